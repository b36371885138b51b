"""``shared_backbone::member_conv2d``: a whole learned conv (groups=1) with a fast batching rule.

Outside ``vmap`` it is ``F.conv2d``. Under ``vmap`` its rule runs K members' convs by the
execution strategy of :mod:`.execution`; torch's own rule for a batched input with a batched
weight reshapes to a grouped conv in NCHW, slow on CPU (its backward most).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._layout import cl, members_copy
from .execution import autocast_inputs, loop_members, strategy
from .members_split_conv import members_split_conv2d

__all__ = ["member_conv2d"]


@torch.library.custom_op("shared_backbone::member_conv2d", mutates_args=())
def _member_conv2d(x: torch.Tensor, w: torch.Tensor, stride: list[int], padding: list[int],
                   dilation: list[int]) -> torch.Tensor:
    return F.conv2d(cl(x), cl(w), None, stride, padding, dilation)


@_member_conv2d.register_fake
def _(x, w, stride, padding, dilation):
    return F.conv2d(cl(x), cl(w), None, stride, padding, dilation)


def _setup(ctx, inputs, output):
    x, w, stride, padding, dilation = inputs
    ctx.save_for_backward(x, w)
    ctx.args = (stride, padding, dilation)


def _backward(ctx, grad):
    x, w = ctx.saved_tensors
    stride, padding, dilation = ctx.args
    gx, gw, _ = torch.ops.aten.convolution_backward(
        cl(grad), cl(x), cl(w), None, stride, padding, dilation, False, [0, 0], 1,
        [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False])
    return gx, gw, None, None, None


_member_conv2d.register_autograd(_backward, setup_context=_setup)


@_member_conv2d.register_vmap
def _(info, in_dims, x, w, stride, padding, dilation):
    xd, wd = in_dims[0], in_dims[1]
    how = strategy(x)
    if how == "loop":
        return loop_members(info.batch_size, _member_conv2d, [(x, xd), (w, wd)], stride, padding, dilation)
    if wd is None:  # one weight for every member: a dense conv over K*N samples, in the input's layout
        return _dense_over_members(x, xd, w, stride, padding, dilation)
    w = w.movedim(wd, 0)  # (K, O, C, kh, kw)
    k = w.shape[0]
    if xd is None:  # one input for every member: a dense conv with K*O outputs
        out = F.conv2d(cl(x), cl(w.flatten(0, 1)), None, stride, padding, dilation)  # (N, K*O, H', W')
        if how == "dense":
            return members_copy(out.unflatten(1, (k, -1)).movedim(1, 0)), 0
        return out.unflatten(1, (k, -1)), 1
    if how == "dense":  # the split conv's per-member op with no fixed rows, member-major
        empty = w.new_empty((0, *w.shape[2:]))
        return members_split_conv2d(x.movedim(xd, 0), w, empty, list(stride), list(padding), list(dilation)), 0
    x = x.movedim(xd, 1)  # (N, K, C, H, W)
    n, _, c, h, wd_ = x.shape
    xg = x.reshape(n, k * c, h, wd_).contiguous(memory_format=torch.channels_last)
    out = F.conv2d(xg, w.flatten(0, 1), None, stride, padding, dilation, k)  # (N, K*O, H', W')
    return out.unflatten(1, (k, -1)), 1


def _dense_over_members(x, xd, w, stride, padding, dilation):
    """One conv with an unbatched weight over every member's samples; the member axis stays where it was
    (0 or 1), so the next element-wise op meets operands in one layout."""
    if xd not in (0, 1):
        x, xd = x.movedim(xd, 0), 0
    out = F.conv2d(x.flatten(0, 1), w, None, stride, padding, dilation)
    return out.unflatten(0, x.shape[:2]), xd


def member_conv2d(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation) -> torch.Tensor:
    """``F.conv2d`` (groups=1) with a fast batching rule. Shape: ``(N, C, H, W) -> (N, O, H', W')``."""
    x, w = autocast_inputs(x, w)
    out = _member_conv2d(x, w, list(stride), list(padding), list(dilation))
    return out if bias is None else out + bias.view(-1, 1, 1)
