"""The custom ops of ``shared_backbone.layers`` and every execution strategy of their vmap rules.

- ``torch.library.opcheck`` on every op (schema, fake tensor, autograd registration, AOT dispatch);
- float64 ``gradcheck`` of every op, unbatched and vmapped under each strategy;
- vmap against a Python loop over members for every ``in_dims`` combination the rules handle,
  forward and backward, under each strategy;
- whole ensembles under each strategy against plain modules carrying each member's weights.

Runs on ``--device`` (default cpu; ``pytest --device cuda tests/test_ops.py`` on a GPU).
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.func import vmap

import shared_backbone as sb
import test_ensemble as te  # the plain-module references, merged by hand
from test_ensemble import frozen  # noqa: F401  (fixture: a "trained" frozen resnet20, width 4)
from shared_backbone import layers
from shared_backbone.layers import split_conv as split_conv_module
from shared_backbone.ensemble import CONV_EXECUTIONS, conv_execution

OPS = torch.ops.shared_backbone
STRATEGIES = ("grouped", "dense", "loop")  # "auto" is one of these, by device
K, N, C, O, NL, HW = 3, 2, 3, 4, 1, 5  # members, batch, in channels, out channels, learned rows, size
CONV_ARGS = ([1, 1], [1, 1], [1, 1])  # stride, padding, dilation
strategies = pytest.mark.parametrize("how", STRATEGIES)


def _t(*shape, device, dtype=torch.float32, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed + 7 * len(shape) + sum(shape))
    return torch.randn(*shape, generator=g, dtype=dtype).to(device).requires_grad_(grad)


def _batched(shape, d, device, dtype=torch.float32, seed=0, grad=True):
    """A tensor of ``shape`` with a member axis of size K at ``d`` (None: unbatched)."""
    if d is None:
        return _t(*shape, device=device, dtype=dtype, seed=seed, grad=grad)
    full = list(shape)
    full.insert(d, K)
    return _t(*full, device=device, dtype=dtype, seed=seed, grad=grad)


def _member(t, d, i):
    return t if d is None else t.select(d, i)


def _vmap_vs_loop(op, tensors, dims, rest, out_fn=lambda o: o):
    """``vmap(op)`` equals the op member by member, outputs and gradients of every tensor input."""
    batched = vmap(lambda *ts: out_fn(op(*ts, *rest)), in_dims=tuple(dims))(*tensors)
    looped = torch.stack([out_fn(op(*[_member(t, d, i) for t, d in zip(tensors, dims)], *rest)) for i in range(K)])
    torch.testing.assert_close(batched, looped, atol=1e-5, rtol=1e-5)
    cot = torch.randn_like(looped)
    wrt = [t for t in tensors if t is not None and t.requires_grad]
    gb = torch.autograd.grad(batched, wrt, cot, allow_unused=True)
    gl = torch.autograd.grad(looped, wrt, cot, allow_unused=True)
    for a, b in zip(gb, gl):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- the setting


def test_conv_execution_setting_and_bad_name():
    assert layers.get_conv_execution() == "auto" and CONV_EXECUTIONS == ("auto", "grouped", "dense", "loop")
    with conv_execution("loop"):
        assert layers.get_conv_execution() == "loop"
        with conv_execution("grouped"):
            assert layers.get_conv_execution() == "grouped"
        assert layers.get_conv_execution() == "loop"
    assert layers.get_conv_execution() == "auto"
    with pytest.raises(ValueError, match=r"one of \('auto', 'grouped', 'dense', 'loop'\), got 'fast'"):
        layers.set_conv_execution("fast")
    with pytest.raises(ValueError, match="got 'fast'"), conv_execution("fast"):
        pass
    assert layers.get_conv_execution() == "auto"


@pytest.mark.parametrize("how", CONV_EXECUTIONS)
def test_each_strategy_runs_the_path_it_names(how, monkeypatch):
    """The setting reaches the rule: grouped -> a grouped conv, dense -> the per-member op, loop -> K calls."""
    seen = []
    real_conv, real_members = F.conv2d, split_conv_module.members_split_conv2d
    monkeypatch.setattr(F, "conv2d", lambda *a, **kw: seen.append(("conv", a[6] if len(a) > 6 else 1))
                        or real_conv(*a, **kw))
    monkeypatch.setattr(split_conv_module, "members_split_conv2d",
                        lambda *a: seen.append(("members", None)) or real_members(*a))
    x, wl, wf = _t(K, N, C, HW, HW, device="cpu"), _t(K, NL, C, 3, 3, device="cpu"), _t(O - NL, C, 3, 3, device="cpu")
    with conv_execution(how):
        vmap(lambda a, b: layers.split_conv2d(a, b, wf, *CONV_ARGS), in_dims=(0, 0))(x, wl)
    want = {"auto": "dense", "grouped": "grouped", "dense": "dense", "loop": "loop"}[how]
    if want == "grouped":
        assert ("conv", K) in seen and ("members", None) not in seen
    elif want == "dense":
        assert ("members", None) in seen and ("conv", K) not in seen
    else:
        assert ("members", None) not in seen and ("conv", K) not in seen


# ---------------------------------------------------------------- opcheck / gradcheck, unbatched


def _op_samples(device, dtype=torch.float32):
    x = _t(N, C, HW, HW, device=device, dtype=dtype, grad=True)
    w = _t(O, C, 3, 3, device=device, dtype=dtype, seed=1, grad=True)
    wl = _t(NL, C, 3, 3, device=device, dtype=dtype, seed=2, grad=True)
    wf = _t(O - NL, C, 3, 3, device=device, dtype=dtype, seed=3)
    xk = _t(K, N, C, HW, HW, device=device, dtype=dtype, seed=4, grad=True)  # member-major
    wlk = _t(K, NL, C, 3, 3, device=device, dtype=dtype, seed=5, grad=True)
    h = _t(N, O, HW, HW, device=device, dtype=dtype, seed=6, grad=True)
    g = (1 + 0.1 * _t(O, device=device, dtype=dtype, seed=7)).requires_grad_(True)
    b = _t(O, device=device, dtype=dtype, seed=8, grad=True)
    rm, rv = _t(O, device=device, dtype=dtype, seed=9), 0.5 + _t(O, device=device, dtype=dtype, seed=10).abs()
    return {
        "member_conv2d": (OPS.member_conv2d, (x, w, *CONV_ARGS)),
        "member_conv2d_stride2": (OPS.member_conv2d, (x, w, [2, 2], [0, 0], [1, 1])),
        "split_conv2d": (OPS.split_conv2d, (x, wl, wf, *CONV_ARGS)),
        "split_conv2d_dilated": (OPS.split_conv2d, (x, wl, wf, [1, 1], [2, 2], [2, 2])),
        "members_split_conv2d": (OPS.members_split_conv2d, (xk, wlk, wf, *CONV_ARGS)),
        "members_split_conv2d_no_fixed": (OPS.members_split_conv2d, (xk, wlk, wf[:0], *CONV_ARGS)),
        "member_batch_norm_train": (OPS.member_batch_norm, (h, g, b, None, None, True, 1e-5)),
        "member_batch_norm_eval": (OPS.member_batch_norm, (h, g, b, rm, rv, False, 1e-5)),
    }


SAMPLE_IDS = list(_op_samples("cpu"))


@pytest.mark.parametrize("name", SAMPLE_IDS)
def test_opcheck(name, device):
    op, args = _op_samples(device)[name]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("name", SAMPLE_IDS)
def test_gradcheck_float64(name, device):
    op, args = _op_samples(device, torch.float64)[name]
    idx = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]

    def fn(*ts):
        full = list(args)
        for i, t in zip(idx, ts):
            full[i] = t
        out = op(*full)
        return out[0] if isinstance(out, tuple) else out

    assert torch.autograd.gradcheck(fn, [args[i] for i in idx], atol=1e-6, rtol=1e-5, fast_mode=True)


@strategies
def test_gradcheck_float64_vmapped(how, device):
    """Double-precision gradients through each strategy's batched conv and batch norm."""
    x = _t(K, N, C, HW, HW, device=device, dtype=torch.float64, grad=True)
    wl = _t(K, NL, C, 3, 3, device=device, dtype=torch.float64, seed=1, grad=True)
    w = _t(K, O, O, 3, 3, device=device, dtype=torch.float64, seed=2, grad=True)
    wf = _t(O - NL, C, 3, 3, device=device, dtype=torch.float64, seed=3)
    g = (1 + 0.1 * _t(K, O, device=device, dtype=torch.float64, seed=4)).requires_grad_(True)

    def member(x, wl, w, g):
        h = layers.split_conv2d(x, wl, wf, *CONV_ARGS)
        h = OPS.member_batch_norm(h, g, torch.zeros_like(g), None, None, True, 1e-5)[0]
        return layers.member_conv2d(torch.relu(h), w, None, *CONV_ARGS)

    with conv_execution(how):
        assert torch.autograd.gradcheck(vmap(member), (x, wl, w, g), atol=1e-6, rtol=1e-5, fast_mode=True)


