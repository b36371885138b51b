"""How the member ops run K members at once under ``vmap``: the execution strategy switch.

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

Also here, for the ops' vmap rules: :func:`strategy` (the setting resolved for a tensor's device),
:func:`loop_members` (the ``"loop"`` strategy) and :func:`autocast_inputs`.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

__all__ = ["CONV_EXECUTIONS", "conv_execution", "get_conv_execution", "set_conv_execution"]

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


def strategy(x: torch.Tensor) -> str:
    """The strategy a vmap rule runs for input ``x``: the setting, with ``"auto"`` resolved by device."""
    how = _setting["execution"]
    if how == "auto":
        return "grouped" if x.is_cuda else "dense"
    return how


def loop_members(k: int, op, args: list[tuple[torch.Tensor, int | None]], *rest) -> tuple[torch.Tensor, int]:
    """Member by member: ``op`` on each member's unbatched tensors (shared ones as they are), stacked on dim 0."""
    per = [[t] * k if d is None else t.unbind(d) for t, d in args]  # unbind: one stacking backward
    outs = [op(*(p[i] for p in per), *rest) for i in range(k)]
    return torch.stack(outs), 0


def autocast_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Under autocast, the inputs in the autocast dtype, as ``F.conv2d`` would have them (a custom op
    is not cast by autocast itself, and its backward must see one dtype)."""
    dev = tensors[0].device.type
    if not torch.is_autocast_enabled(dev):
        return tensors
    dtype = torch.get_autocast_dtype(dev)
    return tuple(t.to(dtype) for t in tensors)
