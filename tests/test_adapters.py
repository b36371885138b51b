"""Tests for shared_backbone.adapters: tasks, mixed batches, adapter files and their failure modes."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import shared_backbone as sb
from shared_backbone import io as sbio
from shared_backbone.adapter_cards import add_task_from_card, card_of
from shared_backbone.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterBank
from shared_backbone.ensemble import MemberStack
from shared_backbone.frozen import FingerprintMismatch
from shared_backbone.io import load_tensors, save_tensors

ROOT = Path(__file__).resolve().parents[1]
CFG = {"width": 4, "in_channels": 1, "num_classes": 10}
TASKS = {  # name: (spec, classes)
    "filters": (sb.Filters(0.25) + sb.BatchNorm() + sb.Head(), 10),
    "block2": (sb.Blocks("block2") + sb.Head(), 4),
    "head": (sb.Head(), 7),
}


def _frozen(seed: int = 0, **cfg) -> sb.FrozenBackbone:
    return sb.FrozenBackbone(sb.build_backbone("resnet20", **{**CFG, **cfg}), seed=seed)


def _perturb(bank: AdapterBank, seed: int = 0) -> None:
    """Move every slice off its initial value and every task's BN statistics off the defaults."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in bank.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    bank.train()
    x = torch.randn(8, 1, 12, 12, generator=g)
    for name in bank.task_names:
        bank(x + len(name), task=name)  # train mode: each task's own running statistics move
    bank.eval()


@pytest.fixture
def bank() -> AdapterBank:
    b = AdapterBank(_frozen())
    for i, (name, (spec, c)) in enumerate(TASKS.items()):
        b.add_task(name, spec, num_classes=c, seed=i)
    _perturb(b)
    return b


@pytest.fixture
def x12() -> torch.Tensor:
    return torch.randn(12, 1, 12, 12, generator=torch.Generator().manual_seed(1))


MIX = ["filters", "block2", "head", "head", "filters", "block2", "filters", "head", "block2", "filters", "head", "head"]


# ----------------------------------------------------------------------------- tasks
def test_add_task_owns_a_head_and_every_bn_statistic(bank):
    assert bank.task_names == list(TASKS) and bank.active == "filters"
    bn = sb.BatchNorm()
    a = bank.adapter("block2")
    assert bank(torch.zeros(2, 1, 8, 8), task="block2").shape == (2, 4)
    assert a.prefix_stages == [] and not a.shared_stats.as_dict()  # all statistics are the task's own
    assert len(a.member_stats.as_dict()) == 3 * sum(1 for m in bank.frozen.backbone.modules()
                                                    if isinstance(m, torch.nn.BatchNorm2d))
    only_bn = bank.add_task("bn", bn, num_classes=3)
    assert "Head()" in repr(only_bn.spec) and bank(torch.zeros(2, 1, 8, 8), task="bn").shape == (2, 3)


def test_task_forward_equals_a_plain_module_with_its_weights(bank, x12):
    for name, (_, c) in TASKS.items():
        a = bank.adapter(name)
        plain = sb.build_backbone("resnet20", **{**CFG, "num_classes": c}).eval()
        state = {**a.full_parameters(), **a.stats_of(0)}
        plain.load_state_dict(state)
        torch.testing.assert_close(bank(x12, task=name), plain(x12), rtol=1e-5, atol=1e-6)


def test_set_active_and_delete_task(bank, x12):
    bank.set_active("head")
    assert bank(x12).shape == (12, 7)
    bank.delete_task("head")
    assert "head" not in bank and bank.active == "filters" and bank(x12).shape == (12, 10)
    with pytest.raises(KeyError, match="'head' is not in the bank"):
        bank.set_active("head")


@pytest.mark.parametrize("verb", ["adapter", "set_active", "delete_task", "save_adapter", "forward"])
def test_unknown_task_name_is_a_clear_error(bank, verb, x12, tmp_path):
    call = {"adapter": lambda: bank.adapter("nope"), "set_active": lambda: bank.set_active("nope"),
            "delete_task": lambda: bank.delete_task("nope"), "save_adapter": lambda: bank.save_adapter("nope", tmp_path),
            "forward": lambda: bank(x12, task="nope")}[verb]
    with pytest.raises(KeyError, match=r"task 'nope' is not in the bank; tasks: \['filters', 'block2', 'head'\]"):
        call()


