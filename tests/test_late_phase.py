"""Members on a trunk that keeps training (late-phase weights), against plain modules with the same weights."""
from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import shared_backbone as sb
from shared_backbone import Head
from shared_backbone.data import TensorData
from shared_backbone import late_phase
from shared_backbone.late_phase import LatePhase, train_late_phase
from shared_backbone.recipes import train_ensemble
from shared_backbone.train import TrainConfig

sys.path.insert(0, str(Path(__file__).parent))
from test_recipes import LAST_STAGE, TINY  # noqa: E402


def _plain_member(trunk: torch.nn.Module, late: LatePhase, i: int) -> torch.nn.Module:
    """A plain module: the trunk's weights with member ``i``'s rows written over them by hand."""
    m = copy.deepcopy(trunk)
    own = late.slices[i]
    with torch.no_grad():
        for name, p in m.named_parameters():
            key = sb.Ensemble.slice_key(name)
            if key not in own:
                continue
            t = own[key]
            if t.shape == p.shape:
                p.copy_(t)
            else:  # Filters: the first rows (output channels) are the member's
                p[: t.shape[0]].copy_(t)
    return m


def _data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorData(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 5, (n,), generator=g), [0.0], [1.0])


def test_a_member_is_the_trunk_with_its_rows_and_the_ensemble_says_the_same(tiny_resnet20):
    torch.manual_seed(0)
    late = LatePhase(tiny_resnet20, LAST_STAGE, members=3, member_init="random", seed=1).eval()
    x = _data().x[:8]
    for i in range(3):
        ref = _plain_member(late.trunk, late, i).eval()
        torch.testing.assert_close(late(x, i), ref(x))
    before = late(x, 2)
    late.train_layout()  # channels_last: the same values
    assert dict(late.trunk.named_parameters())["stages.stem.0.weight"].is_contiguous(
        memory_format=torch.channels_last)
    torch.testing.assert_close(late(x.contiguous(memory_format=torch.channels_last), 2), before)
    ens = late.to_ensemble().eval()
    assert ens.prefix_stages == ["stem", "block1", "block2"]  # inference shares the prefix
    out = ens(x)  # (K, N, C)
    for i in range(3):
        torch.testing.assert_close(out[i], _plain_member(late.trunk, late, i).eval()(x), rtol=1e-4, atol=1e-5)
    # members start apart when drawn afresh, together when copied from the trunk
    assert not torch.equal(late(x, 0), late(x, 1))
    same = LatePhase(tiny_resnet20, LAST_STAGE, members=2).eval()
    torch.testing.assert_close(same(x, 0), same(x, 1))
    torch.testing.assert_close(same(x, 0), tiny_resnet20.eval()(x))


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_one_step_is_a_plain_sgd_step_of_that_member_and_leaves_the_others_alone(tiny_resnet20, scale):
    late = LatePhase(tiny_resnet20, LAST_STAGE, members=3, member_init="random", seed=2).train()
    data = _data()
    x, y = data.x[:16], data.y[:16]
    # the reference: member 1 as a plain module, one plain SGD step on the same batch; the member's own
    # entries (its rows, or the whole tensor) at scale x the lr
    ref = _plain_member(late.trunk, late, 1).train()
    F.cross_entropy(ref(x), y).backward()
    with torch.no_grad():
        expected = {}
        for n, p in ref.named_parameters():
            lr = torch.full_like(p, 0.1)
            if n in late.layout:
                sl = late.layout[n]
                (lr if sl.whole else lr.narrow(sl.dim, 0, sl.n)).fill_(0.1 * scale)
            expected[n] = p - lr * p.grad
    before = [{k: v.detach().clone() for k, v in s.items()} for s in late.slices]
    opt = late_phase._sgd(late, TrainConfig(lr=0.1, momentum=0.0, weight_decay=0.0), scale)
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(late(x, 1), y).backward()
    opt.step()
    after = _plain_member(late.trunk, late, 1)
    for n, p in after.named_parameters():
        torch.testing.assert_close(p, expected[n], rtol=1e-5, atol=1e-6, msg=n)
    for i in (0, 2):  # the members that sat out: byte-identical
        for k, v in late.slices[i].items():
            assert torch.equal(v, before[i][k]), (i, k)
    # the trunk moved outside the slices (shared layers learn), which a frozen backbone never does
    trunk_stem = dict(late.trunk.named_parameters())["stages.stem.0.weight"]
    assert not torch.equal(trunk_stem, dict(tiny_resnet20.named_parameters())["stages.stem.0.weight"])