# ---------------------------------------------------------------- vmap == loop, every in_dims


@strategies
@pytest.mark.parametrize("xd, wd", [(0, 0), (1, 0), (0, None), (1, None), (None, 0), (2, 1)])
def test_member_conv2d_vmap_equals_loop(how, xd, wd, device):
    x = _batched((N, C, HW, HW), xd, device)
    w = _batched((O, C, 3, 3), wd, device, seed=1)
    with conv_execution(how):
        _vmap_vs_loop(layers.member_conv2d, (x, w), (xd, wd), (None, [2, 1], [1, 0], [1, 1]))


# every (x, learned, fixed) combination with at least one batched tensor
SPLIT_DIMS = [d for d in itertools.product((0, None), repeat=3) if d != (None, None, None)] + [(1, 0, None), (2, 1, None)]


@strategies
@pytest.mark.parametrize("dims", SPLIT_DIMS, ids=str)
def test_split_conv2d_vmap_equals_loop(how, dims, device):
    xd, ld, fd = dims
    x = _batched((N, C, HW, HW), xd, device)
    wl = _batched((NL, C, 3, 3), ld, device, seed=1)
    wf = _batched((O - NL, C, 3, 3), fd, device, seed=2, grad=False)
    with conv_execution(how):
        _vmap_vs_loop(layers.split_conv2d, (x, wl, wf), dims, CONV_ARGS)


