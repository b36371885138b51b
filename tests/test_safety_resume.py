"""Resume continues only the run it was made by, and training's edge cases fail clearly.

References: the differences each test makes on purpose (seed, spec, K, recipe, backbone) must all be
named in the refusal; the run resumed with only an allowed change equals the checkpoint's own slices.
"""
from __future__ import annotations

import json

import pytest
import torch

import shared_backbone as sb
from shared_backbone.data import TensorData
from shared_backbone.train import NonFiniteLoss, ResumeMismatch, TrainConfig, fit

SPEC = sb.BatchNorm() + sb.Head()


def _frozen(seed: int = 0) -> sb.FrozenBackbone:
    return sb.FrozenBackbone(sb.build_backbone("resnet20", width=4, in_channels=1, num_classes=5), seed=seed)


def _data(n: int = 16, seed: int = 0) -> TensorData:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 12, 12), generator=g, dtype=torch.uint8)
    return TensorData.from_uint8(images, torch.randint(0, 5, (n,), generator=g), [0.5], [0.25])


CFG = TrainConfig(epochs=1, batch_size=8, seed=0, augment=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    ens = sb.Ensemble(_frozen(), SPEC, members=2, seed=1)
    fit(ens, _data(), None, CFG, out_dir=out, progress=False)
    return out


def _refusal(out, ens, cfg) -> str:
    with pytest.raises(ResumeMismatch) as info:
        fit(ens, _data(), None, cfg, out_dir=out, resume=True, progress=False)
    return str(info.value)


@pytest.mark.parametrize("change, named", [
    (dict(seed=1), ["seed"]), (dict(lr=0.5), ["lr"]), (dict(batch_size=4), ["batch_size"]),
    (dict(seed=1, lr=0.5, label_smoothing=0.0), ["seed", "lr", "label_smoothing"]),
])
def test_resume_refuses_another_recipe_naming_each_difference(run, change, named):
    ens = sb.Ensemble(_frozen(), SPEC, members=2, seed=1)
    msg = _refusal(run, ens, TrainConfig(**{**vars(CFG), **change}))
    for field in named:
        assert f"{field}: checkpoint" in msg, msg
    assert "Only epochs, eval_batch_size, precise_bn, member_group_size may change" in msg


@pytest.mark.parametrize("what, ens", [
    ("fingerprint", lambda: sb.Ensemble(_frozen(seed=1), SPEC, members=2, seed=1)),  # --seed of the backbone
    ("spec", lambda: sb.Ensemble(_frozen(), sb.Head(), members=2, seed=1)),
    ("members", lambda: sb.Ensemble(_frozen(), SPEC, members=3, seed=1)),
    ("data", lambda: sb.Ensemble(_frozen(), SPEC, members=2, seed=1, data="own")),
])
def test_resume_refuses_another_backbone_spec_or_k(run, what, ens):
    assert f"{what}: checkpoint" in _refusal(run, ens(), CFG)


def test_resume_may_train_longer(run, tmp_path):
    import shutil

    out = shutil.copytree(run, tmp_path / "longer")
    ens = sb.Ensemble(_frozen(), SPEC, members=2, seed=1)
    rec = fit(ens, _data(), None, TrainConfig(**{**vars(CFG), "epochs": 2}), out_dir=out, resume=True, progress=False)
    assert rec["steps"] == 4 and [h["epoch"] for h in rec["history"]] == [1, 2]


def test_resume_may_train_the_members_in_groups(run, tmp_path):
    """member_group_size changes how a step is computed, not what it computes: a resume may change it."""
    import shutil

    out = shutil.copytree(run, tmp_path / "grouped")
    ens = sb.Ensemble(_frozen(), SPEC, members=2, seed=1)
    rec = fit(ens, _data(), None, TrainConfig(**{**vars(CFG), "epochs": 2, "member_group_size": 1}), out_dir=out,
              resume=True, progress=False)
    assert rec["steps"] == 4 and rec["config"]["member_group_size"] == 1
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["epoch"] == 2 and state["config"]["epochs"] == 2


def test_a_tampered_checkpoint_is_refused(run, tmp_path):
    import shutil

    out = shutil.copytree(run, tmp_path / "t")
    f = out / "checkpoint" / "state.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 1
    f.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="does not match its manifest"):
        fit(sb.Ensemble(_frozen(), SPEC, members=2, seed=1), _data(), None, CFG, out_dir=out, resume=True,
            progress=False)


def test_position_that_does_not_fit_the_run_is_refused(run, tmp_path):
    import shutil

    out = shutil.copytree(run, tmp_path / "p")
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    state["step"] = 7  # 1 epoch of 2 steps cannot be step 7
    (out / "checkpoint" / "state.json").write_text(json.dumps(state))
    with pytest.raises(ResumeMismatch, match="does not fit 2 steps per epoch"):
        fit(sb.Ensemble(_frozen(), SPEC, members=2, seed=1), _data(), None, CFG, out_dir=out, resume=True,
            progress=False)


# ----------------------------------------------------------------------------- edge cases of training
def test_an_empty_training_set_is_a_clear_error():
    empty = TensorData.from_uint8(torch.zeros(0, 1, 12, 12, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64),
                                  [0.5], [0.25])
    with pytest.raises(ValueError, match="training set is empty"):
        fit(sb.Ensemble(_frozen(), SPEC, members=2), empty, None, CFG, progress=False)


@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_max_steps_per_epoch_must_be_positive(value):
    with pytest.raises(ValueError, match="max_steps_per_epoch must be a positive integer"):
        TrainConfig(max_steps_per_epoch=value)


@pytest.mark.parametrize("lr", [1e38, 3e38])
def test_weights_that_explode_stop_training_and_are_never_checkpointed(tmp_path, lr):
    ens = sb.Ensemble(_frozen(), SPEC, members=2, seed=1)
    cfg = TrainConfig(epochs=2, batch_size=8, lr=lr, momentum=0.0, weight_decay=0.0, augment=False)
    with pytest.raises(NonFiniteLoss, match="NaN or infinite|loss became nan"):
        fit(ens, _data(16), None, cfg, out_dir=tmp_path, checkpoint_every=1, progress=False)
    state = tmp_path / "checkpoint" / "state.json"
    if state.exists():  # only checkpoints taken before the explosion, all finite
        from shared_backbone.io import read_artifact, tensors_from_bytes
        from shared_backbone.schema import CheckpointState

        _, files = read_artifact(state.parent, "state.json", CheckpointState.from_dict)
        tensors, _ = tensors_from_bytes(files["state.safetensors"], "state")
        assert all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())


def test_a_weight_that_becomes_infinite_is_caught_after_the_step(monkeypatch):
    ens = sb.Ensemble(_frozen(), SPEC, members=2, seed=1)
    real = torch.optim.SGD.step

    def step(self, *a, **k):  # an optimizer step that overflows one weight while the loss was finite
        out = real(self, *a, **k)
        with torch.no_grad():
            self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    with pytest.raises(NonFiniteLoss, match="learned weight became NaN or infinite after step 1"):
        fit(ens, _data(8), None, CFG, progress=False)


def test_finite_but_absurd_weights_warn_when_the_test_logits_are_not_finite(monkeypatch):
    ens = sb.Ensemble(_frozen(), SPEC, members=2, seed=1)
    import shared_backbone.train as train_mod

    monkeypatch.setattr(train_mod, "predict", lambda *a, **k: torch.full((2, 8, 5), float("nan")))
    with pytest.warns(RuntimeWarning, match="finite but absurd"):
        fit(ens, _data(8), _data(8, seed=1), CFG, progress=False)
