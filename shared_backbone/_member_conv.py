"""Custom ops that run K members' convs and batch norms fast under ``vmap``.

``member_conv2d`` (a whole learned conv), ``split_conv2d`` (a conv whose first rows are learned and
the rest fixed) and ``member_batch_norm``. Outside ``vmap`` each is the plain torch op. Under
``vmap`` their batching rules choose how K members' convs run; torch's own rule for a batched
input with a batched weight reshapes to a grouped conv in NCHW, slow on CPU (its backward most).

Execution strategies for a batched input with batched weights (:data:`CONV_EXECUTIONS`):
  ``"grouped"``  one grouped conv (K groups) over a channels_last input; a split conv's fixed rows
                 as one dense conv over K·N samples. What ``"auto"`` picks on CUDA.
  ``"dense"``    one dense conv per member with its merged weight, inside one op that writes the
                 ``(N, K, C, H, W)`` layout batch norm reads as ``(N, K·C, H, W)``. ``"auto"`` on CPU
                 (oneDNN's grouped kernels and its convs with a handful of outputs are slow).
  ``"loop"``     no batching: each member's unbatched op in turn, stacked (the fallback torch's
                 rules would otherwise need; also what unusual ``in_dims`` use under every setting).
Whatever the setting, a shared input with batched weights runs the learned rows of every member
as one dense conv with K·n outputs and the fixed rows once ("fixed rows once"); an unbatched
weight runs one dense conv over K·N samples. Every strategy gives the plain module's results;
``tests/test_ops.py`` runs each against it. Select one with :func:`conv_execution`.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F

__all__ = ["member_conv2d", "split_conv2d", "member_batch_norm", "CONV_EXECUTIONS", "conv_execution",
           "get_conv_execution", "set_conv_execution"]

# -- execution strategy ---------------------------------------------------------------------------
CONV_EXECUTIONS = ("auto", "grouped", "dense", "loop")
_setting = {"execution": "auto"}


def get_conv_execution() -> str:
    """The execution strategy the vmap rules use now (one of :data:`CONV_EXECUTIONS`)."""
    return _setting["execution"]


def set_conv_execution(name: str) -> str:
    """Set the members' conv execution strategy for this process; returns the previous one."""
    if name not in CONV_EXECUTIONS:
        raise ValueError(f"conv execution must be one of {CONV_EXECUTIONS}, got {name!r}")
    old, _setting["execution"] = _setting["execution"], name
    return old


@contextlib.contextmanager
def conv_execution(name: str) -> Iterator[None]:
    """Run the block with execution strategy ``name`` (``"auto"``, ``"grouped"``, ``"dense"``, ``"loop"``).

    Applies to calls made (forward) inside the block; autograd's backward follows what the forward ran.
    """
    old = set_conv_execution(name)
    try:
        yield
    finally:
        set_conv_execution(old)


def _strategy(x: torch.Tensor) -> str:
    how = _setting["execution"]
    if how == "auto":
        return "grouped" if x.is_cuda else "dense"
    return how


def _cl(t: torch.Tensor) -> torch.Tensor:
    """On CPU, ``t`` (4-d) in channels_last: oneDNN's convs, their weight gradients above all, and batch
    norm are several times faster there than in NCHW, and element-wise ops keep the layout, so
    activations stay channels_last from the first member conv on. Elsewhere ``t`` as it is."""
    if t.device.type == "cpu" and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    return t


def _loop(k: int, op, args: list[tuple[torch.Tensor, int | None]], *rest) -> tuple[torch.Tensor, int]:
    """Member by member: ``op`` on each member's unbatched tensors (shared ones as they are), stacked on dim 0."""
    per = [[t] * k if d is None else t.unbind(d) for t, d in args]  # unbind: one stacking backward
    outs = [op(*(p[i] for p in per), *rest) for i in range(k)]
    return torch.stack(outs), 0


@torch.library.custom_op("shared_backbone::member_conv2d", mutates_args=())
def _member_conv2d(x: torch.Tensor, w: torch.Tensor, stride: list[int], padding: list[int],
                   dilation: list[int]) -> torch.Tensor:
    return F.conv2d(_cl(x), _cl(w), None, stride, padding, dilation)


@_member_conv2d.register_fake
def _(x, w, stride, padding, dilation):
    return F.conv2d(_cl(x), _cl(w), None, stride, padding, dilation)


def _setup(ctx, inputs, output):
    x, w, stride, padding, dilation = inputs
    ctx.save_for_backward(x, w)
    ctx.args = (stride, padding, dilation)


