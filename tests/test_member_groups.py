"""Members trained in groups (shared_backbone._member_groups, TrainConfig.member_group_size).

References: one SGD step computed with autograd on a plain ``nn.Module`` per member and torch's
own BatchNorm statistics (as in tests/test_train.py), and the same run with every member at once.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import shared_backbone as sb
from shared_backbone._member_groups import auto_group_size, forward_in_groups, group_ranges, member_group
from shared_backbone.ensemble import MemberStack
from shared_backbone.train import TrainConfig, _group_size, fit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import SPEC, _assert_plain_sgd_step, _before_training, _data, _first_batch, _frozen  # noqa: E402

ONE_STEP = dict(epochs=1, batch_size=8, lr=0.1, momentum=0.0, weight_decay=0.0, label_smoothing=0.0, augment=False)


@pytest.mark.parametrize("members, size, want", [
    (5, 2, [(0, 2), (2, 4), (4, 5)]), (4, None, [(0, 4)]), (3, 8, [(0, 3)]), (3, 3, [(0, 3)]),
    (3, 1, [(0, 1), (1, 2), (2, 3)]),
])
def test_group_ranges_cover_every_member_once_in_order(members, size, want):
    assert [(r.start, r.stop) for r in group_ranges(members, size)] == want


@pytest.mark.parametrize("value", [-1, 1.5, True, "2"])
def test_bad_group_sizes_are_refused_naming_the_value(value):
    with pytest.raises(ValueError, match="member_group_size") as info:
        TrainConfig(member_group_size=value)
    assert repr(value) in str(info.value)


def test_a_group_is_a_view_its_logits_and_gradients_are_the_stacks_rows():
    ens = sb.Ensemble(_frozen(), SPEC, members=4, seed=1).eval()
    x = _data(6, seed=3).x
    with torch.no_grad():
        whole = ens(x)
    group = member_group(ens, range(1, 3))
    assert group.members == 2 and group.member_ids == [1, 2]
    logits = group.forward_members(ens.prefix(x))
    torch.testing.assert_close(logits, whole[1:3], rtol=1e-5, atol=1e-6)
    logits.sum().backward()
    for n, p in ens.slices.items():  # the gradient lands in the stack's own parameter, rows 1 and 2 only
        assert p.grad is not None and bool(p.grad[[0, 3]].eq(0).all()) and bool(p.grad[1:3].ne(0).any()), n
    with pytest.raises(ValueError, match="consecutive members"):
        member_group(ens, range(3, 5))


@pytest.mark.parametrize("vectorized", [True, False])
@pytest.mark.parametrize("size", [1, 2])
def test_one_grouped_sgd_step_matches_a_hand_written_reference(vectorized, size):
    """3 members in groups of 1 or 2 (the last group smaller): every member's step and BatchNorm
    statistics are a plain module's, as with all members at once."""
    seed, bs, lr = 3, 8, ONE_STEP["lr"]
    data = _data(bs, seed=1)
    ens = sb.Ensemble(_frozen(), SPEC, members=3, seed=4, vectorized=vectorized).train()
    refs, old = _before_training(ens)
    x, y = _first_batch(data, bs, seed)
    fit(ens, data, None, TrainConfig(**ONE_STEP, seed=seed, member_group_size=size), progress=False)
    for i, model in enumerate(refs):
        _assert_plain_sgd_step(ens, i, model, old[i], x, y, lr)
        stats = ens.stats_of(i)
        for n, b in model.named_buffers():
            if "running" in n or "num_batches" in n:
                torch.testing.assert_close(stats[n], b, rtol=1e-4, atol=1e-6, msg=f"member {i}: {n}")


def test_a_shared_prefix_runs_once_per_step_and_its_statistics_follow_the_plain_module(monkeypatch):
    """Blocks("block3") + Head(): stages 1-2 (and their BatchNorm statistics) are shared; four members
    in groups of one still run them once per step, so the shared running statistics are those of a
    plain module after one batch."""
    seed, bs, lr = 0, 8, ONE_STEP["lr"]
    data = _data(bs, seed=2)
    ens = sb.Ensemble(_frozen(), sb.Blocks("block3") + sb.Head(), members=4, seed=2).train()
    assert ens.prefix_stages  # the shared prefix this test is about
    refs, old = _before_training(ens)
    x, y = _first_batch(data, bs, seed)
    calls = []
    real_prefix = MemberStack.prefix
    monkeypatch.setattr(MemberStack, "prefix", lambda self, h: calls.append(1) or real_prefix(self, h))
    fit(ens, data, None, TrainConfig(**ONE_STEP, seed=seed, member_group_size=1), progress=False)
    assert len(calls) == 1
    shared = ens.shared_stats.as_dict()
    assert shared
    for i, model in enumerate(refs):
        _assert_plain_sgd_step(ens, i, model, old[i], x, y, lr)
        buffers = dict(model.named_buffers())
        for n, t in shared.items():
            torch.testing.assert_close(t, buffers[n], rtol=1e-4, atol=1e-6, msg=n)


def test_own_data_groups_slice_each_members_batch():
    """data="own": member i trains on its own stream (seeded by its index); in groups of 2 of 3."""
    seed, bs, lr = 1, 8, ONE_STEP["lr"]
    data = _data(16, seed=5)
    ens = sb.Ensemble(_frozen(), SPEC, members=3, seed=3, data="own").train()
    refs, old = _before_training(ens)
    fit(ens, data, None, TrainConfig(**{**ONE_STEP, "epochs": 1}, seed=seed, max_steps_per_epoch=1,
                                     member_group_size=2), progress=False)
    for i, model in enumerate(refs):
        g = torch.Generator().manual_seed(seed * 100_003 + 0 * 1_009 + i)  # member i's stream, epoch 0
        x, y = next(iter(data.batches(bs, shuffle=True, generator=g, augment=False)))
        _assert_plain_sgd_step(ens, i, model, old[i], x, y, lr)


