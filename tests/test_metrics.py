"""Ensemble metrics against hand-computed values on tiny tensors written out here."""
from __future__ import annotations

import json
import math
import socket

import numpy as np
import pytest
import torch

from shared_backbone import metrics as M
from shared_backbone.plots import plot_ensemble_report

# 2 members, 4 samples, 3 classes, given as probabilities (logits = log p, so softmax = p)
PROBS_A = [[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.3, 0.3, 0.4], [0.5, 0.4, 0.1]]  # argmax 0 1 2 0
PROBS_B = [[0.7, 0.2, 0.1], [0.2, 0.2, 0.6], [0.6, 0.2, 0.2], [0.1, 0.7, 0.2]]  # argmax 0 2 0 1
LABELS = torch.tensor([0, 1, 2, 1])
# mean probs: [.7 .2 .1] [.15 .4 .45] [.45 .25 .3] [.3 .55 .15] -> argmax 0 2 0 1, right wrong wrong right
MEAN = [[0.7, 0.2, 0.1], [0.15, 0.4, 0.45], [0.45, 0.25, 0.3], [0.3, 0.55, 0.15]]


@pytest.fixture
def logits() -> torch.Tensor:
    return torch.tensor([PROBS_A, PROBS_B], dtype=torch.float64).log()  # (2, 4, 3)


def test_ensemble_probs_mean(logits):
    torch.testing.assert_close(M.ensemble_probs(logits), torch.tensor(MEAN, dtype=torch.float64))


def test_ensemble_probs_vote_breaks_ties_by_mean_prob(logits):
    votes = M.ensemble_probs(logits, combine="vote")
    exact = torch.tensor([[1, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]], dtype=torch.float64)
    torch.testing.assert_close(votes, exact, atol=1e-3, rtol=0)
    torch.testing.assert_close(votes.sum(-1), torch.ones(4, dtype=torch.float64))
    # sample 1 ties classes 1 and 2; mean prob (.40 vs .45) picks 2, not the lower index
    assert votes.argmax(-1).tolist() == [0, 2, 0, 1]


def test_vote_is_majority_not_mean():
    # two members say class 1 mildly, one says class 0 loudly: mean -> 0, vote -> 1
    p = torch.tensor([[[0.4, 0.5, 0.1]], [[0.4, 0.5, 0.1]], [[0.98, 0.01, 0.01]]], dtype=torch.float64)
    assert M.ensemble_probs(p.log(), "mean").argmax(-1).item() == 0
    assert M.ensemble_probs(p.log(), "vote").argmax(-1).item() == 1


def test_accuracy_nll_brier_by_hand(logits):
    probs = M.ensemble_probs(logits)
    assert M.accuracy(probs, LABELS) == pytest.approx(0.5)
    assert M.nll(probs, LABELS) == pytest.approx(-(math.log(0.7) + math.log(0.4) + math.log(0.3) + math.log(0.55)) / 4)
    # per sample: .3²+.2²+.1² = .14, .15²+.6²+.45² = .585, .45²+.25²+.7² = .755, .3²+.45²+.15² = .315
    assert M.brier(probs, LABELS) == pytest.approx((0.14 + 0.585 + 0.755 + 0.315) / 4)


def test_ece_and_reliability_by_hand(logits):
    probs = M.ensemble_probs(logits)
    # confidences .7 (right), .45 (wrong), .45 (wrong), .55 (right); 15 bins of width 1/15:
    # bin 10 [.667, .733): |1 - .7| = .3, n=1; bin 6 [.4, .467): |0 - .45|, n=2; bin 8 [.533, .6): |1 - .55|, n=1
    expected = (1 * 0.3 + 2 * 0.45 + 1 * 0.45) / 4
    assert M.ece(probs, LABELS) == pytest.approx(expected)
    bins = M.reliability_bins(probs, LABELS)
    assert bins["count"] == [0] * 6 + [2, 0, 1, 0, 1] + [0] * 4
    assert bins["confidence"][6] == pytest.approx(0.45) and bins["accuracy"][6] == 0.0
    assert bins["confidence"][8] == pytest.approx(0.55) and bins["accuracy"][8] == 1.0
    assert bins["confidence"][10] == pytest.approx(0.7) and bins["accuracy"][10] == 1.0


def test_ece_matches_reliability_bins_on_random_data():
    g = torch.Generator().manual_seed(0)
    probs = torch.randn(200, 5, generator=g, dtype=torch.float64).mul(2).softmax(-1)
    labels = torch.randint(0, 5, (200,), generator=g)
    bins = M.reliability_bins(probs, labels, n_bins=10)
    by_bins = sum(n / 200 * abs(a - c) for n, a, c in zip(bins["count"], bins["accuracy"], bins["confidence"]))
    assert M.ece(probs, labels, n_bins=10) == pytest.approx(by_bins)
    assert sum(bins["count"]) == 200


