"""Members on a trunk that keeps training (late-phase weights), against plain modules with the same weights."""
from __future__ import annotations

import copy
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
