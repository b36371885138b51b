"""FLOP counts: an ensemble counts K plain models' convs, less what its shared prefix runs once.

The reference is a hand count from the layers' shapes and the known spatial sizes of a
ResNet-20 on 28x28 input (stem and block1 28x28, block2 14x14, block3 7x7), torch's convention:
2 * N * C_out * C_in * kh * kw * H_out * W_out per conv, 2 * N * in * out per linear layer.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import shared_backbone as sb
from shared_backbone import flops as F

K, N, W = 3, 2, 4
SIDE = {"stem": 28, "block1": 28, "block2": 14, "block3": 7}


@pytest.fixture(scope="module")
def frozen():
    torch.manual_seed(0)
    return sb.FrozenBackbone(sb.build_backbone("resnet20", width=W, in_channels=1, num_classes=10), seed=0)


@pytest.fixture(scope="module")
def x():
    return torch.randn(N, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def _hand(stage: str, module: nn.Module) -> int:
    """FLOPs of one stage for N images, from its layers' shapes (not from any counter)."""
    total = 0
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            o, c, kh, kw = m.weight.shape
            total += 2 * N * o * c * kh * kw * SIDE[stage] ** 2
        elif isinstance(m, nn.Linear):
            total += 2 * N * m.in_features * m.out_features
    return total


def _count(model, x) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as c:
        model.eval()(x)
    return c.get_total_flops()


@pytest.fixture(scope="module")
def hand(frozen):
    per_stage = {name: _hand(name, stage) for name, stage in frozen.backbone.stages.named_children()}
    assert set(per_stage) == {"stem", "block1", "block2", "block3", "head"}
    return per_stage


def test_plain_module_count_is_the_hand_count(frozen, x, hand):
    assert _count(frozen.backbone, x) == sum(hand.values()) > 0


@pytest.mark.parametrize("vectorized", [True, False])
@pytest.mark.parametrize("spec_name", ["Full", "Filters", "Head", "Blocks"])
def test_ensemble_counts_k_models_less_the_shared_prefix(frozen, x, hand, spec_name, vectorized):
    spec = {"Full": sb.Full(), "Filters": sb.Filters(0.5) + sb.BatchNorm() + sb.Head(), "Head": sb.Head(),
            "Blocks": sb.Blocks("block3") + sb.Head()}[spec_name]
    # stages every member runs on its own; the ones before the first owned stage run once
    owned = {"Full": list(hand), "Filters": list(hand), "Head": ["head"], "Blocks": ["block3", "head"]}[spec_name]
    plain = sum(hand.values())
    expected = K * plain - (K - 1) * sum(v for s, v in hand.items() if s not in owned)
    if spec_name == "Filters" and vectorized:
        # the stem's input is every member's: its fixed (random) rows, 2 of 4, run once, not K times
        expected -= (K - 1) * hand["stem"] * (W - int(0.5 * W)) // W
    ens = sb.Ensemble(frozen, spec, members=K, vectorized=vectorized)
    assert _count(ens, x) == expected
    assert sb.flops.inference_flops(ens, x) == expected / N


def test_inference_flops_per_image_and_mode_restored(frozen, x, hand):
    ens = sb.Ensemble(frozen, sb.Full(), members=2).train()
    assert F.inference_flops(ens, x) == 2 * sum(hand.values()) / N
    assert ens.training
    assert F.inference_flops(frozen.backbone, x[:1]) == sum(hand.values()) / N


def test_every_custom_op_of_the_package_has_a_formula():
    """An op added to the shared_backbone namespace without a FLOP formula would count 0: fail here."""
    src = "\n".join(p.read_text() for p in (Path(sb.__file__).parent).rglob("*.py"))
    ops = set(re.findall(r'custom_op\(\s*"shared_backbone::(\w+)"', src))
    assert ops, "no custom op found: has the definition syntax changed?"
    missing = ops - set(F.FORMULAS) - set(F.NOT_COUNTED)
    assert not missing, f"custom ops without a FLOP formula: {sorted(missing)}"
    assert set(F.REGISTERED) == ops & set(F.FORMULAS)


@pytest.mark.parametrize("args, err, match", [
    (("not a module", torch.zeros(1, 1)), TypeError, "model must be an nn.Module, got str"),
    ((nn.Linear(2, 2), torch.zeros(0, 2)), ValueError, r"non-empty batch tensor \(N, ...\), got \(0, 2\)"),
    ((nn.Linear(2, 2), [1.0, 2.0]), ValueError, "non-empty batch tensor .* got list"),
])
def test_bad_inputs(args, err, match):
    with pytest.raises(err, match=match):
        F.inference_flops(*args)
