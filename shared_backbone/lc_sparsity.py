"""Sparsity of the 1×1 weights (the LC paper's Eq. 5 and pruning): find them, penalise their L1 norm,
prune them by global magnitude, measure the fraction that is zero.

Works on a module, on an ensemble's stacked member slices ``(K, ...)`` or on a ``{name: tensor}`` dict.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import nn

__all__ = ["pointwise_weights", "l1_penalty", "prune_pointwise", "pointwise_sparsity"]


def _is_pointwise_weight(name: str, t: torch.Tensor) -> bool:
    # (c_out, c_in, 1, 1), or (K, c_out, c_in, 1, 1) stacked over members
    return name.endswith("weight") and t.dim() in (4, 5) and tuple(t.shape[-2:]) == (1, 1)


def pointwise_weights(model_or_slices) -> dict[str, torch.Tensor]:
    """Every 1×1 conv weight: of a module (shortcut 1×1s included), of an ensemble's stacked slices,
    or of a ``{name: tensor}`` slice dict."""
    if isinstance(model_or_slices, nn.Module):
        slices = getattr(model_or_slices, "slices", None)
        if isinstance(slices, nn.ParameterDict):  # an Ensemble / MemberStack: (K, ...) slices
            return {n.replace("::", "."): p for n, p in slices.items() if _is_pointwise_weight(n, p)}
        return {f"{n}.weight": m.weight for n, m in model_or_slices.named_modules()
                if isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (1, 1)}
    if isinstance(model_or_slices, Mapping):
        return {n: t for n, t in model_or_slices.items() if _is_pointwise_weight(n, t)}
    raise TypeError(f"expected an nn.Module, an Ensemble or a dict of tensors, got {type(model_or_slices).__name__}")


def l1_penalty(model_or_slices, lam: float) -> torch.Tensor:
    """``lam · Σ |w|`` over every 1×1 conv weight (the paper's Eq. 5); add it to the loss."""
    if not (isinstance(lam, (int, float)) and lam >= 0 and math.isfinite(lam)):
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    ws = list(pointwise_weights(model_or_slices).values())
    if not ws:
        raise ValueError("no 1x1 conv weight found to regularise")
    return lam * sum(w.abs().sum() for w in ws)


@torch.no_grad()
def prune_pointwise(model: nn.Module, ratio: float) -> dict[str, torch.Tensor]:
    """Global magnitude pruning: zero the ``ratio`` smallest-|w| of all 1×1 weights, in place.

    Returns the keep masks by weight name.
    """
    if not (isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and 0 <= ratio < 1):
        raise ValueError(f"pruning ratio must be in [0, 1) (the fraction of 1x1 weights set to zero), got {ratio!r}")
    ws = pointwise_weights(model)
    if not ws:
        raise ValueError(f"{type(model).__name__} has no 1x1 conv weight to prune")
    flat = torch.cat([w.detach().abs().flatten().float() for w in ws.values()])
    n_prune = int(round(ratio * flat.numel()))
    masks = {}
    if n_prune == 0:
        return {n: torch.ones_like(w, dtype=torch.bool) for n, w in ws.items()}
    threshold = flat.kthvalue(n_prune).values
    # ties at the threshold: prune exactly n_prune, in order
    below = {n: w.abs() < threshold for n, w in ws.items()}
    left = n_prune - sum(int(b.sum()) for b in below.values())
    for n, w in ws.items():
        prune = below[n]
        if left > 0:
            ties = (w.abs() == threshold) & ~prune
            idx = ties.flatten().nonzero().flatten()[:left]
            prune = prune.flatten().clone()
            prune[idx] = True
            prune = prune.view_as(w)
            left -= idx.numel()
        w.masked_fill_(prune, 0.0)
        masks[n] = ~prune
    return masks


def pointwise_sparsity(model_or_slices) -> float:
    """Fraction of exactly-zero entries over all 1×1 weights."""
    ws = list(pointwise_weights(model_or_slices).values())
    total = sum(w.numel() for w in ws)
    return sum(int((w == 0).sum()) for w in ws) / max(total, 1)
