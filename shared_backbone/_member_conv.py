"""``member_conv2d``: a conv2d whose vmap rule runs members' convs as one channels_last grouped conv.

torch's own batching rule for a batched input with a batched weight reshapes to a grouped conv
in NCHW, which is slow on CPU (most of all its backward). This op's vmap rule lays the grouped
input out channels_last, where oneDNN's grouped kernels are fast. Outside vmap it is
``F.conv2d``. The ops its vmap rule runs are ordinary differentiable ops, so autograd through
a vmapped call needs nothing more; the autograd formula below serves unbatched calls.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["member_conv2d", "split_conv2d"]


@torch.library.custom_op("shared_backbone::member_conv2d", mutates_args=())
def _member_conv2d(x: torch.Tensor, w: torch.Tensor, stride: list[int], padding: list[int],
                   dilation: list[int]) -> torch.Tensor:
    return F.conv2d(x, w, None, stride, padding, dilation)


@_member_conv2d.register_fake
def _(x, w, stride, padding, dilation):
    return F.conv2d(x, w, None, stride, padding, dilation)


def _setup(ctx, inputs, output):
    x, w, stride, padding, dilation = inputs
    ctx.save_for_backward(x, w)
    ctx.args = (stride, padding, dilation)


def _backward(ctx, grad):
    x, w = ctx.saved_tensors
    stride, padding, dilation = ctx.args
    gx, gw, _ = torch.ops.aten.convolution_backward(
        grad, x, w, None, stride, padding, dilation, False, [0, 0], 1,
        [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False])
    return gx, gw, None, None, None


_member_conv2d.register_autograd(_backward, setup_context=_setup)


@_member_conv2d.register_vmap
def _(info, in_dims, x, w, stride, padding, dilation):
    xd, wd = in_dims[0], in_dims[1]
    if wd is None:  # one weight for every member: a dense conv over K*N samples
        x = x.movedim(xd, 0)
        out = F.conv2d(x.flatten(0, 1), w, None, stride, padding, dilation)
        return out.unflatten(0, (x.shape[0], -1)), 0
    w = w.movedim(wd, 0)  # (K, O, C, kh, kw)
    k = w.shape[0]
    if xd is None:  # one input for every member: a dense conv with K*O outputs
        out = F.conv2d(x, w.flatten(0, 1), None, stride, padding, dilation)
        return out.unflatten(1, (k, -1)), 1
    x = x.movedim(xd, 1)  # (N, K, C, H, W)
    n, _, c, h, wd_ = x.shape
    xg = x.reshape(n, k * c, h, wd_).contiguous(memory_format=torch.channels_last)
    out = F.conv2d(xg, w.flatten(0, 1), None, stride, padding, dilation, k)  # (N, K*O, H', W')
    return out.unflatten(1, (k, -1)), 1


def member_conv2d(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation) -> torch.Tensor:
    """``F.conv2d`` (groups=1) with a fast batching rule. Shape: ``(N, C, H, W) -> (N, O, H', W')``."""
    out = _member_conv2d(x, w, list(stride), list(padding), list(dilation))
    return out if bias is None else out + bias.view(-1, 1, 1)


# -- split conv: learned rows and fixed rows of one conv, as one op ---------------------------------
@torch.library.custom_op("shared_backbone::split_conv2d", mutates_args=())
def _split_conv2d(x: torch.Tensor, wl: torch.Tensor, wf: torch.Tensor, stride: list[int], padding: list[int],
                  dilation: list[int]) -> torch.Tensor:
    return F.conv2d(x, torch.cat([wl, wf]), None, stride, padding, dilation)


@_split_conv2d.register_fake
def _(x, wl, wf, stride, padding, dilation):
    return F.conv2d(x, torch.cat([wl, wf]), None, stride, padding, dilation)


def _split_setup(ctx, inputs, output):
    x, wl, wf, stride, padding, dilation = inputs
    ctx.save_for_backward(x, wl, wf)
    ctx.args = (stride, padding, dilation)


def _split_backward(ctx, grad):
    # the input gradient needs the whole weight; the weight gradient only the learned rows
    x, wl, wf = ctx.saved_tensors
    stride, padding, dilation = ctx.args
    n = wl.shape[0]
    gx = gwl = None
    if ctx.needs_input_grad[0]:
        gx = torch.ops.aten.convolution_backward(
            grad, x, torch.cat([wl, wf]), None, stride, padding, dilation, False, [0, 0], 1, [True, False, False])[0]
    if ctx.needs_input_grad[1]:
        gwl = torch.ops.aten.convolution_backward(
            grad[:, :n].contiguous(), x, wl, None, stride, padding, dilation, False, [0, 0], 1, [False, True, False])[1]
    return gx, gwl, None, None, None, None


_split_conv2d.register_autograd(_split_backward, setup_context=_split_setup)


@_split_conv2d.register_vmap
def _(info, in_dims, x, wl, wf, stride, padding, dilation):
    xd, ld, fd = in_dims[0], in_dims[1], in_dims[2]
    if fd is not None or ld is None:  # unusual: batched fixed rows or unbatched learned ones
        k = info.batch_size
        x = x.movedim(xd, 0) if xd is not None else x.expand(k, *x.shape)
        wl = wl.movedim(ld, 0) if ld is not None else wl.expand(k, *wl.shape)
        wf = wf.movedim(fd, 0) if fd is not None else wf.expand(k, *wf.shape)
        out = torch.stack([F.conv2d(x[i], torch.cat([wl[i], wf[i]]), None, stride, padding, dilation) for i in range(k)])
        return out, 0
    wl = wl.movedim(ld, 0)  # (K, n, C, kh, kw)
    k = wl.shape[0]
    if xd is None:  # shared input: learned rows of all members in one dense conv, fixed rows once
        out_l = F.conv2d(x, wl.flatten(0, 1), None, stride, padding, dilation).unflatten(1, (k, -1))  # (N, K, n, H, W)
        out_f = F.conv2d(x, wf, None, stride, padding, dilation).unsqueeze(1)  # (N, 1, c-n, H, W)
        return torch.cat([out_l, out_f.expand(-1, k, -1, -1, -1)], dim=2), 1
    x = x.movedim(xd, 1)  # (N, K, C, H, W)
    n, _, c, h, w = x.shape
    xg = x.reshape(n, k * c, h, w).contiguous(memory_format=torch.channels_last)
    out_l = F.conv2d(xg, wl.flatten(0, 1), None, stride, padding, dilation, k).unflatten(1, (k, -1))  # (N, K, n, ...)
    out_f = F.conv2d(x.flatten(0, 1), wf, None, stride, padding, dilation)  # (N*K, c-n, H', W')
    out_f = out_f.unflatten(0, (n, k))  # (N, K, c-n, H', W')
    return torch.cat([out_l, out_f], dim=2), 1


def split_conv2d(x: torch.Tensor, wl: torch.Tensor, wf: torch.Tensor, stride, padding, dilation) -> torch.Tensor:
    """``conv2d(x, cat([wl, wf]))`` that computes the weight gradient for ``wl`` only; fast under vmap.

    Shape: ``(N, C, H, W)``, ``wl (n, C, kh, kw)``, ``wf (O - n, C, kh, kw)`` -> ``(N, O, H', W')``.
    """
    return _split_conv2d(x, wl, wf, list(stride), list(padding), list(dilation))
