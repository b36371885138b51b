"""Artifacts on disk: one commit point, old-or-new whole after a crash at any file boundary, no mixed
load under a concurrent writer, only the library's own files touched, conflicts refused.

References: the tensors of the ensembles/banks that were saved (compared exactly), the bytes of the
user's own files written before the save, and file listings.
"""
from __future__ import annotations

import errno
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

import shared_backbone as sb
import shared_backbone.io as sbio
import shared_backbone.train as train_mod
from shared_backbone.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterBank
from shared_backbone.io import ArtifactConflict, read_artifact
from shared_backbone.saving import load_ensemble, save_backbone, save_ensemble
from shared_backbone.schema import CheckpointState

SPEC = sb.BatchNorm() + sb.Head()


def _frozen(seed: int = 0) -> sb.FrozenBackbone:
    return sb.FrozenBackbone(sb.build_backbone("resnet20", width=4, in_channels=1, num_classes=5), seed=seed)


def _ens(seed: int, k: int, frozen=None) -> sb.Ensemble:
    ens = sb.Ensemble(frozen or _frozen(), SPEC, members=k, seed=seed)
    with torch.no_grad():  # members distinct from each other and from every other save
        for p in ens.slices.values():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
    return ens


def _slices(ens: sb.Ensemble) -> list[dict[str, torch.Tensor]]:
    return [{n: t.clone() for n, t in ens.slice_of(i).items()} for i in range(ens.members)]


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[n], y[n]) for n in x)
                                    for x, y in zip(a, b))


def _bank(seed: int, tasks: dict[str, int], frozen=None) -> AdapterBank:
    bank = AdapterBank(frozen or _frozen())
    for i, (name, c) in enumerate(tasks.items()):
        bank.add_task(name, sb.Head(), num_classes=c, seed=seed * 10 + i)
    return bank.eval()


def _bank_state(bank: AdapterBank) -> dict:
    return {n: {k: t.clone() for k, t in bank.adapter(n).slice_of(0).items()} for n in bank.task_names}