def test_bad_task_names_and_cards(bank):
    with pytest.raises(ValueError, match="already in the bank"):
        bank.add_task("head", sb.Head(), num_classes=2)
    for bad in ("", "a.b", "a/b"):
        with pytest.raises(ValueError, match="task name"):
            bank.add_task(bad, sb.Head(), num_classes=2)
    with pytest.raises(ValueError, match="give num_classes"):
        bank.add_task("x", sb.Head())
    with pytest.raises(TypeError, match="add_task_from_card"):  # add_task takes sizes, not a card
        bank.add_task("x", sb.Head(), "digits")
    with pytest.raises(ValueError, match="task 'x' has 3-channel inputs, but the backbone takes 1 channels"):
        bank.add_task("x", sb.Head(), 10, in_channels=3)
    with pytest.raises(ValueError, match="class_names names 2 classes, but num_classes=3"):
        bank.add_task("x", sb.Head(), 3, class_names=["a", "b"])
    assert "x" not in bank


def test_model_code_does_not_import_data_code():
    """Adapters take sizes; task cards are resolved above them (shared_backbone.adapter_cards)."""
    script = "import sys, shared_backbone.adapters; print(sorted(m for m in sys.modules if m.startswith('shared_backbone.data')))"
    out = subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT, timeout=120, capture_output=True, text=True)
    assert out.stdout.strip() == "[]"


def test_add_task_from_card_reads_the_cards_sizes(bank):
    with pytest.raises(ValueError, match="3-channel inputs"):
        add_task_from_card(bank, "x", sb.Head(), "cifar10")
    with pytest.raises(ValueError, match="num_classes=4 but task card 'digits' has 10"):
        add_task_from_card(bank, "x", sb.Head(), "digits", num_classes=4)
    with pytest.raises(ValueError, match="unknown task card 'nope'"):
        add_task_from_card(bank, "x", sb.Head(), "nope")
    known = sb.data.load_task("fashion_coarse")
    a = add_task_from_card(bank, "train", sb.Head(), "fashion_coarse")  # a name that is also a Module method
    assert a.num_classes == 4 and bank.adapter("train").num_classes == 4
    assert a.class_names == known.class_names and card_of(a) == known
    assert card_of(bank.adapter("head")) is None


# ----------------------------------------------------------------------------- mixed batches
def test_mixed_batch_equals_each_task_alone(bank, x12):
    mixed = bank(x12, tasks=MIX)  # (N, C_max)
    assert mixed.shape == (12, 10)
    for name, (_, c) in TASKS.items():
        idx = [i for i, t in enumerate(MIX) if t == name]
        alone = bank(x12[idx], task=name)
        torch.testing.assert_close(mixed[idx, :c], alone, rtol=1e-5, atol=1e-6)
        assert torch.isneginf(mixed[idx, c:]).all()
    # a batch naming only some tasks, and task indices instead of names
    sub = bank(x12[:2], tasks=["block2", "block2"])
    torch.testing.assert_close(sub[:, :4], bank(x12[:2], task="block2"), rtol=1e-5, atol=1e-6)
    ids = torch.tensor([bank.task_names.index(t) for t in MIX])
    torch.testing.assert_close(bank(x12, tasks=ids), mixed, rtol=0, atol=0)


def test_mixed_batch_is_one_vmapped_call(bank, x12, monkeypatch):
    calls = []
    original = MemberStack.member_forward

    def counting(self, fixed, slices, stats, h):
        calls.append(h.shape)
        return original(self, fixed, slices, stats, h)

    monkeypatch.setattr(MemberStack, "member_forward", counting)
    bank(x12, tasks=MIX)
    assert len(calls) == 1  # traced once by vmap, not once per task
    calls.clear()
    bank(x12[:6], tasks=MIX[:2] * 3)  # two of three tasks present
    assert len(calls) == 1


def test_mixed_batch_follows_training(bank, x12):
    before = bank(x12, tasks=MIX).clone()
    with torch.no_grad():
        next(bank.adapter("head").parameters()).add_(1.0)
    after = bank(x12, tasks=MIX)
    changed = torch.tensor([t == "head" for t in MIX])
    assert not torch.allclose(after[changed], before[changed])
    torch.testing.assert_close(after[~changed], before[~changed], rtol=0, atol=0)


