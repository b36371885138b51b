"""Hugging Face ``evaluate`` module for ensembles; load with ``shared_backbone.metrics.load_metric("ensemble")``.

Loaded from this local path by ``evaluate.load``, so it works offline (``HF_HUB_OFFLINE=1``).
The computation itself is :func:`shared_backbone.metrics.evaluate_ensemble`.
"""
import datasets
import evaluate
import torch

from shared_backbone.metrics import evaluate_ensemble

_DESCRIPTION = """Ensemble metrics: per-member and ensemble accuracy and NLL, ECE (15 bins), Brier score,
member disagreement, accuracy versus number of members and reliability bins."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: per sample, the member probabilities, a (K, C) nested list or array.
    references: per sample, the integer class label.
Returns:
    the dict of `shared_backbone.metrics.evaluate_ensemble`.
Examples:
    >>> metric = shared_backbone.metrics.load_metric("ensemble")
    >>> metric.compute(predictions=[[[0.9, 0.1], [0.6, 0.4]]], references=[0])["accuracy"]
    1.0
"""

__all__ = ["EnsembleMetrics"]


class EnsembleMetrics(evaluate.Metric):
    """Ensemble metrics over per-sample member probabilities.

    Shape: predictions ``(N, K, C)``, references ``(N,)``.
    """

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("float64"))),
                    "references": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, predictions, references, n_bins: int = 15) -> dict:
        probs = torch.as_tensor(predictions, dtype=torch.float64)  # (N, K, C)
        if probs.dim() != 3:
            raise ValueError(f"predictions must be (N, K, C) member probabilities, got shape {tuple(probs.shape)}")
        logits = probs.clamp_min(1e-300).log().transpose(0, 1)  # (K, N, C); softmax(log p) = p
        return evaluate_ensemble(logits, torch.as_tensor(references, dtype=torch.long), n_bins=n_bins)