BN_DIMS = [  # (x, weight, bias, running stats) member axes
    (0, 0, 0, 0), (0, 0, 0, None), (0, None, None, None), (None, 0, 0, 0), (None, 0, None, 0), (1, 0, 0, 0),
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dims", BN_DIMS, ids=str)
def test_member_batch_norm_vmap_equals_loop(dims, training, device):
    xd, wd, bd, sd = dims
    x = _batched((N, O, HW, HW), xd, device)
    w = (1 + 0.1 * _batched((O,), wd, device, seed=1, grad=False)).requires_grad_(True)
    b = _batched((O,), bd, device, seed=2)
    rm = _batched((O,), sd, device, seed=3, grad=False)
    rv = 0.5 + _batched((O,), sd, device, seed=4, grad=False).abs()
    if training:  # batch statistics: the op reads no running statistics
        _vmap_vs_loop(lambda *a: OPS.member_batch_norm(*a, None, None, True, 1e-5)[0], (x, w, b), (xd, wd, bd), ())
    else:
        _vmap_vs_loop(lambda *a: OPS.member_batch_norm(*a, False, 1e-5)[0], (x, w, b, rm, rv), (xd, wd, bd, sd, sd), ())


def test_member_batch_norm_updates_each_members_running_statistics(device):
    """The public wrapper under vmap: per-member running statistics as F.batch_norm computes them."""
    x = _t(K, N, O, HW, HW, device=device)
    w, b = 1 + 0.1 * _t(K, O, device=device, seed=1), _t(K, O, device=device, seed=2)
    rm, rv = torch.zeros(K, O, device=device), torch.ones(K, O, device=device)
    out = vmap(lambda *a: layers.member_batch_norm(*a, True, 0.1, 1e-5))(x, w, b, rm, rv)
    for i in range(K):
        rmi, rvi = torch.zeros(O, device=device), torch.ones(O, device=device)
        ref = F.batch_norm(x[i], rmi, rvi, w[i], b[i], True, 0.1, 1e-5)
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rm[i], rmi)
        torch.testing.assert_close(rv[i], rvi)


# ---------------------------------------------------------------- whole ensembles, every strategy


ENSEMBLE_SPECS = [s for s in te.SPECS if s[0] in ("filters+bn+head", "filters-zero+head", "filters-dim1+head", "block3")]


@pytest.mark.filterwarnings("ignore:Filters.*no learned filter:UserWarning")
@strategies
@pytest.mark.parametrize("data", te.DATA)
@pytest.mark.parametrize("spec_id, make_spec, fixed, filters, differ", ENSEMBLE_SPECS, ids=[s[0] for s in ENSEMBLE_SPECS])
def test_ensemble_strategy_equals_plain_modules(how, data, spec_id, make_spec, fixed, filters, differ, device,
                                                 frozen):
    """Training-mode forward (batch statistics) and the slice gradients of member 0 equal a plain module's."""
    torch.manual_seed(0)
    ens = sb.Ensemble(frozen, make_spec(), members=2, data=data, seed=3).train()
    refs = [te.reference(frozen, ens, i, fixed, filters).to(device).train() for i in range(2)]
    ens.to(device)
    params = dict(refs[0].named_parameters())
    learned = ens.slice_of(0)
    for n in learned:
        params[n].requires_grad_(True)
    x, y = (t.to(device) for t in te.inputs(data, members=2, seed=1))
    with conv_execution(how):
        out = ens(x)
    for i in range(2):
        ref_out = refs[i](te.member_input(x, data, i))
        torch.testing.assert_close(out[i], ref_out, atol=1e-4, rtol=1e-4)
    F.cross_entropy(out[0], y).backward()
    F.cross_entropy(refs[0](te.member_input(x, data, 0)), y).backward()
    for name, p in te.slice_params(ens).items():
        _, d, n = te.merged(params[name], learned[name], fixed)
        want = params[name].grad if d is None else params[name].grad.narrow(d, 0, n)
        torch.testing.assert_close(p.grad[0], want, atol=1e-4, rtol=1e-3, msg=name)
        assert not p.grad[1].any(), name


