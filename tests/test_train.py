"""Training (shared_backbone.train): config checks, fit, one SGD step by hand, NaN, resume, predict.

References are independent of the code under test: an SGD step computed with autograd on a
plain ``nn.Module`` per member, torch's own BatchNorm running statistics, the frozen tensors
as they were before training, and an uninterrupted run compared with an interrupted one.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import shared_backbone as sb
import shared_backbone.train as train_mod
from shared_backbone.data import TensorData
from shared_backbone.train import NonFiniteLoss, TrainConfig, fit, predict

SPEC = sb.Filters(0.5) + sb.BatchNorm() + sb.Head()


def _frozen(seed: int = 0) -> sb.FrozenBackbone:
    return sb.FrozenBackbone(sb.build_backbone("resnet20", width=4, in_channels=1, num_classes=5), seed=seed)


def _data(n: int = 16, seed: int = 0, size: int = 16, **kw) -> TensorData:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, size, size), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 5, (n,), generator=g)
    return TensorData.from_uint8(images, labels, [0.5], [0.25], **kw)


def _slices(ens) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in ens.slices.items()}


def _frozen_state(frozen: sb.FrozenBackbone) -> dict[str, bytes]:
    return {n: t.detach().contiguous().numpy().tobytes() for n, t in frozen.tensors().items()}


# ----------------------------------------------------------------------------- TrainConfig
@pytest.mark.parametrize("field, value", [
    ("epochs", 0), ("epochs", 1.5), ("batch_size", 0), ("eval_batch_size", -1), ("lr", -1.0), ("lr", 0.0),
    ("lr", float("nan")), ("momentum", 1.0), ("momentum", -0.1), ("weight_decay", -1e-4),
    ("label_smoothing", 1.0), ("label_smoothing", -0.1), ("l1_pointwise", -1e-3), ("l1_pointwise", float("inf")),
])
def test_train_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_train_config_paper_and_from_dict():
    p = TrainConfig.paper()
    assert (p.epochs, p.batch_size, p.lr, p.weight_decay, p.momentum, p.nesterov, p.label_smoothing) == (
        75, 256, 1e-2, 1e-2, 0.9, True, 0.1)
    c = TrainConfig.from_dict({"epochs": 3, "lr": 0.2, "not_a_field": 1})
    assert c.epochs == 3 and c.lr == 0.2 and c.batch_size == TrainConfig().batch_size


# ----------------------------------------------------------------------------- fit
def test_fit_changes_only_the_slices_and_statistics():
    frozen = _frozen()
    ens = sb.Ensemble(frozen, SPEC, members=2, seed=1)
    fp_before = frozen.fingerprint
    bytes_before = _frozen_state(frozen)
    fixed_before = {n: t.clone() for n, t in ens.fixed.as_dict().items()}
    slices_before = _slices(ens)

    record = fit(ens, _data(16), None, TrainConfig(epochs=1, batch_size=8), progress=False)

    assert len(record["history"]) == 1 and record["history"][0]["epoch"] == 1
    assert record["steps"] == 2
    h = record["history"][0]
    assert math.isfinite(h["train_loss"]) and 0 <= h["train_accuracy"] <= 1
    # every learned tensor of every member moved
    for n, t in _slices(ens).items():
        for i in range(2):
            assert not torch.equal(t[i], slices_before[n][i]), (n, i)
    # the frozen backbone and the fixed rows are byte-identical
    assert _frozen_state(frozen) == bytes_before
    assert sb.frozen.fingerprint_tensors(frozen.tensors()) == fp_before
    for n, t in ens.fixed.as_dict().items():
        assert torch.equal(t, fixed_before[n]), n
    assert all(not p.requires_grad for p in frozen.backbone.parameters())
    # BatchNorm saw two training batches per member (torch counts them in num_batches_tracked)
    for n, t in ens.member_stats.as_dict().items():
        if n.endswith("num_batches_tracked"):
            assert t.tolist() == [2, 2], n


def _learned_rows(full: torch.Tensor, learned_shape: torch.Size) -> torch.Tensor:
    """A member's slice of a full tensor: all of it, or its first output rows (Filters, dim 0)."""
    if full.shape == learned_shape:
        return full
    assert full.shape[1:] == learned_shape[1:], (full.shape, learned_shape)
    return full[: learned_shape[0]]


