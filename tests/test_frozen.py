"""FrozenBackbone: regenerable from a config, fingerprinted, never trained."""
from __future__ import annotations

import pytest
import torch

import shared_backbone as sb
from conftest import head_linear
from shared_backbone import FingerprintMismatch, FrozenBackbone, INIT_SCHEMES

# how to shrink each kind of option (applied where a backbone accepts it), as in test_backbones.py
TINY = {"width": 4, "widen_factor": 1, "growth_rate": 4, "width_mult": 0.25, "expansion": 2,
        "in_channels": 1, "num_classes": 3, "small_input": True}
TINY_OVERRIDES = {"densenet_bc100": {"depth": 40}}
# torchvision ResNets cannot be shrunk: rebuilding them for from_config costs seconds each
HEAVY = {"resnet50", "wide_resnet50_2"}


def tiny_cfg(name: str) -> dict:
    defaults = sb.backbone_config(name)
    cfg = {k: v for k, v in TINY.items() if k in defaults}
    cfg.update(TINY_OVERRIDES.get(name, {}))
    return cfg


def snapshot(frozen: FrozenBackbone) -> dict[str, bytes]:
    return {n: t.detach().cpu().contiguous().numpy().tobytes() for n, t in frozen.tensors().items()}


@torch.no_grad()
def scramble(module: torch.nn.Module) -> None:
    """Overwrite every parameter and buffer with garbage, so a tensor init forgets stays visible."""
    for t in list(module.parameters()) + list(module.buffers()):
        t.fill_(7 if t.is_floating_point() else 5)


# ---------------------------------------------------------------- determinism over the registry


@pytest.mark.parametrize("name", sb.list_backbones())
def test_same_seed_same_tensors_other_seed_other_fingerprint(name):
    torch.manual_seed(1)
    bb = sb.build_backbone(name, **tiny_cfg(name))
    a = FrozenBackbone(bb, seed=3)
    want, fp = snapshot(a), a.fingerprint
    assert len(fp) == 16 and int(fp, 16) >= 0

    # re-initialising from garbage (and another global RNG state) gives back every tensor, bytewise
    scramble(bb)
    torch.manual_seed(2)
    torch.rand(100)
    b = FrozenBackbone(bb, seed=3)
    assert b.fingerprint == fp
    assert snapshot(b) == want

    c = FrozenBackbone(bb, seed=4)
    assert c.fingerprint != fp
    got = snapshot(c)
    assert set(got) == set(want)
    # every conv/linear weight is random, so each one must change with the seed
    weights = [n for n, p in bb.named_parameters() if p.dim() >= 2]
    assert weights and all(got[n] != want[n] for n in weights)
    assert not any(p.requires_grad for p in bb.parameters())


@pytest.mark.parametrize("name", sorted(set(sb.list_backbones()) - HEAVY))
def test_from_config_regenerates_every_backbone(name):
    torch.manual_seed(10)
    frozen = FrozenBackbone(sb.build_backbone(name, **tiny_cfg(name)), seed=11)
    cfg = frozen.config
    assert cfg["arch"] == name and cfg["seed"] == 11 and cfg["init"] == "default"
    assert cfg["source"] == "random" and cfg["fingerprint"] == frozen.fingerprint
    assert cfg["config"] == {**sb.backbone_config(name), **tiny_cfg(name)}
    torch.manual_seed(99)  # a different global RNG state must not matter
    again = FrozenBackbone.from_config(cfg)
    assert again.fingerprint == frozen.fingerprint
    assert snapshot(again) == snapshot(frozen)
    assert type(again.backbone) is type(frozen.backbone) and again.backbone.arch == name


# ---------------------------------------------------------------- init schemes