def test_train_late_phase_cycles_members_and_returns_an_ensemble_on_the_final_trunk(tiny_resnet20):
    data = _data(n=64)
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05, precise_bn=2, augment=False)
    ens, record = train_late_phase(tiny_resnet20, LAST_STAGE, 3, data, cfg, progress=False)
    assert record["steps"] == 8 and record["steps_per_member"] == [3, 3, 2]
    assert len(record["history"]) == 2
    assert isinstance(ens, sb.Ensemble) and ens.members == 3 and ens.data == "shared"
    assert not ens.frozen.regenerable  # a trained trunk is stored, not re-drawn from a seed
    assert ens.frozen.fingerprint != sb.FrozenBackbone.from_module(tiny_resnet20).fingerprint
    # members copied from one trunk and trained on different batches end apart
    ens.eval()
    out = ens(data.x[:8])
    assert not torch.equal(out[0], out[1])
    # the input module is left as it was
    assert all(not p.requires_grad for p in ens.frozen.backbone.parameters())


def _scripted_clock(monkeypatch, cost):
    """``time.perf_counter`` in late_phase advances only by ``cost(n)`` seconds at the n-th step."""
    now, n = [0.0], [0]
    real_step = late_phase._step

    def step(*args, **kwargs):
        now[0] += cost(n[0])
        n[0] += 1
        return real_step(*args, **kwargs)

    monkeypatch.setattr(late_phase, "_step", step)
    monkeypatch.setattr(late_phase.time, "perf_counter", lambda: now[0])


def test_a_seconds_budget_sizes_the_phase_from_its_own_timed_steps(tiny_resnet20, monkeypatch):
    # every step costs 0.5 s, nothing else takes time: a 10 s budget is 20 steps (the first guess, 2 epochs
    # of 4, is 8), the cosine stretched to them and ending at 0
    _scripted_clock(monkeypatch, lambda n: 0.5)
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05, augment=False, max_steps_per_epoch=4)
    lrs = []
    real_sgd = late_phase._sgd

    def sgd(*args, **kwargs):
        opt = real_sgd(*args, **kwargs)
        opt.register_step_post_hook(lambda o, *_: lrs.append(o.param_groups[0]["lr"]))
        return opt

    monkeypatch.setattr(late_phase, "_sgd", sgd)
    _, record = train_late_phase(tiny_resnet20, LAST_STAGE, 2, _data(n=64), cfg, seconds=10.0, progress=False)
    assert record["steps"] == 20 and record["train_seconds"] == 10.0 and record["seconds_budget"] == 10.0
    assert len(record["history"]) == 5  # epochs of the whole data (4 batches of 16) once the guess is passed
    # the lr follows a cosine over the 20 steps to its end
    assert lrs[-1] == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi * 19 / 20)))
    with pytest.raises(ValueError, match="seconds must be a finite number > 0 .*, got -1"):
        train_late_phase(tiny_resnet20, LAST_STAGE, 2, _data(n=64), cfg, seconds=-1, progress=False)


