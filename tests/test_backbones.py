"""Contract tests over every registered backbone, plus hand-computed parameter counts."""
from __future__ import annotations

import re

import pytest
import torch
import torchvision
from torch import nn

from shared_backbone.backbones import Backbone, backbone_config, build_backbone, list_backbones
from shared_backbone.backbones.cifar_resnet import ZeroPadShortcut, _cifar_resnet

torch.set_num_threads(2)

# how to shrink each kind of option for a fast test (applied only where a backbone accepts it)
TINY = {"width": 4, "widen_factor": 1, "growth_rate": 4, "width_mult": 0.25, "expansion": 2,
        "in_channels": 1, "num_classes": 3, "small_input": True}
TINY_OVERRIDES = {"densenet_bc100": {"depth": 40}}


def tiny(name: str) -> tuple[dict, tuple[int, ...]]:
    """A tiny config for ``name`` and the input shape to feed it (28 px, or 32 px for ImageNet models)."""
    defaults = backbone_config(name)
    cfg = {k: v for k, v in TINY.items() if k in defaults}
    cfg.update(TINY_OVERRIDES.get(name, {}))
    size = 32 if "small_input" in defaults else 28
    return cfg, (2, cfg.get("in_channels", defaults.get("in_channels", 3)), size, size)


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def meta_count(name: str, **cfg) -> int:
    """Parameter count without allocating or initialising the weights."""
    with torch.device("meta"):
        return n_params(build_backbone(name, **cfg))


# ---------------------------------------------------------------- contract over the registry


def test_registry_holds_every_family():
    expected = {"resnet20", "resnet32", "resnet56", "resnet110", "wrn16_4", "wrn28", "densenet_bc100",
                "vgg19", "vgg19_bn", "resnet18", "resnet50", "wide_resnet50_2", "mobilenet_v2"}
    assert expected <= set(list_backbones())


@pytest.mark.parametrize("name", list_backbones())
def test_forward_contract(name):
    torch.manual_seed(0)
    cfg, shape = tiny(name)
    model = build_backbone(name, **cfg)
    assert isinstance(model, Backbone)
    assert model.arch == name and model.config == {**backbone_config(name), **cfg}

    names = model.stage_names
    assert names[0] == "stem" and names[-1] == "head"
    assert names[1:-1] == [f"block{i}" for i in range(1, len(names) - 1)] and len(names) >= 3

    x = torch.randn(shape)
    for train in (True, False):
        model.train(train)
        out = model(x)
        assert out.shape == (shape[0], model.num_classes)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", list_backbones())
def test_wrong_input_channels_are_refused(name):
    cfg, shape = tiny(name)
    with torch.device("meta"):  # refused before any compute, so the weights need not exist
        model = build_backbone(name, **cfg)
        bad = torch.randn(shape[0], shape[1] + 2, *shape[2:])
    with pytest.raises(ValueError, match=rf"in_channels={shape[1] + 2}"):
        model(bad)


# ---------------------------------------------------------------- bad configs


def test_unknown_name_lists_available():
    with pytest.raises(ValueError, match="available: .*resnet20") as e:
        build_backbone("resnet21")
    assert "'resnet21'" in str(e.value)


def test_unknown_option_lists_accepted():
    with pytest.raises(ValueError, match=r"'depth'.*accepted options: .*width=16.*shortcut='B'"):
        build_backbone("resnet20", depth=21)


def test_resnet_depth_must_be_6n_plus_2():
    with pytest.raises(ValueError, match=r"6n\+2.*got 21"):
        _cifar_resnet(21, in_channels=3, num_classes=10, width=16, kernel_size=3, shortcut="B")


@pytest.mark.parametrize("name", ["resnet20", "wrn16_4", "vgg19"])
def test_even_kernel_size_refused(name):
    with pytest.raises(ValueError, match=r"kernel_size must be an odd size in .*got 4"):
        build_backbone(name, kernel_size=4)


def test_unknown_shortcut_refused():
    with pytest.raises(ValueError, match=r"shortcut must be one of \('A', 'B'\).*got 'C'"):
        build_backbone("resnet20", shortcut="C")


