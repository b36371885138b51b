"""LC-Blocks (issue 4): fused == reference, weight sharing, sparsity, export, analysis, errors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import shared_backbone as sb
from shared_backbone.describe import describe
from shared_backbone.lc import (
    LCConv2d, SharedSpatial, export_fused, followed_by_pointwise, freeze_spatial, l1_penalty, lc_layers,
    load_sparse, pointwise_sparsity, pointwise_weights, prune_pointwise, save_sparse,
)
from shared_backbone import lc_analysis as la

TINY_LC = {"width": 4, "in_channels": 1, "num_classes": 5, "expansion": 3}
SPEC = sb.Pointwise() + sb.BatchNorm() + sb.Head()


def make_lc(**cfg):
    return sb.build_backbone("lcresnet20", **{**TINY_LC, **cfg})


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-12))


def reference_pair(layer: LCConv2d) -> nn.Sequential:
    """The LC-Block as two plain convs carrying the same (materialised, scaled) weights."""
    k = layer.kernel_size
    c_mid = layer.out_channels * layer.expansion
    seq = nn.Sequential(nn.Conv2d(layer.in_channels, c_mid, k, layer.stride, k // 2, bias=False),
                        nn.Conv2d(c_mid, layer.out_channels, 1, bias=False))
    with torch.no_grad():
        seq[0].weight.copy_(layer.spatial_weight() * layer.scale)
        seq[1].weight.copy_(layer.pointwise.weight)
    return seq


def shared_layer(sharing: str, fraction: float, c_in=4, c_out=6, k=3, stride=1, expansion=4):
    bank = SharedSpatial(sharing, fraction, k)
    layer = LCConv2d(c_in, c_out, k, stride, expansion, shared=bank)
    LCConv2d(c_in, c_out, k, 1, expansion * 2, shared=bank)  # a larger layer sets W_s's size
    layer.bank = bank.allocate()  # registered as a child here, as the backbone does on its root
    return layer


# -- LCConv2d: fused == reference == plain convs -----------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda: LCConv2d(3, 5, 3, 2, 4),
    lambda: LCConv2d(2, 3, 5, 1, 2),
    lambda: shared_layer("global", 1.0),
    lambda: shared_layer("recycled", 0.25),  # 4 * 6*8*36 / 4 elements: whole rows of 36 -> folded into P
    lambda: shared_layer("recycled", 0.03),  # not whole rows: tiled copy
], ids=["none", "none_k5", "global", "recycled_rows", "recycled_misaligned"])
def test_fused_equals_reference_pair_and_plain_convs(make):
    torch.manual_seed(0)
    layer = make()
    for p in layer.parameters():
        p.requires_grad_(False)
    layer.pointwise.weight.requires_grad_(True)
    x = torch.randn(2, layer.in_channels, 9, 9)
    outs, grads = [], []
    for fused in (True, False):
        layer.fused = fused
        out = layer(x)
        g, = torch.autograd.grad((out ** 2).sum(), layer.pointwise.weight)
        outs.append(out)
        grads.append(g)
    ref = reference_pair(layer)
    ref_out = ref(x)
    ref_g, = torch.autograd.grad((ref_out ** 2).sum(), ref[1].weight)
    assert outs[0].shape == (2, layer.out_channels, math.ceil(9 / layer.stride[0]), math.ceil(9 / layer.stride[0]))
    assert rel_err(outs[0], ref_out) < 1e-4 and rel_err(outs[1], ref_out) < 1e-4
    assert rel_err(grads[0], ref_g) < 1e-4 and rel_err(grads[1], ref_g) < 1e-4


def test_frozen_spatial_weight_gets_no_gradient_and_one_conv_runs():
    layer = LCConv2d(3, 4, 3, 1, 8)
    layer.spatial.weight.requires_grad_(False)
    out = layer(torch.randn(2, 3, 6, 6))
    out.sum().backward()
    assert layer.spatial.weight.grad is None and layer.pointwise.weight.grad is not None
    assert layer.fused_weight().shape == (4, 3, 3, 3)


def test_global_sharing_is_a_view_scaled_by_fan_in():
    layer = shared_layer("global", 1.0)
    w = layer.spatial_weight()
    ws = layer.shared.weight
    assert w.untyped_storage().data_ptr() == ws.untyped_storage().data_ptr()
    assert torch.equal(w.flatten(), ws[: w.numel()])
    assert layer.scale == pytest.approx(1 / math.sqrt(4 * 9))
    assert ws.abs().max() <= 1 and ws.abs().max() > 0.9  # U[-1, 1]


def test_recycled_tiles_whole_kernels():
    layer = shared_layer("recycled", 0.03)
    ws = layer.shared.weight
    assert ws.numel() % 9 == 0 and ws.numel() < math.prod(layer.spatial_shape)
    flat = layer.spatial_weight().flatten()
    idx = torch.arange(flat.numel())
    assert torch.equal(flat, ws[idx % ws.numel()])


# -- LCResNet: counts, sharing stored once, regeneration ----------------------------------------------
def _meta_counts(**cfg):
    with torch.device("meta"):
        model = sb.build_backbone("lcresnet20", width=16, expansion=128, in_channels=3, num_classes=10, **cfg)
    total = sum(p.numel() for p in model.parameters())
    learn = sb.resolve(SPEC, model).numel(model)
    return model, total, learn


def test_table1_counts_hand_computed():
    # 1x1 of LC-Blocks: 16*2048 (stem) + 6*16*2048 + 6*32*4096 + 6*64*8192; shortcuts 16*32 + 32*64
    pointwise = 16 * 2048 + 6 * 16 * 2048 + 6 * 32 * 4096 + 6 * 64 * 8192 + 16 * 32 + 32 * 64
    learnable = pointwise + 2 * (16 + 6 * 16 + 6 * 32 + 32 + 6 * 64 + 64) + 64 * 10 + 10
    assert learnable == 4_166_314
    largest = 64 * 128 * 64 * 9
    for cfg, total in [({}, 38_431_402), ({"sharing": "global"}, learnable + largest),
                       ({"sharing": "recycled", "share_fraction": 1 / 16}, learnable + largest // 16)]:
        _, t, lrn = _meta_counts(**cfg)
        assert (t, lrn) == (total, learnable), cfg
    assert learnable + largest // 16 == 4_461_226


@pytest.mark.parametrize("cfg, total", [({}, 38_431_402), ({"sharing": "recycled", "share_fraction": 1 / 16}, 4_461_226)],
                         ids=["unshared", "recycled16"])
def test_describe_lcresnet20_16x128_table1_row(cfg, total):
    frozen = sb.FrozenBackbone(sb.build_backbone("lcresnet20", width=16, expansion=128, in_channels=3,
                                                 num_classes=10, **cfg))
    d = describe(frozen, SPEC, verbose=False)
    assert (d["total"], d["learnable"]) == (total, 4_166_314)


def test_shared_tensor_stored_counted_and_fingerprinted_once():
    model = make_lc(sharing="global")
    frozen = sb.FrozenBackbone(model, seed=3)
    sd = model.state_dict()
    shared_keys = [k for k in sd if k.endswith("shared_spatial.weight")]
    assert shared_keys == ["shared_spatial.weight"]
    assert not any(k.endswith("spatial.weight") and k != "shared_spatial.weight" for k in sd)
    largest = 16 * 3 * 16 * 9
    assert sd["shared_spatial.weight"].numel() == largest
    n_other = sum(t.numel() for n, t in model.named_parameters() if n != "shared_spatial.weight")
    assert frozen.num_parameters() == n_other + largest == describe(frozen, SPEC, verbose=False)["total"]
    again = sb.FrozenBackbone.from_recipe(frozen.recipe)
    assert again.fingerprint == frozen.fingerprint
    assert sb.FrozenBackbone(make_lc(sharing="global"), seed=4).fingerprint != frozen.fingerprint


def test_shared_tensor_regenerates_under_other_init_schemes():
    a = sb.FrozenBackbone(make_lc(sharing="recycled", share_fraction=0.5), seed=1, init="kaiming_uniform")
    assert sb.FrozenBackbone.from_recipe(a.recipe).fingerprint == a.fingerprint
    assert a.backbone.shared_spatial.weight.abs().max() <= 1


@pytest.mark.parametrize("sharing", ["none", "global"])
def test_ensemble_members_equal_plain_forward(sharing):
    torch.manual_seed(0)
    frozen = sb.FrozenBackbone(make_lc(sharing=sharing), seed=0)
    ens = sb.Ensemble(frozen, SPEC, members=2).eval()
    x = torch.randn(3, 1, 10, 10)
    out = ens(x)
    loop = ens(x, vectorized=False)
    assert out.shape == (2, 3, 5)
    assert torch.allclose(out, loop, atol=1e-5)
    for i in range(2):
        assert torch.allclose(out[i], ens.member(i)(x), atol=1e-5)
    assert not torch.allclose(out[0], out[1])
    names = set(ens.layout)
    assert any(n.endswith("conv1.pointwise.weight") for n in names)
    assert not any("spatial" in n.replace("pointwise", "") for n in names)


def test_ensemble_training_step_leaves_spatial_untouched():
    frozen = sb.FrozenBackbone(make_lc(sharing="global"), seed=0)
    before = {n: t.clone() for n, t in frozen.tensors().items()}
    ens = sb.Ensemble(frozen, SPEC, members=2).train()
    opt = torch.optim.SGD(ens.parameters(), lr=0.1)
    loss = ens(torch.randn(4, 1, 8, 8)).logsumexp(-1).sum() + l1_penalty(ens, 1e-3)
    loss.backward()
    opt.step()
    assert all(torch.equal(before[n], t) for n, t in frozen.tensors().items())
    assert all(p.grad is not None for p in ens.slices.values())


# -- plain models: freeze_spatial, followed_by_pointwise ------------------------------------------------
def test_freeze_spatial_on_plain_lcresnet_and_param_groups():
    model = make_lc()
    groups = freeze_spatial(model)
    learn = {id(p) for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in learn) == (not name.endswith(".spatial.weight")), name
        assert p.requires_grad == (id(p) in learn)
    with pytest.raises(ValueError, match="no conv with a kernel larger"):
        freeze_spatial(nn.Sequential(nn.Conv2d(2, 2, 1), nn.ReLU()))


def test_followed_by_pointwise_torchvision():
    import torchvision

    r50 = followed_by_pointwise(sb.build_backbone("resnet50", num_classes=10))  # torchvision's, in stages
    assert r50["stages.block1.0.conv2"] == {"pointwise": "stages.block1.0.conv3", "through": ["BatchNorm2d", "ReLU"],
                                            "linear": False}
    assert r50["stages.stem.0"]["pointwise"] is None
    assert sum(v["pointwise"] is not None for v in r50.values()) == 16  # every bottleneck's 3x3
    r18 = followed_by_pointwise(torchvision.models.resnet18(weights=None, num_classes=10))
    assert all(v["pointwise"] is None for v in r18.values())
    seq = followed_by_pointwise(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1)))
    assert seq["0"] == {"pointwise": "2", "through": ["BatchNorm2d"], "linear": True}


@pytest.mark.parametrize("conv, norm", [
    (nn.Conv2d, nn.InstanceNorm2d(4, affine=True)), (nn.Conv2d, nn.SyncBatchNorm(4)),
    (nn.Conv2d, nn.LazyBatchNorm2d()), (nn.Conv3d, nn.LazyInstanceNorm3d()), (nn.Conv1d, nn.BatchNorm1d(4)),
])
def test_followed_by_pointwise_passes_every_kind_of_norm(conv, norm):
    seq = followed_by_pointwise(nn.Sequential(conv(1, 4, 3), norm, conv(4, 2, 1)))
    assert seq["0"] == {"pointwise": "2", "through": [type(norm).__name__], "linear": True}


def test_surgery_finds_every_norm_and_conv_torch_nn_defines():
    """lc_surgery names norms and convs by public classes; they cover every class torch.nn derives from
    its private bases (a class torch adds later fails here)."""
    from shared_backbone import lc_surgery

    classes = [c for c in vars(nn).values() if isinstance(c, type)]
    norms = [c for c in classes if issubclass(c, nn.modules.batchnorm._NormBase)]
    convs = [c for c in classes if issubclass(c, nn.modules.conv._ConvNd)]
    assert len(norms) >= 13 and len(convs) >= 12
    assert [c.__name__ for c in norms if not issubclass(c, lc_surgery._NORMS)] == []
    assert [c.__name__ for c in convs if not issubclass(c, lc_surgery._CONVS)] == []


# -- export ---------------------------------------------------------------------------------------------
def _conv_macs(model, x):
    """Multiply-adds per sample of every conv; an unfused LC-Block runs its k×k conv and its 1×1."""
    macs = []

    def hook(m, inp, out):
        pixels = out.shape[-2] * out.shape[-1]
        if isinstance(m, LCConv2d):
            mid = m.out_channels * m.expansion
            macs.append(pixels * (mid * m.in_channels * m.kernel_size ** 2 + m.out_channels * mid))
        else:
            macs.append(pixels * m.weight.numel())

    hs = [m.register_forward_hook(hook) for m in model.modules()
          if isinstance(m, (LCConv2d, nn.Conv2d))]
    model(x)
    for h in hs:
        h.remove()
    return sum(macs)


@pytest.mark.parametrize("sharing", ["none", "recycled"])
def test_export_fused_is_plain_resnet_with_same_outputs(sharing):
    torch.manual_seed(0)
    frac = 0.25 if sharing == "recycled" else 1.0
    model = sb.FrozenBackbone(make_lc(expansion=8, sharing=sharing, share_fraction=frac), seed=0).backbone.eval()
    plain = export_fused(model).eval()
    assert plain.arch == "resnet20" and not lc_layers(plain)
    ref = sb.build_backbone("resnet20", **plain.config)
    ref.load_state_dict(plain.state_dict())  # strict: the same registry family
    x = torch.randn(2, 1, 12, 12)
    assert rel_err(ref.eval()(x), model(x)) < 1e-4
    lc_macs, plain_macs = _conv_macs(model, x), _conv_macs(ref, x)
    spatial_lc = sum(m.spatial_weight().numel() for m in lc_layers(model).values())
    assert spatial_lc == 8 * sum(m.weight.numel() for m in ref.modules() if isinstance(m, nn.Conv2d) and m.kernel_size[0] > 1)
    assert lc_macs / plain_macs > 8  # E x fewer spatial MACs (plus the 1x1s it no longer runs)


def test_export_refuses_a_block_with_a_nonlinearity_between():
    bad = nn.Sequential(LCConv2d(2, 3, 3, 1, 2, mid_layer=lambda c: nn.ReLU()))
    x = torch.randn(1, 2, 5, 5)
    assert bad(x).shape == (1, 3, 5, 5)  # runs unfused
    with pytest.raises(ValueError, match=r"cannot fuse 1 LC-Block.*0.*ReLU"):
        export_fused(bad)
    with pytest.raises(ValueError, match="no LC-Block"):
        export_fused(nn.Sequential(nn.Conv2d(1, 1, 3)))


# -- sparsity -------------------------------------------------------------------------------------------
def test_l1_penalty_equals_hand_sum():
    model = make_lc()
    manual = sum(m.weight.abs().sum() for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1))
    assert torch.allclose(l1_penalty(model, 0.5), 0.5 * manual)
    ens = sb.Ensemble(sb.FrozenBackbone(make_lc()), SPEC, members=2)
    stacked = sum(p.abs().sum() for n, p in ens.slices.items() if p.dim() == 5)
    assert torch.allclose(l1_penalty(ens, 1.0), stacked)
    assert set(pointwise_weights(ens)) == {n for n in ens.layout if n.endswith("weight") and "bn" not in n
                                           and not n.startswith("stages.head") and ".1.weight" not in n}


def test_prune_pointwise_zeroes_the_smallest_global_fraction():
    model = make_lc()
    ws = pointwise_weights(model)
    flat = torch.cat([w.detach().abs().flatten() for w in ws.values()])
    n_prune = round(0.7 * flat.numel())
    cut = flat.sort().values[n_prune - 1]
    masks = prune_pointwise(model, 0.7)
    assert sum(int((~m).sum()) for m in masks.values()) == n_prune
    assert pointwise_sparsity(model) == pytest.approx(n_prune / flat.numel())
    kept = torch.cat([w.detach().abs().flatten()[m.flatten()] for w, m in zip(ws.values(), masks.values())])
    assert kept.min() >= cut
    assert prune_pointwise(make_lc(), 0.0) and pointwise_sparsity(make_lc()) == 0


def test_sparse_checkpoint_roundtrip_and_smaller(tmp_path):
    model = sb.FrozenBackbone(make_lc(expansion=16, sharing="global")).backbone
    dense = save_sparse(tmp_path / "dense.safetensors", model, min_zero_fraction=1.1)
    prune_pointwise(model, 0.7)
    path = save_sparse(tmp_path / "sparse.safetensors", model, {"note": "x"})
    state, meta = load_sparse(path)
    assert meta["note"] == "x"
    ref = model.state_dict()
    assert set(state) == set(ref) and all(torch.equal(state[k], ref[k]) for k in ref)
    pw = sum(w.numel() for w in pointwise_weights(model).values())
    # 70% of the 1x1s gone: values 30% + bitmask 1/32 of them
    saved = dense.stat().st_size - path.stat().st_size
    assert saved > 0.6 * pw * 4
    assert not list(tmp_path.glob(".*tmp"))


# -- bad input ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg, match", [
    ({"expansion": 0}, r"expansion E must be an integer >= 1.*got 0"),
    ({"expansion": 1.5}, r"expansion.*1\.5"),
    ({"kernel_size": 4}, r"odd.*got 4"),
    ({"sharing": "local"}, r"sharing must be one of \('none', 'global', 'recycled'\), got 'local'"),
    ({"sharing": "recycled", "share_fraction": 1e-6}, r"share_fraction=1e-06.*fewer than one 3x3 kernel \(9\)"),
    ({"sharing": "recycled", "share_fraction": 0}, r"share_fraction must be in \(0, 1\], got 0"),
    ({"share_fraction": 0.5}, r"share_fraction=0\.5 applies to sharing='recycled' only"),
])
def test_bad_config_errors_name_value_and_accepted(cfg, match):
    with pytest.raises(ValueError, match=match):
        make_lc(**cfg)


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5, "0.5"])
def test_bad_pruning_ratio(ratio):
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\).*got"):
        prune_pointwise(make_lc(), ratio)


# -- analysis -------------------------------------------------------------------------------------------
def test_fve_hand_computed():
    same = torch.randn(1, 1, 3, 3).expand(8, 4, 3, 3)
    assert la.filter_variance_entropy(same) == pytest.approx(0.0, abs=1e-9)
    e1, e2 = torch.zeros(9), torch.zeros(9)
    e1[0], e2[4] = 1.0, 1.0
    two = torch.stack([e1, -e1, e2, -e2]).view(4, 1, 3, 3)  # two directions of equal variance
    assert la.filter_variance_entropy(two) == pytest.approx(math.log10(2), abs=1e-9)
    c = la.THRESHOLD_3X3
    assert la.randomness_threshold(2 ** c["x0"]) == pytest.approx(c["l"] / 2 + c["b"])
    rnd = torch.empty(64, 32, 3, 3).uniform_(-1, 1)
    assert la.normalized_fve(rnd) >= 0.97
    assert la.filter_variance_entropy(rnd) <= math.log10(9) + 1e-9
    with pytest.raises(ValueError, match=r"3x3 filters only, got \(5, 5\)"):
        la.normalized_fve(torch.randn(4, 4, 5, 5))


def test_sparse_filters_and_position_variance():
    w = torch.randn(4, 2, 3, 3)
    w[0, 0] = 1e-4
    assert la.sparse_filter_fraction(w) == pytest.approx(1 / 8)
    manual = w.reshape(-1, 9).double().var(dim=0).view(3, 3).float()
    assert torch.allclose(la.per_position_variance(w), manual)


def test_reconstructed_filters_report_and_figures(tmp_path):
    model = sb.FrozenBackbone(make_lc(), seed=0).backbone
    layer = model.stages.stem[0]
    ref = torch.einsum("om,mikl->oikl", layer.pointwise.weight.flatten(1), layer.spatial_weight())
    assert torch.allclose(la.reconstructed_filters(layer), ref, atol=1e-6)
    rep = la.fve_report(model)
    assert set(rep) == set(lc_layers(model)) and all(r["normalized_fve"] is not None for r in rep.values())
    assert la.plot_filter_grid({"E=3": ref, "W": layer.spatial_weight()}, tmp_path / "g.png", n=4).stat().st_size > 0
    assert la.plot_position_variance({"stem": ref}, tmp_path / "v.png").stat().st_size > 0
    assert la.plot_pointwise_histograms(model, tmp_path / "h.png").stat().st_size > 0
    hist = la.pointwise_histograms(model, bins=10)
    assert sum(hist["stages.stem.0.pointwise.weight"]["counts"]) == layer.pointwise.weight.numel()


def test_fgsm_matches_manual_attack():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))
    model = la.Normalize(net, [0.5], [0.25])
    x, y = torch.rand(20, 1, 6, 6), torch.randint(0, 3, (20,))
    res = la.fgsm_accuracy(model, (x, y), eps=0.05, batch_size=7)
    xr = x.clone().requires_grad_(True)
    F.cross_entropy(model(xr), y).backward()
    adv = (x + 0.05 * xr.grad.sign()).clamp(0, 1)
    assert res["fgsm_accuracy"] == pytest.approx(float((model(adv).argmax(-1) == y).float().mean()))
    assert res["clean_accuracy"] == pytest.approx(float((model(x).argmax(-1) == y).float().mean()))
    assert la.fgsm_accuracy(model, (x, y), eps=0)["fgsm_accuracy"] == res["clean_accuracy"]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        la.fgsm_accuracy(model, (x * 3 - 1, y))


def test_reproduce_lc_table1_script(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "reproduce_lc.py"
    spec = importlib.util.spec_from_file_location("reproduce_lc", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.main(["--table1", "--out", str(tmp_path)])
    rows = {r["method"]: (r["total"], r["learnable"]) for r in res["table1"]}
    assert rows["Baseline (all learned)"] == (38_431_402, 38_431_402)
    assert rows["+ Frozen"] == (38_431_402, 4_166_314)
    assert rows["+ Recycled WS (1/16)"] == (4_461_226, 4_166_314)
    assert rows["+ 1x1 pruning (rho=0.7)"] == (4_461_226 - round(0.7 * 4_164_096), 4_166_314)
    assert "38,431,402" in capsys.readouterr().out and (tmp_path / "tables.json").exists()
    assert sb.LCConv2d is LCConv2d


def test_recycled_1_16_of_lcresnet20_16x128_tiles_without_copies():
    """Every layer reads a view of W_s, or whole rows of it folded into P (no tiled copy)."""
    model, _, _ = _meta_counts(sharing="recycled", share_fraction=1 / 16)
    m = model.shared_spatial.weight.numel()
    for layer in lc_layers(model).values():
        n, row = math.prod(layer.spatial_shape), math.prod(layer.spatial_shape[1:])
        assert n <= m or m % row == 0