def _backward(ctx, grad):
    x, w = ctx.saved_tensors
    stride, padding, dilation = ctx.args
    gx, gw, _ = torch.ops.aten.convolution_backward(
        _cl(grad), _cl(x), _cl(w), None, stride, padding, dilation, False, [0, 0], 1,
        [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False])
    return gx, gw, None, None, None


_member_conv2d.register_autograd(_backward, setup_context=_setup)


@_member_conv2d.register_vmap
def _(info, in_dims, x, w, stride, padding, dilation):
    xd, wd = in_dims[0], in_dims[1]
    how = _strategy(x)
    if how == "loop":
        return _loop(info.batch_size, _member_conv2d, [(x, xd), (w, wd)], stride, padding, dilation)
    if wd is None:  # one weight for every member: a dense conv over K*N samples, in the input's layout
        return _dense_over_members(x, xd, w, stride, padding, dilation)
    w = w.movedim(wd, 0)  # (K, O, C, kh, kw)
    k = w.shape[0]
    if xd is None:  # one input for every member: a dense conv with K*O outputs
        out = F.conv2d(_cl(x), _cl(w.flatten(0, 1)), None, stride, padding, dilation)  # (N, K*O, H', W')
        if how == "dense":
            return _members_copy(out.unflatten(1, (k, -1)).movedim(1, 0)), 0
        return out.unflatten(1, (k, -1)), 1
    if how == "dense":  # the split conv's per-member op with no fixed rows, member-major
        empty = w.new_empty((0, *w.shape[2:]))
        return _members_split_conv2d(x.movedim(xd, 0), w, empty, list(stride), list(padding), list(dilation)), 0
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
    x, w = _autocast(x, w)
    out = _member_conv2d(x, w, list(stride), list(padding), list(dilation))
    return out if bias is None else out + bias.view(-1, 1, 1)


# -- split conv: learned rows and fixed rows of one conv, as one op ---------------------------------
@torch.library.custom_op("shared_backbone::split_conv2d", mutates_args=())
def _split_conv2d(x: torch.Tensor, wl: torch.Tensor, wf: torch.Tensor, stride: list[int], padding: list[int],
                  dilation: list[int]) -> torch.Tensor:
    return F.conv2d(_cl(x), _cl(torch.cat([wl, wf])), None, stride, padding, dilation)


@_split_conv2d.register_fake
def _(x, wl, wf, stride, padding, dilation):
    return F.conv2d(_cl(x), _cl(torch.cat([wl, wf])), None, stride, padding, dilation)


def _split_setup(ctx, inputs, output):
    x, wl, wf, stride, padding, dilation = inputs
    ctx.save_for_backward(x, wl, wf)
    ctx.args = (stride, padding, dilation)


def _split_backward(ctx, grad):
    # the input gradient needs the whole weight; the weight gradient only the learned rows
    x, wl, wf = ctx.saved_tensors
    stride, padding, dilation = ctx.args
    n = wl.shape[0]
    grad, x = _cl(grad), _cl(x)
    gx = gwl = None
    if ctx.needs_input_grad[0]:
        gx = torch.ops.aten.convolution_backward(
            grad, x, _cl(torch.cat([wl, wf])), None, stride, padding, dilation, False, [0, 0], 1,
            [True, False, False])[0]
    if ctx.needs_input_grad[1]:  # channels_last: oneDNN's weight gradient of a few rows is cheap only there
        gwl = torch.ops.aten.convolution_backward(
            _cl(grad[:, :n]), x, _cl(wl), None, stride, padding, dilation, False, [0, 0], 1, [False, True, False])[1]
    return gx, gwl, None, None, None, None


_split_conv2d.register_autograd(_split_backward, setup_context=_split_setup)