def test_dense_strategy_keeps_members_channels_last_on_cpu():
    """The layout the dense rules promise on CPU: member-major, each member's block channels_last,
    through a conv, a batch norm and a second conv (so no op pays a layout conversion)."""
    x = _t(K, N, C, HW, HW, device="cpu")
    wl, w = _t(K, NL, C, 3, 3, device="cpu", seed=1), _t(K, O, O, 3, 3, device="cpu", seed=2)
    wf, g = _t(O - NL, C, 3, 3, device="cpu", seed=3), 1 + 0.1 * _t(K, O, device="cpu", seed=4)
    seen = []

    def member(x, wl, w, g):
        h = layers.split_conv2d(x, wl, wf, *CONV_ARGS)
        h = layers.member_batch_norm(h, g, torch.zeros_like(g), None, None, True, 0.1, 1e-5)
        seen.append(h)
        return layers.member_conv2d(torch.relu(h), w, None, *CONV_ARGS)

    with conv_execution("dense"):
        out = vmap(member)(x, wl, w, g)
    for t in (out, torch._C._functorch.get_unwrapped(seen[0])):
        assert t.shape[:2] == (K, N) and all(t[i].is_contiguous(memory_format=torch.channels_last) for i in range(K))


def test_chunked_vmap_equals_the_member_loop(frozen):
    """K=5 on CPU runs vmap in chunks of 3 and 2: logits, running statistics and gradients equal the loop's."""
    from shared_backbone.ensemble import _vmap_chunk

    assert _vmap_chunk(5, torch.zeros(1)) == 3 and _vmap_chunk(8, torch.zeros(1)) == 4
    assert all(k % _vmap_chunk(k, torch.zeros(1)) != 1 for k in range(5, 40))  # never a chunk of one member
    torch.manual_seed(0)
    ens = sb.Ensemble(frozen, sb.Filters(0.25) + sb.BatchNorm() + sb.Head(), members=5, seed=1).train()
    twin = __import__("copy").deepcopy(ens)
    x, y = te.inputs("shared", seed=2)
    outs = []
    for model, vec in ((ens, True), (twin, False)):
        out = model(x, vectorized=vec)
        F.cross_entropy(out.flatten(0, 1), y.repeat(5)).backward()
        outs.append(out.detach())
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    for (n, p), (_, q) in zip(ens.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=n)
    for n, b in ens.member_stats.as_dict().items():
        torch.testing.assert_close(b, twin.member_stats.as_dict()[n], msg=n)


def test_mixed_adapter_batch_runs_the_shared_prefix_once_only_when_statistics_agree(frozen):
    """Blocks("block3")+Head() tasks: stem..block2 run once for the mixed batch while every task holds the
    same statistics there; after one task's differ, the batch falls back to per-task prefixes. Either way
    each sample's logits equal its task's own forward."""
    bank = sb.AdapterBank(frozen)
    for i, classes in enumerate((3, 5, 4)):
        bank.add_task(f"t{i}", sb.Blocks("block3") + sb.Head(), num_classes=classes, seed=i)
    bank.eval()
    x = te.inputs("shared", seed=5)[0][:4].repeat(3, 1, 1, 1)  # 12 samples
    tasks = [f"t{i % 3}" for i in range(12)]

    def check(expect_prefix: bool):
        with torch.no_grad():
            mixed = bank(x, tasks=tasks)
            for i, t in enumerate(tasks):
                alone = bank(x[i:i + 1], task=t)[0]
                torch.testing.assert_close(mixed[i, :alone.shape[0]], alone, atol=1e-5, rtol=1e-5)
        stack = bank._mixed.stack(list(bank.adapters.values()), x.device)  # the stack the batch ran on
        assert bool(stack.prefix_stages) == expect_prefix and (stack.data == "shared") == expect_prefix

    check(expect_prefix=True)
    with torch.no_grad():  # task t1's statistics in block1 move (as training on its own data would)
        name = next(n for n in bank.adapter("t1").stats_of(0) if n.startswith("stages.block1") and "running_mean" in n)
        bank.adapter("t1").set_member(0, bank.adapter("t1").slice_of(0), {name: bank.adapter("t1").stats_of(0)[name] + 0.5})
    check(expect_prefix=False)
