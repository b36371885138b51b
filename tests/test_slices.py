"""Slice specs: which parameters a spec learns, checked against hand-computed counts on resnet20."""
from __future__ import annotations


import pytest
import torch

import shared_backbone as sb
from conftest import head_linear
from shared_backbone import BatchNorm, Blocks, Filters, Full, Head, Pointwise, parse_spec, resolve
from shared_backbone.slices import ParamSlice, spec_from_dict

W, CLASSES = 8, 5

# resnet20, width 8, shortcut B: every conv as (name, c_out, c_in, k)
CONVS = [("stages.stem.0", W, 1, 3)]
for _b in range(3):
    CONVS += [(f"stages.block1.{_b}.conv1", W, W, 3), (f"stages.block1.{_b}.conv2", W, W, 3)]
for _stage, _c in (("block2", 2 * W), ("block3", 4 * W)):
    CONVS += [(f"stages.{_stage}.0.conv1", _c, _c // 2, 3), (f"stages.{_stage}.0.conv2", _c, _c, 3),
              (f"stages.{_stage}.0.shortcut.0", _c, _c // 2, 1)]
    for _b in (1, 2):
        CONVS += [(f"stages.{_stage}.{_b}.conv1", _c, _c, 3), (f"stages.{_stage}.{_b}.conv2", _c, _c, 3)]
# every BatchNorm as (name, channels)
BNS = [("stages.stem.1", W)]
for _stage, _c in (("block1", W), ("block2", 2 * W), ("block3", 4 * W)):
    for _b in range(3):
        BNS += [(f"stages.{_stage}.{_b}.bn1", _c), (f"stages.{_stage}.{_b}.bn2", _c)]
    if _stage != "block1":
        BNS.append((f"stages.{_stage}.0.shortcut.1", _c))


@pytest.fixture
def bb(make_resnet20):
    return sb.FrozenBackbone(make_resnet20(width=W), seed=0).backbone


@pytest.fixture
def frozen8(make_resnet20):
    return sb.FrozenBackbone(make_resnet20(width=W), seed=0)


def test_hand_tables_match_the_model(bb):
    """The tables above (written from the architecture) list every conv and BN of the model."""
    convs = {n: (m.out_channels, m.in_channels, m.kernel_size[0])
             for n, m in bb.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert convs == {n: (o, i, k) for n, o, i, k in CONVS}
    assert len(CONVS) == 21 and len(BNS) == 21


# ---------------------------------------------------------------- Filters


@pytest.mark.parametrize("p, expected", [
    (0.25, {8: 2, 16: 4, 32: 8}),
    (0.5, {8: 4, 16: 8, 32: 16}),
    (0.125, {8: 1, 16: 2, 32: 4}),
    (0.3, {8: 2, 16: 4, 32: 9}),      # floor(2.4), floor(4.8), floor(9.6)
    (0.75, {8: 6, 16: 12, 32: 24}),
])
def test_filters_takes_floor_p_times_c_out(bb, p, expected):
    layout = resolve(Filters(p), bb)
    want = {f"{n}.weight": ParamSlice(0, expected[o], "random") for n, o, _, _ in CONVS}
    assert dict(layout) == want
    assert f"{head_linear(bb)}.weight" not in layout  # Linear excluded
    assert "stages.block2.0.shortcut.0.weight" in layout and "stages.block3.0.shortcut.0.weight" in layout
    assert layout.learned_shapes(bb)["stages.block3.0.shortcut.0.weight"] == (expected[32], 16, 1, 1)
    assert layout.numel(bb) == sum(expected[o] * i * k * k for _, o, i, k in CONVS)


def test_filters_p_one_learns_whole_convs(bb):
    layout = resolve(Filters(1.0), bb)
    assert all(sl.whole for sl in layout.values()) and len(layout) == 21


def test_filters_k(bb):
    layout = resolve(Filters(k=3), bb)
    assert dict(layout) == {f"{n}.weight": ParamSlice(0, 3, "random") for n, *_ in CONVS}
    assert layout.numel(bb) == sum(3 * i * k * k for _, _, i, k in CONVS)


def test_filters_dim1_and_zero(bb):
    with pytest.warns(UserWarning, match=r"stages\.stem\.0"):  # stem has 1 input channel: floor(0.5) = 0
        layout = resolve(Filters(0.5, dim=1, fixed="zero"), bb)
    assert "stages.stem.0.weight" not in layout
    assert layout["stages.block2.0.conv1.weight"] == ParamSlice(1, 4, "zero")
    assert layout["stages.block3.1.conv2.weight"] == ParamSlice(1, 16, "zero")
    assert layout.learned_shapes(bb)["stages.block3.0.shortcut.0.weight"] == (32, 8, 1, 1)


def test_layer_with_no_filter_warns_and_stays_fixed(bb):
    # 0.1 * 8 = 0.8 -> 0 filters in the stem and block1; 0.1 * 16 -> 1; 0.1 * 32 -> 3
    with pytest.warns(UserWarning, match=r"leaves 7 conv layer\(s\) with no learned filter.*stages\.stem\.0"):
        layout = resolve(Filters(0.1), bb)
    assert not any(n.startswith(("stages.stem.", "stages.block1.")) for n in layout)
    assert layout["stages.block2.1.conv1.weight"].n == 1 and layout["stages.block3.1.conv1.weight"].n == 3
    # in an ensemble those convs stay fixed, frozen tensors
    frozen = sb.FrozenBackbone(bb)
    with pytest.warns(UserWarning):
        ens = sb.Ensemble(frozen, Filters(0.1) + Head(), members=2)
    assert "stages.stem.0.weight" in ens.fixed.as_dict()
    assert not any("stem" in n or "block1" in n for n, _ in ens.named_parameters())


def test_p_below_one_over_size_leaves_layer_empty(bb):
    with pytest.warns(UserWarning, match="no learned filter"):
        layout = resolve(Filters(1 / 17) + Head(), bb)  # floor(32/17) = 1 only in block3
    assert {n.split(".")[1] for n in layout} == {"block3", "head"}
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="learns no parameter"):
        resolve(Filters(0.01), bb)


@pytest.mark.parametrize("kwargs, match", [
    ({"p": 0}, r"p must be in \(0, 1\], got 0"),
    ({"p": -0.1}, r"p must be in \(0, 1\], got -0.1"),
    ({"p": 1.5}, r"p must be in \(0, 1\], got 1.5"),
    ({"p": "0.5"}, r"p must be in \(0, 1\]"),
    ({"k": 0}, r"k must be a positive integer, got 0"),
    ({"k": 2.5}, r"k must be a positive integer"),
    ({"p": 0.5, "k": 2}, "exactly one of p"),
    ({}, "exactly one of p"),
    ({"p": 0.5, "dim": 4}, r"dim must be 0 .*got 4"),
    ({"p": 0.5, "fixed": "ones"}, r"fixed must be 'random' or 'zero', got 'ones'"),
])
def test_filters_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Filters(**kwargs)


def test_filters_k_larger_than_a_layer_names_it(bb):
    with pytest.raises(ValueError, match=r"Filters\(k=9\): k=9 is larger than layer 'stages\.stem\.0', which has 8"):
        resolve(Filters(k=9), bb)
    with pytest.raises(ValueError, match=r"Filters\(k=2, dim=1\): k=2 is larger than layer 'stages\.stem\.0', which "
                                         r"has 1 along dim 1; use k <= 1"):
        resolve(Filters(k=2, dim=1), bb)


# ---------------------------------------------------------------- other kinds


def test_batchnorm_selects_every_gamma_and_beta(bb):
    layout = resolve(BatchNorm(), bb)
    assert set(layout) == {f"{n}.{p}" for n, _ in BNS for p in ("weight", "bias")}
    assert all(sl.whole for sl in layout.values())


def test_head_selects_the_linear(bb):
    lin = head_linear(bb)
    assert list(resolve(Head(), bb)) == [f"{lin}.weight", f"{lin}.bias"]
    assert resolve(Blocks("fc"), bb) == resolve(Head(), bb)


def test_blocks_selects_one_stage(bb):
    layout = resolve(Blocks("block2"), bb)
    names = {n for n, _ in bb.named_parameters() if n.startswith("stages.block2.")}
    assert set(layout) == names and len(names) == 3 * (2 + 2 * 2) + 1 + 2  # 3 x (2 conv + 2 BN), shortcut conv + BN
    assert "stages.block2.0.shortcut.0.weight" in layout
    stem = {"stages.stem.0.weight", "stages.stem.1.weight", "stages.stem.1.bias"}
    assert set(resolve(Blocks("conv1"), bb)) == set(resolve(Blocks("stem"), bb)) == stem
    assert set(resolve(Blocks("stem", "head"), bb)) == stem | {f"{head_linear(bb)}.weight", f"{head_linear(bb)}.bias"}


def test_unknown_block_lists_stages(bb):
    with pytest.raises(ValueError, match=r"unknown block 'block4' for resnet20; stages: stem, block1, block2, "
                                         r"block3, head"):
        resolve(Blocks("block4"), bb)
    with pytest.raises(ValueError, match="one or more stage names"):
        Blocks()


def test_pointwise_selects_shortcut_1x1_convs(bb, make_resnet20):
    assert list(resolve(Pointwise(), bb)) == ["stages.block2.0.shortcut.0.weight", "stages.block3.0.shortcut.0.weight"]
    with pytest.raises(ValueError, match=r"Pointwise\(\) learns no parameter of resnet20"):
        resolve(Pointwise(), make_resnet20(shortcut="A"))


def test_full_selects_everything(bb):
    layout = resolve(Full(), bb)
    assert list(layout) == [n for n, _ in bb.named_parameters()]
    assert layout.numel(bb) == 68_477


def test_resolve_refuses_non_spec(bb):
    with pytest.raises(TypeError, match="spec must be a SliceSpec"):
        resolve("Head()", bb)


# ---------------------------------------------------------------- composition


def test_plus_merges(bb):
    spec = Filters(0.25) + BatchNorm() + Head()
    layout = resolve(spec, bb)
    assert len(layout) == 21 + 42 + 2
    assert list(layout) == [n for n, _ in bb.named_parameters() if n in layout]  # backbone order
    assert resolve(Filters(0.25) + Filters(0.5), bb)["stages.stem.0.weight"] == ParamSlice(0, 4, "random")
    assert resolve(Filters(0.25) + Full(), bb)["stages.stem.0.weight"].whole
    assert resolve(Filters(0.25) + Blocks("block3"), bb)["stages.block3.1.conv1.weight"].whole
    assert resolve(Filters(0.25) + Blocks("block3"), bb)["stages.block2.1.conv1.weight"].n == 4
    with pytest.raises(ValueError, match="different dims"), pytest.warns(UserWarning):
        resolve(Filters(0.25) + Filters(0.25, dim=1), bb)
    with pytest.raises(ValueError, match="disagree on fixed"):
        resolve(Filters(0.25) + Filters(0.5, fixed="zero"), bb)
    assert (Filters(0.25) + Head()).parts() == [Filters(0.25), Head()]


# ---------------------------------------------------------------- text form


ROUND_TRIP = [
    Filters(0.25), Filters(k=3), Filters(0.5, dim=1), Filters(0.25, fixed="zero"), Filters(0.5, dim=2, fixed="zero"),
    BatchNorm(), Head(), Full(), Pointwise(), Blocks("block2"), Blocks("block1", "head"),
    Filters(0.1) + BatchNorm() + Head(), Blocks("block3") + Pointwise(), Filters(k=2, dim=1) + Full(),
]


@pytest.mark.parametrize("spec", ROUND_TRIP, ids=repr)
def test_parse_repr_round_trip(spec):
    assert parse_spec(repr(spec)) == spec
    assert repr(parse_spec(repr(spec))) == repr(spec)
    assert spec_from_dict(spec.to_dict()) == spec


def test_repr_and_equality():
    assert repr(Filters(0.1) + BatchNorm() + Head()) == "Filters(0.1) + BatchNorm() + Head()"
    assert repr(Filters(k=3, dim=1, fixed="zero")) == "Filters(k=3, dim=1, fixed='zero')"
    assert parse_spec("Filters(0.1)+BatchNorm()+Head()") == Filters(0.1) + BatchNorm() + Head()
    assert parse_spec(" Blocks( 'block2' , 'head' ) ") == Blocks("block2", "head")
    assert Filters(0.1) != Filters(0.2) and Filters(0.1) != Filters(0.1, dim=1) and Head() != BatchNorm()
    assert Blocks("block2") != Blocks("block3")
    assert hash(Filters(0.1) + Head()) == hash(Filters(0.1) + Head())


def test_equal_specs_hash_equal():
    assert Filters(1) == Filters(1.0)
    assert hash(Filters(1)) == hash(Filters(1.0))
    assert len({Filters(1), Filters(1.0)}) == 1


@pytest.mark.parametrize("text, match", [
    ("Foo()", r"cannot read slice 'Foo\(\)'"),
    ("filters(0.1)", r"cannot read slice 'filters\(0.1\)'.*Filters\(\.\.\.\)"),
    ("Filters(0.1) + Lora(4)", r"cannot read slice 'Lora\(4\)'"),
    ("Filters(0.1", "cannot read slice"),
    ("Head", "cannot read slice"),
    ("", "empty slice term"),
    ("Filters(0.1) + ", "empty slice term"),
    ("Filters(0)", r"p must be in \(0, 1\]"),
    ("Blocks()", "one or more stage names"),
])
def test_parse_errors(text, match):
    with pytest.raises(ValueError, match=match):
        parse_spec(text)


def test_parse_never_evaluates_code():
    with pytest.raises(ValueError):
        parse_spec("Filters(__import__('os').getpid())")


def test_spec_from_dict_unknown_kind():
    with pytest.raises(ValueError, match=r"unknown slice kind 'lora'; known: filters, batchnorm"):
        spec_from_dict([{"kind": "lora"}])


# ---------------------------------------------------------------- describe(), by hand

BN_CHANNELS = W + 6 * W + (6 * 2 * W + 2 * W) + (6 * 4 * W + 4 * W)  # stem, block1, block2 (+shortcut), block3
BN_STATS = 2 * 4 * BN_CHANNELS + 8 * 21  # running mean + var (float32) per channel, num_batches_tracked (int64) per BN
TOTAL = (
    (1 * W * 9 + 2 * W)                                                   # stem: conv 1->8 3x3 + BN
    + 3 * (2 * W * W * 9 + 2 * 2 * W)                                     # block1: 3 x (2 conv 8->8 + 2 BN)
    + (W * 2 * W * 9 + (2 * W) ** 2 * 9 + 2 * 2 * 2 * W + W * 2 * W + 2 * 2 * W)  # block2.0 with 1x1 shortcut + BN
    + 2 * (2 * (2 * W) ** 2 * 9 + 2 * 2 * 2 * W)                          # block2.1, block2.2
    + (2 * W * 4 * W * 9 + (4 * W) ** 2 * 9 + 2 * 2 * 4 * W + 2 * W * 4 * W + 2 * 4 * W)  # block3.0
    + 2 * (2 * (4 * W) ** 2 * 9 + 2 * 2 * 4 * W)                          # block3.1, block3.2
    + (4 * W * CLASSES + CLASSES)                                         # head Linear(32, 5)
)
FILTERS_025 = (
    2 * 1 * 9                                   # stem: 2 of 8 filters, 1 input
    + 6 * 2 * 8 * 9                             # block1: 6 convs, 2 filters of 8x3x3
    + (4 * 8 * 9 + 4 * 16 * 9 + 4 * 8) + 4 * 4 * 16 * 9    # block2: conv1, conv2, shortcut, 4 more convs
    + (8 * 16 * 9 + 8 * 32 * 9 + 8 * 16) + 4 * 8 * 32 * 9  # block3
)


def test_hand_numbers():
    assert TOTAL == 68_477 and BN_CHANNELS == 392 and BN_STATS == 3_304 and FILTERS_025 == 16_882


@pytest.mark.parametrize("spec, learnable, stats", [
    (Head(), 4 * W * CLASSES + CLASSES, 0),                     # head has no BN
    (BatchNorm(), 2 * BN_CHANNELS, BN_STATS),
    (Filters(0.25) + BatchNorm() + Head(), FILTERS_025 + 2 * BN_CHANNELS + 165, BN_STATS),
    (Filters(0.25), FILTERS_025, BN_STATS),
    # block3 onwards: 7 BN of 32 channels
    (Blocks("block3"), 16 * 32 * 9 + 5 * 32 * 32 * 9 + 16 * 32 + 7 * 2 * 32, 7 * (2 * 4 * 32 + 8)),
    (Full(), TOTAL, BN_STATS),
])
def test_describe_counts(frozen8, spec, learnable, stats):
    d = sb.describe(frozen8, spec, verbose=False)
    assert d["total"] == TOTAL
    assert d["learnable"] == learnable
    assert d["fraction"] == pytest.approx(learnable / TOTAL)
    assert d["stats_bytes"] == stats
    assert d["stored_bytes"] == 4 * learnable + stats
    assert sum(r["params"] for r in d["stages"]) == TOTAL
    assert sum(r["learnable"] for r in d["stages"]) == learnable
    assert d["spec"] == repr(spec)


def test_describe_per_stage_and_members(frozen8, capsys):
    d = sb.describe(frozen8, Filters(0.25) + Head(), members=4)
    assert capsys.readouterr().out == ""  # library code does not print; str(d) is the table
    print(d)
    rows = {r["stage"]: r for r in d["stages"]}
    assert rows["stem"]["learnable"] == 18 and rows["stem"]["params"] == 88
    assert rows["block1"]["learnable"] == 864
    assert rows["head"]["learnable"] == 165 and rows["head"]["params"] == 165
    assert d["ensemble_params"] == TOTAL + 3 * (FILTERS_025 + 165)
    out = capsys.readouterr().out
    assert "resnet20" in out and "68,477" in out and f"{FILTERS_025 + 165:,}" in out
