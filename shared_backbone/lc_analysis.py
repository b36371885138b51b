"""Analyses of the LC paper: filter variance entropy, reconstructed filters, 1×1 histograms, FGSM.

Figures are written with a bare matplotlib Agg ``Figure`` (no pyplot state), atomically.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers.lc_conv import LCConv2d, lc_layers
from .lc_sparsity import pointwise_weights
from .plots import new_figure, save_png

__all__ = [
    "filter_variance_entropy", "randomness_threshold", "normalized_fve", "sparse_filter_fraction", "fve_report",
    "reconstructed_filters", "per_position_variance", "pointwise_histograms", "Normalize", "fgsm_accuracy",
    "plot_filter_grid", "plot_position_variance", "plot_pointwise_histograms",
]

# the randomness threshold of 3×3 filters (DESIGN.md, from the first author's filter-quality package)
THRESHOLD_3X3 = {"l": 1.2618047, "x0": 2.30436435, "kappa": 0.88767525, "b": -0.31050834}


def _as_filters(weight: torch.Tensor) -> torch.Tensor:
    if weight.dim() != 4:
        raise ValueError(f"expected a conv weight (c_out, c_in, k, k), got shape {tuple(weight.shape)}")
    return weight.detach().double().reshape(-1, weight.shape[-2] * weight.shape[-1])  # (n, k²)


def filter_variance_entropy(weight: torch.Tensor) -> float:
    """Entropy (log10) of the variance spectrum of a layer's ``n = c_out·c_in`` k×k filters.

    Rows centred over filters; singular values ``s``; ``v = s²/(n-1)``; ``r = v/Σv``;
    ``H = -Σ r log10 r``: 0 when every filter is the same shape, at most ``log10 k²``.
    """
    f = _as_filters(weight)
    n = f.shape[0]
    if n < 2:
        raise ValueError(f"filter variance entropy needs at least 2 filters, got {n}")
    s = torch.linalg.svdvals(f - f.mean(dim=0, keepdim=True))
    v = s ** 2 / (n - 1)
    total = v.sum()
    if total <= 0:
        return 0.0
    r = v / total
    r = r[r > 0]
    return float(-(r * torch.log10(r)).sum())


def randomness_threshold(n: int) -> float:
    """``T(n)``: the entropy below which ``n`` 3×3 filters are less diverse than random ones."""
    if n < 1:
        raise ValueError(f"n (number of filters) must be >= 1, got {n!r}")
    c = THRESHOLD_3X3
    return c["l"] / (1 + math.exp(-c["kappa"] * (math.log2(n) - c["x0"]))) + c["b"]


def normalized_fve(weight: torch.Tensor) -> float:
    """``H / T(n)`` for 3×3 filters: >= 1 random-like, 0 collapsed. Other sizes: use the raw entropy."""
    if tuple(weight.shape[-2:]) != (3, 3):
        raise ValueError(f"the randomness threshold is defined for 3x3 filters only, got "
                         f"{tuple(weight.shape[-2:])}; use filter_variance_entropy for the raw value")
    return filter_variance_entropy(weight) / randomness_threshold(weight.shape[0] * weight.shape[1])


def sparse_filter_fraction(weight: torch.Tensor, rel: float = 0.01) -> float:
    """Fraction of filters whose every |w| is below ``rel`` times the layer's largest |w|."""
    f = _as_filters(weight).abs()
    top = f.max()
    if top == 0:
        return 1.0
    return float((f.max(dim=1).values < rel * top).double().mean())


