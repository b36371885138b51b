"""``shared_backbone::split_conv2d``: one conv whose first rows are learned and the rest fixed.

``conv2d(x, cat([wl, wf]))`` that computes the weight gradient for the learned rows ``wl`` only.
Under ``vmap`` (learned rows per member, fixed rows shared) its rule runs the fixed rows once
where it can, and K members' convs by the execution strategy of :mod:`.execution`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._layout import cl, members_empty
from .execution import autocast_inputs, loop_members, strategy
from .members_split_conv import members_split_conv2d, save_split_inputs

__all__ = ["split_conv2d"]


@torch.library.custom_op("shared_backbone::split_conv2d", mutates_args=())
def _split_conv2d(x: torch.Tensor, wl: torch.Tensor, wf: torch.Tensor, stride: list[int], padding: list[int],
                  dilation: list[int]) -> torch.Tensor:
    return F.conv2d(cl(x), cl(torch.cat([wl, wf])), None, stride, padding, dilation)


@_split_conv2d.register_fake
def _(x, wl, wf, stride, padding, dilation):
    return F.conv2d(cl(x), cl(torch.cat([wl, wf])), None, stride, padding, dilation)


def _backward(ctx, grad):
    # the input gradient needs the whole weight; the weight gradient only the learned rows
    x, wl, wf = ctx.saved_tensors
    stride, padding, dilation = ctx.args
    n = wl.shape[0]
    grad, x = cl(grad), cl(x)
    gx = gwl = None
    if ctx.needs_input_grad[0]:
        gx = torch.ops.aten.convolution_backward(
            grad, x, cl(torch.cat([wl, wf])), None, stride, padding, dilation, False, [0, 0], 1,
            [True, False, False])[0]
    if ctx.needs_input_grad[1]:  # channels_last: oneDNN's weight gradient of a few rows is cheap only there
        gwl = torch.ops.aten.convolution_backward(
            cl(grad[:, :n]), x, cl(wl), None, stride, padding, dilation, False, [0, 0], 1, [False, True, False])[1]
    return gx, gwl, None, None, None, None


_split_conv2d.register_autograd(_backward, setup_context=save_split_inputs)


@_split_conv2d.register_vmap
def _(info, in_dims, x, wl, wf, stride, padding, dilation):
    xd, ld, fd = in_dims[0], in_dims[1], in_dims[2]
    how = strategy(x)
    if how == "loop" or fd is not None or ld is None:  # or unusual: batched fixed rows, unbatched learned ones
        return loop_members(info.batch_size, _split_conv2d, [(x, xd), (wl, ld), (wf, fd)], stride, padding, dilation)
    wl = wl.movedim(ld, 0)  # (K, n, C, kh, kw)
    k = wl.shape[0]
    if xd is None:
        return _shared_input(x, wl, wf, stride, padding, dilation, how)
    if how == "dense":  # oneDNN: dense convs per member beat a grouped conv
        return members_split_conv2d(x.movedim(xd, 0), wl, wf, list(stride), list(padding), list(dilation)), 0
    x = x.movedim(xd, 1)  # (N, K, C, H, W)
    n, _, c, h, w = x.shape
    xg = x.reshape(n, k * c, h, w).contiguous(memory_format=torch.channels_last)
    out_l = F.conv2d(xg, wl.flatten(0, 1), None, stride, padding, dilation, k).unflatten(1, (k, -1))  # (N, K, n, ...)
    out_f = F.conv2d(x.flatten(0, 1), wf, None, stride, padding, dilation)  # (N*K, c-n, H', W')
    out_f = out_f.unflatten(0, (n, k))  # (N, K, c-n, H', W')
    return torch.cat([out_l, out_f], dim=2), 1


def _shared_input(x, wl, wf, stride, padding, dilation, how):
    """One input for every member: learned rows of all members in one dense conv, fixed rows once."""
    k = wl.shape[0]
    out_l = F.conv2d(cl(x), cl(wl.flatten(0, 1)), None, stride, padding, dilation).unflatten(1, (k, -1))
    out_f = F.conv2d(cl(x), cl(wf), None, stride, padding, dilation).unsqueeze(1)  # (N, 1, c-n, H, W)
    if how == "dense":  # member-major: (K, N, c, H', W'), each member's block channels_last on CPU
        nl = out_l.shape[2]
        out = members_empty(k, out_f[:, 0], out_l.shape[2] + out_f.shape[2])
        out[:, :, :nl] = out_l.movedim(1, 0)
        out[:, :, nl:] = out_f.movedim(1, 0)
        return out, 0
    return torch.cat([out_l, out_f.expand(-1, k, -1, -1, -1)], dim=2), 1  # (N, K, c, H', W')


def split_conv2d(x: torch.Tensor, wl: torch.Tensor, wf: torch.Tensor, stride, padding, dilation) -> torch.Tensor:
    """``conv2d(x, cat([wl, wf]))`` that computes the weight gradient for ``wl`` only; fast under vmap.

    Shape: ``(N, C, H, W)``, ``wl (n, C, kh, kw)``, ``wf (O - n, C, kh, kw)`` -> ``(N, O, H', W')``.
    """
    x, wl, wf = autocast_inputs(x, wl, wf)
    return _split_conv2d(x, wl, wf, list(stride), list(padding), list(dilation))
