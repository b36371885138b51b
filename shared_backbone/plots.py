"""Figures for ensemble reports: reliability diagram and accuracy versus number of members."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from .metrics import evaluate_ensemble

__all__ = ["plot_ensemble_report", "new_figure", "save_png"]

_REQUIRED = ("reliability", "ece", "accuracy_vs_members", "mean_member_accuracy")


def plot_ensemble_report(
    report: Mapping[str, Any] | Tensor, path: str | os.PathLike, labels: Tensor | None = None,
    *, baseline: Mapping[str, Any] | None = None,
) -> Path:
    """Write a two-panel PNG: reliability diagram (ECE in the title) and accuracy vs members.

    ``report`` is a dict from :func:`~shared_backbone.metrics.evaluate_ensemble`, or member
    logits together with ``labels``. ``baseline``, the metrics of the equal-cost baseline
    (``results["baseline"]["metrics"]`` of the main job), adds its accuracy and ECE. The file is
    written to a temporary name and moved into place atomically. Returns the path written.

    Shape: logits ``(K, N, C)``, labels ``(N,)``.
    """
    if isinstance(report, Tensor):
        if labels is None:
            raise ValueError("plot_ensemble_report got logits without labels; pass labels=")
        report = evaluate_ensemble(report, labels)
    missing = [k for k in _REQUIRED if k not in report]
    if missing:
        raise ValueError(f"report lacks {', '.join(missing)}; expected a dict from evaluate_ensemble")

    rel = report["reliability"]
    n_bins = len(rel["count"])
    width = 1.0 / n_bins
    centers = [(i + 0.5) * width for i in range(n_bins)]
    acc_curve = report["accuracy_vs_members"]
    members = list(range(1, len(acc_curve) + 1))

    fig = new_figure((10, 4.2))
    ax_rel, ax_k = fig.subplots(1, 2)
    ax_rel.bar(centers, rel["accuracy"], width=width, edgecolor="black", label="accuracy")
    ax_rel.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    ax_rel.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy")
    same_cost = f"; same-cost baseline {baseline['ece']:.3f}" if baseline else ""
    ax_rel.set_title(f"Reliability (ECE = {report['ece']:.3f}{same_cost})")
    ax_rel.legend(loc="upper left")

    ax_k.plot(members, acc_curve, "o-", label="ensemble")
    ax_k.axhline(report["mean_member_accuracy"], color="gray", linestyle="--", label="mean member")
    if baseline:
        n = baseline.get("num_members", 1)
        ax_k.axhline(baseline["accuracy"], color="red", linestyle=":",
                     label=f"{n} full model{'s' if n > 1 else ''}, same cost")
    ax_k.set(xlabel="number of members", ylabel="accuracy", title="Accuracy vs members")
    ax_k.set_xticks(members)
    ax_k.legend(loc="lower right")
    fig.tight_layout()
    return save_png(fig, path)


def new_figure(figsize: tuple[float, float]) -> Figure:
    """A bare Agg figure: no pyplot global state, no window, whatever backend the user set."""
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: str | os.PathLike) -> Path:
    """Write ``fig`` as a PNG to a temporary name beside ``path``, then move it into place atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png", prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
