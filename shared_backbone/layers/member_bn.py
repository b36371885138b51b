"""``shared_backbone::member_batch_norm``: every member's channels normalised as one batch norm.

Outside ``vmap`` it is ``F.batch_norm``. Under ``vmap`` its rule normalises the members' channels
as one ``(N, K·C, H, W)`` batch where they sit side by side, and hands the member-major layout
of the ``"dense"`` convs to :mod:`.members_bn`.
"""
from __future__ import annotations

import torch

from ._layout import grad_format
from .members_bn import members_batch_norm, save_bn_inputs

__all__ = ["member_batch_norm"]


@torch.library.custom_op("shared_backbone::member_batch_norm", mutates_args=())
def _member_batch_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, rm: torch.Tensor | None,
                       rv: torch.Tensor | None, training: bool, eps: float) -> tuple[torch.Tensor, torch.Tensor,
                                                                                      torch.Tensor]:
    out, mean, invstd = torch.ops.aten.native_batch_norm(x, w, b, rm, rv, training, 0.0, eps)
    return out, mean, invstd


@_member_batch_norm.register_fake
def _(x, w, b, rm, rv, training, eps):
    c = x.shape[1] if training else 0
    return torch.empty_like(x), x.new_empty(c), x.new_empty(c)


def _backward(ctx, grad, _gmean, _ginvstd):
    x, w, rm, rv, mean, invstd = ctx.saved_tensors
    training, eps = ctx.args
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
    gx, gw, gb = torch.ops.aten.native_batch_norm_backward(grad.contiguous(memory_format=grad_format(x)), x, w, rm,
                                                            rv, mean, invstd, training, eps, mask)
    return gx, gw, gb, None, None, None, None


_member_batch_norm.register_autograd(_backward, setup_context=save_bn_inputs)


def _per_member(t: torch.Tensor | None, d: int | None, k: int) -> torch.Tensor | None:
    """A per-channel tensor as ``(K*C,)``: batched ones flattened, shared ones repeated."""
    if t is None:
        return None
    return t.movedim(d, 0).reshape(-1) if d is not None else t.repeat(k)


@_member_batch_norm.register_vmap
def _(info, in_dims, x, w, b, rm, rv, training, eps):
    k = info.batch_size
    xd, wd, bd, md, vd = in_dims[:5]
    x = x.movedim(xd, 1) if xd is not None else x.unsqueeze(1).expand(-1, k, *x.shape[1:])  # (N, K, C, ...)
    n, _, c, *rest = x.shape
    if x.stride(1) != c * x.stride(2):  # members' channels not side by side (member-major): one per member
        per = [None if t is None else t.movedim(d, 0) if d is not None else t.expand(k, *t.shape)
               for t, d in ((w, wd), (b, bd), (rm, md), (rv, vd))]
        out, mean, invstd = members_batch_norm(x.movedim(1, 0), *per, training, eps)  # (K, N, C, ...)
        return (out, mean, invstd), (0, 0 if training else None, 0 if training else None)
    x2 = x.reshape(n, k * c, *rest)  # a view when the members' channels already sit side by side
    out, mean, invstd = torch.ops.aten.native_batch_norm(
        x2, _per_member(w, wd, k), _per_member(b, bd, k), _per_member(rm, md, k), _per_member(rv, vd, k),
        training, 0.0, eps)
    stats = (mean.view(k, c), invstd.view(k, c)) if training else (mean, invstd)
    return (out.view(n, k, c, *rest), *stats), (1, 0 if training else None, 0 if training else None)


def member_batch_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_mean: torch.Tensor | None,
                      running_var: torch.Tensor | None, training: bool, momentum: float,
                      eps: float) -> torch.Tensor:
    """``F.batch_norm`` with a fast batching rule: members' channels normalised as one ``(N, K*C)`` batch.

    torch's own rule moves the member axis around and applies the affine part in separate strided
    element-wise ops; this one keeps the layout the member convs produce and runs one kernel.
    Running statistics are updated in place as ``F.batch_norm`` does (momentum, unbiased variance).
    Shape: ``(N, C, ...) -> (N, C, ...)``.
    """
    if training:
        out, mean, invstd = _member_batch_norm(x, weight, bias, None, None, True, eps)
        if running_mean is not None:
            with torch.no_grad():
                count = x.numel() // x.shape[1]
                var = (invstd.pow(-2) - eps) * (count / max(count - 1, 1))
                running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
                running_var.mul_(1 - momentum).add_(var, alpha=momentum)
        return out
    return _member_batch_norm(x, weight, bias, running_mean, running_var, False, eps)[0]