def test_a_phase_whose_steps_slow_down_is_resized_to_end_with_its_budget(tiny_resnet20, monkeypatch):
    # 0.25 s a step for the first 6 steps, then 1 s: sized once from its first steps it would run ~40 steps
    # and 3x over; re-sized from the mean so far it ends within a step of the 12 s
    _scripted_clock(monkeypatch, lambda n: 0.25 if n < 6 else 1.0)
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05, augment=False, max_steps_per_epoch=4)
    _, record = train_late_phase(tiny_resnet20, LAST_STAGE, 2, _data(n=64), cfg, seconds=12.0, progress=False)
    assert 11.0 <= record["train_seconds"] <= 13.0


def test_the_main_job_gives_the_joint_trunk_the_single_runs_seconds_left_after_the_warm_start(monkeypatch):
    from shared_backbone import recipes
    seen = {}
    real = late_phase.train_late_phase

    def spy(*args, seconds=None, **kwargs):
        seen["seconds"] = seconds
        return real(*args, seconds=seconds, **kwargs)

    monkeypatch.setattr(recipes.late_phase, "train_late_phase", spy)
    full, members = TrainConfig(epochs=1, batch_size=32), TrainConfig(epochs=1, batch_size=32, precise_bn=2)
    _, r, _ = train_ensemble(LAST_STAGE, members=2, config=members, full_config=full, warm_start_epochs=1,
                             budget_epochs=2, schedule="shared", trunk="joint", ood=None, **TINY)
    assert seen["seconds"] == pytest.approx(r["baseline"]["train_seconds"] - r["warm_start_seconds"])
    assert r["train"]["seconds_budget"] == seen["seconds"]
    t = r["baseline"]["timing"]
    assert t["timed_in"] == "loop" and t["ensemble_steps"] == r["train"]["steps"]


def test_non_finite_loss_stops_the_late_phase(tiny_resnet20):
    data = _data(n=32)
    data.x[3] = float("nan")
    with pytest.raises(sb.train.NonFiniteLoss, match="late-phase loss"):
        train_late_phase(tiny_resnet20, Head(), 2, data, TrainConfig(epochs=1, batch_size=32, augment=False),
                         progress=False)


def test_train_ensemble_with_a_joint_trunk_reports_both_arms_at_one_budget():
    full = TrainConfig(epochs=1, batch_size=32)
    members = TrainConfig(epochs=1, batch_size=32, precise_bn=2)
    _, r, _ = train_ensemble(LAST_STAGE, members=2, config=members, full_config=full, warm_start_epochs=1,
                             budget_epochs=2, schedule="shared", trunk="joint", ood=None, **TINY)
    assert r["trunk"] == "joint" and r["data"] == "shared"
    t = r["baseline"]["timing"]
    assert r["train"]["steps"] == t["ensemble_steps"] and r["train"]["steps_per_member"][0] >= 1
    assert r["baseline"]["steps"] == t["budget_single_steps"] == 8
    # the trunk trained on: stored once beside the slices, like a warm start
    assert r["ensemble"]["stored_bytes"] == 2 * r["params"]["stored_bytes_per_member"] + r["params"]["full_model_bytes"]


@pytest.mark.parametrize("kwargs, match", [
    ({"trunk": "thawed"}, "trunk must be one of"),
    ({"trunk": "joint", "data": "own"}, "data must be 'shared'"),
    ({"trunk": "joint", "resume": True}, "does not checkpoint"),
    ({"trunk": "joint", "checkpoint_every": 5}, "does not checkpoint"),
    ({"slice_lr_scale": 2.0}, "needs trunk='joint'"),
    ({"trunk": "joint", "slice_lr_scale": 0.0}, "slice_lr_scale must be a finite number > 0, got 0.0"),
])
def test_joint_trunk_refuses_what_it_cannot_do(kwargs, match):
    with pytest.raises(ValueError, match=match):
        train_ensemble(Head(), **kwargs, **TINY)


# --------------------------------------------------------------------------- the main job's flag