@_split_conv2d.register_vmap
def _(info, in_dims, x, wl, wf, stride, padding, dilation):
    xd, ld, fd = in_dims[0], in_dims[1], in_dims[2]
    how = _strategy(x)
    if how == "loop" or fd is not None or ld is None:  # or unusual: batched fixed rows, unbatched learned ones
        return _loop(info.batch_size, _split_conv2d, [(x, xd), (wl, ld), (wf, fd)], stride, padding, dilation)
    wl = wl.movedim(ld, 0)  # (K, n, C, kh, kw)
    k = wl.shape[0]
    if xd is None:  # shared input: learned rows of all members in one dense conv, fixed rows once
        out_l = F.conv2d(_cl(x), _cl(wl.flatten(0, 1)), None, stride, padding, dilation).unflatten(1, (k, -1))
        out_f = F.conv2d(_cl(x), _cl(wf), None, stride, padding, dilation).unsqueeze(1)  # (N, 1, c-n, H, W)
        if how == "dense":  # member-major: (K, N, c, H', W'), each member's block channels_last on CPU
            nl = out_l.shape[2]
            out = _members_empty(k, out_f[:, 0], out_l.shape[2] + out_f.shape[2])
            out[:, :, :nl] = out_l.movedim(1, 0)
            out[:, :, nl:] = out_f.movedim(1, 0)
            return out, 0
        return torch.cat([out_l, out_f.expand(-1, k, -1, -1, -1)], dim=2), 1  # (N, K, c, H', W')
    if how == "dense":  # oneDNN: dense convs per member beat a grouped conv
        return _members_split_conv2d(x.movedim(xd, 0), wl, wf, list(stride), list(padding), list(dilation)), 0
    x = x.movedim(xd, 1)  # (N, K, C, H, W)
    n, _, c, h, w = x.shape
    xg = x.reshape(n, k * c, h, w).contiguous(memory_format=torch.channels_last)
    out_l = F.conv2d(xg, wl.flatten(0, 1), None, stride, padding, dilation, k).unflatten(1, (k, -1))  # (N, K, n, ...)
    out_f = F.conv2d(x.flatten(0, 1), wf, None, stride, padding, dilation)  # (N*K, c-n, H', W')
    out_f = out_f.unflatten(0, (n, k))  # (N, K, c-n, H', W')
    return torch.cat([out_l, out_f], dim=2), 1


