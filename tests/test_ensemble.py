"""Ensemble contract tests: every slice kind, shared and own data, against hand-built plain modules."""
from __future__ import annotations

import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import shared_backbone as sb
from conftest import head_linear
from shared_backbone import BatchNorm, Blocks, Ensemble, Filters, Full, Head, Pointwise

# Filters(0.5, dim=1) leaves the 1-channel stem conv with no learned input: warned about in test_slices
pytestmark = pytest.mark.filterwarnings("ignore:Filters.*no learned filter:UserWarning")

K, N, C, HW = 3, 4, 5, 16

# (id, spec factory, fixed mode of the partial convs, (p, dim) of Filters or None, members differ at init)
SPECS = [
    ("filters+bn+head", lambda: Filters(0.25) + BatchNorm() + Head(), "random", (0.25, 0), True),
    ("filters-zero+head", lambda: Filters(0.25, fixed="zero") + Head(), "zero", (0.25, 0), True),
    ("filters-dim1+head", lambda: Filters(0.5, dim=1) + Head(), "random", (0.5, 1), True),
    ("head", Head, "random", None, True),
    ("block3", lambda: Blocks("block3"), "random", None, True),
    ("batchnorm", BatchNorm, "random", None, False),  # gamma=1, beta=0 for every member
    ("full", Full, "random", None, True),
]
DATA = ["shared", "own"]


spec_params = pytest.mark.parametrize("spec_id, make_spec, fixed, filters, differ", SPECS, ids=[s[0] for s in SPECS])


data_param = pytest.mark.parametrize("data", DATA)


# ---------------------------------------------------------------- helpers (independent of the library)


def bn_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}


@pytest.fixture
def frozen(make_resnet20):
    """A frozen resnet20 (width 4) from a 'trained' checkpoint: BN statistics and affine values are not
    the identity, so a mix-up of statistics between members, or between frozen and member, shows."""
    torch.manual_seed(0)
    bb = make_resnet20()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in bn_modules(bb).values():
            c = m.num_features
            m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
            m.running_var.copy_(0.5 + torch.rand(c, generator=g))
            m.weight.copy_(1 + 0.2 * torch.randn(c, generator=g))
            m.bias.copy_(0.1 * torch.randn(c, generator=g))
    return sb.FrozenBackbone.from_checkpoint(make_resnet20(), copy.deepcopy(bb.state_dict()))


@pytest.fixture
def random_frozen(make_resnet20):
    return sb.FrozenBackbone(make_resnet20(), seed=0)


