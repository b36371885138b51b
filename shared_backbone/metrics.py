"""Metrics for ensembles of K members: accuracy, NLL, calibration, diversity, OOD detection.

Member outputs come in as logits ``(K, N, C)`` with integer labels ``(N,)``; single-model
metrics take probabilities ``(N, C)`` (for an ensemble, :func:`ensemble_probs`). Summaries
returned by :func:`evaluate_ensemble` are plain Python numbers, ready for JSON.

Conventions, where the literature differs:

- **NLL** of an ensemble is ``-mean_n log((1/K) sum_k softmax(z_k)[y_n])``, computed in log space
  (``logsumexp`` over members of ``log_softmax`` minus ``log K``, float64, no clamp): a
  confidently wrong ensemble is charged its full loss instead of ``-log(1e-12) = 27.6``.
- **FPR@95** comes in both conventions, under keys that say which:
  ``ood_fpr95_<score>`` takes the *in-distribution* samples as positives (ODIN, Liang et al.
  2018; Hendrycks & Gimpel): the fraction of OOD samples still accepted when 95 % of the
  in-distribution test set is accepted. ``ood_fpr95_ood_positive_<score>`` takes the *OOD*
  samples as positives (torch-uncertainty's ``FPR95(pos_label=1)``, anomaly-seg): the fraction
  of in-distribution samples flagged when 95 % of the OOD set is flagged. Both: lower is
  better; they differ, often widely, on the same scores.
- **AUROC** does not depend on which side is positive (the score's sign flips with it).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchmetrics.functional.classification import binary_auroc, multiclass_calibration_error

__all__ = [
    "ensemble_probs",
    "accuracy",
    "nll",
    "ensemble_nll",
    "brier",
    "ece",
    "reliability_bins",
    "disagreement",
    "mutual_information",
    "ood_scores",
    "ood_auroc",
    "fpr_at_95_tpr",
    "accuracy_vs_members",
    "evaluate_ensemble",
    "load_metric",
    "COMBINES",
    "OOD_SCORES",
    "FPR_POSITIVES",
]

COMBINES = ("mean", "vote")
OOD_SCORES = ("max_prob", "mutual_info")
FPR_POSITIVES = ("in", "ood")  # which side FPR@95 counts as positive: see the module docstring

# weight of the mean-probability pseudo-vote that breaks ties in ``combine="vote"``
_VOTE_TIE_WEIGHT = 1e-3
_EVALUATE_MODULES = Path(__file__).resolve().parent / "evaluate_modules"
_METRIC_MODULES = ("ensemble",)


# --------------------------------------------------------------------------- checks


def _check_logits(logits: Tensor) -> None:
    if not isinstance(logits, Tensor) or logits.dim() != 3:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a (K, N, C) tensor, got shape {shape}")
    if min(logits.shape) == 0:
        raise ValueError(f"logits must be non-empty, got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got dtype {logits.dtype}")


def _check_probs(probs: Tensor) -> None:
    if not isinstance(probs, Tensor) or probs.dim() != 2 or min(probs.shape) == 0:
        shape = tuple(probs.shape) if isinstance(probs, Tensor) else type(probs).__name__
        raise ValueError(f"probs must be a non-empty (N, C) tensor, got shape {shape}")
    if not probs.is_floating_point():
        raise ValueError(f"probs must be floating point, got dtype {probs.dtype}")


def _check_labels(labels: Tensor, n: int, num_classes: int) -> None:
    if not isinstance(labels, Tensor) or labels.dim() != 1:
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"labels must be a (N,) tensor, got shape {shape}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}")
    if labels.numel() != n:
        raise ValueError(f"labels has {labels.numel()} entries but predictions have N={n}")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        bad = lo if lo < 0 else hi
        raise ValueError(f"label {bad} is out of range for C={num_classes} classes (expected 0..{num_classes - 1})")


def _check_scores(scores: Tensor, name: str) -> Tensor:
    scores = torch.as_tensor(scores)
    if scores.dim() != 1 or scores.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor, got shape {tuple(scores.shape)}")
    return scores.double()


# --------------------------------------------------------------------------- combining


def ensemble_probs(logits: Tensor, combine: str = "mean") -> Tensor:
    """Combine member logits into ensemble class probabilities.

    ``"mean"`` averages the members' softmax. ``"vote"`` gives the fraction of members whose
    argmax is each class, plus a pseudo-vote of weight 1e-3 carrying the mean probability, so
    rows sum to 1, the argmax is the majority vote with ties broken by mean probability, and
    values differ from the exact vote fractions by less than 1e-3 / K.

    Shape: logits ``(K, N, C)`` -> ``(N, C)``.
    """
    _check_logits(logits)
    if combine not in COMBINES:
        raise ValueError(f"unknown combine {combine!r}; accepted: {', '.join(COMBINES)}")
    mean = logits.softmax(dim=-1).mean(dim=0)  # (N, C)
    if combine == "mean":
        return mean
    k, _, c = logits.shape
    counts = torch.nn.functional.one_hot(logits.argmax(dim=-1), c).sum(dim=0).to(mean.dtype)  # (N, C)
    return (counts + _VOTE_TIE_WEIGHT * mean) / (k + _VOTE_TIE_WEIGHT)


# --------------------------------------------------------------------------- single prediction


def accuracy(probs: Tensor, labels: Tensor) -> float:
    """Fraction of samples whose argmax class equals the label.

    Shape: probs ``(N, C)`` (probabilities or logits), labels ``(N,)`` -> scalar.
    """
    _check_probs(probs)
    _check_labels(labels, probs.shape[0], probs.shape[1])
    return float((probs.argmax(dim=-1) == labels).double().mean())


def nll(probs: Tensor, labels: Tensor, eps: float = 0.0) -> float:
    """Mean negative log-likelihood of the labels, ``-mean log p[y]``, in float64.

    Unclamped by default: a probability of exactly 0 gives ``inf``. ``eps > 0`` clamps ``p[y]``
    at ``eps`` first (the old behaviour was ``eps=1e-12``). For an ensemble's logits use
    :func:`ensemble_nll`, which never rounds a small probability to 0.

    Shape: probs ``(N, C)``, labels ``(N,)`` -> scalar.
    """
    _check_probs(probs)
    _check_labels(labels, probs.shape[0], probs.shape[1])
    if not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number >= 0 (0 = no clamp), got {eps!r}")
    p_true = probs.double().gather(1, labels[:, None].long()).squeeze(1)
    return float(-(p_true.clamp_min(eps) if eps else p_true).log().mean())


def ensemble_nll(logits: Tensor, labels: Tensor) -> float:
    """NLL of the mean-probability ensemble, ``-mean_n log((1/K) sum_k softmax(z_k)[y_n])``.

    Computed in log space in float64 (``logsumexp_k log_softmax(z_k)[y] - log K``), so it stays
    exact when every member gives the label a probability far below float32's smallest number;
    with K = 1 it is the member's own NLL.

    Shape: logits ``(K, N, C)``, labels ``(N,)`` -> scalar.
    """
    _check_logits(logits)
    _check_labels(labels, logits.shape[1], logits.shape[2])
    logp = logits.double().log_softmax(dim=-1)  # (K, N, C)
    idx = labels.long()[None, :, None].expand(logits.shape[0], -1, 1)
    logp_true = logp.gather(2, idx).squeeze(2)  # (K, N)
    return float(-(torch.logsumexp(logp_true, dim=0) - math.log(logits.shape[0])).mean())


def brier(probs: Tensor, labels: Tensor) -> float:
    """Brier score: squared error to the one-hot label, summed over classes, mean over samples.

    Shape: probs ``(N, C)``, labels ``(N,)`` -> scalar.
    """
    _check_probs(probs)
    _check_labels(labels, probs.shape[0], probs.shape[1])
    onehot = torch.nn.functional.one_hot(labels.long(), probs.shape[1]).double()
    return float(((probs.double() - onehot) ** 2).sum(dim=1).mean())


def ece(probs: Tensor, labels: Tensor, n_bins: int = 15) -> float:
    """Expected calibration error of the top-1 confidence: equal-width bins, l1 norm.

    Computed by torchmetrics' ``multiclass_calibration_error``; bins are ``[lo, hi)``.

    Shape: probs ``(N, C)`` (rows sum to 1), labels ``(N,)`` -> scalar.
    """
    _check_probs(probs)
    _check_labels(labels, probs.shape[0], probs.shape[1])
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    return float(
        multiclass_calibration_error(
            probs.double(), labels.long(), num_classes=probs.shape[1], n_bins=n_bins, norm="l1"
        )
    )


def reliability_bins(probs: Tensor, labels: Tensor, n_bins: int = 15) -> dict[str, list]:
    """Per-bin mean confidence, accuracy and count of the top-1 prediction.

    Bins split ``[0, 1]`` into ``n_bins`` equal ``[lo, hi)`` intervals, the last one closed.
    Empty bins report confidence and accuracy 0.0 with count 0.

    Shape: probs ``(N, C)``, labels ``(N,)`` -> lists of length ``n_bins``.
    """
    _check_probs(probs)
    _check_labels(labels, probs.shape[0], probs.shape[1])
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    conf, pred = probs.double().max(dim=1)  # (N,)
    correct = (pred == labels).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)  # same edges as torchmetrics
    idx = (torch.bucketize(conf, edges, right=True) - 1).clamp(0, n_bins - 1)
    count = torch.zeros(n_bins, dtype=torch.float64).scatter_add_(0, idx, torch.ones_like(conf))
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).scatter_add_(0, idx, conf)
    acc_sum = torch.zeros(n_bins, dtype=torch.float64).scatter_add_(0, idx, correct)
    denom = count.clamp_min(1.0)
    return {
        "confidence": (conf_sum / denom).tolist(),
        "accuracy": (acc_sum / denom).tolist(),
        "count": [int(c) for c in count.tolist()],
    }


# --------------------------------------------------------------------------- diversity, uncertainty


def disagreement(logits: Tensor) -> float:
    """Mean over member pairs of the fraction of samples where their argmax classes differ.

    A single member disagrees with nobody: 0.0.

    Shape: logits ``(K, N, C)`` -> scalar.
    """
    _check_logits(logits)
    k = logits.shape[0]
    if k < 2:
        return 0.0
    pred = logits.argmax(dim=-1)  # (K, N)
    differ = (pred[:, None, :] != pred[None, :, :]).double().mean(dim=-1)  # (K, K)
    return float(differ.sum() / (k * (k - 1)))


def mutual_information(logits: Tensor) -> Tensor:
    """Per-sample mutual information: entropy of the mean prob minus the mean member entropy.

    Shape: logits ``(K, N, C)`` -> ``(N,)``, in nats, >= 0.
    """
    _check_logits(logits)
    logp = logits.double().log_softmax(dim=-1)  # (K, N, C)
    member_entropy = -(logp.exp() * logp).sum(dim=-1).mean(dim=0)  # (N,)
    log_mean = torch.logsumexp(logp, dim=0) - math.log(logits.shape[0])  # (N, C)
    total_entropy = -(log_mean.exp() * log_mean).sum(dim=-1)  # (N,)
    return (total_entropy - member_entropy).clamp_min(0.0).to(logits.dtype)


# --------------------------------------------------------------------------- OOD detection


def ood_scores(logits: Tensor, kind: str = "max_prob") -> Tensor:
    """Per-sample in-distribution score: higher means more in-distribution.

    ``"max_prob"``: largest class probability of the mean ensemble.
    ``"mutual_info"``: the *negative* mutual information (members agreeing -> higher score).

    Shape: logits ``(K, N, C)`` -> ``(N,)``.
    """
    if kind not in OOD_SCORES:
        raise ValueError(f"unknown OOD score kind {kind!r}; accepted: {', '.join(OOD_SCORES)}")
    if kind == "max_prob":
        return ensemble_probs(logits, "mean").max(dim=-1).values
    return -mutual_information(logits)


def ood_auroc(scores_in: Tensor, scores_out: Tensor) -> float:
    """AUROC of telling in-distribution (positive) from OOD samples by score; ties count 0.5.

    Shape: scores_in ``(N_in,)``, scores_out ``(N_out,)`` -> scalar in [0, 1].
    """
    s_in, s_out = _check_scores(scores_in, "scores_in"), _check_scores(scores_out, "scores_out")
    scores = torch.cat([s_in, s_out])
    # map to dense ranks in [0, 1]: order and ties kept exactly, and torchmetrics never
    # applies its sigmoid (which would saturate large scores into false ties)
    _, rank = torch.unique(scores, sorted=True, return_inverse=True)
    preds = rank.double() / max(int(rank.max()), 1)
    target = torch.cat([torch.ones_like(s_in), torch.zeros_like(s_out)]).long()
    return float(binary_auroc(preds, target))


def fpr_at_95_tpr(scores_in: Tensor, scores_out: Tensor, positive: str = "in") -> float:
    """False positive rate at 95 % true positive rate, the positives being ``positive``'s side.

    Scores are in-distribution scores (higher = more in-distribution, as :func:`ood_scores`).

    ``positive="in"`` (ODIN's convention; the ``ood_fpr95_<score>`` keys): a sample is accepted
    when its score is >= the highest threshold that accepts >= 95 % of ``scores_in``; returns
    the fraction of ``scores_out`` accepted.

    ``positive="ood"`` (torch-uncertainty's ``FPR95(pos_label=1)``; the
    ``ood_fpr95_ood_positive_<score>`` keys): a sample is flagged OOD when its score is <= the
    lowest threshold that flags >= 95 % of ``scores_out``; returns the fraction of ``scores_in``
    flagged. Ties are never split: every sample at the threshold counts, in both conventions.

    Shape: scores_in ``(N_in,)``, scores_out ``(N_out,)`` -> scalar in [0, 1].
    """
    if positive not in FPR_POSITIVES:
        raise ValueError(f"positive must be one of {', '.join(FPR_POSITIVES)} (which side FPR@95 counts as "
                         f"positive), got {positive!r}")
    s_in, s_out = _check_scores(scores_in, "scores_in"), _check_scores(scores_out, "scores_out")
    if positive == "ood":  # the same computation with the roles swapped and the score negated
        s_in, s_out = -s_out, -s_in
    n_keep = math.ceil(0.95 * s_in.numel() - 1e-9)
    threshold = s_in.sort(descending=True).values[n_keep - 1]
    return float((s_out >= threshold).double().mean())


# --------------------------------------------------------------------------- summaries


def accuracy_vs_members(logits: Tensor, labels: Tensor) -> list[float]:
    """Mean-ensemble accuracy using the first 1, 2, ..., K members.

    Shape: logits ``(K, N, C)``, labels ``(N,)`` -> list of length K.
    """
    _check_logits(logits)
    _check_labels(labels, logits.shape[1], logits.shape[2])
    running = logits.softmax(dim=-1).cumsum(dim=0)  # (K, N, C); argmax unaffected by 1/k
    return [accuracy(running[k], labels) for k in range(logits.shape[0])]


def evaluate_ensemble(
    logits: Tensor, labels: Tensor, ood_logits: Tensor | None = None, n_bins: int = 15
) -> dict[str, Any]:
    """All ensemble metrics as plain Python numbers (JSON-ready).

    Keys: ``num_members``, ``member_accuracy``, ``member_nll`` (lists of K),
    ``mean_member_accuracy``, ``accuracy``, ``nll`` (:func:`ensemble_nll`, unclamped), ``ece``,
    ``brier`` (of the mean ensemble), ``disagreement``, ``accuracy_vs_members``, ``reliability``
    (see :func:`reliability_bins`); with ``ood_logits`` also, for each kind in
    :data:`OOD_SCORES`: ``ood_auroc_<kind>``, ``ood_fpr95_<kind>`` (FPR@95 with the
    in-distribution samples positive, ODIN's convention) and ``ood_fpr95_ood_positive_<kind>``
    (OOD samples positive, torch-uncertainty's convention); see the module docstring.

    Shape: logits ``(K, N, C)``, labels ``(N,)``, ood_logits ``(K, M, C)``.
    """
    _check_logits(logits)
    _check_labels(labels, logits.shape[1], logits.shape[2])
    member_probs = logits.softmax(dim=-1)  # (K, N, C)
    probs = member_probs.mean(dim=0)  # (N, C)
    member_acc = [accuracy(p, labels) for p in member_probs]
    report: dict[str, Any] = {
        "num_members": int(logits.shape[0]),
        "member_accuracy": member_acc,
        "member_nll": [ensemble_nll(z[None], labels) for z in logits],
        "mean_member_accuracy": sum(member_acc) / len(member_acc),
        "accuracy": accuracy(probs, labels),
        "nll": ensemble_nll(logits, labels),
        "ece": ece(probs, labels, n_bins),
        "brier": brier(probs, labels),
        "disagreement": disagreement(logits),
        "accuracy_vs_members": accuracy_vs_members(logits, labels),
        "reliability": reliability_bins(probs, labels, n_bins),
    }
    if ood_logits is not None:
        _check_logits(ood_logits)
        if ood_logits.shape[0] != logits.shape[0] or ood_logits.shape[2] != logits.shape[2]:
            raise ValueError(
                f"ood_logits shape {tuple(ood_logits.shape)} does not match K={logits.shape[0]}, "
                f"C={logits.shape[2]} of logits"
            )
        for kind in OOD_SCORES:
            s_in, s_out = ood_scores(logits, kind), ood_scores(ood_logits, kind)
            report[f"ood_auroc_{kind}"] = ood_auroc(s_in, s_out)
            report[f"ood_fpr95_{kind}"] = fpr_at_95_tpr(s_in, s_out, positive="in")
            report[f"ood_fpr95_ood_positive_{kind}"] = fpr_at_95_tpr(s_in, s_out, positive="ood")
    return report


def load_metric(name: str, **load_kwargs: Any):
    """Load the local Hugging Face ``evaluate`` module ``name``; works with ``HF_HUB_OFFLINE=1``.

    ``"ensemble"`` takes ``predictions`` of per-sample member probabilities ``(K, C)`` and
    integer ``references`` and computes :func:`evaluate_ensemble`. ``load_kwargs`` go to
    ``evaluate.load`` (e.g. ``keep_in_memory=True``, ``experiment_id``).
    """
    if name not in _METRIC_MODULES:
        raise ValueError(f"unknown metric module {name!r}; available: {', '.join(_METRIC_MODULES)}")
    import evaluate  # heavy import, only when asked for

    return evaluate.load(str(_EVALUATE_MODULES / name), **load_kwargs)