def _before_training(ens) -> tuple[list[torch.nn.Module], list[dict[str, torch.Tensor]]]:
    """Each member as a plain module, and its slice, as they are before a step."""
    return ([ens.member(i) for i in range(ens.members)],
            [{n: t.detach().clone() for n, t in ens.slice_of(i).items()} for i in range(ens.members)])


def _first_batch(data: TensorData, bs: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first batch fit draws: the same generator seed and call."""
    (x, y), = list(data.batches(bs, shuffle=True, generator=torch.Generator().manual_seed(seed * 100_003 + 0),
                                augment=False))
    return x, y


def _plain_grads(model: torch.nn.Module, loss_of) -> dict[str, torch.Tensor]:
    """Autograd on the plain module in train mode: ``{name: grad}`` of ``loss_of(model)``."""
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    names = [n for n, _ in model.named_parameters()]
    return dict(zip(names, torch.autograd.grad(loss_of(model), list(model.parameters()), allow_unused=True)))


def _assert_plain_sgd_step(ens, i: int, model: torch.nn.Module, old: dict[str, torch.Tensor], x, y, lr: float) -> None:
    """Member ``i``'s slice after one plain SGD step (no momentum, no weight decay, no label smoothing)
    equals ``old - lr * grad`` of the plain module ``model`` (member ``i`` before the step) on ``(x, y)``."""
    grads = _plain_grads(model, lambda m: F.cross_entropy(m(x), y))
    new = ens.slice_of(i)
    for n, w in old.items():
        expected = w - lr * _learned_rows(grads[n], w.shape)
        torch.testing.assert_close(new[n].detach(), expected, rtol=1e-4, atol=1e-6, msg=f"member {i}: {n}")


@pytest.mark.parametrize("vectorized", [True, False])
def test_one_sgd_step_matches_a_hand_written_reference(vectorized):
    lr, seed, bs = 0.1, 3, 8
    cfg = TrainConfig(epochs=1, batch_size=bs, lr=lr, momentum=0.0, weight_decay=0.0, label_smoothing=0.0,
                      augment=False, seed=seed, member_group_size=0)  # every member in one forward (groups: test_member_groups)
    data = _data(bs, seed=1)
    ens = sb.Ensemble(_frozen(), SPEC, members=2, seed=4, vectorized=vectorized)
    ens.train()
    refs, old = _before_training(ens)
    x, y = _first_batch(data, bs, seed)

    fit(ens, data, None, cfg, progress=False)

    for i, model in enumerate(refs):
        _assert_plain_sgd_step(ens, i, model, old[i], x, y, lr)
        # the member's running statistics follow torch's BatchNorm on that batch
        stats = ens.stats_of(i)
        for n, b in model.named_buffers():
            if "running" in n:
                torch.testing.assert_close(stats[n], b, rtol=1e-4, atol=1e-6, msg=f"member {i}: {n}")


def test_l1_on_pointwise_weights_matches_a_hand_written_step():
    """TrainConfig.l1_pointwise adds lam * sum|w| over each member's learned 1x1 weights (LC paper Eq. 5)."""
    lr, lam, seed, bs = 0.1, 1e-2, 2, 8
    cfg = TrainConfig(epochs=1, batch_size=bs, lr=lr, momentum=0.0, weight_decay=0.0, label_smoothing=0.0,
                      augment=False, seed=seed, l1_pointwise=lam)
    data = _data(bs, seed=1)
    frozen = sb.FrozenBackbone(sb.build_backbone("lcresnet20", width=4, expansion=2, in_channels=1, num_classes=5),
                               seed=0)
    ens = sb.Ensemble(frozen, sb.Pointwise() + sb.Head(), members=2, seed=4)
    ens.train()
    refs, old = _before_training(ens)
    x, y = _first_batch(data, bs, seed)
    fit(ens, data, None, cfg, progress=False)

    def loss_of(m):
        pw = [p for p in m.parameters() if p.dim() == 4 and p.shape[-2:] == (1, 1)]
        assert len(pw) == 19 + 2  # the 1x1 of every LC-Block (one per conv of ResNet-20) + 2 shortcut 1x1 convs
        return F.cross_entropy(m(x), y) + lam * sum(p.abs().sum() for p in pw)

    for i, model in enumerate(refs):
        grads = _plain_grads(model, loss_of)
        new = ens.slice_of(i)
        for n, w in old[i].items():
            torch.testing.assert_close(new[n].detach(), w - lr * grads[n], rtol=1e-4, atol=1e-6, msg=f"member {i}: {n}")


def test_a_regularizer_passed_in_matches_a_hand_written_step():
    """fit(regularizers=[f]) adds f(model) to the loss: here mu * sum w^2 over the slices, each member its own."""
    lr, mu, seed, bs = 0.1, 0.3, 2, 8
    cfg = TrainConfig(epochs=1, batch_size=bs, lr=lr, momentum=0.0, weight_decay=0.0, label_smoothing=0.0,
                      augment=False, seed=seed)
    data = _data(bs, seed=1)
    ens = sb.Ensemble(_frozen(), sb.Head(), members=2, seed=4)
    ens.train()
    refs, old = _before_training(ens)
    x, y = _first_batch(data, bs, seed)
    fit(ens, data, None, cfg, progress=False,
        regularizers=[lambda model: mu * sum((w ** 2).sum() for w in model.slices.values())])

    for i, model in enumerate(refs):
        def loss_of(m):
            params = dict(m.named_parameters())
            return F.cross_entropy(m(x), y) + mu * sum((params[n] ** 2).sum() for n in old[i])

        grads = _plain_grads(model, loss_of)
        new = ens.slice_of(i)
        for n, w in old[i].items():
            torch.testing.assert_close(new[n].detach(), w - lr * grads[n], rtol=1e-4, atol=1e-6, msg=f"member {i}: {n}")


def test_l1_needs_a_learned_pointwise_weight():
    ens = sb.Ensemble(_frozen(), sb.Head(), members=2)
    with pytest.raises(ValueError, match="l1_pointwise=0.01.*no 1x1 conv weight"):
        fit(ens, _data(8), None, TrainConfig(epochs=1, batch_size=8, l1_pointwise=0.01), progress=False)


def test_fit_with_a_shared_prefix_matches_the_reference_too():
    """Head() only: the prefix runs once, shared; the head's step still equals the plain module's."""
    lr = 0.2
    cfg = TrainConfig(epochs=1, batch_size=8, lr=lr, momentum=0.0, weight_decay=0.0, label_smoothing=0.0,
                      augment=False, seed=0)
    data = _data(8, seed=2)
    ens = sb.Ensemble(_frozen(), sb.Head(), members=2, seed=2)
    refs, old = _before_training(ens)
    x, y = _first_batch(data, 8, seed=0)
    fit(ens, data, None, cfg, progress=False)
    for i, model in enumerate(refs):
        grads = _plain_grads(model, lambda m: F.cross_entropy(m(x), y))
        for n, w in old[i].items():
            torch.testing.assert_close(ens.slice_of(i)[n].detach(), w - lr * grads[n], rtol=1e-4, atol=1e-6)


def test_nan_inputs_stop_training_with_nonfinite_loss():
    data = _data(8)
    x = data.x.clone()
    x[0, 0, 0, 0] = float("nan")
    bad = TensorData(x, data.y, data.mean, data.std)
    ens = sb.Ensemble(_frozen(), SPEC, members=2)
    before = _slices(ens)
    with pytest.raises(NonFiniteLoss, match="lr") as info:
        fit(ens, bad, None, TrainConfig(epochs=1, batch_size=8, lr=0.123), progress=False)
    assert "0.123" in str(info.value)
    assert isinstance(info.value, FloatingPointError)
    for n, t in _slices(ens).items():  # it stopped before stepping
        assert torch.equal(t, before[n]), n


class _Interrupted(Exception):
    pass


def test_resume_after_an_interruption_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    # default momentum (Nesterov 0.9) and weight decay, so the optimiser state must be restored too
    cfg = TrainConfig(epochs=2, batch_size=8, lr=0.05, seed=5)
    data = _data(16, seed=4, crop_padding=2, hflip=True)

    full = sb.Ensemble(_frozen(), SPEC, members=2, seed=6)
    rec_full = fit(full, data, None, cfg, out_dir=tmp_path / "a", progress=False)

    # the same run, killed right after epoch 1 has been checkpointed
    real_write_json = train_mod.write_json

    def write_then_die(path, obj):
        out = real_write_json(path, obj)
        if path.name == "history.json":
            raise _Interrupted
        return out

    first = sb.Ensemble(_frozen(), SPEC, members=2, seed=6)
    monkeypatch.setattr(train_mod, "write_json", write_then_die)
    with pytest.raises(_Interrupted):
        fit(first, data, None, cfg, out_dir=tmp_path / "b", progress=False)
    monkeypatch.undo()
    assert (tmp_path / "b" / "checkpoint" / "state.safetensors").is_file()

    resumed = sb.Ensemble(_frozen(), SPEC, members=2, seed=6)  # a fresh process would start like this
    rec = fit(resumed, data, None, cfg, out_dir=tmp_path / "b", resume=True, progress=False)

    assert rec["steps"] == rec_full["steps"] == 4
    assert [h["epoch"] for h in rec["history"]] == [1, 2]
    torch.testing.assert_close(rec["history"][1]["train_loss"], rec_full["history"][1]["train_loss"],
                               rtol=1e-5, atol=1e-6)
    for n, t in full.slices.items():
        assert torch.allclose(resumed.slices[n], t, atol=1e-6), n
    for n, t in full.member_stats.as_dict().items():
        assert torch.allclose(resumed.member_stats.as_dict()[n].float(), t.float(), atol=1e-6), n
    # and it did really resume (not retrain from scratch): the interrupted ensemble had done epoch 1 only
    assert not torch.allclose(next(iter(first.slices.values())), next(iter(full.slices.values())), atol=1e-6)


def test_resume_without_a_checkpoint_starts_from_scratch(tmp_path):
    cfg = TrainConfig(epochs=1, batch_size=8, seed=1)
    data = _data(8)
    a = sb.Ensemble(_frozen(), SPEC, members=2, seed=1)
    b = sb.Ensemble(_frozen(), SPEC, members=2, seed=1)
    fit(a, data, None, cfg, progress=False)
    rec = fit(b, data, None, cfg, out_dir=tmp_path / "new", resume=True, progress=False)
    assert rec["steps"] == 1
    for n, t in a.slices.items():
        assert torch.equal(b.slices[n], t), n


# ----------------------------------------------------------------------------- predict
@pytest.mark.parametrize("training", [True, False])
def test_predict_shape_values_and_mode(training):
    ens = sb.Ensemble(_frozen(), SPEC, members=3, seed=2)
    with torch.no_grad():  # non-default statistics, so eval mode matters
        for n, t in ens.member_stats.as_dict().items():
            if n.endswith("running_mean"):
                t.add_(0.05 * torch.randn(t.shape, generator=torch.Generator().manual_seed(len(n))))
    ens.train(training)
    data = _data(6, seed=8)
    out = predict(ens, data, batch_size=4)
    assert out.shape == (3, 6, 5) and out.device.type == "cpu" and out.dtype == torch.float32
    assert ens.training is training
    for i in range(3):  # each member equals its plain module in eval mode
        model = ens.member(i).eval()
        with torch.no_grad():
            torch.testing.assert_close(out[i], model(data.x), rtol=1e-4, atol=1e-5)


def test_fit_with_test_data_reports_metrics_on_predicted_logits():
    ens = sb.Ensemble(_frozen(), SPEC, members=2, seed=2)
    test = _data(6, seed=9)
    rec = fit(ens, _data(8), test, TrainConfig(epochs=1, batch_size=8, eval_batch_size=4), progress=False)
    logits = rec["_test_logits"]
    assert logits.shape == (2, 6, 5)
    torch.testing.assert_close(logits, predict(ens, test, 6))
    acc = (logits.softmax(-1).mean(0).argmax(-1) == test.y).float().mean().item()
    assert rec["test"]["accuracy"] == pytest.approx(acc)


# ----------------------------------------------------------------------------- data modes
def test_own_data_with_bootstrap_makes_identical_starts_differ():
    cfg = TrainConfig(epochs=1, batch_size=8, bootstrap=True, seed=0)
    ens = sb.Ensemble(_frozen(), SPEC, members=2, member_init="backbone", data="own")
    for n, t in ens.slices.items():
        assert torch.equal(t[0], t[1]), n  # same start
    before = _slices(ens)
    rec = fit(ens, _data(16), None, cfg, progress=False)
    assert rec["steps"] == 2 and len(rec["history"]) == 1
    changed = [n for n, t in ens.slices.items() if not torch.equal(t, before[n])]
    assert changed
    assert any(not torch.equal(t[0], t[1]) for t in ens.slices.values())


def test_shared_data_with_identical_starts_keeps_members_identical():
    """Control for the test above: same start + same batches = the same model, K times."""
    ens = sb.Ensemble(_frozen(), SPEC, members=2, member_init="backbone", data="shared")
    fit(ens, _data(16), None, TrainConfig(epochs=1, batch_size=8), progress=False)
    for n, t in ens.slices.items():
        torch.testing.assert_close(t[0], t[1], rtol=0, atol=1e-6, msg=n)


def test_train_config_rejects_nan_weight_decay():
    with pytest.raises(ValueError, match="weight_decay"):
        TrainConfig(weight_decay=float("nan"))


def test_recalibrate_bn_gives_exact_averages_like_a_plain_module():
    """Precise BN: after recalibration each member's running statistics are the equal-weight average
    of its batch statistics over the batches, as a plain module with momentum=None computes them."""
    import copy

    import shared_backbone as sb
    from shared_backbone.data import TensorData
    from shared_backbone.train import recalibrate_bn

    torch.manual_seed(0)
    frozen = sb.FrozenBackbone(sb.build_backbone("resnet20", width=4, in_channels=1, num_classes=3), seed=0)
    ens = sb.Ensemble(frozen, sb.Filters(0.5) + sb.BatchNorm() + sb.Head(), members=2, seed=1)
    data = TensorData(torch.randn(40, 1, 8, 8) * 3 + 1, torch.randint(0, 3, (40,)), [0.0], [1.0])
    ens.eval()
    assert recalibrate_bn(ens, data, num_batches=2, batch_size=16) == 2
    assert not ens.training
    assert all(m.momentum == 0.1 for m in ens._template.modules() if isinstance(m, torch.nn.BatchNorm2d))
    g = torch.Generator().manual_seed(0)
    batches = [x for x, _ in data.batches(16, shuffle=True, generator=g)][:2]
    for i in range(2):
        ref = copy.deepcopy(ens.member(i))
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        ref.train()
        with torch.no_grad():
            for x in batches:
                ref(x)
        want = dict(ref.named_buffers())
        for n, t in ens.stats_of(i).items():
            torch.testing.assert_close(t.to(want[n].dtype), want[n], atol=1e-5, rtol=1e-5, msg=f"member {i}: {n}")


def test_precise_bn_must_be_a_count():
    with pytest.raises(ValueError, match="precise_bn must be a number of batches"):
        TrainConfig(precise_bn=-1)


def _lrs_seen(cfg: TrainConfig, n: int = 32) -> list[float]:
    """The lr of every optimizer step of one fit, read off the optimizer as the step runs."""
    ens = sb.Ensemble(_frozen(), SPEC, members=1)
    seen: list[float] = []
    opt_step = torch.optim.SGD.step

    def spy(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return opt_step(self, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.SGD, "step", spy)
        fit(ens, _data(n), None, cfg, progress=False)
    return seen


def test_a_schedule_in_two_pieces_matches_one_cosine_step_for_step():
    """A warm start covering [0, 0.5] of a cosine and a run covering [0.5, 1] see the lrs one run of
    twice the length sees: 0.5 * lr * (1 + cos(pi * t / T)) at its steps t = 0 .. T-1 (hand-computed)."""
    base = dict(batch_size=8, lr=0.1, augment=False, epochs=2)  # 32 images: 4 steps an epoch, 8 a run
    first = _lrs_seen(TrainConfig(**base, schedule_to=0.5))
    second = _lrs_seen(TrainConfig(**base, schedule_from=0.5))
    whole = [0.5 * 0.1 * (1 + math.cos(math.pi * t / 16)) for t in range(16)]
    assert first == pytest.approx(whole[:8], rel=1e-12, abs=1e-15)
    assert second == pytest.approx(whole[8:], rel=1e-12, abs=1e-15)
    assert _lrs_seen(TrainConfig(**base)) == pytest.approx(
        [0.5 * 0.1 * (1 + math.cos(math.pi * t / 8)) for t in range(8)], rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("start, stop", [(0.5, 0.5), (0.6, 0.4), (-0.1, 1.0), (0.0, 1.5), (float("nan"), 1.0)])
def test_train_config_rejects_a_schedule_piece_outside_zero_to_one(start, stop):
    with pytest.raises(ValueError, match="schedule_from and schedule_to"):
        TrainConfig(schedule_from=start, schedule_to=stop)