def inputs(data: str, members: int = K, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (members, N, 1, HW, HW) if data == "own" else (N, 1, HW, HW)
    return torch.randn(shape, generator=g), torch.randint(0, C, (N,), generator=g)


def member_input(x: torch.Tensor, data: str, i: int) -> torch.Tensor:
    return x[i] if data == "own" else x


def merged(frozen_param: torch.Tensor, learned: torch.Tensor, fixed: str) -> tuple[torch.Tensor, int | None, int]:
    """The full parameter a member uses, joined by hand: (tensor, sliced dim or None, learned count)."""
    if learned.shape == frozen_param.shape:
        return learned.detach().clone(), None, 0
    dims = [d for d in range(frozen_param.dim()) if learned.shape[d] != frozen_param.shape[d]]
    assert len(dims) == 1, (learned.shape, frozen_param.shape)
    d, n = dims[0], learned.shape[dims[0]]
    full = frozen_param.detach().clone()
    full.narrow(d, 0, n).copy_(learned.detach())
    if fixed == "zero":
        full.narrow(d, n, full.shape[d] - n).zero_()
    return full, d, n


def reference(frozen: sb.FrozenBackbone, ens: Ensemble, i: int, fixed: str, filters=None) -> nn.Module:
    """A plain copy of the frozen backbone carrying member ``i``'s slice, merged here by hand."""
    model = copy.deepcopy(frozen.backbone)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, learned in ens.slice_of(i).items():
            full, d, n = merged(params[name], learned, fixed)
            if d is not None and filters is not None:
                p, dim = filters
                assert d == dim and n == math.floor(p * params[name].shape[dim]), name
            params[name].copy_(full)
    return model


def slice_params(ens: Ensemble) -> dict[str, nn.Parameter]:
    """The stacked slice parameters keyed by backbone parameter name."""
    out = {}
    for n, p in ens.named_parameters():
        assert n.startswith("slices."), n
        out[n[len("slices."):].replace("::", ".")] = p
    return out


def as_bytes(tensors: dict[str, torch.Tensor]) -> dict[str, bytes]:
    return {n: t.detach().cpu().contiguous().numpy().tobytes() for n, t in tensors.items()}


# ---------------------------------------------------------------- forward contract


@spec_params
@data_param
def test_forward_shape_vmap_equals_loop_and_members(frozen, data, spec_id, make_spec, fixed, filters, differ):
    torch.manual_seed(0)
    ens = Ensemble(frozen, make_spec(), members=K, data=data).eval()
    x, _ = inputs(data)
    with torch.no_grad():
        out = ens(x)
        loop = ens(x, vectorized=False)
    assert out.shape == (K, N, C) and torch.isfinite(out).all()
    torch.testing.assert_close(out, loop, atol=1e-5, rtol=1e-5)
    for i in range(K):
        xi = member_input(x, data, i)
        member = ens.member(i)
        assert isinstance(member, sb.Backbone) and not member.training
        assert not any(p.requires_grad for p in member.parameters())
        ref = reference(frozen, ens, i, fixed, filters).eval()
        with torch.no_grad():
            torch.testing.assert_close(member(xi), out[i], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ref(xi), out[i], atol=1e-5, rtol=1e-5)
    if differ:  # members start from different slices, so they predict differently
        assert not torch.allclose(out[0], out[1])


@spec_params
@data_param
def test_train_forward_updates_statistics_per_member(frozen, data, spec_id, make_spec, fixed, filters, differ):
    torch.manual_seed(0)
    ens = Ensemble(frozen, make_spec(), members=K, data=data)
    refs = [reference(frozen, ens, i, fixed, filters).train() for i in range(K)]
    twin = copy.deepcopy(ens)
    x, _ = inputs(data)
    ens.train()
    twin.train()
    with torch.no_grad():
        out = ens(x)
        loop = twin(x, vectorized=False)
    torch.testing.assert_close(out, loop, atol=1e-5, rtol=1e-5)
    bn_names = {f"{m}.{b}" for m, mod in bn_modules(frozen.backbone).items() for b, _ in mod.named_buffers()}
    for i in range(K):
        with torch.no_grad():
            torch.testing.assert_close(refs[i](member_input(x, data, i)), out[i], atol=1e-5, rtol=1e-5)
        want = dict(refs[i].named_buffers())
        stats = ens.stats_of(i)
        assert set(stats) == bn_names
        for n, t in stats.items():
            torch.testing.assert_close(t, want[n], atol=1e-5, rtol=1e-5, msg=f"member {i}: {n}")
            torch.testing.assert_close(twin.stats_of(i)[n], t, atol=1e-5, rtol=1e-5)
    # the frozen backbone's own statistics never move
    for n, m in bn_modules(frozen.backbone).items():
        assert int(m.num_batches_tracked) == 0
    mine = ens.member_stats.as_dict()
    if data == "own":  # every stage belongs to the members, each member saw its own batch
        assert set(mine) == bn_names and not ens.shared_stats.as_dict()
    if not mine:
        assert spec_id == "head" and data == "shared"  # the head has no BatchNorm
        return
    means = [n for n in mine if n.endswith("running_mean")]
    assert all(int(v) == 1 for n, v in mine.items() if n.endswith("num_batches_tracked") for v in v)
    differs = any(not torch.allclose(mine[n][0], mine[n][1]) for n in means)
    assert differs == (differ or data == "own")


@spec_params
@data_param
def test_sgd_step_touches_only_slices(random_frozen, data, spec_id, make_spec, fixed, filters, differ):
    torch.manual_seed(0)
    frozen = random_frozen
    ens = Ensemble(frozen, make_spec(), members=K, data=data).train()
    before_frozen = as_bytes(frozen.tensors())
    before_fixed = as_bytes(ens.fixed.as_dict())
    before_slices = {n: p.detach().clone() for n, p in slice_params(ens).items()}
    names = [n for n, _ in ens.named_parameters()]
    assert names and all(n.startswith("slices.") for n in names)
    assert not any(p.requires_grad for p in frozen.backbone.parameters())
    assert not any(b.requires_grad for b in ens.buffers())

    opt = torch.optim.SGD(ens.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    x, y = inputs(data)
    out = ens(x)
    loss = sum(F.cross_entropy(out[i], y) for i in range(K))
    loss.backward()
    for name, p in slice_params(ens).items():
        assert p.grad is not None, name
        assert p.grad.shape == p.shape and p.shape[0] == K
        for i in range(K):
            assert p.grad[i].abs().sum() > 0, f"member {i} got no gradient for {name}"
    opt.step()

    assert as_bytes(frozen.tensors()) == before_frozen
    assert as_bytes(ens.fixed.as_dict()) == before_fixed
    after = slice_params(ens)
    assert all(not torch.equal(after[n], before_slices[n]) for n in before_slices)
    assert not any(p.requires_grad for p in frozen.backbone.parameters())


@spec_params
@data_param
def test_member_gradient_equals_plain_module(frozen, data, spec_id, make_spec, fixed, filters, differ):
    """The slice gradient equals the gradient of the same rows of the merged weight in a plain module:
    the split conv (learned rows + fixed rows) is exact, and so is the zero-filled rest.

    Two members, the loss on member 0 only (K=1 under vmap corrupts the heap: see the xfail below)."""
    torch.manual_seed(0)
    ens = Ensemble(frozen, make_spec(), members=2, data=data, seed=3).train()
    ref = reference(frozen, ens, 0, fixed, filters).train()
    params = dict(ref.named_parameters())
    learned = ens.slice_of(0)
    for n in learned:
        params[n].requires_grad_(True)
    x, y = inputs(data, members=2, seed=1)

    F.cross_entropy(ens(x)[0], y).backward()
    F.cross_entropy(ref(member_input(x, data, 0)), y).backward()
    for name, p in slice_params(ens).items():
        _, d, n = merged(params[name], learned[name], fixed)
        want = params[name].grad if d is None else params[name].grad.narrow(d, 0, n)
        torch.testing.assert_close(p.grad[0], want, atol=1e-5, rtol=1e-4, msg=name)
        assert not p.grad[1].any(), name  # member 1 is not in the loss
    # the plain module agrees that nothing else would have learned
    assert {n for n, p in ref.named_parameters() if p.grad is not None} == set(learned)


K1_SCRIPT = """
import torch, torch.nn.functional as F
torch.set_num_threads(1)
import shared_backbone as sb
frozen = sb.FrozenBackbone(sb.build_backbone("resnet20", width=4, in_channels=1, num_classes=5), seed=0)
for it in range(10):
    ens = sb.Ensemble(frozen, sb.Full(), members=1)
    out = ens(torch.randn(4, 1, 16, 16))
    F.cross_entropy(out[0], torch.randint(0, 5, (4,))).backward()
print("ok")
"""


def test_single_member_backward_does_not_crash():
    """K=1 under vmap once corrupted the heap in torch 2.14's CPU conv backward; K=1 now runs unvectorized."""
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", K1_SCRIPT], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-500:]


# ---------------------------------------------------------------- member init


def test_filters_members_start_different_and_backbone_init_starts_equal(random_frozen):
    frozen = random_frozen
    spec = Filters(0.25) + Head()
    a = Ensemble(frozen, spec, members=3, seed=0)
    b = Ensemble(frozen, spec, members=3, seed=1)
    name = "stages.block2.0.conv1.weight"
    s0, s1 = a.slice_of(0), a.slice_of(1)
    assert s0[name].shape == (2, 4, 3, 3)  # floor(0.25 * 8) of 8 filters
    for n in s0:
        assert not torch.equal(s0[n], s1[n]), n
        assert not torch.equal(s0[n], b.slice_of(0)[n]), n
    # the same seed reproduces the same members
    c = Ensemble(frozen, spec, members=3, seed=0)
    assert all(torch.equal(c.slice_of(2)[n], t) for n, t in a.slice_of(2).items())
    # fresh rows follow the backbone's init: U[-a, a], a = 1/sqrt(4 * 9)
    assert s0[name].abs().max() <= 1 / 6

    start = Ensemble(frozen, spec, members=3, member_init="backbone")
    params = dict(frozen.backbone.named_parameters())
    for i in range(3):
        for n, t in start.slice_of(i).items():
            want = params[n] if t.shape == params[n].shape else params[n][: t.shape[0]]
            assert torch.equal(t, want), n
    x, _ = inputs("shared")
    with torch.no_grad():
        out = start.eval()(x)
        torch.testing.assert_close(out[0], frozen.backbone.eval()(x), atol=1e-5, rtol=1e-5)
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    with pytest.raises(ValueError, match=r"member_init must be 'random' or 'backbone', got 'zeros'"):
        Ensemble(frozen, spec, members=2, member_init="zeros")


def test_set_member_writes_one_member(random_frozen):
    ens = Ensemble(random_frozen, Head(), members=3)
    lin = head_linear(random_frozen.backbone)
    new = {n: torch.zeros_like(t) for n, t in ens.slice_of(1).items()}
    ens.set_member(1, new)
    x, _ = inputs("shared")
    with torch.no_grad():
        out = ens.eval()(x)
    assert torch.equal(out[1], torch.zeros(N, C))
    assert not torch.equal(out[0], torch.zeros(N, C))
    with pytest.raises(ValueError, match="slice does not match the spec"):
        ens.set_member(0, {f"{lin}.weight": torch.zeros(5, 16)})
    with pytest.raises(ValueError, match=r"has shape \(5, 4\), expected \(5, 16\)"):
        ens.set_member(0, {f"{lin}.weight": torch.zeros(5, 4), f"{lin}.bias": torch.zeros(5)})


def test_member_forward_reads_only_its_arguments(frozen):
    """The per-member function, called on its own (no forward_members around it) with member i's tensors
    passed in, is member i's plain module; another stack's tensors run through it as well; a forward
    leaves no state behind on the stack."""
    ens = Ensemble(frozen, Blocks("block2", "block3") + Head(), members=K, seed=1).eval()
    other = Ensemble(frozen, Blocks("block2", "block3") + Head(), members=K, seed=2).eval()
    x, _ = inputs("shared")
    attrs = set(vars(ens))
    with torch.no_grad():
        h = ens.prefix(x)  # stem and block1 run once: no member owns them
        for stack in (ens, other):
            for i in range(K):
                one = ens.member_forward(ens.fixed.as_dict(), {n: p[i] for n, p in stack.slices.items()},
                                         {n: b[i] for n, b in stack.member_stats.as_dict().items()}, h)
                torch.testing.assert_close(one, stack.member(i)(x), atol=1e-5, rtol=1e-5)
        mixed = ens.forward_members(h, slices=dict(other.slices.items()), stats=other.member_stats.as_dict())
        torch.testing.assert_close(mixed, other(x), atol=0, rtol=0)
    assert set(vars(ens)) == attrs


# ---------------------------------------------------------------- combine


def test_combine_mean_is_mean_probability(random_frozen):
    ens = Ensemble(random_frozen, Head(), members=K).eval()
    x, _ = inputs("shared")
    with torch.no_grad():
        logits = ens(x)
    probs = ens.combine(logits)
    want = torch.stack([torch.exp(l) / torch.exp(l).sum(-1, keepdim=True) for l in logits]).sum(0) / K
    torch.testing.assert_close(probs, want)
    torch.testing.assert_close(probs.sum(-1), torch.ones(N))
    vote = ens.combine(logits, "vote")
    assert torch.equal(vote.argmax(-1), torch.mode(logits.argmax(-1), dim=0).values) or K > 2
    with pytest.raises(ValueError, match="unknown combine 'median'"):
        ens.combine(logits, "median")


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("members", [0, -1, 1.5])
def test_bad_member_count(random_frozen, members):
    with pytest.raises(ValueError, match=rf"members must be a positive integer \(K >= 1\), got {members}"):
        Ensemble(random_frozen, Head(), members=members)


def test_spec_learning_nothing_is_refused(make_resnet20):
    frozen = sb.FrozenBackbone(make_resnet20(shortcut="A"), seed=0)  # no 1x1 convs at all
    with pytest.raises(ValueError, match=r"Pointwise\(\) learns no parameter of resnet20"):
        Ensemble(frozen, Pointwise(), members=2)
    with pytest.warns(UserWarning, match="no learned filter"), pytest.raises(ValueError, match="learns no parameter"):
        Ensemble(frozen, Filters(0.05), members=2)  # floor(0.05 * c) = 0 for c = 4, 8 and 16
    with pytest.raises(TypeError, match="spec must be a SliceSpec"):
        Ensemble(frozen, "Head()", members=2)


def test_bad_data_mode(random_frozen):
    with pytest.raises(ValueError, match=r"data must be one of \('shared', 'own'\), got 'mixed'"):
        Ensemble(random_frozen, Head(), members=2, data="mixed")


@pytest.mark.parametrize("data, shape, match", [
    ("shared", (N, 3, HW, HW), r"expected input of shape \(N, C, H, W\) with C=1, got \(4, 3, 16, 16\)"),
    ("shared", (N, HW, HW), r"expected input of shape \(N, C, H, W\) with C=1, got \(4, 16, 16\)"),
    ("shared", (K, N, 1, HW, HW), r"expected input of shape \(N, C, H, W\)"),
    ("own", (N, HW, HW), r"expected input of shape \(N, C, H, W\) or \(K, N, C, H, W\) with C=1, got \(4, 16, 16\)"),
    ("own", (K, N, 2, HW, HW), r"expected input of shape \(N, C, H, W\) or \(K, N, C, H, W\) with C=1"),
    ("own", (K + 1, N, 1, HW, HW), r"one batch per member needs a leading dim of K=3, got 4"),
])
def test_bad_input_shapes(random_frozen, data, shape, match):
    ens = Ensemble(random_frozen, Head(), members=K, data=data)
    with pytest.raises(ValueError, match=match):
        ens(torch.zeros(shape))


@pytest.mark.parametrize("i", [K, -1, 10, 1.0])
def test_member_index_out_of_range(random_frozen, i):
    ens = Ensemble(random_frozen, Head(), members=K)
    for call in (ens.member, ens.slice_of, ens.stats_of):
        with pytest.raises(IndexError, match=rf"member index must be in \[0, 3\), got {i}"):
            call(i)


def test_only_slices_are_parameters_and_state_dict(random_frozen):
    ens = Ensemble(random_frozen, Filters(0.25) + BatchNorm() + Head(), members=2)
    assert all(n.startswith("slices.") for n, _ in ens.named_parameters())
    sd = ens.state_dict()
    assert not any(k.startswith("fixed.") for k in sd)  # frozen tensors are never saved per member
    assert any(k.startswith("member_stats.") for k in sd)
    n_learned = sum(p.numel() for p in ens.parameters())
    assert n_learned == 2 * sb.describe(random_frozen, ens.spec, verbose=False)["learnable"]


def test_own_data_ensemble_takes_one_shared_batch_for_evaluation(random_frozen):
    """data='own' trains on (K, N, ...) but evaluates one batch for all: the same as repeating it."""
    ens = Ensemble(random_frozen, Filters(0.25) + BatchNorm() + Head(), members=3, data="own").eval()
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        shared = ens(x)
        repeated = ens(x.unsqueeze(0).expand(3, -1, -1, -1, -1))
    torch.testing.assert_close(shared, repeated, rtol=1e-5, atol=1e-6)
