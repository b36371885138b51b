"""Saving and loading ensembles and backbones (shared_backbone.saving, shared_backbone.io).

References are independent of the code under test: logits of the ensemble that was saved,
file sizes from the safetensors format (8-byte header length + JSON header + raw data) and
hand-counted parameters, bytes written and read back on disk.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import shared_backbone as sb
import shared_backbone.io as sbio
from shared_backbone.io import load_tensors, save_tensors
from shared_backbone.saving import load_backbone, load_ensemble, save_backbone, save_ensemble

REPO = Path(__file__).resolve().parents[1]
SPEC = sb.Filters(0.5) + sb.BatchNorm() + sb.Head()


def _frozen(seed: int = 0, **cfg) -> sb.FrozenBackbone:
    return sb.FrozenBackbone(sb.build_backbone("resnet20", **{"width": 4, "in_channels": 1, "num_classes": 5, **cfg}),
                             seed=seed)


def _perturb_stats(ens: sb.Ensemble, seed: int = 1) -> None:
    """Give every member its own non-default BatchNorm statistics, so eval logits depend on them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, t in {**ens.member_stats.as_dict(), **ens.shared_stats.as_dict()}.items():
            if n.endswith("running_mean"):
                t.add_(0.1 * torch.randn(t.shape, generator=g))
            elif n.endswith("running_var"):
                t.mul_(0.5 + torch.rand(t.shape, generator=g))
            elif n.endswith("num_batches_tracked"):
                t.add_(7)


@pytest.fixture
def x16():
    return torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(3))