def _trained(spec, data_mode: str, size: int | None, vectorized: bool = True):
    """Two epochs of two steps with the default recipe (Nesterov, weight decay, label smoothing,
    augmentation) plus a regulariser, which a grouped step must add once, not once per group.

    In float64: a group's loss is its members' mean times G where the whole stack's is over K
    members times K, which can round differently in the last bit; momentum then grows float32
    last-bit differences into 1e-4 within a few steps (vmap against the loop does the same)."""
    ens = sb.Ensemble(_frozen(), spec, members=4, seed=7, data=data_mode, vectorized=vectorized).double()
    cfg = TrainConfig(epochs=2, batch_size=8, seed=2, bootstrap=data_mode == "own", member_group_size=size)
    data = _data(16, seed=6, crop_padding=2, hflip=True, dtype=torch.float64)
    rec = fit(ens, data, None, cfg, progress=False,
              regularizers=[lambda m: 0.01 * sum((w ** 2).sum() for w in m.slices.values())])
    return ens, rec


@pytest.mark.parametrize("spec, data_mode, vectorized", [
    (SPEC, "shared", True), (SPEC, "shared", False), (sb.Blocks("block3") + sb.Head(), "shared", True),
    (SPEC, "own", True),
])
@pytest.mark.parametrize("size", [1, 3])
def test_grouped_training_equals_all_members_at_once(spec, data_mode, vectorized, size):
    ref, ref_rec = _trained(spec, data_mode, 0, vectorized)  # 0: all members in one forward (unset may group)
    ens, rec = _trained(spec, data_mode, size, vectorized)
    for n, t in ref.state_dict().items():  # slices, shared and per-member BatchNorm statistics
        torch.testing.assert_close(ens.state_dict()[n], t, rtol=0, atol=1e-10, msg=n)
    for h, r in zip(rec["history"], ref_rec["history"], strict=True):  # the reported loss and accuracy
        assert h["train_accuracy"] == r["train_accuracy"]
        assert h["train_loss"] == pytest.approx(r["train_loss"], rel=1e-12)


def test_groups_that_split_an_8_member_vmap_like_its_cpu_chunks_are_bit_identical():
    """K=8 runs vmap in chunks of 4 on CPU; groups of 4 (what an unset member_group_size picks there)
    or 2 run the same per-member computations, to the bit."""
    frozen = _frozen()
    data = _data(16, seed=6)
    out = []
    for size in (0, None, 4, 2):
        e = sb.Ensemble(frozen, SPEC, members=8, seed=7)
        out.append((e, fit(e, data, None, TrainConfig(epochs=1, batch_size=8, seed=2, member_group_size=size),
                           progress=False)))
    (e0, r0), *rest = out
    for e, r in rest:
        for n, t in e0.state_dict().items():
            assert torch.equal(e.state_dict()[n], t), n
        for h, h0 in zip(r["history"], r0["history"], strict=True):  # the loss: K-member sums in another order
            assert h["train_accuracy"] == h0["train_accuracy"]
            assert h["train_loss"] == pytest.approx(h0["train_loss"], rel=1e-6)


def _run(size, members=4, shard=False, device="cpu", vectorized=True):
    return SimpleNamespace(cfg=TrainConfig(member_group_size=size),
                           local=SimpleNamespace(members=members, vectorized=vectorized),
                           shard=shard, procs=2 if shard else 1, accelerator=SimpleNamespace(device=torch.device(device)))


@pytest.mark.parametrize("members, want", [(1, None), (4, None), (5, 3), (6, 3), (8, 4), (9, 3), (10, 4), (13, 5)])
def test_unset_picks_the_cpu_vmap_chunks_never_a_lone_member(members, want):
    assert auto_group_size(members, "cpu") == want
    assert _group_size(_run(None, members)) == want
    assert auto_group_size(members, "meta") is None  # not a CPU: one vmapped call over every member


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("members, want", [(1, None), (2, 1), (8, 1)])
def test_unset_runs_the_member_loop_one_member_at_a_time(members, want, device):
    """The member loop computes one member at a time anyway: unset groups hold one member each, on any device."""
    assert auto_group_size(members, device, vectorized=False) == want
    assert _group_size(_run(None, members, device=device, vectorized=False)) == want
    assert _group_size(_run(None, members, shard=True, vectorized=False)) is None  # never under DDP


def test_grouping_is_off_under_ddp_with_a_warning_and_off_when_it_splits_nothing():
    assert _group_size(_run(2)) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _group_size(_run(0, members=8)) is None  # 0: all at once
        assert _group_size(_run(4)) is None and _group_size(_run(9)) is None  # one group: the plain forward
        assert _group_size(_run(None, members=8, shard=True)) is None  # unset: off under DDP, silently
        assert _group_size(_run(4, shard=True)) is None
    with pytest.warns(RuntimeWarning, match=r"member_group_size=2 is not used with parallel='data' over 2"):
        assert _group_size(_run(2, shard=True)) is None


def test_forward_in_groups_checks_its_input():
    ens = sb.Ensemble(_frozen(), SPEC, members=2)
    with pytest.raises(ValueError, match="expected input of shape"):
        next(forward_in_groups(ens, torch.zeros(2, 3, 8, 8), 1))
