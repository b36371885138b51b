"""Sparse checkpoints: a state dict in safetensors, each mostly-zero tensor stored as a packed bitmask
(1 bit per entry) plus its non-zero values. Written and read with :mod:`shared_backbone.io`'s
atomic, checked safetensors functions; public as ``shared_backbone.lc.save_sparse`` / ``load_sparse``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from torch import nn

from .io import load_tensors, save_tensors
from .schema import safe_text

__all__ = ["save_sparse", "load_sparse"]

_MASK, _VALUES = "::mask", "::values"


def save_sparse(path: str | Path, tensors: Mapping[str, torch.Tensor] | nn.Module, meta: Mapping | None = None,
                *, min_zero_fraction: float = 0.1) -> Path:
    """Write a state dict to safetensors, atomically; a tensor with at least ``min_zero_fraction``
    zeros is stored as a packed bitmask (1 bit per entry) plus its non-zero values.

    Load with :func:`load_sparse`. A module's state dict has a shared tensor (``W_s``) once.
    """
    state = tensors.state_dict() if isinstance(tensors, nn.Module) else dict(tensors)
    out, shapes = {}, {}
    for name, t in state.items():
        t = t.detach().cpu()
        zeros = int((t == 0).sum()) if t.is_floating_point() and t.numel() else 0
        if t.numel() >= 64 and zeros >= min_zero_fraction * t.numel():
            mask = (t != 0).flatten()
            out[name + _MASK] = torch.from_numpy(np.packbits(mask.numpy()))
            out[name + _VALUES] = t.flatten()[mask].clone()
            shapes[name] = list(t.shape)
        else:
            out[name] = t
    return save_tensors(path, out, {**dict(meta or {}), "sparse_shapes": shapes})


def load_sparse(path: str | Path, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Read a file of :func:`save_sparse`: ``(dense state dict, meta)``.

    Every recorded shape is checked against its mask and values on disk before a dense tensor is
    allocated: a header cannot make this allocate more than the file's own bits describe.
    """
    raw, meta = load_tensors(path)
    shapes = meta.pop("sparse_shapes", {})
    if not isinstance(shapes, dict):
        raise ValueError(f"{path}: sparse_shapes must be an object of name -> shape, got {type(shapes).__name__}")
    state = {n: t for n, t in raw.items() if not n.endswith((_MASK, _VALUES))}
    for name, shape in shapes.items():
        if name + _MASK not in raw or name + _VALUES not in raw:
            raise ValueError(f"{path}: sparse tensor {safe_text(name)!r} lacks its mask or values")
        if not (isinstance(shape, list) and len(shape) <= 8
                and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise ValueError(f"{path}: sparse tensor {safe_text(name)!r} has shape {safe_text(shape)}; "
                             "accepted: a list of at most 8 integers >= 0")
        n = math.prod(shape)
        packed, values = raw[name + _MASK], raw[name + _VALUES]
        if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (n + 7) // 8:
            raise ValueError(f"{path}: sparse tensor {safe_text(name)!r} has shape {shape} ({n:,} entries) but its "
                             f"mask holds {packed.numel() * 8:,} bits; the file is corrupt")
        mask = torch.from_numpy(np.unpackbits(packed.numpy(), count=n).astype(bool))
        if int(mask.sum()) != values.numel() or values.dim() != 1:
            raise ValueError(f"{path}: sparse tensor {safe_text(name)!r} has {int(mask.sum())} set bits but "
                             f"{values.numel()} values")
        dense = torch.zeros(n, dtype=values.dtype)
        dense[mask] = values
        state[name] = dense.view(shape)
    return {n: t.to(device) for n, t in state.items()}, meta