def test_mixed_batch_follows_a_task_replaced_under_the_same_name(bank, x12):
    bank(x12, tasks=MIX)  # the mixed structure is kept for these three tasks
    bank.delete_task("head")
    bank.add_task("head", sb.Blocks("block3") + sb.Head(), num_classes=12, seed=9).eval()
    mixed = bank(x12, tasks=MIX)
    assert mixed.shape == (12, 12)
    for name in TASKS:
        idx = [i for i, t in enumerate(MIX) if t == name]
        alone = bank(x12[idx], task=name)
        torch.testing.assert_close(mixed[idx, :alone.shape[1]], alone, rtol=1e-5, atol=1e-6)


def test_mixed_batch_bad_input(bank, x12):
    with pytest.raises(KeyError, match=r"unknown task\(s\) \['nope'\]"):
        bank(x12, tasks=MIX[:-1] + ["nope"])
    with pytest.raises(ValueError, match="11 samples' tasks, but the batch has 12"):
        bank(x12, tasks=MIX[:-1])
    with pytest.raises(KeyError, match="task indices must be in"):
        bank(x12, tasks=torch.full((12,), 3))
    with pytest.raises(TypeError, match="one task name per sample"):
        bank(x12, tasks="head")
    with pytest.raises(ValueError, match="not both"):
        bank(x12, "head", tasks=MIX)
    with pytest.raises(ValueError, match="no task"):
        AdapterBank(_frozen())(x12, tasks=MIX)


def test_fit_trains_one_task_and_nothing_else(bank):
    from shared_backbone.data import TensorData
    from shared_backbone.train import TrainConfig, fit

    frozen_before = {n: t.clone() for n, t in bank.frozen.tensors().items()}
    others = {n: [p.detach().clone() for p in bank.adapter(n).parameters()] for n in ("filters", "head")}
    g = torch.Generator().manual_seed(0)
    data = TensorData(torch.randn(16, 1, 12, 12, generator=g), torch.randint(0, 4, (16,), generator=g), [0.0], [1.0])
    rec = fit(bank.adapter("block2"), data, data, TrainConfig(epochs=1, batch_size=8, augment=False), progress=False)
    assert rec["steps"] == 2 and 0 <= rec["test"]["accuracy"] <= 1
    for n, t in bank.frozen.tensors().items():
        assert torch.equal(t, frozen_before[n]), n
    for n, ps in others.items():
        assert all(torch.equal(a, b) for a, b in zip(bank.adapter(n).parameters(), ps))