@pytest.fixture
def ens3():
    ens = sb.Ensemble(_frozen(), SPEC, members=3, seed=5)
    _perturb_stats(ens)
    return ens.eval()


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _reseal(d: Path, manifest: str = "ensemble.json") -> None:
    """Rewrite the manifest's sizes and hashes to match the files now on disk: a hostile but consistent
    artifact, so the checks behind the manifest's are exercised too."""
    meta = json.loads((d / manifest).read_text())
    for rel in list(meta["files"]):
        if (d / rel).exists():
            raw = (d / rel).read_bytes()
            meta["files"][rel] = {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    (d / manifest).write_text(json.dumps(meta))


# ----------------------------------------------------------------------------- round trips
def test_round_trip_gives_bit_identical_eval_logits(tmp_path, ens3, x16):
    with torch.no_grad():
        want = ens3(x16)
    save_ensemble(ens3, tmp_path / "ens")
    loaded = load_ensemble(tmp_path / "ens").eval()
    assert loaded.members == 3 and repr(loaded.spec) == repr(SPEC)
    with torch.no_grad():
        got = loaded(x16)
    assert got.shape == (3, 4, 5)
    assert torch.equal(got, want)
    for i in range(3):
        for n, t in ens3.slice_of(i).items():
            assert torch.equal(loaded.slice_of(i)[n], t), n
        for n, t in ens3.stats_of(i).items():
            assert torch.equal(loaded.stats_of(i)[n], t), n
    # the members really differ, so a round trip that mixed them up would be caught
    assert not torch.equal(want[0], want[1])


def test_round_trip_with_a_shared_prefix_and_shared_stats(tmp_path, x16):
    """Head() only: every stage before the head is shared, its statistics go to shared.safetensors."""
    ens = sb.Ensemble(_frozen(), sb.Head(), members=2, seed=2)
    _perturb_stats(ens)
    ens.eval()
    assert ens.shared_stats.as_dict(), "expected shared BatchNorm statistics for a Head() spec"
    with torch.no_grad():
        want = ens(x16)
    save_ensemble(ens, tmp_path / "ens")
    assert (tmp_path / "ens" / "shared.safetensors").is_file()
    loaded = load_ensemble(tmp_path / "ens").eval()
    with torch.no_grad():
        assert torch.equal(loaded(x16), want)


def test_round_trip_in_a_fresh_process(tmp_path, ens3, x16):
    with torch.no_grad():
        want = ens3(x16)
    save_ensemble(ens3, tmp_path / "ens")
    torch.save(x16, tmp_path / "x.pt")
    code = (
        "import sys, torch; torch.set_num_threads(1)\n"
        "from shared_backbone.saving import load_ensemble\n"
        "d = sys.argv[1]\n"
        "ens = load_ensemble(d + '/ens').eval()\n"
        "x = torch.load(d + '/x.pt')\n"
        "with torch.no_grad():\n"
        "    torch.save(ens(x), d + '/logits.pt')\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, cwd=str(tmp_path),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = torch.load(tmp_path / "logits.pt")
    assert torch.equal(got, want)


def test_ensemble_json_holds_the_backbone_config_and_no_backbone_tensors_for_a_random_backbone(tmp_path, ens3):
    d = save_ensemble(ens3, tmp_path / "ens")
    names = sorted(p.name for p in d.iterdir())
    assert names == ["ensemble.json", "member_000.safetensors", "member_001.safetensors", "member_002.safetensors"]
    meta = json.loads((d / "ensemble.json").read_text())
    assert meta["members"] == 3
    assert meta["spec_repr"] == repr(SPEC)
    bb = meta["backbone"]
    assert bb["arch"] == "resnet20" and bb["source"] == "random" and bb["seed"] == 0
    assert bb["config"]["width"] == 4 and bb["config"]["in_channels"] == 1 and bb["config"]["num_classes"] == 5
    assert bb["fingerprint"] == ens3.frozen.fingerprint
    # every member file's header carries the backbone fingerprint and the member index
    for i in range(3):
        _, header = load_tensors(d / f"member_{i:03d}.safetensors")
        assert header["fingerprint"] == ens3.frozen.fingerprint and header["member"] == i


def _safetensors_layout(path: Path) -> tuple[int, dict]:
    """(header length, header JSON) read with the format's own rule: u64 little endian + JSON."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8 : 8 + n])


def test_member_file_size_is_its_learned_floats_plus_stats_plus_header(tmp_path):
    fr = _frozen()
    bb = fr.backbone
    ens = sb.Ensemble(fr, SPEC, members=2)
    d = save_ensemble(ens, tmp_path / "ens")

    # hand count of what Filters(0.5) + BatchNorm() + Head() learns on this resnet20 (width 4)
    learned = 0
    for name, p in bb.named_parameters():
        if p.dim() == 4:  # conv: the first floor(0.5 * c_out) output filters
            learned += (p.shape[0] // 2) * p[0].numel()
        else:  # BatchNorm gamma/beta, the head's Linear weight and bias: all of it
            learned += p.numel()
    assert learned == sum(t.numel() for t in ens.slice_of(0).values())
    # no stage is shared (the stem learns), so each member keeps every BatchNorm statistic
    stats = sum(b.numel() * b.element_size() for n, b in bb.named_buffers() if "running" in n or "num_batches" in n)
    for i in range(2):
        f = d / f"member_{i:03d}.safetensors"
        n_header, header = _safetensors_layout(f)
        assert f.stat().st_size == 8 + n_header + 4 * learned + stats
        assert n_header < 250 * len(header)  # the header is small: names, dtypes, shapes, offsets
        assert f.stat().st_size < 1.5 * 4 * learned + stats + 16_000


def test_member_files_are_far_smaller_than_the_backbone(tmp_path):
    fr = _frozen(width=8)
    ens = sb.Ensemble(fr, sb.Head(), members=2)
    d = save_ensemble(ens, tmp_path / "ens")
    backbone_bytes = 4 * sum(p.numel() for p in fr.backbone.parameters())
    head_floats = 5 * 32 + 5  # Linear(4 * width -> 5 classes) + bias
    for i in range(2):
        f = d / f"member_{i:03d}.safetensors"
        n_header, _ = _safetensors_layout(f)
        assert f.stat().st_size == 8 + n_header + 4 * head_floats
        assert f.stat().st_size * 50 < backbone_bytes


# ----------------------------------------------------------------------------- checkpoint backbones
def _trained_like_module(seed: int = 9) -> torch.nn.Module:
    m = sb.build_backbone("resnet20", width=4, in_channels=1, num_classes=5)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
        for n, b in m.named_buffers():
            if n.endswith("running_mean"):
                b.add_(0.1 * torch.randn(b.shape, generator=g))
    return m


def test_checkpoint_backbone_writes_backbone_safetensors_and_reloads(tmp_path, x16):
    module = _trained_like_module()
    fr = sb.FrozenBackbone.from_module(module)
    assert not fr.regenerable
    ens = sb.Ensemble(fr, sb.BatchNorm() + sb.Head(), members=2, seed=1).eval()
    with torch.no_grad():
        want = ens(x16)
    d = save_ensemble(ens, tmp_path / "ens")
    assert (d / "backbone.safetensors").is_file()
    # the saved backbone holds the module's own tensors, byte for byte
    saved, header = load_tensors(d / "backbone.safetensors")
    assert header["fingerprint"] == fr.fingerprint
    ref = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    assert set(saved) == set(ref)
    for n, t in ref.items():
        assert torch.equal(saved[n], t.detach()), n

    loaded = load_ensemble(d).eval()
    assert loaded.frozen.fingerprint == fr.fingerprint and not loaded.frozen.regenerable
    with torch.no_grad():
        assert torch.equal(loaded(x16), want)


def test_checkpoint_backbone_without_its_tensors_is_a_clear_error(tmp_path):
    fr = sb.FrozenBackbone.from_module(_trained_like_module())
    d = save_ensemble(sb.Ensemble(fr, sb.Head(), members=2), tmp_path / "ens")
    (d / "backbone.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="backbone.safetensors"):
        load_ensemble(d)


# ----------------------------------------------------------------------------- wrong backbone, corrupt files
def test_loading_onto_another_backbone_raises_fingerprint_mismatch(tmp_path, ens3):
    d = save_ensemble(ens3, tmp_path / "ens")
    other = _frozen(seed=1)
    assert other.fingerprint != ens3.frozen.fingerprint
    with pytest.raises(sb.FingerprintMismatch, match="fingerprint"):
        load_ensemble(d, frozen=other)
    # the right backbone, passed explicitly, is accepted
    same = _frozen(seed=0)
    loaded = load_ensemble(d, frozen=same)
    assert loaded.frozen is same


def test_member_file_with_another_fingerprint_in_its_header_raises(tmp_path, ens3):
    d = save_ensemble(ens3, tmp_path / "ens")
    f = d / "member_001.safetensors"
    tensors, header = load_tensors(f)
    save_tensors(f, tensors, {**header, "fingerprint": "0123456789abcdef"})
    with pytest.raises(ValueError, match="member_001.safetensors does not match its manifest"):
        load_ensemble(d)
    _reseal(d)
    with pytest.raises(sb.FingerprintMismatch, match="member_001"):
        load_ensemble(d)


def test_member_file_without_a_fingerprint_raises(tmp_path, ens3):
    d = save_ensemble(ens3, tmp_path / "ens")
    f = d / "member_002.safetensors"
    tensors, header = load_tensors(f)
    save_tensors(f, tensors, {k: v for k, v in header.items() if k != "fingerprint"})
    _reseal(d)
    with pytest.raises(sb.FingerprintMismatch):
        load_ensemble(d)


def test_member_file_for_another_spec_raises(tmp_path, ens3):
    d = save_ensemble(ens3, tmp_path / "ens")
    f = d / "member_000.safetensors"
    tensors, header = load_tensors(f)
    save_tensors(f, tensors, {**header, "spec": "Head()"})
    _reseal(d)
    with pytest.raises(ValueError, match="spec"):
        load_ensemble(d)


def test_truncated_member_file_is_a_clear_error(tmp_path, ens3):
    d = save_ensemble(ens3, tmp_path / "ens")
    f = d / "member_001.safetensors"
    raw = f.read_bytes()
    f.write_bytes(raw[: len(raw) - 100])
    with pytest.raises(ValueError, match="member_001.safetensors does not match its manifest"):
        load_ensemble(d)
    _reseal(d)
    with pytest.raises(ValueError, match="truncated or corrupt") as info:
        load_ensemble(d)
    assert "member_001.safetensors" in str(info.value)


@pytest.mark.parametrize("garbage", [b"not a safetensors file at all" * 10, b"\x00\x01", b""])
def test_garbage_member_file_is_a_clear_error(tmp_path, ens3, garbage):
    d = save_ensemble(ens3, tmp_path / "ens")
    (d / "member_002.safetensors").write_bytes(garbage)
    _reseal(d)
    with pytest.raises(ValueError, match="truncated or corrupt") as info:
        load_ensemble(d)
    assert "member_002.safetensors" in str(info.value)


def test_missing_member_file_is_a_clear_error(tmp_path, ens3):
    d = save_ensemble(ens3, tmp_path / "ens")
    (d / "member_001.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="member_001.safetensors is missing"):
        load_ensemble(d)
    meta = json.loads((d / "ensemble.json").read_text())
    del meta["files"]["member_001.safetensors"]
    (d / "ensemble.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="says K=3 members but lists 2 member files"):
        load_ensemble(d)


def test_newer_format_version_is_refused(tmp_path, ens3):
    d = save_ensemble(ens3, tmp_path / "ens")
    meta = json.loads((d / "ensemble.json").read_text())
    meta["format_version"] = 99
    (d / "ensemble.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format_version 99"):
        load_ensemble(d)


@pytest.mark.parametrize("field", ["members", "spec", "backbone"])
def test_missing_field_in_ensemble_json_is_named(tmp_path, ens3, field):
    d = save_ensemble(ens3, tmp_path / "ens")
    meta = json.loads((d / "ensemble.json").read_text())
    del meta[field]
    (d / "ensemble.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=repr(field)):
        load_ensemble(d)


def test_invalid_ensemble_json_and_missing_directory(tmp_path, ens3):
    with pytest.raises(FileNotFoundError):
        load_ensemble(tmp_path / "nowhere")
    d = save_ensemble(ens3, tmp_path / "ens")
    (d / "ensemble.json").write_text("{ not json")
    with pytest.raises(ValueError, match="ensemble.json"):
        load_ensemble(d)


# ----------------------------------------------------------------------------- atomic overwrite
def test_saving_over_an_existing_ensemble_is_atomic(tmp_path, ens3, monkeypatch):
    target = save_ensemble(ens3, tmp_path / "ens")
    before = _files(target)

    other = sb.Ensemble(_frozen(), SPEC, members=3, seed=99)
    real = sbio._write_durable
    calls = []

    def failing(path, data):
        calls.append(Path(path).name)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return real(path, data)

    monkeypatch.setattr(sbio, "_write_durable", failing)
    with pytest.raises(OSError, match="simulated"):
        save_ensemble(other, target)
    assert len(calls) == 2  # it did fail midway, after writing one member file
    monkeypatch.undo()

    assert {n: b for n, b in _files(target).items() if not n.startswith(".sb-")} == before  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ens"]  # nothing written beside it
    save_ensemble(ens3, target)  # the next save cleans up the failed one's staged file
    assert _files(target) == before
    loaded = load_ensemble(target)
    for n, t in ens3.slice_of(1).items():
        assert torch.equal(loaded.slice_of(1)[n], t)


def test_successful_overwrite_replaces_the_ensemble_and_keeps_other_files(tmp_path, ens3):
    target = save_ensemble(ens3, tmp_path / "ens")
    (target / "stray.txt").write_text("the user's own file")
    small = sb.Ensemble(_frozen(), SPEC, members=2, seed=7)
    save_ensemble(small, target)
    assert sorted(p.name for p in target.iterdir()) == ["ensemble.json", "member_000.safetensors",
                                                       "member_001.safetensors", "stray.txt"]
    assert (target / "stray.txt").read_text() == "the user's own file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ens"]
    loaded = load_ensemble(target)
    assert loaded.members == 2
    for n, t in small.slice_of(1).items():
        assert torch.equal(loaded.slice_of(1)[n], t)


# ----------------------------------------------------------------------------- backbones alone, io
def test_save_and_load_a_random_backbone(tmp_path):
    fr = _frozen(seed=3)
    d = save_backbone(fr, tmp_path / "bb")
    assert sorted(p.name for p in d.iterdir()) == ["backbone.json"]
    config = json.loads((d / "backbone.json").read_text())
    assert config["seed"] == 3 and config["source"] == "random" and config["fingerprint"] == fr.fingerprint
    back = load_backbone(d)
    assert back.fingerprint == fr.fingerprint and back.seed == 3
    ref = fr.tensors()
    got = back.tensors()
    assert set(got) == set(ref)
    for n, t in ref.items():
        assert torch.equal(got[n], t), n


def test_save_and_load_a_checkpoint_backbone(tmp_path, x16):
    module = _trained_like_module(seed=4)
    fr = sb.FrozenBackbone.from_module(module)
    d = save_backbone(fr, tmp_path / "bb")
    assert sorted(p.name for p in d.iterdir()) == ["backbone.json", "backbone.safetensors"]
    back = load_backbone(d)
    assert back.fingerprint == fr.fingerprint
    module.eval()
    back.backbone.eval()
    with torch.no_grad():
        assert torch.equal(back.backbone(x16), module(x16))


def test_tampered_backbone_tensors_are_refused(tmp_path):
    fr = sb.FrozenBackbone.from_module(_trained_like_module())
    d = save_backbone(fr, tmp_path / "bb")
    tensors, header = load_tensors(d / "backbone.safetensors")
    name = next(n for n in tensors if n.endswith("weight"))
    tensors[name] = tensors[name] + 1e-3
    save_tensors(d / "backbone.safetensors", tensors, header)
    with pytest.raises(ValueError, match="does not match its manifest"):
        load_backbone(d)
    _reseal(d, "backbone.json")
    with pytest.raises(sb.FingerprintMismatch):
        load_backbone(d)


def test_load_tensors_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_tensors(tmp_path / "nope.safetensors")


def test_save_tensors_round_trip_and_meta(tmp_path):
    t = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.tensor([1, 2], dtype=torch.int64)}
    f = save_tensors(tmp_path / "sub" / "t.safetensors", t, {"k": [1, "x"]})
    got, meta = load_tensors(f)
    assert meta == {"k": [1, "x"]}
    assert set(got) == {"a", "b"} and torch.equal(got["a"], t["a"]) and torch.equal(got["b"], t["b"])
    assert sorted(p.name for p in f.parent.iterdir()) == ["t.safetensors"]  # no temp file left


def test_round_trip_of_an_own_data_ensemble(tmp_path, x16):
    ens = sb.Ensemble(_frozen(), sb.BatchNorm() + sb.Head(), members=2, data="own", seed=3)
    _perturb_stats(ens)
    ens.eval()
    with torch.no_grad():
        want = ens(x16)
    loaded = load_ensemble(save_ensemble(ens, tmp_path / "ens")).eval()
    assert loaded.data == "own"
    with torch.no_grad():
        assert torch.equal(loaded(x16), want)


def test_more_than_a_thousand_members_load_in_order(tmp_path):
    k = 1001
    ens = sb.Ensemble(_frozen(), sb.Head(), members=k, member_init="backbone")
    with torch.no_grad():  # member i's head holds the value i everywhere
        for p in ens.slices.values():
            p.copy_(torch.arange(k, dtype=p.dtype).view(-1, *[1] * (p.dim() - 1)).expand_as(p))
    loaded = load_ensemble(save_ensemble(ens, tmp_path / "ens"))
    for i in (0, 100, 101, 999, 1000):
        for n, t in loaded.slice_of(i).items():
            assert torch.all(t == i), (i, n, t.flatten()[:3])