def test_disagreement_by_hand(logits):
    # member argmax 0 1 2 0 vs 0 2 0 1: differ on 3 of 4 samples
    assert M.disagreement(logits) == pytest.approx(0.75)
    assert M.disagreement(logits[:1]) == 0.0
    # three members: preds (0,0), (0,1), (1,1) -> pairs differ on 1/2, 2/2, 1/2 samples -> mean 2/3
    three = torch.tensor([[[5.0, 0], [5, 0]], [[5, 0], [0, 5]], [[0, 5], [0, 5]]])
    assert M.disagreement(three) == pytest.approx(2 / 3)


def _entropy(p: np.ndarray) -> float:
    return float(-sum(x * math.log(x) for x in p))


def test_mutual_information_against_numpy_loop(logits):
    expected = []
    for n in range(4):
        members = [np.array(PROBS_A[n]), np.array(PROBS_B[n])]
        expected.append(_entropy((members[0] + members[1]) / 2) - (_entropy(members[0]) + _entropy(members[1])) / 2)
    mi = M.mutual_information(logits)
    assert mi.shape == (4,)
    torch.testing.assert_close(mi, torch.tensor(expected, dtype=torch.float64))
    assert mi[0].item() == pytest.approx(0.0, abs=1e-12)  # identical members on sample 0
    # sample 2 by hand: H(.45,.25,.3) - (H(.3,.3,.4) + H(.6,.2,.2)) / 2
    by_hand = _entropy([0.45, 0.25, 0.3]) - (_entropy([0.3, 0.3, 0.4]) + _entropy([0.6, 0.2, 0.2])) / 2
    assert mi[2].item() == pytest.approx(by_hand)


def test_ood_scores(logits):
    torch.testing.assert_close(M.ood_scores(logits, "max_prob"), torch.tensor([0.7, 0.45, 0.45, 0.55], dtype=torch.float64))
    torch.testing.assert_close(M.ood_scores(logits, "mutual_info"), -M.mutual_information(logits))


@pytest.mark.parametrize(
    "s_in, s_out, expected",
    [
        ([3.0, 4.0, 5.0], [0.0, 1.0, 2.0], 1.0),  # perfect separation
        ([0.0, 1.0, 2.0], [3.0, 4.0, 5.0], 0.0),  # reversed
        ([1.0, 1.0, 1.0], [1.0, 1.0], 0.5),  # all tied
        ([0.9, 0.4], [0.5, 0.1], 0.75),  # 3 of 4 (in, out) pairs ordered right
        ([100.0, 200.0], [50.0, 60.0], 1.0),  # large scores must not saturate into ties
        ([-0.0, -0.1], [-1.0, -2.0], 1.0),  # negative scores (e.g. -MI)
    ],
)
def test_ood_auroc_known_cases(s_in, s_out, expected):
    assert M.ood_auroc(torch.tensor(s_in), torch.tensor(s_out)) == pytest.approx(expected, abs=1e-6)


def test_ood_auroc_matches_pair_counting():
    g = torch.Generator().manual_seed(1)
    s_in, s_out = torch.randn(30, generator=g).round(decimals=1) + 0.5, torch.randn(20, generator=g).round(decimals=1)
    pairs = [(1.0 if a > b else 0.5 if a == b else 0.0) for a in s_in.tolist() for b in s_out.tolist()]
    assert M.ood_auroc(s_in, s_out) == pytest.approx(sum(pairs) / len(pairs), abs=1e-6)


def test_fpr_at_95_tpr_known_cases():
    # 20 in-scores 1..20: keeping 19 of them (95%) puts the threshold at 2; out >= 2: 2, 3, 10
    s_in = torch.arange(1.0, 21.0)
    assert M.fpr_at_95_tpr(s_in, torch.tensor([0.0, 1.5, 2.0, 3.0, 10.0])) == pytest.approx(0.6)
    # 100 in-scores 0..99: threshold 5
    assert M.fpr_at_95_tpr(torch.arange(100.0), torch.tensor([4.9, 5.0, 6.0, -1.0])) == pytest.approx(0.5)
    assert M.fpr_at_95_tpr(torch.tensor([3.0, 4.0]), torch.tensor([0.0, 1.0])) == 0.0
    assert M.fpr_at_95_tpr(torch.tensor([0.0, 1.0]), torch.tensor([3.0, 4.0])) == 1.0