def test_every_init_scheme_is_deterministic_and_distinct(make_resnet20):
    assert {"default", "kaiming_uniform", "kaiming_normal", "xavier_uniform", "xavier_normal",
            "orthogonal"} <= set(INIT_SCHEMES)
    fingerprints, convs = {}, {}
    for init in INIT_SCHEMES:
        a = FrozenBackbone(make_resnet20(), seed=0, init=init)
        b = FrozenBackbone(make_resnet20(), seed=0, init=init)
        assert a.fingerprint == b.fingerprint, init
        assert snapshot(a) == snapshot(b), init
        assert a.config["init"] == init
        t = a.tensors()
        assert all(torch.isfinite(v).all() for v in t.values() if v.is_floating_point())
        # BatchNorm is reset to its identity in every scheme
        assert torch.equal(t["stages.stem.1.weight"], torch.ones(4))
        assert torch.equal(t["stages.stem.1.running_var"], torch.ones(4))
        fingerprints[init] = a.fingerprint
        convs[init] = t["stages.block2.0.conv1.weight"]
        assert FrozenBackbone.from_config(a.config).fingerprint == a.fingerprint
    assert len(set(fingerprints.values())) == len(INIT_SCHEMES)
    # spot-check the schemes on block2's first conv, 8x4x3x3 (fan_in 36, fan_out 72)
    bound_default = 1 / 36 ** 0.5
    assert convs["default"].abs().max() <= bound_default
    assert convs["kaiming_uniform"].abs().max() <= (6 / 36) ** 0.5
    assert convs["kaiming_uniform"].abs().max() > bound_default
    assert convs["xavier_uniform"].abs().max() <= (6 / (36 + 72)) ** 0.5
    w = convs["orthogonal"].reshape(8, -1)
    torch.testing.assert_close(w @ w.T, torch.eye(8), atol=1e-5, rtol=0)


def test_unknown_init_is_a_clear_error(tiny_resnet20):
    with pytest.raises(ValueError, match=r"unknown init 'he'; available: default, kaiming_uniform"):
        FrozenBackbone(tiny_resnet20, seed=0, init="he")


def test_bad_seed_and_backbone_refused(tiny_resnet20):
    with pytest.raises(ValueError, match=r"seed must be an int, got 1.5"):
        FrozenBackbone(tiny_resnet20, seed=1.5)
    with pytest.raises(TypeError, match="backbone must be an nn.Module"):
        FrozenBackbone("resnet20")


# ---------------------------------------------------------------- tensors and fingerprint


def test_tensors_cover_parameters_and_buffers_and_need_no_grad(tiny_frozen):
    bb = tiny_frozen.backbone
    t = tiny_frozen.tensors()
    names = {n for n, _ in bb.named_parameters()} | {n for n, _ in bb.named_buffers()}
    assert set(t) == names
    assert "stages.stem.1.running_mean" in t and f"{head_linear(bb)}.weight" in t
    assert not any(p.requires_grad for p in bb.parameters())
    assert not any(v.requires_grad for v in t.values())
    # the default init: U[-a, a], a = 1/sqrt(c_in * k * k) for the stem conv (1 -> 4, 3x3)
    assert t["stages.stem.0.weight"].abs().max() <= 1 / 3
    # 68,477 at width 8 is checked in test_slices; width 4: hand count
    w, c = 4, 5
    stem = 1 * w * 9 + 2 * w
    b1 = 3 * (2 * w * w * 9 + 2 * 2 * w)
    b2 = (w * 2 * w * 9 + 4 * w * w * 9 + 2 * 2 * 2 * w + w * 2 * w + 2 * 2 * w) + 2 * (2 * 4 * w * w * 9 + 2 * 2 * 2 * w)
    b3 = (2 * w * 4 * w * 9 + 16 * w * w * 9 + 2 * 2 * 4 * w + 2 * w * 4 * w + 2 * 4 * w) + 2 * (2 * 16 * w * w * 9 + 2 * 2 * 4 * w)
    head = 4 * w * c + c
    assert tiny_frozen.num_parameters() == stem + b1 + b2 + b3 + head == 17_377


def test_fingerprint_sees_one_changed_value(tiny_frozen):
    from shared_backbone.frozen import fingerprint_tensors

    t = {n: v.clone() for n, v in tiny_frozen.tensors().items()}
    assert fingerprint_tensors(t) == tiny_frozen.fingerprint
    t["stages.block3.2.conv2.weight"][0, 0, 0, 0] += 1e-6
    assert fingerprint_tensors(t) != tiny_frozen.fingerprint


