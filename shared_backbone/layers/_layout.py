"""Memory layouts the member ops agree on: channels_last on CPU, and the member-major block layout.

A member-major tensor ``(K, N, C, H, W)`` holds each member's ``(N, C, H, W)`` block in one piece,
channels_last on CPU, so that batch norm, ReLU and residual adds meet one layout end to end;
gradients are made in their input's layout (:func:`grad_format`).
"""
from __future__ import annotations

import torch


def cl(t: torch.Tensor) -> torch.Tensor:
    """On CPU, ``t`` (4-d) in channels_last: oneDNN's convs, their weight gradients above all, and batch
    norm are several times faster there than in NCHW, and element-wise ops keep the layout, so
    activations stay channels_last from the first member conv on. Elsewhere ``t`` as it is."""
    if t.device.type == "cpu" and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    return t


def members_empty(k: int, like: torch.Tensor, channels: int | None = None) -> torch.Tensor:
    """An empty member-major ``(K, N, C, H, W)`` tensor shaped like ``like`` (N, C, H, W) per member,
    each member's block channels_last on CPU (contiguous elsewhere)."""
    n, c, h, w = like.shape
    c = c if channels is None else channels
    if like.device.type == "cpu":  # not a permuted view: autograd lets in-place ops (ReLU) write into it
        return like.new_empty_strided((k, n, c, h, w), (n * h * w * c, h * w * c, 1, w * c, c))
    return like.new_empty((k, n, c, h, w))


def members_copy(t: torch.Tensor) -> torch.Tensor:
    """``t`` (K, N, C, H, W) copied into the member-major layout of :func:`members_empty`."""
    out = members_empty(t.shape[0], t[0])
    out.copy_(t)
    return out


def grad_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format for a gradient of ``x``: channels_last where ``x`` is (4-d, not NCHW-contiguous)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format
