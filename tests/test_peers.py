"""compare_peers: every arm trained at one budget and evaluated alike (tiny models, a few steps).

torch-uncertainty's arms run only where it imports; without it they must be skipped with a reason.
"""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

import shared_backbone.peers as P
from shared_backbone import Head, data as data_mod
from shared_backbone.data import TensorData
from shared_backbone.flops import inference_flops
from shared_backbone.train import TrainConfig

REPO = Path(__file__).resolve().parents[1]
HAVE_TU = P.torch_uncertainty_missing() is None
METRICS = ("accuracy", "nll", "ece", "brier", "ood_auroc_max_prob", "ood_fpr95_max_prob",
           "ood_fpr95_ood_positive_max_prob")


def _data(n: int, seed: int) -> TensorData:
    g = torch.Generator().manual_seed(seed)
    return TensorData.from_uint8(torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8),
                                 torch.randint(0, 10, (n,), generator=g), [0.5], [0.25])


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


CFG = TrainConfig(batch_size=16, max_steps_per_epoch=3, precise_bn=1, eval_batch_size=32)


def test_every_arm_one_table_same_evaluation():
    train, test, ood = _data(64, 0), _data(32, 1), _data(24, 2)
    arms = P.ARMS if HAVE_TU else ("cheap", "single", "deep")
    res = P.compare_peers(train, test, ood, arms=arms, members=2, spec=Head(), epochs=1, width=4, config=CFG,
                          num_classes=10)
    json.dumps(res)
    rows = {r["arm"]: r for r in res["rows"]}
    assert list(rows) == list(arms) and res["skipped"] == {}
    assert res["budget_seconds"] == rows["cheap"]["train_seconds"] > 0  # the cheap arm sets the budget
    for r in rows.values():
        assert r["steps"] >= 1 and r["members"] == (1 if r["arm"] == "single" else 2)
        for key in METRICS:
            assert 0 <= r[key] <= (math.inf if key == "nll" else 1), (r["arm"], key)
        assert r["flops_per_image"] > 0 and r["bytes_stored"] > 0
    assert rows["single"]["ood_auroc_mutual_info"] is None and 0 <= rows["deep"]["ood_auroc_mutual_info"] <= 1
    # K independent full models: K times one model's FLOPs and bytes (same architecture, counted apart)
    assert rows["deep"]["flops_per_image"] == 2 * rows["single"]["flops_per_image"]
    assert rows["deep"]["bytes_stored"] == 2 * rows["single"]["bytes_stored"]
    # head-only members over a random backbone: the backbone runs once, each member stores its head
    assert rows["single"]["flops_per_image"] < rows["cheap"]["flops_per_image"] < rows["deep"]["flops_per_image"]
    assert rows["cheap"]["bytes_stored"] == 2 * (16 * 10 + 10) * 4  # Linear(4 * width -> 10) + bias, float32


@pytest.mark.skipif(not HAVE_TU, reason="torch-uncertainty is not installed")
@pytest.mark.parametrize("arm", P.TU_ARMS)
def test_torch_uncertainty_models_give_k_n_c_per_estimator(arm):
    """Estimator k's logits for sample n are row k*N + n of the model's own output (its einops layout)."""
    torch.manual_seed(0)
    model = P._Estimators(P._tu_model(arm, 2, 20, 4, 1, 10, 2, 1), 2).eval()
    x = _data(5, 3).x
    with torch.no_grad():
        out, raw = model(x), model.model(x)
    assert out.shape == (2, 5, 10)
    torch.testing.assert_close(out[1, 4], raw[1 * 5 + 4])
    assert inference_flops(model, x) > 0


@pytest.mark.skipif(not HAVE_TU, reason="torch-uncertainty is not installed")
def test_batch_ensemble_trains_k_estimators_that_do_not_divide_the_batch():
    """K=3 estimators, batches of 16 (and a last batch of 4): precise BN runs the raw model, whose
    train-mode output is (N, C) for BatchEnsemble, not K*N rows (a K=3 full-data run once crashed here)."""
    cfg = TrainConfig(batch_size=16, precise_bn=3, eval_batch_size=32)
    model, steps, seconds, _ = P._tu_arm("batch_ensemble", _data(36, 0), 20, 4, 1, 10, 3, 0.01, cfg, 2, 1)
    assert steps >= 1 and seconds > 0
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    # re-estimated over all 3 batches of 36 images (16, 16, 4): the count restarts at 0, whatever the steps were
    assert int(bn.num_batches_tracked) == 3
    with torch.no_grad():
        assert model.eval()(_data(5, 3).x).shape == (3, 5, 10)