def fve_report(model: nn.Module) -> dict[str, dict]:
    """Per spatial conv (LC-Blocks: their reconstructed ``P·W``): entropy, normalised (3×3), sparsity."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, LCConv2d):
            w = reconstructed_filters(m)
        elif isinstance(m, nn.Conv2d) and m.kernel_size[0] * m.kernel_size[1] > 1 and not name.endswith(".spatial"):
            w = m.weight.detach()
        else:
            continue
        k = w.shape[-1]
        out[name] = {"fve": filter_variance_entropy(w), "n": w.shape[0] * w.shape[1], "k": k,
                     "normalized_fve": normalized_fve(w) if k == 3 and w.shape[-2] == 3 else None,
                     "sparse_filters": sparse_filter_fraction(w)}
    return out


@torch.no_grad()
def reconstructed_filters(layer: LCConv2d) -> torch.Tensor:
    """The k×k filters an LC-Block effectively applies, ``scale · P·W``. Shape: ``(c_out, c_in, k, k)``."""
    if not isinstance(layer, LCConv2d):
        raise TypeError(f"expected an LCConv2d, got {type(layer).__name__}")
    return layer.fused_weight().detach()


def per_position_variance(weight: torch.Tensor) -> torch.Tensor:
    """Variance of each kernel position over all ``c_out·c_in`` filters (the paper's Figure 13). Shape: ``(k, k)``."""
    f = _as_filters(weight)
    return f.var(dim=0).view(weight.shape[-2], weight.shape[-1]).float()


def pointwise_histograms(model: nn.Module, bins: int = 50, range_: tuple[float, float] | None = None) -> dict[str, dict]:
    """Histogram of every 1×1 weight, per layer (the paper's Figure 16): ``{name: {counts, edges}}``."""
    ws = pointwise_weights(model)
    if not ws:
        raise ValueError("no 1x1 conv weight found")
    if range_ is None:
        top = max(float(w.detach().abs().max()) for w in ws.values()) or 1.0
        range_ = (-top, top)
    out = {}
    for n, w in ws.items():
        counts = torch.histc(w.detach().float().flatten(), bins=bins, min=range_[0], max=range_[1])
        out[n] = {"counts": counts.tolist(), "edges": torch.linspace(range_[0], range_[1], bins + 1).tolist(),
                  "near_zero": float((w.detach().abs() < 0.01 * (range_[1] or 1.0)).float().mean())}
    return out


# -- robustness ------------------------------------------------------------------------------------
class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, so a model takes inputs in [0, 1]. Shape: unchanged."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(-1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


def fgsm_accuracy(model: nn.Module, data, eps: float = 1 / 255, *, batch_size: int = 500) -> dict:
    """Accuracy on clean and on FGSM inputs ``clamp(x + eps·sign(∇x loss), 0, 1)``.

    ``data``: a :class:`~shared_backbone.data.TensorData` (normalised; it is mapped back to [0, 1]
    and ``model`` wrapped in :class:`Normalize`), or ``(x, y)`` with ``x`` in [0, 1] and the
    normalisation inside ``model``. A ``(K, N, C)`` output (an ensemble) is attacked through its
    mean probability.
    """
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"eps must be a number >= 0 (in [0, 1] pixel units), got {eps!r}")
    if hasattr(data, "mean") and hasattr(data, "x") and not isinstance(data, (tuple, list)):
        mean = torch.tensor(data.mean).view(1, -1, 1, 1)
        std = torch.tensor(data.std).view(1, -1, 1, 1)
        x_all, y_all = data.x * std.to(data.x) + mean.to(data.x), data.y
        model = Normalize(model, data.mean, data.std).to(x_all.device)
    else:
        x_all, y_all = data
        if x_all.min() < 0 or x_all.max() > 1:
            raise ValueError(f"FGSM inputs must lie in [0, 1] (normalise inside the model), got range "
                             f"[{float(x_all.min()):.3g}, {float(x_all.max()):.3g}]")
    was = model.training
    model.eval()
    clean = adv = 0
    for i in range(0, len(y_all), batch_size):
        x = x_all[i:i + batch_size].detach().clone().requires_grad_(True)
        y = y_all[i:i + batch_size]
        logp = _log_probs(model(x))
        F.nll_loss(logp, y).backward()
        with torch.no_grad():
            clean += int((logp.argmax(-1) == y).sum())
            x_adv = (x + eps * x.grad.sign()).clamp(0, 1)
            adv += int((_log_probs(model(x_adv)).argmax(-1) == y).sum())
    model.train(was)
    n = len(y_all)
    return {"eps": eps, "clean_accuracy": clean / n, "fgsm_accuracy": adv / n, "n": n}


def _log_probs(out: torch.Tensor) -> torch.Tensor:
    if out.dim() == 3:  # (K, N, C): the ensemble's mean probability
        return torch.logsumexp(out.log_softmax(-1), dim=0) - math.log(out.shape[0])
    return out.log_softmax(-1)


# -- figures -----------------------------------------------------------------------------------------
def plot_filter_grid(filters: Mapping[str, torch.Tensor], path: str | os.PathLike, *, n: int = 12,
                     in_channel: int = 0) -> Path:
    """One row per entry (e.g. ``{"E=1": w, "E=16": w, "learned": w}``), the first ``n`` filters
    (input channel ``in_channel``), each scaled to its own max |w| (the paper's Figures 12 and 14)."""
    rows = list(filters.items())
    if not rows:
        raise ValueError("plot_filter_grid needs at least one set of filters")
    fig = new_figure((n * 0.8 + 1.2, len(rows) * 0.9 + 0.3))
    axes = fig.subplots(len(rows), n, squeeze=False)
    for r, (label, w) in enumerate(rows):
        w = w.detach().float()
        for c in range(n):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < w.shape[0]:
                f = w[c, min(in_channel, w.shape[1] - 1)]
                a = float(f.abs().max()) or 1.0
                ax.imshow(f.numpy(), cmap="seismic", vmin=-a, vmax=a)
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)


def plot_position_variance(weights: Mapping[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Per-position variance heat maps, one panel per entry (the paper's Figure 13)."""
    items = list(weights.items())
    fig = new_figure((2.4 * len(items), 2.6))
    axes = fig.subplots(1, len(items), squeeze=False)[0]
    for ax, (label, w) in zip(axes, items):
        v = per_position_variance(w)
        im = ax.imshow((v / v.max()).numpy(), cmap="viridis", vmin=0, vmax=1)
        ax.set_title(label, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=list(axes), shrink=0.8)
    return save_png(fig, path)


def plot_pointwise_histograms(model: nn.Module, path: str | os.PathLike, bins: int = 50, max_layers: int = 20) -> Path:
    """Histograms of the 1×1 weights of each LC-Block (log counts), the paper's Figure 16."""
    names = [f"{n}.pointwise.weight" for n in lc_layers(model)] or list(pointwise_weights(model))
    hist = pointwise_histograms(model, bins)
    names = [n for n in names if n in hist][:max_layers]
    cols = min(5, len(names))
    rows = math.ceil(len(names) / cols)
    fig = new_figure((3 * cols, 2.2 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, name in zip(axes.flat, names):
        h = hist[name]
        edges = h["edges"]
        ax.bar(edges[:-1], [max(c, 0.5) for c in h["counts"]], width=edges[1] - edges[0], align="edge")
        ax.set_yscale("log")
        ax.set_title(name.replace("stages.", "").replace(".pointwise.weight", ""), fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    return save_png(fig, path)
