"""FLOP counts for the library's custom ops, and FLOPs per image of any model.

``torch.utils.flop_counter.FlopCounterMode`` counts an op only if it has a formula; the convs
the library runs through its own ops (``torch.ops.shared_backbone.*``, defined in
``layers/``) would count 0. Importing this module (the package does) registers a
formula for each, with torch's own conv convention (``2 * N * C_out * C_in/groups * kh * kw *
H_out * W_out``: multiply-adds count 2, bias and batch norm are not counted), so an ensemble is
counted exactly as the plain convs it replaces.

Ops covered (op name: what it computes):

- ``shared_backbone::member_conv2d`` ``(x, w, ...)``: ``conv2d(x, w)``;
- ``shared_backbone::split_conv2d`` ``(x, wl, wf, ...)``: ``conv2d(x, cat([wl, wf]))``;
- ``shared_backbone::members_split_conv2d`` ``(x (K, N, C, H, W), wl (K, n, ...), wf, ...)``
  (member-major): K such convs, one per member;
- ``shared_backbone::member_batch_norm``, ``shared_backbone::members_batch_norm``: no count, as
  torch counts no batch norm.

An op named here that the package does not define is skipped (the module reads the op table,
not the ops' code); an op the package defines without a formula is an error in the tests.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torch import nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from . import layers  # noqa: F401  (defines the ops)

__all__ = ["inference_flops", "FORMULAS", "NOT_COUNTED", "REGISTERED"]

log = logging.getLogger(__name__)


def _conv(x_shape, w_shape, out_shape) -> int:
    """torch's conv count: 2 * N * prod(out spatial) * C_out * C_in_per_group * prod(kernel)."""
    return flop_counter.conv_flop_count(list(x_shape), list(w_shape), list(out_shape))


def _member_conv2d(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return _conv(x_shape, w_shape, out_shape)


def _split_conv2d(x_shape, wl_shape, wf_shape, *args, out_shape=None, **kwargs) -> int:
    w_shape = (wl_shape[0] + wf_shape[0], *wl_shape[1:])  # cat([wl, wf]) along the output channels
    return _conv(x_shape, w_shape, out_shape)


def _members_split_conv2d(x_shape, wl_shape, wf_shape, *args, out_shape=None, **kwargs) -> int:
    k, n = x_shape[:2]  # member-major x: (K, N, C, H, W); out: (K, N, O, H', W'); one conv per member
    w_shape = (wl_shape[1] + wf_shape[0], *wl_shape[2:])
    return k * _conv((n, *x_shape[2:]), w_shape, (n, *out_shape[2:]))


#: op name (in the ``shared_backbone`` namespace) -> its FLOP formula over shapes
FORMULAS: dict[str, Callable[..., int]] = {
    "member_conv2d": _member_conv2d,
    "split_conv2d": _split_conv2d,
    "members_split_conv2d": _members_split_conv2d,
}
#: ops that count no FLOPs on purpose (torch's counter counts no batch norm either)
NOT_COUNTED: tuple[str, ...] = ("member_batch_norm", "members_batch_norm")


def _register() -> list[str]:
    """Register every formula whose op exists; return the names registered (idempotent)."""
    done = []
    for name, formula in FORMULAS.items():
        if not hasattr(torch.ops.shared_backbone, name):
            log.debug("no op shared_backbone::%s; its FLOP formula is not registered", name)
            continue
        packet = getattr(torch.ops.shared_backbone, name)
        if packet not in flop_counter.flop_registry:
            flop_counter.register_flop_formula(packet)(formula)
        done.append(name)
    return done


REGISTERED = _register()


@torch.no_grad()
def inference_flops(model: nn.Module, example: torch.Tensor) -> float:
    """FLOPs per image of one forward pass of ``model`` in eval mode (an ensemble: all its members).

    ``example`` is a batch ``(N, ...)``; the count (torch's ``FlopCounterMode``, with the library's
    ops registered above) is divided by N. Conv and linear multiply-adds count 2 each; batch norm,
    activations and bias adds count nothing, as in torch's counter. The model's train/eval mode is
    restored afterwards.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(example, torch.Tensor) or example.dim() < 1 or example.shape[0] < 1:
        shape = tuple(example.shape) if isinstance(example, torch.Tensor) else type(example).__name__
        raise ValueError(f"example must be a non-empty batch tensor (N, ...), got {shape}")
    was = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(example)
    finally:
        model.train(was)
    total = counter.get_total_flops()
    if not math.isfinite(total):
        raise ValueError(f"FLOP count is not finite: {total}")
    return total / example.shape[0]