@pytest.mark.parametrize("name, cfg, word", [
    ("resnet20", {"width": 0}, "width"),
    ("wrn28", {"widen_factor": -1}, "widen_factor"),
    ("densenet_bc100", {"depth": 99}, "depth"),
    ("densenet_bc100", {"compression": 0.0}, "compression"),
    ("vgg19_bn", {"num_classes": 0}, "num_classes"),
    ("mobilenet_v2", {"width_mult": 0.0}, "width_mult"),
])
def test_bad_values_refused(name, cfg, word):
    with pytest.raises(ValueError, match=word):
        build_backbone(name, **cfg)


# ---------------------------------------------------------------- architecture details


def test_resnet_shortcuts():
    a = build_backbone("resnet20", width=4, shortcut="A")
    b = build_backbone("resnet20", width=4, shortcut="B")
    first2 = b.stages["block2"][0]
    assert isinstance(first2.shortcut, nn.Sequential)
    assert isinstance(first2.shortcut[0], nn.Conv2d) and first2.shortcut[0].kernel_size == (1, 1)
    assert first2.shortcut[0].stride == (2, 2) and first2.shortcut[0].bias is None
    assert isinstance(a.stages["block2"][0].shortcut, ZeroPadShortcut)
    assert isinstance(a.stages["block1"][0].shortcut, nn.Identity)
    # odd spatial sizes: the subsampled shortcut must match the strided conv (7 -> 4)
    x = torch.randn(2, 4, 7, 7)
    out = ZeroPadShortcut(4, 8, 2)(x)
    assert out.shape == (2, 8, 4, 4)
    assert torch.equal(out[:, 2:6], x[:, :, ::2, ::2]) and not out[:, :2].any() and not out[:, 6:].any()
    assert a(torch.randn(2, 3, 7, 7)).shape == (2, 10)


def test_resnet_conv_layer_hook_builds_every_kxk_conv():
    made = []

    def conv_layer(c_in, c_out, k, stride):
        made.append((c_in, c_out, k, stride))
        return nn.Conv2d(c_in, c_out, k, stride, padding=k // 2, bias=False)

    _cifar_resnet(20, in_channels=1, num_classes=10, width=4, kernel_size=5, shortcut="B", conv_layer=conv_layer)
    assert len(made) == 1 + 2 * 9  # stem + two per block
    assert made[0] == (1, 4, 5, 1) and (4, 8, 5, 2) in made and (8, 16, 5, 2) in made


def test_vgg_28px_shrinks_to_1x1():
    model = build_backbone("vgg19_bn", width=4, in_channels=1).eval()
    x = torch.randn(1, 1, 28, 28)
    sizes = []
    for name, stage in model.stages.items():
        if name == "head":
            break
        x = stage(x)
        sizes.append(x.shape[-1])
    assert sizes == [28, 14, 7, 4, 2, 1] and x.shape[1] == 32


def test_torchvision_stems():
    small = build_backbone("resnet18", small_input=True, num_classes=5)
    conv = small.stages["stem"][0]
    assert conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.bias is None
    assert not any(isinstance(m, nn.MaxPool2d) for m in small.stages["stem"])
    big = build_backbone("resnet18", num_classes=5)
    assert big.stages["stem"][0].kernel_size == (7, 7) and isinstance(big.stages["stem"][-1], nn.MaxPool2d)
    mb = build_backbone("mobilenet_v2", small_input=True, in_channels=1, width_mult=0.25)
    assert mb.stage_names == ["stem"] + [f"block{i}" for i in range(1, 8)] + ["head"]
    assert mb.stages["stem"][0].stride == (1, 1) and mb.stages["stem"][0].in_channels == 1


@pytest.mark.parametrize("name, factory, cfg, size", [
    ("resnet18", torchvision.models.resnet18, {"num_classes": 7}, 64),
    ("mobilenet_v2", torchvision.models.mobilenet_v2, {"num_classes": 7, "width_mult": 0.25}, 64),
])
def test_torchvision_wrapper_equals_torchvision(name, factory, cfg, size):
    torch.manual_seed(0)
    ours = build_backbone(name, **cfg).eval()
    torch.manual_seed(0)
    ref = factory(weights=None, **cfg).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x))


# ---------------------------------------------------------------- parameter counts, by hand


def bn(c):  # gamma + beta
    return 2 * c