def _same_bank(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(a[n].keys() == b[n].keys() and all(torch.equal(a[n][k], b[n][k]) for k in a[n])
                                      for n in a)


def _count_boundaries(save) -> int:
    events = []
    sbio._on_boundary = events.append
    try:
        save()
    finally:
        sbio._on_boundary = None
    return len(events)


def _crash_at(n: int, save) -> int:
    """Run ``save`` in a forked child that dies (``os._exit``) at its ``n``-th file boundary; its exit code."""
    pid = os.fork()
    if pid == 0:  # child
        count = [0]

        def hook(event: str) -> None:
            count[0] += 1
            if count[0] == n:
                os._exit(17)

        sbio._on_boundary = hook
        try:
            save()
        except BaseException:  # noqa: BLE001
            os._exit(3)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _no_leftovers(d: Path) -> list[str]:
    return [str(p) for p in d.rglob(".sb-*")]


# ----------------------------------------------------------------------------- crash at every boundary
def test_ensemble_crash_at_every_file_boundary_leaves_old_or_new_whole(tmp_path):
    old, new = _ens(1, 3), _ens(2, 2)  # K changes too: a member file must disappear
    want_old, want_new = _slices(old), _slices(new)
    base = tmp_path / "base"
    save_ensemble(old, base)
    n_events = _count_boundaries(lambda: save_ensemble(new, shutil.copytree(base, tmp_path / "count")))
    assert n_events >= 7  # 2 staged writes, manifest write + rename, 2 renames, 1 removal
    seen = set()
    for n in range(1, n_events + 1):
        d = shutil.copytree(base, tmp_path / f"crash{n}")
        assert _crash_at(n, lambda: save_ensemble(new, d)) == 17
        got = _slices(load_ensemble(d))
        state = "old" if _same(got, want_old) else "new" if _same(got, want_new) else "mixed"
        assert state != "mixed", f"crash at boundary {n} left a mixed ensemble"
        seen.add(state)
        save_ensemble(new, d)  # the next save cleans up whatever the crash left
        assert _same(_slices(load_ensemble(d)), want_new) and not _no_leftovers(d)
        assert sorted(p.name for p in d.iterdir()) == ["ensemble.json", "member_000.safetensors",
                                                       "member_001.safetensors"]
    assert seen == {"old", "new"}  # the commit point lies inside the save


def test_bank_crash_at_every_file_boundary_leaves_old_or_new_whole(tmp_path):
    frozen = _frozen()
    old, new = _bank(1, {"a": 3, "b": 4}, frozen), _bank(2, {"a": 3, "c": 5}, frozen)
    want_old, want_new = _bank_state(old), _bank_state(new)
    base = tmp_path / "base"
    old.save(base)
    n_events = _count_boundaries(lambda: new.save(shutil.copytree(base, tmp_path / "count")))
    seen = set()
    for n in range(1, n_events + 1):
        d = shutil.copytree(base, tmp_path / f"crash{n}")
        assert _crash_at(n, lambda: new.save(d)) == 17
        got = _bank_state(AdapterBank.load(d))
        state = "old" if _same_bank(got, want_old) else "new" if _same_bank(got, want_new) else "mixed"
        assert state != "mixed", f"crash at boundary {n} left a mixed bank: tasks {list(got)}"
        seen.add(state)
        new.save(d)
        assert _same_bank(_bank_state(AdapterBank.load(d)), want_new) and not _no_leftovers(d)
        assert not (d / "b").exists()  # the dropped task's folder went with its files
    assert seen == {"old", "new"}


def test_adapter_crash_at_every_file_boundary_leaves_old_or_new_whole(tmp_path):
    bank = _bank(1, {"a": 3})
    base = bank.save_adapter("a", tmp_path / "base")
    want_old = _bank_state(bank)
    with torch.no_grad():
        next(bank.adapter("a").parameters()).add_(1.0)
    want_new = _bank_state(bank)
    n_events = _count_boundaries(lambda: bank.save_adapter("a", shutil.copytree(base, tmp_path / "count")))
    seen = set()
    for n in range(1, n_events + 1):
        d = shutil.copytree(base, tmp_path / f"crash{n}")
        assert _crash_at(n, lambda: bank.save_adapter("a", d)) == 17
        got = _bank_state(AdapterBank.load(d))
        seen.add("old" if _same_bank(got, want_old) else "new" if _same_bank(got, want_new) else "mixed")
    assert seen == {"old", "new"}


def test_checkpoint_crash_at_every_file_boundary_leaves_old_or_new_whole(tmp_path):
    ens = _ens(1, 2)
    cfg = train_mod.TrainConfig(epochs=3, batch_size=4)
    ident = train_mod._identity(ens)

    def save(d, value, epoch):
        tensors = {f"model/{k}": torch.full_like(v.float(), value) for k, v in ens.state_dict().items()}
        train_mod._save_checkpoint(d, tensors, {"epoch": epoch, "step_in_epoch": 0, "step": epoch * 4,
                                                "epoch_partial": [0.0, 0.0, 0.0]}, cfg, ident, [])

    base = tmp_path / "base"
    save(base, 1.0, 1)
    n_events = _count_boundaries(lambda: save(shutil.copytree(base, tmp_path / "count"), 2.0, 2))
    seen = set()
    for n in range(1, n_events + 1):
        d = shutil.copytree(base, tmp_path / f"crash{n}")
        assert _crash_at(n, lambda: save(d, 2.0, 2)) == 17
        state, files = read_artifact(d, "state.json", CheckpointState.from_dict)
        tensors, _ = sbio.tensors_from_bytes(files["state.safetensors"], "state")
        values = {float(t.flatten()[0]) for t in tensors.values() if t.numel()}
        assert values == {float(state.epoch)}, f"crash at boundary {n}: position {state.epoch} with tensors {values}"
        seen.add(state.epoch)
    assert seen == {1, 2}


# ----------------------------------------------------------------------------- concurrent reader and writer
def test_concurrent_reader_never_sees_a_mixed_ensemble(tmp_path):
    a, b = _ens(1, 3), _ens(2, 3)
    want = {"a": _slices(a), "b": _slices(b)}
    d = tmp_path / "ens"
    save_ensemble(a, d)
    stop = tmp_path / "stop"
    pid = os.fork()
    if pid == 0:  # writer: alternate the two ensembles until the reader has seen both (30 s at most)
        try:
            end = time.monotonic() + 30.0
            i = 0
            while time.monotonic() < end and not stop.exists():
                save_ensemble(b if i % 2 == 0 else a, d)
                i += 1
        finally:
            os._exit(0)
    loads, kinds = 0, set()
    try:  # at least 2 s of reading, then on until both saves were seen whole (bounded: a slow machine)
        start = time.monotonic()
        while time.monotonic() - start < 2.0 or (kinds != {"a", "b"} and time.monotonic() - start < 30.0):
            got = _slices(load_ensemble(d))
            kind = next((k for k, w in want.items() if _same(got, w)), "mixed")
            assert kind != "mixed", f"load {loads} mixed two saves"
            kinds.add(kind)
            loads += 1
    finally:
        stop.touch()
        os.waitpid(pid, 0)
    assert loads >= 5 and kinds == {"a", "b"}


# ----------------------------------------------------------------------------- only our own files
def _user_files(d: Path) -> dict[str, bytes]:
    (d / "sub").mkdir(parents=True, exist_ok=True)
    (d / "thesis.tex").write_text("\\documentclass{article}")
    (d / "sub" / "data.csv").write_text("a,b\n1,2\n")
    (d / ".sb-notes.txt").write_text("a hidden file that only looks like ours")
    return {n: (d / n).read_bytes() for n in ("thesis.tex", "sub/data.csv", ".sb-notes.txt")}


@pytest.mark.parametrize("what", ["ensemble", "adapter", "bank", "backbone"])
def test_a_save_keeps_every_file_it_did_not_write(tmp_path, what):
    d = tmp_path / "u"
    mine = _user_files(d)
    bank = _bank(1, {"digits": 3})
    for _ in range(2):  # a first save and an overwrite
        if what == "ensemble":
            save_ensemble(_ens(1, 2), d)
        elif what == "adapter":
            bank.save_adapter("digits", d)
        elif what == "bank":
            bank.save(d)
        else:
            save_backbone(bank.frozen, d)
    assert {k: (d / k).read_bytes() for k in mine} == mine
    assert [p.name for p in d.rglob(".sb-*")] == [".sb-notes.txt"]


def test_saving_into_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.md").write_text("mine")
    ens = _ens(3, 2)
    save_ensemble(ens, ".")
    save_ensemble(ens, ".")
    assert _same(_slices(load_ensemble(".")), _slices(ens))
    assert (tmp_path / "notes.md").read_text() == "mine"


@pytest.mark.parametrize("err", [errno.EBUSY, errno.EROFS, errno.EXDEV])
def test_a_save_never_renames_the_folder_or_writes_outside_it(tmp_path, monkeypatch, err):
    """A mount point (EBUSY), a folder inside a read-only parent (EROFS), another device (EXDEV): any
    rename of the target or write beside it fails, so a save must do neither."""
    target = tmp_path / "mnt"
    target.mkdir()
    real_replace, real_open = os.replace, os.open

    def guarded_replace(src, dst, *a, **k):
        for p in (Path(src), Path(dst)):
            if p.resolve() == target.resolve() or target.resolve() not in p.resolve().parents:
                raise OSError(err, os.strerror(err), str(p))
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", guarded_replace)
    monkeypatch.setattr(os, "rename", guarded_replace)
    ens = _ens(4, 2)
    save_ensemble(ens, target)
    save_ensemble(_ens(5, 2), target)
    bank = _bank(1, {"t": 3})
    bank.save(target / "bank")
    bank.save(target / "bank")
    monkeypatch.setattr(os, "replace", real_replace)
    assert _same(_slices(load_ensemble(target)), _slices(_ens(5, 2)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnt"]
    assert AdapterBank.load(target / "bank").task_names == ["t"]
    del real_open


# ----------------------------------------------------------------------------- conflicts
def test_another_kind_of_artifact_in_the_way_is_refused(tmp_path):
    bank = _bank(1, {"a": 3})
    d = bank.save_adapter("a", tmp_path / "x")
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    with pytest.raises(ArtifactConflict, match="already holds a adapter"):
        save_ensemble(_ens(1, 2), d)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    save_ensemble(_ens(1, 2), d, overwrite=True)  # on purpose: written beside it, the adapter kept
    assert {p.name: p.read_bytes() for p in d.iterdir() if p.name in before} == before
    assert AdapterBank.load(d).task_names == ["a"] and load_ensemble(d).members == 2


def test_a_bank_on_another_backbone_is_refused_naming_both_fingerprints(tmp_path):
    first = _bank(1, {"a": 3}, _frozen(seed=0))
    d = first.save(tmp_path / "bank")
    other = _bank(2, {"b": 3}, _frozen(seed=1))
    with pytest.raises(ArtifactConflict) as info:
        other.save(d)
    assert first.frozen.fingerprint in str(info.value) and other.frozen.fingerprint in str(info.value)
    assert AdapterBank.load(d).task_names == ["a"]  # untouched, still usable
    other.save(d, overwrite=True)
    assert AdapterBank.load(d).task_names == ["b"]
    # a backbone.json of another backbone (train_adapter's folder) is refused the same way
    save_backbone(_frozen(seed=5), tmp_path / "plain")
    with pytest.raises(ArtifactConflict, match="fingerprint"):
        first.save(tmp_path / "plain")
    with pytest.raises(ArtifactConflict, match="fingerprint"):
        save_backbone(_frozen(seed=6), tmp_path / "plain")


def test_updating_one_task_does_not_rewrite_the_others(tmp_path):
    bank = _bank(1, {"a": 3, "b": 4})
    d = bank.save(tmp_path / "bank")
    stat = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (d / "b").iterdir()}
    with torch.no_grad():
        next(bank.adapter("a").parameters()).add_(1.0)
    bank.save(d)
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (d / "b").iterdir()} == stat
    assert _same_bank(_bank_state(AdapterBank.load(d)), _bank_state(bank))


def test_damage_is_named_and_never_loads_silently(tmp_path):
    d = save_ensemble(_ens(1, 2), tmp_path / "e")
    (d / "member_001.safetensors").write_bytes((d / "member_000.safetensors").read_bytes())  # swapped member
    with pytest.raises(ValueError, match="member_001.safetensors does not match its manifest"):
        load_ensemble(d)
    bank = _bank(1, {"a": 3})
    a = bank.save_adapter("a", tmp_path / "a")
    (a / ADAPTER_WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match=ADAPTER_WEIGHTS):
        AdapterBank.load(a)
    assert ADAPTER_CONFIG


def test_train_adapter_never_replaces_a_folder_of_other_adapters(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_adapter", Path(__file__).resolve().parents[1] / "scripts"
                                                  / "train_adapter.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    common = ["--width", "4", "--epochs", "1", "--max-steps-per-epoch", "1", "--train-subset", "32",
              "--test-subset", "32", "--threads", "1", "--no-progress", "--precise-bn", "0"]
    out = tmp_path / "adapters"
    mod.main(["--task", "digits", "mnist5k", "--slice", "Head()", "--out", str(out)] + common)
    before = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert {"backbone.json", "digits/adapter_config.json", "mnist5k/adapter_model.safetensors",
            "digits.results.json"} <= set(before)
    with pytest.raises(SystemExit) as info:
        mod.main(["--task", "digits", "--slice", "Head()", "--out", str(out)] + common)
    assert info.value.code != 0
    assert "holds other adapters" in capsys.readouterr().err
    assert {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