def test_fpr_at_95_tpr_ood_positive_by_hand():
    # OOD positive: flag (score <=) 95% of the 20 OOD scores 1..20, i.e. 19 of them: threshold 19;
    # in-distribution scores flagged (<= 19): 0, 18.5, 19 of five -> 0.6
    s_out = torch.arange(1.0, 21.0)
    s_in = torch.tensor([0.0, 18.5, 19.0, 19.5, 30.0])
    assert M.fpr_at_95_tpr(s_in, s_out, positive="ood") == pytest.approx(0.6)
    # and in-positive on the same scores: accept 5 of 5 in-scores (ceil(4.75)) -> threshold 0: every OOD accepted
    assert M.fpr_at_95_tpr(s_in, s_out, positive="in") == 1.0
    assert M.fpr_at_95_tpr(s_in, s_out) == 1.0  # the default stays ODIN's in-positive convention


def test_fpr_ood_positive_matches_torch_uncertainty():
    """The same tie-aware number as torch-uncertainty's FPR95(pos_label=1) on OOD score = -score."""
    fpr = pytest.importorskip("torch_uncertainty.metrics.classification.fpr")
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        s_in = torch.randn(200, generator=g).round(decimals=1) + 1.0
        s_out = torch.randn(150, generator=g).round(decimals=1)
        conf = -torch.cat([s_in, s_out])  # their confidence: higher = more OOD
        target = torch.cat([torch.zeros(200), torch.ones(150)]).long()
        ref = float(fpr._fprx_compute(conf, target, recall_level=0.95, pos_label=1))
        assert M.fpr_at_95_tpr(s_in, s_out, positive="ood") == pytest.approx(ref, abs=1e-6)  # theirs: float32


def test_ensemble_nll_is_exact_where_the_old_clamp_under_reported():
    # 2 members, 3 classes; the label's logit is -120 (member A) and -110 (member B), the others 0:
    # float32 softmax rounds both probabilities to 0 and a 1e-12 clamp would say 27.63 nats
    lg = torch.tensor([[[-120.0, 0.0, 0.0]], [[-110.0, 0.0, 0.0]]])  # (K=2, N=1, C=3), float32
    labels = torch.tensor([0])
    p_a = math.exp(-120.0) / (math.exp(-120.0) + 2.0)  # float64 by hand
    p_b = math.exp(-110.0) / (math.exp(-110.0) + 2.0)
    expected = -math.log((p_a + p_b) / 2)  # 110 + log 2 + log 2 - tiny = 111.386...
    assert M.ensemble_nll(lg, labels) == pytest.approx(expected, rel=1e-12)
    assert M.evaluate_ensemble(lg, labels)["nll"] == pytest.approx(expected, rel=1e-12)
    clamped = M.nll(M.ensemble_probs(lg), labels, eps=1e-12)
    assert clamped == pytest.approx(-math.log(1e-12)) and clamped < expected - 70  # what the clamp reported
    assert M.nll(M.ensemble_probs(lg), labels) == math.inf  # unclamped probabilities say inf, not 27.6
    # member NLLs are exact too: -log p_a, -log p_b
    assert M.evaluate_ensemble(lg, labels)["member_nll"] == pytest.approx([-math.log(p_a), -math.log(p_b)],
                                                                          rel=1e-12)


def test_ensemble_nll_by_hand(logits):
    # mean probs of the labels: .7, .4, .3, .55 (MEAN above)
    expected = -(math.log(0.7) + math.log(0.4) + math.log(0.3) + math.log(0.55)) / 4
    assert M.ensemble_nll(logits, LABELS) == pytest.approx(expected)


def test_accuracy_vs_members(logits):
    # member A alone: 3/4; A and B: 2/4
    assert M.accuracy_vs_members(logits, LABELS) == pytest.approx([0.75, 0.5])