# ----------------------------------------------------------------------------- adapter files
def test_save_adapter_writes_peft_style_files(bank, tmp_path):
    d = bank.save_adapter("block2", tmp_path / "block2")
    assert sorted(p.name for p in d.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    cfg = json.loads((d / ADAPTER_CONFIG).read_text())
    for key in ("format_version", "task", "spec", "num_classes", "backbone", "library_version", "learned_parameters"):
        assert key in cfg
    assert cfg["backbone"]["fingerprint"] == bank.frozen.fingerprint and cfg["num_classes"] == 4
    tensors, header = load_tensors(d / ADAPTER_WEIGHTS)
    assert header["fingerprint"] == bank.frozen.fingerprint
    assert {n for n in tensors if n.startswith("slice/")} == {f"slice/{n}" for n in bank.adapter("block2").layout}
    assert any(n.startswith("stats/stages.stem") for n in tensors)  # statistics of every BN layer
    learned = sum(t.numel() for n, t in tensors.items() if n.startswith("slice/"))
    assert learned == cfg["learned_parameters"] == bank.adapter("block2").num_learned()


def test_round_trip_is_bit_identical_and_trainable_flag(bank, x12, tmp_path):
    for name in TASKS:
        bank.save_adapter(name, tmp_path / name)
    other = AdapterBank(_frozen())
    a = other.load_adapter(tmp_path / "block2")
    assert other.task_names == ["block2"] and not any(p.requires_grad for p in a.parameters())
    b = other.load_adapter(tmp_path / "head", name="head2", trainable=True)
    assert all(p.requires_grad for p in b.parameters()) and b.task_card is None and card_of(b) is None
    other.eval()
    assert torch.equal(other(x12, task="block2"), bank(x12, task="block2"))
    assert torch.equal(other(x12, task="head2"), bank(x12, task="head"))
    with pytest.raises(ValueError, match="already in the bank"):
        other.load_adapter(tmp_path / "block2")


def test_adapter_saved_then_loaded_in_a_fresh_process_gives_bit_identical_logits(bank, x12, tmp_path):
    bank.save(tmp_path / "bank")
    torch.save(x12, tmp_path / "x.pt")
    expected = {name: bank(x12, task=name) for name in TASKS}
    script = textwrap.dedent(f"""
        import torch
        torch.set_num_threads(1)
        from shared_backbone.adapters import AdapterBank
        bank = AdapterBank.load({str(tmp_path / 'bank')!r})
        x = torch.load({str(tmp_path / 'x.pt')!r})
        torch.save({{n: bank(x, task=n) for n in bank.task_names}}, {str(tmp_path / 'out.pt')!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT, timeout=120)
    got = torch.load(tmp_path / "out.pt")
    assert list(got) == list(TASKS)
    for name in TASKS:
        assert torch.equal(got[name], expected[name]), name


def test_bank_save_writes_the_backbone_once_and_loads_single_adapters(bank, x12, tmp_path):
    d = bank.save(tmp_path / "bank")
    assert (d / "backbone.json").is_file() and not (d / "backbone.safetensors").exists()  # regenerable
    assert sorted(p.name for p in d.iterdir() if p.is_dir()) == sorted(TASKS)
    one = AdapterBank.load(d / "head")  # an adapter folder: the backbone beside it
    assert one.task_names == ["head"] and torch.equal(one(x12), bank(x12, task="head"))
    alone = tmp_path / "alone"
    bank.save_adapter("head", alone)  # no backbone.json anywhere: regenerated from the recipe inside
    assert torch.equal(AdapterBank.load(alone)(x12), bank(x12, task="head"))


def test_trained_backbone_is_saved_with_its_tensors(x12, tmp_path):
    frozen = sb.FrozenBackbone.from_module(_frozen(seed=3).backbone)
    bank = AdapterBank(frozen)
    bank.add_task("t", sb.Blocks("block3") + sb.Head(), num_classes=3)
    bank.eval()
    d = bank.save(tmp_path / "bank")
    assert (d / "backbone.safetensors").is_file()
    again = AdapterBank.load(d)
    assert again.frozen.fingerprint == frozen.fingerprint and torch.equal(again(x12), bank(x12))
    with pytest.raises(ValueError, match="cannot be regenerated"):
        AdapterBank.load(_copy_adapter(d / "t", tmp_path / "lonely"))


def _copy_adapter(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


# ----------------------------------------------------------------------------- bad adapter files
def _reseal(d: Path, manifest: str = ADAPTER_CONFIG) -> None:
    """Make the manifest list the files now on disk (a hostile but consistent adapter), so the checks
    behind the manifest's sizes and hashes are exercised."""
    import hashlib

    cfg = json.loads((d / manifest).read_text())
    for rel in cfg["files"]:
        raw = (d / rel).read_bytes()
        cfg["files"][rel] = {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    (d / manifest).write_text(json.dumps(cfg))


@pytest.fixture
def saved(bank, tmp_path) -> Path:
    return bank.save_adapter("block2", tmp_path / "block2")


def test_adapter_for_another_backbone_is_refused(saved):
    with pytest.raises(FingerprintMismatch, match="fingerprint"):
        AdapterBank(_frozen(seed=1)).load_adapter(saved)
    with pytest.raises(FingerprintMismatch, match="another architecture: resnet20"):
        AdapterBank(_frozen(width=8)).load_adapter(saved)


def test_header_with_another_fingerprint_is_refused(bank, saved):
    tensors, meta = load_tensors(saved / ADAPTER_WEIGHTS)
    save_tensors(saved / ADAPTER_WEIGHTS, tensors, {**meta, "fingerprint": "0" * 16})
    with pytest.raises(ValueError, match="does not match its manifest"):
        AdapterBank(_frozen()).load_adapter(saved)
    _reseal(saved)
    with pytest.raises(FingerprintMismatch, match="0000000000000000"):
        AdapterBank(_frozen()).load_adapter(saved)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "missing"])
def test_truncated_or_corrupt_safetensors_is_a_clear_error(saved, damage):
    f = saved / ADAPTER_WEIGHTS
    raw = f.read_bytes()
    if damage == "truncate":
        f.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        f.write_bytes(b"\x00\x01not safetensors" * 10)
    elif damage == "empty":
        f.write_bytes(b"")
    else:
        f.unlink()
    err = FileNotFoundError if damage == "missing" else ValueError
    with pytest.raises(err, match=ADAPTER_WEIGHTS):
        AdapterBank(_frozen()).load_adapter(saved)


def test_safetensors_with_missing_or_misshapen_tensors_is_refused(saved):
    tensors, meta = load_tensors(saved / ADAPTER_WEIGHTS)
    name = next(n for n in tensors if n.startswith("slice/"))
    save_tensors(saved / ADAPTER_WEIGHTS, {n: t for n, t in tensors.items() if n != name}, meta)
    _reseal(saved)
    with pytest.raises(ValueError, match="missing"):
        AdapterBank(_frozen()).load_adapter(saved)
    save_tensors(saved / ADAPTER_WEIGHTS, {**tensors, name: torch.zeros(3)}, meta)
    _reseal(saved)
    with pytest.raises(ValueError, match="shape"):
        AdapterBank(_frozen()).load_adapter(saved)


@pytest.mark.parametrize("field", ["format_version", "task", "spec", "num_classes", "backbone", "library_version"])
def test_config_missing_a_field_is_named(saved, field):
    cfg = json.loads((saved / ADAPTER_CONFIG).read_text())
    del cfg[field]
    (saved / ADAPTER_CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=f"missing the field '{field}'"):
        AdapterBank(_frozen()).load_adapter(saved)


def test_config_from_a_newer_format_version_or_invalid_json_is_refused(saved):
    cfg = json.loads((saved / ADAPTER_CONFIG).read_text())
    (saved / ADAPTER_CONFIG).write_text(json.dumps({**cfg, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99; this library reads up to 1"):
        AdapterBank(_frozen()).load_adapter(saved)
    (saved / ADAPTER_CONFIG).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        AdapterBank(_frozen()).load_adapter(saved)
    with pytest.raises(FileNotFoundError, match="no adapter directory"):
        AdapterBank(_frozen()).load_adapter(saved.parent / "nowhere")


def test_saving_over_an_existing_adapter_is_atomic(bank, saved, monkeypatch):
    before = {f.name: f.read_bytes() for f in saved.iterdir()}
    with torch.no_grad():
        next(bank.adapter("block2").parameters()).add_(1.0)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(sbio, "_write_durable", boom)
    with pytest.raises(OSError, match="disk full"):
        bank.save_adapter("block2", saved)
    assert {f.name: f.read_bytes() for f in saved.iterdir()} == before
    assert not [p for p in saved.parent.iterdir() if p.name.startswith(".")]  # nothing written beside it
    monkeypatch.undo()
    bank.save_adapter("block2", saved)
    assert (saved / ADAPTER_WEIGHTS).read_bytes() != before[ADAPTER_WEIGHTS]


# ----------------------------------------------------------------------------- bench suite
def test_bench_adapters_suite_quick(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_script", ROOT / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    bench.main(["--quick", "--repeats", "1", "--warmup", "0", "--threads", "1", "--only", "adapters", "--out", str(out)])
    body = json.loads(out.read_text())["suites"]["adapters"]
    assert set(body["cases"]) == {"mixed_4tasks", "separate_4x", "mixed_4tasks_block3", "separate_4x_block3"}
    assert body["ratios"]["separate_over_mixed"]["value"] > 0 and body["ratios"]["mixed_block3_over_separate"]["value"] > 0
    st = body["storage"]
    assert len(st["per_task"]) == 4 and 0 < st["mean_adapter_over_full"] < 1


# ----------------------------------------------------------------------------- scripts
def _script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_train_adapter_then_eval_adapters(tmp_path, capsys):
    common = ["--width", "4", "--epochs", "1", "--max-steps-per-epoch", "1", "--train-subset", "32",
              "--test-subset", "32", "--threads", "1", "--no-progress"]
    train = _script("train_adapter")
    r1 = train.main(["--task", "digits", "--slice", "Blocks('block2')+Head()", "--out", str(tmp_path / "digits")] + common)
    r2 = train.main(["--task", "digits", "--slice", "Head()", "--name", "digits_fc", "--out", str(tmp_path / "fc")] + common)
    assert r1["fingerprint"] == r2["fingerprint"]  # the second adapter reuses the backbone beside it
    assert (tmp_path / "backbone.json").is_file() and (tmp_path / "digits" / ADAPTER_WEIGHTS).is_file()
    assert r2["learned"] == 16 * 10 + 10 and r2["spec"] == "Head()"
    rows = _script("eval_adapters").main([str(tmp_path / "digits"), str(tmp_path / "fc"), "--test-subset", "32",
                                          "--threads", "1"])
    assert [r["task"] for r in rows] == ["digits", "digits_fc"]
    assert rows[1]["learned"] == r2["learned"] and rows[1]["adapter_bytes"] == r2["adapter_bytes"]
    out = capsys.readouterr().out
    assert "| task" in out and "adapter bytes" in out and "digits_fc" in out


def test_train_adapter_several_tasks_then_eval_the_folder(tmp_path, capsys):
    common = ["--width", "4", "--epochs", "1", "--max-steps-per-epoch", "1", "--train-subset", "32",
              "--test-subset", "32", "--threads", "1", "--no-progress"]
    res = _script("train_adapter").main(["--task", "digits", "mnist5k", "--slice", "Head()",
                                         "--out", str(tmp_path / "bank")] + common)
    reports = {r["task"]: r for r in res["reports"]}
    assert set(reports) == {"digits", "mnist5k"}
    assert len({r["fingerprint"] for r in reports.values()}) == 1  # one backbone for both
    assert (tmp_path / "bank" / "backbone.json").is_file()
    # the folder itself, and a shell glob over it (which also matches backbone.json and *.results.json)
    by_folder = _script("eval_adapters").main([str(tmp_path / "bank"), "--test-subset", "32", "--threads", "1"])
    by_glob = _script("eval_adapters").main([str(p) for p in sorted((tmp_path / "bank").iterdir())] +
                                            ["--test-subset", "32", "--threads", "1"])
    assert sorted(r["task"] for r in by_folder) == sorted(r["task"] for r in by_glob) == ["digits", "mnist5k"]
    for r in by_folder:
        assert r["accuracy"] == reports[r["task"]]["accuracy"]  # reloaded adapters score as trained


@pytest.mark.parametrize("tasks, match", [
    (["mnist5k", "tasks/mnist5k.toml"], "names one task twice"),
    (["mnist5k", "cifar10"], r"1-channel images but task\(s\) cifar10 \(3 channels\)"),
])
def test_train_adapter_refuses_bad_task_lists(tmp_path, capsys, tasks, match):
    import os

    cwd = os.getcwd()
    os.chdir(Path(__file__).resolve().parents[1])
    try:
        with pytest.raises(SystemExit):
            _script("train_adapter").main(["--task", *tasks, "--out", str(tmp_path / "x"), "--width", "4"])
    finally:
        os.chdir(cwd)
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- PEFT's verbs
def test_peft_verbs_and_argument_names(bank, x12, tmp_path):
    one = bank.save_pretrained(tmp_path / "one", selected_adapters=["block2"])  # one task: an adapter folder
    assert (one / ADAPTER_CONFIG).is_file()
    both = bank.save_pretrained(tmp_path / "both", selected_adapters=["block2", "head"])  # several: a bank
    other = AdapterBank.from_pretrained(both, is_trainable=True)
    assert other.task_names == ["block2", "head"] and other.training
    assert all(p.requires_grad for p in other.parameters())
    fresh = AdapterBank(_frozen())
    a = fresh.load_adapter(one, adapter_name="renamed", is_trainable=False)
    assert fresh.task_names == ["renamed"] and not any(p.requires_grad for p in a.parameters())
    assert torch.equal(fresh.eval()(x12, task="renamed"), bank(x12, task="block2"))
    fresh.add_adapter("extra", sb.Head(), num_classes=3)
    fresh.set_adapter("extra")
    assert fresh.active_adapter == "extra" == fresh.active
    fresh.delete_adapter("extra")
    assert fresh.task_names == ["renamed"] and fresh.active_adapter == "renamed"
