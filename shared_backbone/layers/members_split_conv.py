"""``shared_backbone::members_split_conv2d``: every member's split conv on member-major input, one op.

The ``"dense"`` execution strategy (see :mod:`.execution`) of :mod:`.split_conv` and
:mod:`.member_conv` under ``vmap``: on oneDNN a grouped conv is slow, so each member runs one
dense conv with its merged weight. Called by those ops' vmap rules, not by models.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._layout import cl, members_empty

__all__ = ["members_split_conv2d", "save_split_inputs"]


@torch.library.custom_op("shared_backbone::members_split_conv2d", mutates_args=())
def members_split_conv2d(x: torch.Tensor, wl: torch.Tensor, wf: torch.Tensor, stride: list[int],
                         padding: list[int], dilation: list[int]) -> torch.Tensor:
    """Every member's split conv on member-major ``(K, N, C, H, W)`` input, laid out for CPU kernels.

    On oneDNN a grouped conv is slow, so each member runs one dense conv with its merged weight on its
    own block ``x[k]`` (channels_last on CPU: no copy when the input came from this op), writing into a
    member-major output whose blocks are channels_last too: batch norm, ReLU and residual adds then
    meet one layout end to end, the one the member loop runs in. Shape: ``-> (K, N, c_out, H', W')``.
    """
    k = x.shape[0]
    out = None
    for i in range(k):
        o = F.conv2d(cl(x[i]), cl(torch.cat([wl[i], wf])), None, stride, padding, dilation)
        if out is None:
            out = members_empty(k, o)
        out[i] = o
    return out


@members_split_conv2d.register_fake
def _(x, wl, wf, stride, padding, dilation):
    o = F.conv2d(cl(x[0]), cl(torch.cat([wl[0], wf])), None, stride, padding, dilation)
    return members_empty(x.shape[0], o)


def save_split_inputs(ctx, inputs, output):
    """``setup_context`` of both split-conv ops: the input, both weights and the conv's arguments."""
    x, wl, wf, stride, padding, dilation = inputs
    ctx.save_for_backward(x, wl, wf)
    ctx.args = (stride, padding, dilation)


def _backward(ctx, grad):
    """Per member: the input gradient with its whole weight, the weight gradient for its learned rows."""
    x, wl, wf = ctx.saved_tensors
    stride, padding, dilation = ctx.args
    k, nl = wl.shape[:2]
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    gx = members_empty(k, x[0]) if need_x else None
    gwl = torch.empty_like(wl) if need_w else None
    for i in range(k):
        gi, xi = cl(grad[i]), cl(x[i])
        if need_x:
            gx[i] = torch.ops.aten.convolution_backward(
                gi, xi, cl(torch.cat([wl[i], wf])), None, stride, padding, dilation, False, [0, 0], 1,
                [True, False, False])[0]
        if need_w:
            gwl[i] = torch.ops.aten.convolution_backward(
                cl(gi[:, :nl]), xi, cl(wl[i]), None, stride, padding, dilation, False, [0, 0], 1,
                [False, True, False])[1]
    return gx, gwl, None, None, None, None


members_split_conv2d.register_autograd(_backward, setup_context=save_split_inputs)