def test_the_main_job_trains_a_joint_trunk_and_saves_an_ensemble_that_loads(tmp_path):
    from shared_backbone.cli import train_ensemble as job
    from shared_backbone.saving import load_ensemble
    out = tmp_path / "run"
    report = job.main(["--task", "digits", "--trunk", "joint", "--members", "2", "--width", "4",
                       "--budget-epochs", "2", "--warm-start-epochs", "1", "--train-subset", "64",
                       "--test-subset", "32", "--batch-size", "32", "--precise-bn", "1", "--ood", "none",
                       "--threads", "1", "--no-progress", "--out", str(out)])
    assert report["trunk"] == "joint" and report["baseline"]["members"] == 1
    ens = load_ensemble(out / "ensemble").eval()
    assert ens.frozen.fingerprint == report["fingerprint"]
    from shared_backbone.recipes import load_train_test
    _, test, _ = load_train_test("digits", 64, 32, 0)
    with torch.no_grad():
        probs = ens(test.x).softmax(-1).mean(0)
    assert (probs.argmax(-1) == test.y).float().mean().item() == pytest.approx(report["metrics"]["accuracy"])


@pytest.mark.parametrize("argv, message", [
    (["--data", "own"], "data must be 'shared', got 'own'"),
    (["--resume"], "does not checkpoint its phase"),
    (["--slice-lr-scale", "nan"], "slice_lr_scale must be a finite number > 0, got nan"),
    (["--trunk", "frozen", "--slice-lr-scale", "2"], "--slice-lr-scale 2.0 needs --trunk joint"),
])
def test_a_joint_trunk_with_what_it_cannot_do_is_a_usage_error(argv, message, tmp_path, capsys):
    from shared_backbone.cli import train_ensemble as job
    trunk = [] if argv[0] == "--trunk" else ["--trunk", "joint"]
    with pytest.raises(SystemExit) as info:
        job.main([*trunk, *argv, "--out", str(tmp_path / "run")])
    assert info.value.code == 2
    assert message in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- members that disagree off the data

def test_jigsaw_shuffles_each_images_whole_tiles_and_leaves_the_rest_in_place():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(3 * 2 * 5 * 5, dtype=torch.float32).reshape(3, 2, 5, 5)  # 5x5, tiles of 2: a 1-pixel rim
    out = late_phase.jigsaw(x, 2, g)
    assert out.shape == x.shape
    torch.testing.assert_close(out[:, :, 4, :], x[:, :, 4, :])  # the rim past the last whole tile stays
    torch.testing.assert_close(out[:, :, :, 4], x[:, :, :, 4])
    moved = 0
    for i in range(3):
        tiles_in = [x[i, :, r:r + 2, c:c + 2] for r in (0, 2) for c in (0, 2)]
        tiles_out = [out[i, :, r:r + 2, c:c + 2] for r in (0, 2) for c in (0, 2)]
        # every output tile is one of this image's tiles (its channels together), each used once
        used = sorted(next(j for j, t in enumerate(tiles_in) if torch.equal(t, o)) for o in tiles_out)
        assert used == [0, 1, 2, 3]
        moved += sum(not torch.equal(a, b) for a, b in zip(tiles_in, tiles_out))
    assert moved > 0
    torch.testing.assert_close(late_phase.jigsaw(x, 5, g), x)  # one tile: nothing to shuffle


@pytest.mark.parametrize("bad, match", [
    ({"patch": 0}, r"patch must be an integer in \[1, 5\] for 5x5 images, got 0"),
    ({"patch": 6}, r"got 6"),
    ({"patch": 2.0}, r"got 2.0"),
])
def test_jigsaw_refuses_a_tile_that_does_not_fit(bad, match):
    with pytest.raises(ValueError, match=match):
        late_phase.jigsaw(torch.zeros(1, 1, 5, 5), **bad)
    with pytest.raises(ValueError, match=r"images \(N, C, H, W\), got shape \(5, 5\)"):
        late_phase.jigsaw(torch.zeros(5, 5), 2)