@pytest.mark.skipif(not HAVE_TU, reason="torch-uncertainty is not installed")
def test_a_k_packed_ensembles_refuses_is_an_error_before_any_arm_trains(monkeypatch):
    """Packed-Ensembles needs its channels divisible by K: K=3 at width 16 (alpha 2: 32 channels) is
    refused up front, naming K and what to pass, not after the other arms' hour of training."""
    monkeypatch.setattr(P, "_cheap_arm", lambda *a, **k: pytest.fail("an arm trained before the check"))
    monkeypatch.setattr(P, "train_ensemble", lambda *a, **k: pytest.fail("an arm trained before the check"))
    with pytest.raises(ValueError, match=r"refuses packed with K=3 \(width 16.*--peer-members"):
        P.compare_peers(_data(16, 0), _data(16, 1), arms=("cheap", "packed"), members=3, width=16, config=CFG)
    with pytest.raises(ValueError, match=r"refuses packed with K=3"):
        P.compare_with_recipe(_data(16, 0), _data(16, 1), arms=("cheap", "packed"), members=2, peer_members=3,
                              spec=Head(), width=16, config=CFG)


def test_missing_torch_uncertainty_skips_with_a_reason(monkeypatch):
    monkeypatch.setattr(P, "torch_uncertainty_missing", lambda: "torch-uncertainty is not importable (test)")
    res = P.compare_peers(_data(32, 0), _data(16, 1), None, arms=("single", "packed", "batch_ensemble"),
                          members=2, width=4, config=CFG, budget_seconds=0.01, num_classes=10)
    assert [r["arm"] for r in res["rows"]] == ["single"]
    assert set(res["skipped"]) == {"packed", "batch_ensemble"}
    assert "not importable" in res["skipped"]["packed"]
    assert "ood_auroc_max_prob" not in res["rows"][0]  # no OOD set given


def test_fit_config_takes_the_asked_steps():
    for steps, n in [(1, 64), (7, 64), (40, 64), (100, 1000)]:
        cfg = P._fit_config(TrainConfig(batch_size=16), steps, n)
        per_epoch = min(math.ceil(n / 16), cfg.max_steps_per_epoch)
        assert steps <= cfg.epochs * per_epoch < steps + cfg.epochs