def test_resnet20_parameter_counts():
    stem = 3 * 16 * 9 + bn(16)
    stage1 = 3 * (2 * 16 * 16 * 9 + 2 * bn(16))
    stage2 = (16 * 32 * 9 + 32 * 32 * 9 + 2 * bn(32)) + 2 * (2 * 32 * 32 * 9 + 2 * bn(32))
    stage3 = (32 * 64 * 9 + 64 * 64 * 9 + 2 * bn(64)) + 2 * (2 * 64 * 64 * 9 + 2 * bn(64))
    head = 64 * 10 + 10
    option_a = stem + stage1 + stage2 + stage3 + head
    assert option_a == 269_722
    option_b = option_a + (16 * 32 + bn(32)) + (32 * 64 + bn(64))  # two 1x1 conv + BN shortcuts
    assert option_b == 272_474

    assert n_params(build_backbone("resnet20", shortcut="A")) == option_a
    assert n_params(build_backbone("resnet20", shortcut="B")) == option_b
    gray = 3 * 16 * 9 - 1 * 16 * 9  # stem conv sees 1 channel instead of 3
    assert n_params(build_backbone("resnet20", in_channels=1, shortcut="A")) == option_a - gray
    assert n_params(build_backbone("resnet20", in_channels=1)) == option_b - gray


def test_wrn28_parameter_counts():
    def wrn28(k: int, classes: int = 10) -> int:
        def group(c_in, c):  # 4 pre-activation blocks; the first has a 1x1 shortcut
            first = bn(c_in) + c_in * c * 9 + bn(c) + c * c * 9 + c_in * c
            rest = bn(c) + c * c * 9 + bn(c) + c * c * 9
            return first + 3 * rest

        stem = 3 * 16 * 9
        body = group(16, 16 * k) + group(16 * k, 32 * k) + group(32 * k, 64 * k)
        head = bn(64 * k) + 64 * k * classes + classes
        return stem + body + head

    assert wrn28(10) == 36_479_194  # the WRN-28-10 count of the reference implementation
    assert wrn28(4) == 5_849_050
    assert meta_count("wrn28") == wrn28(10)
    assert meta_count("wrn28", widen_factor=4) == wrn28(4)


def test_densenet_bc100_parameter_count():
    k, n = 12, 16
    total, c = 3 * 2 * k * 9, 2 * k  # stem
    for block in range(3):
        for _ in range(n):
            total += bn(c) + c * 4 * k + bn(4 * k) + 4 * k * k * 9
            c += k
        if block < 2:
            total += bn(c) + c * (c // 2)
            c //= 2
    total += bn(c) + c * 10 + 10
    assert c == 342 and total == 769_162
    assert meta_count("densenet_bc100") == total


def test_vgg19_parameter_counts():
    def conv(c_in, c_out):
        return c_in * c_out * 9 + c_out  # with bias

    convs = (conv(3, 64) + conv(64, 64) + conv(64, 128) + conv(128, 128) + conv(128, 256)
             + 3 * conv(256, 256) + conv(256, 512) + 7 * conv(512, 512))
    norms = bn(64) * 2 + bn(128) * 2 + bn(256) * 4 + bn(512) * 8
    head = 512 * 10 + 10
    assert convs + norms + head == 20_040_522
    assert meta_count("vgg19") == convs + head
    assert meta_count("vgg19_bn") == convs + norms + head


def test_torchvision_resnet18_parameter_count():
    assert meta_count("resnet18") == 11_689_512
    assert meta_count("resnet18", in_channels=1) == 11_689_512 - 2 * 64 * 7 * 7
    assert meta_count("resnet18", small_input=True) == 11_689_512 - 64 * 3 * (49 - 9)


def test_lc_style_conv_layer_reproduces_paper_count():
    """LCResNet-20-16x128 (DESIGN.md): 38,431,402 parameters, 4,166,314 outside the spatial convs."""

    def lc(c_in, c_out, k, stride, expansion=128):
        return nn.Sequential(nn.Conv2d(c_in, c_out * expansion, k, stride, k // 2, bias=False),
                             nn.Conv2d(c_out * expansion, c_out, 1, bias=False))

    with torch.device("meta"):
        model = _cifar_resnet(20, in_channels=3, num_classes=10, width=16, kernel_size=3, shortcut="B", conv_layer=lc)
    spatial = sum(p.numel() for p in model.parameters() if p.dim() == 4 and p.shape[-1] > 1)
    assert n_params(model) == 38_431_402 and n_params(model) - spatial == 4_166_314


def test_error_message_names_bad_depth_value():
    with pytest.raises(ValueError) as e:
        _cifar_resnet(21, in_channels=3, num_classes=10, width=16, kernel_size=3, shortcut="B")
    assert re.search(r"\b20\b", str(e.value)) and "21" in str(e.value)