@pytest.mark.parametrize("kwargs, match", [
    ({"weight": 0}, "weight must be a finite number > 0, got 0"),
    ({"weight": float("nan")}, "weight must be a finite number > 0, got nan"),
    ({"weight": True}, "weight must be a finite number > 0, got True"),
    ({"patch": 0}, "patch must be a positive integer, got 0"),
    ({"batch": 2.5}, "batch must be a positive integer, got 2.5"),
    ({"reach": "head"}, "reach must be one of trunk, slice, got 'head'"),
])
def test_a_bad_diversity_is_refused_naming_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        late_phase.Diversity(**kwargs)


def test_diversity_parses_key_values_and_names_a_bad_one():
    assert late_phase.Diversity.parse(["weight=2", "patch=7"]) == late_phase.Diversity(2.0, 7, 16)
    assert late_phase.Diversity.parse([]) == late_phase.Diversity()
    assert late_phase.Diversity.parse(["reach=slice"]).reach == "slice"
    with pytest.raises(ValueError, match="KEY one of weight, patch, batch, reach, got 'size=3'"):
        late_phase.Diversity.parse(["size=3"])
    with pytest.raises(ValueError, match="diversity patch='x': expected int"):
        late_phase.Diversity.parse(["patch=x"])


def test_the_diversity_term_is_the_agreement_of_one_member_with_the_others_mean(tiny_resnet20):
    late = LatePhase(tiny_resnet20, LAST_STAGE, members=3, member_init="random", seed=4).eval()
    div = late_phase.Diversity(weight=2.0, patch=14, batch=5)
    x = _data().x[:9]
    loss = div.loss(late, x, 1, torch.Generator().manual_seed(3))
    # by hand: the same outliers through plain modules, member 1 against the mean of members 0 and 2
    outliers = late_phase.jigsaw(x[:5], 14, torch.Generator().manual_seed(3))
    p = [_plain_member(late.trunk, late, i).eval()(outliers).softmax(-1) for i in range(3)]
    expected = 2.0 * (p[1] * (p[0] + p[2]) / 2).sum(-1).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)
    # the gradient reaches the stepping member's slice and the trunk, never the others' slices
    loss.backward()
    assert any(t.grad is not None and t.grad.abs().sum() > 0 for t in late.slices[1].values())
    assert all(t.grad is None for i in (0, 2) for t in late.slices[i].values())


def test_a_slice_reach_term_is_the_same_agreement_with_its_gradient_in_the_slice_only(tiny_resnet20):
    late = LatePhase(tiny_resnet20, LAST_STAGE, members=3, member_init="random", seed=4).eval()
    x = _data().x[:9]
    loss = late_phase.Diversity(weight=2.0, patch=14, batch=5, reach="slice").loss(
        late, x, 2, torch.Generator().manual_seed(3))
    outliers = late_phase.jigsaw(x[:5], 14, torch.Generator().manual_seed(3))
    p = [_plain_member(late.trunk, late, i).eval()(outliers).softmax(-1) for i in range(3)]
    torch.testing.assert_close(loss, 2.0 * (p[2] * (p[0] + p[1]) / 2).sum(-1).mean(), rtol=1e-4, atol=1e-6)
    loss.backward()
    assert any(t.grad is not None and t.grad.abs().sum() > 0 for t in late.slices[2].values())
    assert all(t.grad is None for i in (0, 1) for t in late.slices[i].values())
    assert all(p.grad is None for p in late.trunk.parameters())  # the trunk learns from the data alone


def test_training_with_the_diversity_term_makes_members_disagree_more_off_the_data(tiny_resnet20):
    data = _data(n=96)
    cfg = TrainConfig(epochs=3, batch_size=32, lr=0.05, augment=False)
    div = late_phase.Diversity(weight=5.0, patch=14, batch=32)
    probe = late_phase.jigsaw(_data(n=64, seed=9).x, 14, torch.Generator().manual_seed(5))

    def agreement(diversity):
        torch.manual_seed(0)
        ens, record = train_late_phase(tiny_resnet20, LAST_STAGE, 2, data, cfg, member_init="random", seed=1,
                                       diversity=diversity, progress=False)
        with torch.no_grad():
            p = ens.eval()(probe).softmax(-1)  # (K, N, C)
        return (p[0] * p[1]).sum(-1).mean().item(), record

    plain, _ = agreement(None)
    pushed, record = agreement(div)
    assert record["diversity"] == {"weight": 5.0, "patch": 14, "batch": 32, "reach": "trunk"}
    assert pushed < plain


