"""The main job's recipe: the ensemble and its equal-cost baseline, trained and reported side by side."""
from __future__ import annotations

import itertools

import pytest

import shared_backbone as sb
from shared_backbone import BatchNorm, Filters, Head, parse_spec, resolve
from shared_backbone.plots import plot_ensemble_report
from shared_backbone.recipes import equal_cost_steps, format_report, train_ensemble
from shared_backbone.slices import spec_from_dict
from shared_backbone.train import TrainConfig, fit

LAST_STAGE = Filters(0.25, stages=["block3"]) + BatchNorm(stages=["block3"]) + Head()


# --------------------------------------------------------------------------- stage-restricted slices


def test_stage_restricted_filters_count_by_hand(make_resnet20):
    bb = make_resnet20(width=8, num_classes=10)  # block3: 32 channels, fed by block2's 16
    layout = resolve(LAST_STAGE, bb)
    # Filters(0.25) owns the first 8 of 32 output filters of each block3 conv:
    # 0.conv1 8x16x3x3, 0.conv2 8x32x3x3, 0.shortcut 8x16x1x1, then 1.conv1 .. 2.conv2: 4 x 8x32x3x3
    filters = 8 * 16 * 9 + 8 * 32 * 9 + 8 * 16 + 4 * 8 * 32 * 9
    bns = 7 * 2 * 32  # block3's bn1, bn2 of 3 blocks and the shortcut BN: gamma and beta
    head = 32 * 10 + 10
    assert layout.numel(bb) == filters + bns + head == 13_578
    assert {n.split(".")[1] for n in layout} == {"block3", "head"}
    assert all(n.startswith("stages.block3.") or n.startswith("stages.head.") for n in layout)


def test_stage_restricted_slice_shares_the_prefix_and_round_trips(make_resnet20):
    frozen = sb.FrozenBackbone(make_resnet20(width=8), seed=0)
    ens = sb.Ensemble(frozen, LAST_STAGE, members=2)
    assert ens.prefix_stages == ["stem", "block1", "block2"]  # run once for both members
    assert parse_spec(repr(LAST_STAGE)) == LAST_STAGE
    assert spec_from_dict(LAST_STAGE.to_dict()) == LAST_STAGE
    assert resolve(BatchNorm(stages="stem"), frozen.backbone).keys() == {"stages.stem.1.weight", "stages.stem.1.bias"}


@pytest.mark.parametrize("bad", [["block9"], [], [3]])
def test_stage_restricted_slice_rejects_bad_stages(make_resnet20, bad):
    with pytest.raises(ValueError, match="stage"):
        resolve(Filters(0.5, stages=bad), make_resnet20())


# --------------------------------------------------------------------------- equal cost


def _scripted_clock(durations):
    """A clock whose successive start/stop pairs measure ``durations`` in turn, cyclically."""
    now, out = 0.0, []
    for d in itertools.islice(itertools.cycle(durations), 1000):
        out += [now, now + d]
        now += d
    return iter(out).__next__


def test_equal_cost_steps_times_every_step_interleaved_and_takes_medians():
    calls = []
    steps = {"ensemble": lambda: calls.append("e"), "single": lambda: calls.append("s")}
    # 3 rounds of (ensemble, single); the second round's ensemble step is an outlier the median drops
    clock = _scripted_clock([2.0, 1.0, 9.0, 1.0, 2.0, 1.0])
    assert equal_cost_steps(steps, repeats=3, clock=clock) == {"ensemble": 2.0, "single": 1.0}
    assert calls == ["e", "s"] * 4  # one warm-up round, then interleaved
    with pytest.raises(ValueError, match="repeats"):
        equal_cost_steps(steps, repeats=0)


TINY = dict(backbone_cfg={"width": 4}, task="digits", train_subset=128, test_subset=64, progress=False,
            vectorized=False)