def test_repr_names_arch_seed_and_fingerprint(tiny_frozen):
    r = repr(tiny_frozen)
    assert "resnet20" in r and "seed=0" in r and tiny_frozen.fingerprint in r and "17,377" in r


# ---------------------------------------------------------------- checkpoints


def test_from_checkpoint_state_dict_and_config(make_resnet20):
    torch.manual_seed(5)
    trained = make_resnet20()
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.5)  # anything a seed cannot regenerate
    state = {k: v.clone() for k, v in trained.state_dict().items()}

    frozen = FrozenBackbone.from_checkpoint(make_resnet20(), state)
    assert not frozen.regenerable and frozen.config["source"] == "checkpoint"
    got = frozen.tensors()
    assert all(torch.equal(got[k], state[k]) for k in state)
    assert not any(p.requires_grad for p in frozen.backbone.parameters())

    cfg = frozen.config
    again = FrozenBackbone.from_config(cfg, tensors=state)
    assert again.fingerprint == frozen.fingerprint

    with pytest.raises(ValueError, match="cannot be regenerated from its config"):
        FrozenBackbone.from_config(cfg)

    tampered = {**cfg, "fingerprint": "0" * 16}
    with pytest.raises(FingerprintMismatch, match=r"'0000000000000000'.*" + frozen.fingerprint):
        FrozenBackbone.from_config(tampered, tensors=state)
    assert issubclass(FingerprintMismatch, ValueError)

    # tensors of another checkpoint do not match the config's fingerprint either
    other = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    with pytest.raises(FingerprintMismatch):
        FrozenBackbone.from_config(cfg, tensors=other)


def test_tampered_random_config_raises_mismatch(tiny_frozen):
    cfg = tiny_frozen.config
    with pytest.raises(FingerprintMismatch, match="the backbone config was made for"):
        FrozenBackbone.from_config({**cfg, "seed": 1})
    with pytest.raises(FingerprintMismatch):
        FrozenBackbone.from_config({**cfg, "fingerprint": "f" * 16})


def test_checkpoint_that_does_not_fit_is_refused(make_resnet20):
    model = make_resnet20()
    bias = f"{head_linear(model)}.bias"
    state = model.state_dict()
    del state[bias]
    state["stages.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=rf"does not fit resnet20: missing \['{bias}'\], "
                                         r"unexpected \['stages.extra.weight'\]"):
        FrozenBackbone.from_checkpoint(make_resnet20(), state)


def test_from_module_copies(tiny_resnet20):
    frozen = FrozenBackbone.from_module(tiny_resnet20)
    assert frozen.backbone is not tiny_resnet20
    ref = tiny_resnet20.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in frozen.tensors().items())
    assert all(p.requires_grad for p in tiny_resnet20.parameters())  # the original is untouched


def test_config_checks(tiny_frozen):
    cfg = tiny_frozen.config
    with pytest.raises(ValueError, match="missing the field 'fingerprint'"):
        FrozenBackbone.from_config({k: v for k, v in cfg.items() if k != "fingerprint"})
    with pytest.raises(ValueError, match="format_version 99"):
        FrozenBackbone.from_config({**cfg, "format_version": 99})


def test_recipe_is_a_deprecated_alias_of_config(tiny_frozen):
    """The backbone's config was called its recipe; the old names still read and rebuild the same backbone."""
    with pytest.warns(DeprecationWarning, match="FrozenBackbone.config"):
        old = tiny_frozen.recipe
    assert old == tiny_frozen.config
    with pytest.raises(AttributeError):
        tiny_frozen.recipe = {}  # read-only, like config
    with pytest.warns(DeprecationWarning, match="from_config"):
        again = FrozenBackbone.from_recipe(old)
    assert again.fingerprint == tiny_frozen.fingerprint and snapshot(again) == snapshot(tiny_frozen)