def test_evaluate_ensemble_by_hand_and_json(logits):
    ood = torch.tensor([[[0.4, 0.3, 0.3]] * 3, [[0.3, 0.3, 0.4]] * 3], dtype=torch.float64).log()
    r = M.evaluate_ensemble(logits, LABELS, ood_logits=ood)
    json.dumps(r)  # plain Python numbers only
    assert r["num_members"] == 2
    assert r["member_accuracy"] == pytest.approx([0.75, 0.5])
    assert r["member_nll"] == pytest.approx(
        [-(math.log(0.7) + math.log(0.6) + 2 * math.log(0.4)) / 4, -(2 * math.log(0.7) + 2 * math.log(0.2)) / 4]
    )
    assert r["mean_member_accuracy"] == pytest.approx(0.625)
    assert r["accuracy"] == pytest.approx(0.5)
    assert r["ece"] == pytest.approx(0.4125)
    assert r["brier"] == pytest.approx(1.795 / 4)
    assert r["disagreement"] == pytest.approx(0.75)
    assert r["accuracy_vs_members"] == pytest.approx([0.75, 0.5])
    # OOD max prob is .4 everywhere, below every in-distribution max prob (.45 .. .7)
    assert r["ood_auroc_max_prob"] == pytest.approx(1.0)
    assert r["ood_fpr95_max_prob"] == 0.0
    # OOD positive: flag 95% of the OOD max probs (all .4): threshold .4, no in-distribution max prob <= .4
    assert r["ood_fpr95_ood_positive_max_prob"] == 0.0
    for key in ("ood_auroc_mutual_info", "ood_fpr95_mutual_info", "ood_fpr95_ood_positive_mutual_info"):
        assert 0.0 <= r[key] <= 1.0
    assert "ood_auroc_max_prob" not in M.evaluate_ensemble(logits, LABELS)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda lg: M.ensemble_probs(lg[0]), r"\(K, N, C\).*\(4, 3\)"),
        (lambda lg: M.ensemble_probs(lg, combine="median"), r"unknown combine 'median'; accepted: mean, vote"),
        (lambda lg: M.evaluate_ensemble(lg, LABELS[:3]), r"labels has 3 entries but predictions have N=4"),
        (lambda lg: M.evaluate_ensemble(lg, torch.tensor([0, 1, 3, 1])), r"label 3 is out of range for C=3"),
        (lambda lg: M.accuracy(lg[0].exp(), torch.tensor([0, -1, 2, 1])), r"label -1 is out of range"),
        (lambda lg: M.nll(lg[0].exp(), LABELS.float()), r"integer class ids, got dtype torch.float32"),
        (lambda lg: M.brier(lg[0].exp(), LABELS[None]), r"\(N,\) tensor, got shape \(1, 4\)"),
        (lambda lg: M.ece(lg[0].exp(), LABELS, n_bins=0), r"n_bins must be >= 1, got 0"),
        (lambda lg: M.ood_scores(lg, kind="energy"), r"unknown OOD score kind 'energy'; accepted: max_prob, mutual_info"),
        (lambda lg: M.ood_auroc(torch.tensor([]), torch.tensor([1.0])), r"scores_in must be a non-empty 1-D"),
        (lambda lg: M.fpr_at_95_tpr(torch.tensor([1.0]), torch.ones(2, 2)), r"scores_out .* shape \(2, 2\)"),
        (lambda lg: M.fpr_at_95_tpr(torch.ones(3), torch.ones(3), positive="out"),
         r"positive must be one of in, ood .* got 'out'"),
        (lambda lg: M.nll(lg[0].exp(), LABELS, eps=-1.0), r"eps must be a finite number >= 0 .* got -1.0"),
        (lambda lg: M.ensemble_nll(lg[0], LABELS), r"\(K, N, C\).*\(4, 3\)"),
        (lambda lg: M.evaluate_ensemble(lg, LABELS, ood_logits=torch.zeros(2, 5, 4)), r"ood_logits shape \(2, 5, 4\)"),
        (lambda lg: M.disagreement(torch.zeros(2, 0, 3)), r"non-empty"),
        (lambda lg: M.load_metric("accuracy"), r"unknown metric module 'accuracy'; available: ensemble"),
    ],
)
def test_bad_inputs_give_clear_errors(logits, call, match):
    with pytest.raises(ValueError, match=match):
        call(logits)


def test_evaluate_module_offline_agrees_with_function(logits, monkeypatch):
    import evaluate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)

    def no_network(*args, **kwargs):
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    metric = M.load_metric("ensemble", keep_in_memory=True)
    assert isinstance(metric, evaluate.Metric)
    member_probs = logits.exp().transpose(0, 1)  # (N, K, C)
    metric.add_batch(predictions=member_probs[:2].tolist(), references=LABELS[:2].tolist())
    metric.add_batch(predictions=member_probs[2:].numpy(), references=LABELS[2:].numpy())
    got = metric.compute()
    expected = M.evaluate_ensemble(logits, LABELS)
    assert set(got) == set(expected)
    for key in ("accuracy", "nll", "ece", "brier", "disagreement", "mean_member_accuracy"):
        assert got[key] == pytest.approx(expected[key]), key
    assert got["member_accuracy"] == pytest.approx(expected["member_accuracy"])
    assert got["accuracy_vs_members"] == pytest.approx(expected["accuracy_vs_members"])


def test_plot_writes_png(logits, tmp_path):
    out = tmp_path / "sub" / "report.png"
    written = plot_ensemble_report(M.evaluate_ensemble(logits, LABELS), out)
    assert written == out
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 5_000
    assert list(out.parent.iterdir()) == [out]  # no temp file left behind
    # logits + labels work too, and overwrite in place
    plot_ensemble_report(logits, out, labels=LABELS)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="without labels"):
        plot_ensemble_report(logits, out)
    with pytest.raises(ValueError, match="report lacks reliability"):
        plot_ensemble_report({"ece": 0.1}, out)