def test_diversity_needs_a_joint_trunk_and_two_members(tiny_resnet20):
    div = late_phase.Diversity()
    with pytest.raises(ValueError, match="diversity .* needs trunk='joint'"):
        train_ensemble(Head(), diversity=div, **TINY)
    with pytest.raises(ValueError, match="needs K >= 2 members, got 1"):
        train_late_phase(tiny_resnet20, Head(), 1, _data(), TrainConfig(epochs=1), diversity=div, progress=False)
    with pytest.raises(TypeError, match="Diversity\\(...\\) or None, got dict"):
        train_late_phase(tiny_resnet20, Head(), 2, _data(), TrainConfig(epochs=1), diversity={"weight": 1},
                         progress=False)


def test_the_main_job_times_and_reports_the_diversity_term(tmp_path):
    from shared_backbone.cli import train_ensemble as job
    report = job.main(["--task", "digits", "--trunk", "joint", "--diversity", "weight=2", "--diversity", "batch=8",
                       "--members", "2", "--width", "4", "--budget-epochs", "2", "--warm-start-epochs", "1",
                       "--train-subset", "64", "--test-subset", "32", "--batch-size", "32", "--precise-bn", "1",
                       "--ood", "none", "--threads", "1", "--no-progress", "--out", str(tmp_path / "run")])
    assert report["diversity"] == report["train"]["diversity"] == {"weight": 2.0, "patch": 14, "batch": 8,
                                                                   "reach": "trunk"}


@pytest.mark.parametrize("argv, message", [
    (["--trunk", "frozen", "--diversity", "weight=1"], "--diversity needs --trunk joint"),
    (["--trunk", "joint", "--diversity", "weight=-1"], "--diversity: Diversity weight must be a finite number > 0"),
    (["--trunk", "joint", "--diversity", "tiles=4"], "--diversity: diversity takes KEY=VALUE"),
    (["--trunk", "joint", "--members", "1", "--diversity", "weight=1"], "needs K >= 2 members, got 1"),
])
def test_a_bad_diversity_flag_is_a_usage_error(argv, message, tmp_path, capsys):
    from shared_backbone.cli import train_ensemble as job
    with pytest.raises(SystemExit) as info:
        job.main([*argv, "--out", str(tmp_path / "run")])
    assert info.value.code == 2
    assert message in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "run").exists()


def test_a_diversity_step_is_counted_at_its_extra_cost_over_a_joint_step_never_less_than_one(monkeypatch):
    # a joint step that times faster than one model's (channels_last) counts as one; the diversity term's
    # extra work is then added as timed against the plain joint step, so it always costs the members steps
    from shared_backbone import recipes
    seen = {}

    def fake(steps, clock=None):
        seen["names"] = sorted(steps)
        return {"single": 1.0, "ensemble": 0.8, "ensemble_diversity": 1.0}

    monkeypatch.setattr(recipes, "equal_cost_steps", fake)
    frozen = sb.FrozenBackbone(sb.build_backbone("resnet20", width=4, in_channels=1, num_classes=5), seed=0)
    cfg = TrainConfig(batch_size=16)
    out = recipes._cost(LAST_STAGE, 2, "shared", False, frozen, _data(), cfg, cfg, None, "joint",
                        late_phase.Diversity(batch=4))
    assert seen["names"] == ["ensemble", "ensemble_diversity", "single"]
    assert out["ensemble_step_in_single_steps"] == pytest.approx(1.25)  # max(0.8, 1) x 1.0 / 0.8
