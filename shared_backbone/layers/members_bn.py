"""``shared_backbone::members_batch_norm``: every member's batch norm on member-major input, one op.

What :mod:`.member_bn`'s vmap rule runs when the members' channels do not sit side by side (the
member-major ``(K, N, C, H, W)`` layout of the ``"dense"`` convs). Called by that rule, not by models.
"""
from __future__ import annotations

import torch

from ._layout import grad_format

__all__ = ["members_batch_norm", "save_bn_inputs"]


@torch.library.custom_op("shared_backbone::members_batch_norm", mutates_args=())
def members_batch_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, rm: torch.Tensor | None,
                       rv: torch.Tensor | None, training: bool, eps: float) -> tuple[torch.Tensor, torch.Tensor,
                                                                                      torch.Tensor]:
    """Every member's batch norm on member-major ``(K, N, C, H, W)`` input, written in place member by
    member (no stacking copy), each block in its input's layout. ``w``, ``b``, ``rm``, ``rv``: ``(K, C)``."""
    k = x.shape[0]
    out = torch.empty_like(x)  # x's strides: each member's block in its input's layout (native_batch_norm.out needs it)
    c = x.shape[2] if training else 0
    mean, invstd = w.new_empty(k, c), w.new_empty(k, c)  # the parameters' dtype (float32 under bf16 autocast)
    for i in range(k):
        torch.ops.aten.native_batch_norm.out(x[i], w[i], b[i], None if rm is None else rm[i],
                                             None if rv is None else rv[i], training, 0.0, eps,
                                             out=out[i], save_mean=mean[i], save_invstd=invstd[i])
    return out, mean, invstd


@members_batch_norm.register_fake
def _(x, w, b, rm, rv, training, eps):
    k = x.shape[0]
    c = x.shape[2] if training else 0
    return torch.empty_like(x), w.new_empty(k, c), w.new_empty(k, c)


def save_bn_inputs(ctx, inputs, output):
    """``setup_context`` of both batch-norm ops: what ``native_batch_norm_backward`` reads."""
    x, w, b, rm, rv, training, eps = inputs
    ctx.save_for_backward(x, w, rm, rv, output[1], output[2])
    ctx.args = (training, eps)


def _backward(ctx, grad, _gmean, _ginvstd):
    x, w, rm, rv, mean, invstd = ctx.saved_tensors
    training, eps = ctx.args
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
    k = x.shape[0]
    # every gradient is written in place (the .out kernel needs all three; unneeded ones are dropped)
    gx, gw, gb = torch.empty_like(x), torch.empty_like(w), torch.empty_like(w)
    for i in range(k):
        xi = x[i]
        torch.ops.aten.native_batch_norm_backward.out(
            grad[i].contiguous(memory_format=grad_format(xi)), xi, w[i], None if rm is None else rm[i],
            None if rv is None else rv[i], mean[i], invstd[i], training, eps, [True, True, True],
            out0=gx[i], out1=gw[i], out2=gb[i])
    return (gx if mask[0] else None), (gw if mask[1] else None), (gb if mask[2] else None), None, None, None, None


members_batch_norm.register_autograd(_backward, setup_context=save_bn_inputs)