def test_baseline_trains_for_the_budget_it_is_given(tmp_path):
    # an ensemble step costs 2.5 single-model steps by this clock; 0.5 warm-start epochs are 2 steps
    cfg = TrainConfig(epochs=1, batch_size=32, precise_bn=2)
    _, r, arrays = train_ensemble(LAST_STAGE, members=2, config=cfg, warm_start_epochs=0.5, member_init="random",
                                  ood="mnist5k", clock=_scripted_clock([2.5, 1.0]), **TINY)
    t = r["baseline"]["timing"]
    assert t["ensemble_step_in_single_steps"] == 2.5
    assert (t["warm_steps"], t["ensemble_steps"]) == (2, 4)  # 128 / 32 per epoch
    assert t["budget_single_steps"] == 2 + 4 * 2.5
    assert r["baseline"]["steps"] == 12 and r["ensemble"]["steps"] == 2 + 4  # the baseline: 3 epochs of 4 steps
    assert r["baseline"]["members"] == 1 and r["baseline"]["stored_bytes"] == r["params"]["full_model_bytes"]
    # a warm-started backbone is stored once beside the members' slices
    assert r["ensemble"]["stored_bytes"] == 2 * r["params"]["stored_bytes_per_member"] + r["params"]["full_model_bytes"]
    for side in ("ensemble", "baseline"):
        m = r[side]["metrics"]
        for key in ("accuracy", "nll", "ece", "brier", "ood_auroc_max_prob", "ood_fpr95_max_prob"):
            assert 0 <= m[key] < 10, (side, key)
        assert r[side]["train_seconds"] > 0
    assert r["metrics"] is r["ensemble"]["metrics"]  # the old top-level keys stay
    assert arrays["baseline_test_logits"].shape == (1, 64, 10)
    assert arrays["baseline_ood_logits"].shape == (1, 5000, 10)

    text = format_report(r)
    assert "ensemble K=2" in text and "1 full model" in text
    acc_row = next(line for line in text.splitlines() if line.startswith("accuracy "))
    assert acc_row.split()[1:] == [f"{r['ensemble']['metrics']['accuracy']:.4f}",
                                   f"{r['baseline']['metrics']['accuracy']:.4f}"]
    mi_row = next(line for line in text.splitlines() if line.startswith("OOD AUROC mutual-info"))
    assert mi_row.split()[-1] == "-"  # one model has no mutual information
    assert "budget 12 single-model steps = 2 warm + 4 x 2.50" in text
    png = plot_ensemble_report(r["metrics"], tmp_path / "report.png", baseline=r["baseline"]["metrics"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_deep_baseline_fits_as_many_full_models_as_the_budget_allows():
    cfg = TrainConfig(epochs=2, batch_size=32)
    # ensemble steps cost 1 single step, two full models cost 2: the budget of 8 steps gives 2 models x 4 steps
    clock = _scripted_clock([1.0, 1.0] * 5 + [1.0, 2.0] * 5)  # 5 rounds each
    _, r, _ = train_ensemble(Head(), members=2, config=cfg, baseline="deep", ood=None, clock=clock, **TINY)
    b = r["baseline"]
    assert b["timing"]["budget_single_steps"] == 8 and b["timing"]["deep_members"] == 2
    assert b["members"] == 2 and b["steps"] == 4
    assert len(b["metrics"]["member_accuracy"]) == 2
    assert "2 full models" in format_report(r)


def test_no_baseline_and_bad_baseline():
    _, r, arrays = train_ensemble(Head(), members=2, config=TrainConfig(epochs=1, batch_size=64), baseline="none",
                                  ood=None, **TINY)
    assert r["baseline"] is None and "baseline_test_logits" not in arrays
    text = format_report(r)
    assert "ensemble K=2" in text and "1 full model" not in text and "single-model steps" not in text
    with pytest.raises(ValueError, match="'none', 'single', 'deep'.*'both'"):
        train_ensemble(Head(), baseline="both", **TINY)


# --------------------------------------------------------------------------- one budget, one schedule


def _single_run(steps: int, stop_after: int | None, config: TrainConfig):
    """A reference: one full model trained on the same data for ``steps`` (cut at ``stop_after``), as a user would."""
    from shared_backbone.recipes import _config_for_steps, load_train_test
    train, _, card = load_train_test("digits", 128, 64, 0)
    model = sb.Ensemble(sb.FrozenBackbone(sb.build_backbone("resnet20", width=4, in_channels=card.input_shape[0],
                                                             num_classes=card.num_classes), seed=0),
                        sb.Full(), members=1, member_init="backbone")
    fit(model, train, None, _config_for_steps(config, steps, len(train)), progress=False, stop_after=stop_after)
    return model.member(0).state_dict()


@pytest.mark.parametrize("baseline", ["single", "none"])
def test_a_shared_schedule_cuts_the_warm_start_from_the_single_models_run(baseline):
    # 128 images / 32 = 4 steps an epoch; a budget of 2 epochs = 8 single steps; the warm start takes 1 epoch
    # (4 steps); an ensemble step costs 2 single steps by this clock, so the members get (8 - 4) / 2 = 2 steps
    full = TrainConfig(epochs=1, batch_size=32)
    members = TrainConfig(epochs=5, batch_size=32)  # epochs unused: the budget sizes the members
    _, r, _ = train_ensemble(LAST_STAGE, members=2, config=members, full_config=full, warm_start_epochs=1,
                             budget_epochs=2, schedule="shared", baseline=baseline, ood=None,
                             clock=_scripted_clock([2.0, 1.0]), **TINY)
    assert (r["schedule"], r["schedule_split"]) == ("shared", 0.5)
    assert r["ensemble"]["steps"] == 4 + 2 and r["train"]["config"]["schedule_from"] == 0.5
    # the frozen backbone is the single model's run stopped after 4 of its 8 steps, whatever the baseline
    warm = _single_run(8, 4, full)
    assert r["fingerprint"] == sb.FrozenBackbone.from_module(_module(warm)).fingerprint
    if baseline == "single":  # the baseline is that same run, on to its end: 8 steps, as if never cut
        assert r["baseline"]["steps"] == 8 and r["baseline"]["timing"]["budget_single_steps"] == 8
        assert r["baseline"]["metrics"]["accuracy"] == _accuracy(_single_run(8, None, full))
    else:
        assert r["baseline"] is None


def _module(state):
    m = sb.build_backbone("resnet20", width=4, in_channels=1, num_classes=10)
    m.load_state_dict(state)
    return m


def _accuracy(state) -> float:
    from shared_backbone.recipes import load_train_test
    import torch
    _, test, _ = load_train_test("digits", 128, 64, 0)
    m = _module(state).eval()
    with torch.no_grad():
        return (m(test.x).argmax(-1) == test.y).float().mean().item()


def test_budget_and_schedule_are_checked():
    with pytest.raises(ValueError, match="schedule must be one of"):
        train_ensemble(Head(), schedule="cyclic", **TINY)
    with pytest.raises(ValueError, match="needs warm_start_epochs"):
        train_ensemble(Head(), schedule="shared", **TINY)
    with pytest.raises(ValueError, match="budget_epochs must be"):
        train_ensemble(Head(), budget_epochs=0, **TINY)
    with pytest.raises(ValueError, match=r"warm_start_epochs \(2\) must be below budget_epochs \(2\)"):
        train_ensemble(Head(), budget_epochs=2, warm_start_epochs=2, baseline="none", ood=None,
                       clock=_scripted_clock([1.0]), **TINY)