@pytest.mark.parametrize("kwargs, match", [
    ({"arms": ("cheap", "ensemble")}, r"unknown arm\(s\) \['ensemble'\]; accepted: cheap, single"),
    ({"arms": ("single",)}, "without the 'cheap' arm, pass budget_seconds"),
    ({"budget_seconds": -1.0}, "budget_seconds must be a positive number of seconds, got -1.0"),
    ({"backbone": "vgg11"}, "need a CIFAR ResNet backbone .* got 'vgg11'"),
    ({"members": 0}, "members must be an integer >= 1, got 0"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        P.compare_peers(_data(16, 0), _data(16, 1), **kwargs)


def test_script_writes_json_and_png(tmp_path, monkeypatch, capsys):
    def stand_in(card, split, *args, **kw):
        g = torch.Generator().manual_seed(0 if split == "train" else 1)
        return (torch.randint(0, 256, (48, *card.input_shape), generator=g, dtype=torch.uint8),
                torch.randint(0, card.num_classes, (48,), generator=g))

    monkeypatch.setattr(data_mod, "load_arrays", stand_in)
    spec = importlib.util.spec_from_file_location("_compare_peers", REPO / "scripts" / "compare_peers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    arms = "cheap,single,batch_ensemble" if HAVE_TU else "cheap,single"
    res = mod.main(["--arms", arms, "--members", "2", "--width", "4", "--epochs", "1", "--batch-size", "16",
                    "--max-steps-per-epoch", "2", "--precise-bn", "1", "--no-ood", "--no-progress", "--threads", "1",
                    "--slice", "Head()", "--budget-epochs", "0", "--warm-start-epochs", "0", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "peers.json").read_text())
    assert [r["arm"] for r in saved["rows"]] == arms.split(",") == [r["arm"] for r in res["rows"]]
    assert (tmp_path / "peers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "FPR95 in+" in out and "single model Full()" in out
    with pytest.raises(SystemExit):
        mod.main(["--arms", "cheap,mc_dropout", "--out", str(tmp_path)])


def test_the_default_recipe_is_the_cheap_row_and_its_single_model_the_single_row(tmp_path, monkeypatch, capsys):
    """compare-peers with its defaults (the budget path): the cheap arm is train_ensemble's shared schedule,
    the single row is that run's single model (all of the budget's steps), the other arms get its wall time."""
    def stand_in(card, split, *args, **kw):
        g = torch.Generator().manual_seed(0 if split == "train" else 1)
        return (torch.randint(0, 256, (64, *card.input_shape), generator=g, dtype=torch.uint8),
                torch.randint(0, card.num_classes, (64,), generator=g))

    monkeypatch.setattr(data_mod, "load_arrays", stand_in)
    from shared_backbone.cli import compare_peers as cli
    res = cli.main(["--arms", "cheap,single,deep", "--members", "2", "--width", "4", "--batch-size", "16",
                    "--max-steps-per-epoch", "2", "--precise-bn", "1", "--no-ood", "--no-progress", "--threads", "1",
                    "--budget-epochs", "2", "--warm-start-epochs", "1", "--out", str(tmp_path)])
    rows = {r["arm"]: r for r in res["rows"]}
    assert list(rows) == ["cheap", "single", "deep"]
    assert res["recipe"]["schedule"] == "shared" and res["recipe"]["budget_epochs"] == 2
    assert "block3" in res["recipe"]["spec"] and res["member_config"]["label_smoothing"] == 0  # train-ensemble's defaults
    assert rows["single"]["steps"] == 4  # 2 epochs of 2 steps: the whole budget, one run
    assert rows["cheap"]["steps"] >= 3  # its warm start (2 steps, cut from that run) + the members' steps
    assert res["budget_seconds"] == rows["cheap"]["train_seconds"] > 0
    assert rows["deep"]["members"] == 4 and rows["deep"]["steps"] >= 1  # --peer-members: 4 by default
    assert rows["cheap"]["flops_per_image"] > rows["single"]["flops_per_image"] > 0  # two members' last stages
    assert json.loads((tmp_path / "peers.json").read_text())["rows"][0]["arm"] == "cheap"
    with pytest.raises(SystemExit):  # the budget comes from the cheap arm's recipe
        cli.main(["--arms", "single,deep", "--out", str(tmp_path)])
    assert "keep 'cheap' in --arms" in capsys.readouterr().err
    for argv, msg in ((["--peer-members", "0"], "peer_members must be an integer >= 1, got 0"),
                      (["--budget-epochs", "0", "--member-opt", "lr=0.1"], "--member-opt: only with --budget-epochs"),
                      (["--budget-epochs", "0", "--warm-start-epochs", "0.5"], "whole epochs without"),
                      (["--schedule", "shared", "--warm-start-epochs", "0"], "needs --warm-start-epochs > 0")):
        with pytest.raises(SystemExit):  # refused before anything trains
            cli.main(["--arms", "cheap,single,deep", "--out", str(tmp_path), *argv])
        assert msg in capsys.readouterr().err


def test_the_recipe_rows_carry_ood_metrics_one_model_without_mutual_information():
    """compare_with_recipe with an OOD set: both rows from train_ensemble's report, in [0, 1]; the single
    model has no mutual information; its classes are the ones passed, not the labels seen."""
    train, test, ood = _data(48, 0), _data(32, 1), _data(24, 2)
    res = P.compare_with_recipe(train, test, ood, arms=("cheap", "single"), members=2, spec=Head(), width=4,
                                budget_epochs=2, warm_start_epochs=1, config=CFG, num_classes=12)
    cheap, single = res["rows"]
    assert (cheap["arm"], single["arm"]) == ("cheap", "single")
    assert 0 <= cheap["ood_auroc_mutual_info"] <= 1 and single["ood_auroc_mutual_info"] is None
    for r in (cheap, single):
        assert 0 <= r["ood_auroc_max_prob"] <= 1 and 0 <= r["accuracy"] <= 1
    assert cheap["bytes_stored"] > 2 * (16 * 12 + 12) * 4  # two 12-class heads + the warm-started backbone