@torch.library.custom_op("shared_backbone::members_split_conv2d", mutates_args=())
def _members_split_conv2d(x: torch.Tensor, wl: torch.Tensor, wf: torch.Tensor, stride: list[int],
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
        o = F.conv2d(_cl(x[i]), _cl(torch.cat([wl[i], wf])), None, stride, padding, dilation)
        if out is None:
            out = _members_empty(k, o)
        out[i] = o
    return out


@_members_split_conv2d.register_fake
def _(x, wl, wf, stride, padding, dilation):
    o = F.conv2d(_cl(x[0]), _cl(torch.cat([wl[0], wf])), None, stride, padding, dilation)
    return _members_empty(x.shape[0], o)


def _members_empty(k: int, like: torch.Tensor, channels: int | None = None) -> torch.Tensor:
    """An empty member-major ``(K, N, C, H, W)`` tensor shaped like ``like`` (N, C, H, W) per member,
    each member's block channels_last on CPU (contiguous elsewhere)."""
    n, c, h, w = like.shape
    c = c if channels is None else channels
    if like.device.type == "cpu":  # not a permuted view: autograd lets in-place ops (ReLU) write into it
        return like.new_empty_strided((k, n, c, h, w), (n * h * w * c, h * w * c, 1, w * c, c))
    return like.new_empty((k, n, c, h, w))


def _members_copy(t: torch.Tensor) -> torch.Tensor:
    """``t`` (K, N, C, H, W) copied into the member-major layout of :func:`_members_empty`."""
    out = _members_empty(t.shape[0], t[0])
    out.copy_(t)
    return out


def _members_setup(ctx, inputs, output):
    x, wl, wf, stride, padding, dilation = inputs
    ctx.save_for_backward(x, wl, wf)
    ctx.args = (stride, padding, dilation)


def _members_backward(ctx, grad):
    """Per member: the input gradient with its whole weight, the weight gradient for its learned rows."""
    x, wl, wf = ctx.saved_tensors
    stride, padding, dilation = ctx.args
    k, nl = wl.shape[:2]
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    gx = _members_empty(k, x[0]) if need_x else None
    gwl = torch.empty_like(wl) if need_w else None
    for i in range(k):
        gi, xi = _cl(grad[i]), _cl(x[i])
        if need_x:
            gx[i] = torch.ops.aten.convolution_backward(
                gi, xi, _cl(torch.cat([wl[i], wf])), None, stride, padding, dilation, False, [0, 0], 1,
                [True, False, False])[0]
        if need_w:
            gwl[i] = torch.ops.aten.convolution_backward(
                _cl(gi[:, :nl]), xi, _cl(wl[i]), None, stride, padding, dilation, False, [0, 0], 1,
                [False, True, False])[1]
    return gx, gwl, None, None, None, None


_members_split_conv2d.register_autograd(_members_backward, setup_context=_members_setup)


def split_conv2d(x: torch.Tensor, wl: torch.Tensor, wf: torch.Tensor, stride, padding, dilation) -> torch.Tensor:
    """``conv2d(x, cat([wl, wf]))`` that computes the weight gradient for ``wl`` only; fast under vmap.

    Shape: ``(N, C, H, W)``, ``wl (n, C, kh, kw)``, ``wf (O - n, C, kh, kw)`` -> ``(N, O, H', W')``.
    """
    x, wl, wf = _autocast(x, wl, wf)
    return _split_conv2d(x, wl, wf, list(stride), list(padding), list(dilation))


def _autocast(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Under autocast, the inputs in the autocast dtype, as ``F.conv2d`` would have them (a custom op
    is not cast by autocast itself, and its backward must see one dtype)."""
    dev = tensors[0].device.type
    if not torch.is_autocast_enabled(dev):
        return tensors
    dtype = torch.get_autocast_dtype(dev)
    return tuple(t.to(dtype) for t in tensors)


# -- member batch norm: every member's channels as one (N, K*C, H, W) batch norm ---------------------
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


def _bn_setup(ctx, inputs, output):
    x, w, b, rm, rv, training, eps = inputs
    ctx.save_for_backward(x, w, rm, rv, output[1], output[2])
    ctx.args = (training, eps)


def _bn_backward(ctx, grad, _gmean, _ginvstd):
    x, w, rm, rv, mean, invstd = ctx.saved_tensors
    training, eps = ctx.args
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
    fmt = torch.channels_last if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(
        memory_format=torch.channels_last) else torch.contiguous_format
    gx, gw, gb = torch.ops.aten.native_batch_norm_backward(grad.contiguous(memory_format=fmt), x, w, rm, rv, mean, invstd,
                                                            training, eps, mask)
    return gx, gw, gb, None, None, None, None


_member_batch_norm.register_autograd(_bn_backward, setup_context=_bn_setup)


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
        out, mean, invstd = _members_batch_norm(x.movedim(1, 0), *per, training, eps)  # (K, N, C, ...)
        return (out, mean, invstd), (0, 0 if training else None, 0 if training else None)
    x2 = x.reshape(n, k * c, *rest)  # a view when the members' channels already sit side by side
    out, mean, invstd = torch.ops.aten.native_batch_norm(
        x2, _per_member(w, wd, k), _per_member(b, bd, k), _per_member(rm, md, k), _per_member(rv, vd, k),
        training, 0.0, eps)
    stats = (mean.view(k, c), invstd.view(k, c)) if training else (mean, invstd)
    return (out.view(n, k, c, *rest), *stats), (1, 0 if training else None, 0 if training else None)


@torch.library.custom_op("shared_backbone::members_batch_norm", mutates_args=())
def _members_batch_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, rm: torch.Tensor | None,
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


@_members_batch_norm.register_fake
def _(x, w, b, rm, rv, training, eps):
    k = x.shape[0]
    c = x.shape[2] if training else 0
    return torch.empty_like(x), w.new_empty(k, c), w.new_empty(k, c)


def _members_bn_setup(ctx, inputs, output):
    x, w, b, rm, rv, training, eps = inputs
    ctx.save_for_backward(x, w, rm, rv, output[1], output[2])
    ctx.args = (training, eps)


def _members_bn_backward(ctx, grad, _gmean, _ginvstd):
    x, w, rm, rv, mean, invstd = ctx.saved_tensors
    training, eps = ctx.args
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
    k = x.shape[0]
    # every gradient is written in place (the .out kernel needs all three; unneeded ones are dropped)
    gx, gw, gb = torch.empty_like(x), torch.empty_like(w), torch.empty_like(w)
    for i in range(k):
        xi = x[i]
        fmt = torch.channels_last if xi.dim() == 4 and not xi.is_contiguous() and xi.is_contiguous(
            memory_format=torch.channels_last) else torch.contiguous_format
        torch.ops.aten.native_batch_norm_backward.out(
            grad[i].contiguous(memory_format=fmt), xi, w[i], None if rm is None else rm[i],
            None if rv is None else rv[i], mean[i], invstd[i], training, eps, [True, True, True],
            out0=gx[i], out1=gw[i], out2=gb[i])
    return (gx if mask[0] else None), (gw if mask[1] else None), (gb if mask[2] else None), None, None, None, None


_members_batch_norm.register_autograd(_members_bn_backward, setup_context=_members_bn_setup)


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
