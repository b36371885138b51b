"""Hostile files: every field typed and bounded, every tensor checked, sizes refused before allocation,
untrusted strings kept as data.

Each case writes a file by hand (or edits a saved one and re-seals its manifest, so the check behind
the manifest's hash is the one exercised) and asserts the error names the file and the field.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shared_backbone as sb
from shared_backbone import schema
from shared_backbone.adapter_cards import untrusted_card as _untrusted_card
from shared_backbone.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterBank
from shared_backbone.io import load_tensors, save_tensors
from shared_backbone.lc import load_sparse, save_sparse
from shared_backbone.saving import load_backbone, load_ensemble, save_ensemble
from shared_backbone.schema import SchemaError, check_name, safe_text

ROOT = Path(__file__).resolve().parents[1]
SPEC = sb.Filters(0.5) + sb.BatchNorm() + sb.Head()


def _frozen(seed: int = 0) -> sb.FrozenBackbone:
    return sb.FrozenBackbone(sb.build_backbone("resnet20", width=4, in_channels=1, num_classes=5), seed=seed)


def _reseal(d: Path, manifest: str) -> None:
    meta = json.loads((d / manifest).read_text())
    for rel in meta["files"]:
        raw = (d / rel).read_bytes()
        meta["files"][rel] = {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    (d / manifest).write_text(json.dumps(meta))


def _edit_json(path: Path, fn) -> None:
    meta = json.loads(path.read_text())
    fn(meta)
    path.write_text(json.dumps(meta))


@pytest.fixture
def ens_dir(tmp_path) -> Path:
    return save_ensemble(sb.Ensemble(_frozen(), SPEC, members=2, seed=1), tmp_path / "ens")


@pytest.fixture
def adapter_dir(tmp_path) -> Path:
    bank = AdapterBank(_frozen())
    bank.add_task("digits", sb.Head(), num_classes=3)
    return bank.save_adapter("digits", tmp_path / "digits")


# ----------------------------------------------------------------------------- malformed JSON, every shape
MALFORMED = {
    "null": b"null", "list": b"[1, 2]", "string": b'"hi"', "number": b"3", "empty": b"",
    "bom": b"\xef\xbb\xbf{}", "deep": b"[" * 100_000 + b"]" * 100_000, "nan": b'{"format_version": NaN}',
    "not utf-8": b'{"a": "\xff"}', "truncated": b'{"format_version": 1, ',
}


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_malformed_json_of_every_shape_is_a_clear_error_naming_the_file(ens_dir, adapter_dir, kind):
    for d, name, load in ((ens_dir, "ensemble.json", load_ensemble),
                          (adapter_dir, ADAPTER_CONFIG, lambda p: AdapterBank(_frozen()).load_adapter(p))):
        (d / name).write_bytes(MALFORMED[kind])
        with pytest.raises(ValueError) as info:  # SchemaError is a ValueError; never TypeError/RecursionError
            load(d)
        assert name in str(info.value)


@pytest.mark.parametrize("field, value, accepted", [
    ("format_version", "2", "an integer 1..1"), ("format_version", True, "an integer 1..1"),
    ("format_version", 1.0, "an integer 1..1"), ("format_version", None, "an integer 1..1"),
    ("format_version", 0, "an integer 1..1"), ("format_version", 2, "upgrade"),
    ("members", "2", "an integer"), ("members", 2.5, "an integer"), ("members", 10**6, "an integer in"),
    ("members", None, "an integer"), ("spec", None, "a list"), ("spec", {"kind": "head"}, "a list"),
    ("spec", [], "non-empty"), ("spec", [{"kind": "evil"}], "one of"), ("data", "theirs", "one of"),
    ("backbone", [], "JSON object"), ("files", [], "file entries"),
])
def test_every_ensemble_field_is_typed_and_bounded(ens_dir, field, value, accepted):
    _edit_json(ens_dir / "ensemble.json", lambda m: m.__setitem__(field, value))
    with pytest.raises(ValueError) as info:
        load_ensemble(ens_dir)
    msg = str(info.value)
    assert "ensemble.json" in msg and field in msg and accepted in msg, msg


@pytest.mark.parametrize("field, value", [
    ("num_classes", "10"), ("num_classes", 10.7), ("num_classes", 10**8), ("num_classes", 0),
    ("num_classes", True), ("task", "a\nb"), ("task", "../up"), ("task", "x" * 65), ("task", 3),
    ("class_names", ["a"]), ("task_card", [1]), ("seed", "0"), ("library_version", None),
])
def test_every_adapter_field_is_typed_and_bounded(adapter_dir, field, value):
    _edit_json(adapter_dir / ADAPTER_CONFIG, lambda m: m.__setitem__(field, value))
    with pytest.raises(ValueError) as info:
        AdapterBank(_frozen()).load_adapter(adapter_dir)
    assert ADAPTER_CONFIG in str(info.value) and field in str(info.value)
    assert "\n" not in str(info.value)  # a hostile value is escaped, never printed raw


@pytest.mark.parametrize("entry", ["../../etc/passwd", "/etc/passwd", "a/b/c", ".hidden", "", "x\x1b[2J"])
def test_manifests_cannot_reach_outside_their_folder(ens_dir, entry):
    _edit_json(ens_dir / "ensemble.json", lambda m: m["files"].__setitem__(entry, {"size": 1, "sha256": "0" * 64}))
    with pytest.raises(SchemaError, match="not a plain path inside its folder") as info:  # noqa: PT012
        load_ensemble(ens_dir)
    assert "\x1b" not in str(info.value)


def test_bank_task_lists_cannot_name_folders_outside_the_bank(tmp_path):
    bank = AdapterBank(_frozen())
    bank.add_task("a", sb.Head(), num_classes=3)
    d = bank.save(tmp_path / "bank")
    for tasks in (["../a"], ["a", "a"], ["/etc"], [None]):
        _edit_json(d / "adapter_bank.json", lambda m: m.__setitem__("tasks", tasks))
        with pytest.raises(SchemaError, match="adapter_bank.json"):
            AdapterBank.load(d)


# ----------------------------------------------------------------------------- property-based: schemas
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4),
                    max_leaves=12)
SCHEMAS = [schema.EnsembleConfig, schema.AdapterConfig, schema.BankConfig, schema.CheckpointState,
           schema.BackboneConfig]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(SCHEMAS), JSON)
def test_any_json_value_is_accepted_or_refused_with_a_schema_error(kind, value):
    try:
        kind.from_dict(value, "f.json")
    except SchemaError as err:
        assert "f.json" in str(err)


def _valid(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("v")
    save_ensemble(sb.Ensemble(_frozen(), sb.Head(), members=2), d)
    return json.loads((d / "ensemble.json").read_text())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(["format_version", "members", "spec", "data", "backbone", "files", "kind"]), value=JSON)
def test_one_bad_field_is_named_in_the_error(tmp_path_factory, field, value):
    if "ens" not in _VALID:
        _VALID["ens"] = _valid(tmp_path_factory)
    good = _VALID["ens"]
    bad = {**good, field: value}
    try:
        schema.EnsembleConfig.from_dict(bad, "ensemble.json")
    except SchemaError as err:
        assert field in str(err) or "files[" in str(err) or "backbone" in str(err), str(err)


_VALID: dict = {}


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=80))
def test_names_are_a_safe_charset_and_printing_escapes_control_characters(text):
    try:
        check_name(text)
        assert text.isascii() and text.isprintable() and "/" not in text and "." not in text and len(text) <= 64
    except ValueError as err:
        assert "\x1b" not in str(err) and "\n" not in str(err)
    shown = safe_text(text)
    assert all(c.isprintable() and c != "\x1b" for c in shown)


# ----------------------------------------------------------------------------- tensors: names, shapes, dtypes, stats
def _member_edit(d: Path, fn) -> None:
    f = d / "member_001.safetensors"
    tensors, header = load_tensors(f)
    save_tensors(f, fn(tensors), header)
    _reseal(d, "ensemble.json")


@pytest.mark.parametrize("case, match", [
    ("strip stats", "missing"), ("rename stats", "unexpected"), ("(1,) running_var", "shape"),
    ("extra tensor", "unexpected"), ("int slice", "dtype"), ("bool slice", "dtype"), ("complex slice", "dtype"),
    ("float64 stats", "dtype"),
])
def test_member_files_are_checked_as_strictly_as_adapters(ens_dir, case, match):
    def edit(t: dict) -> dict:
        stats = [n for n in t if n.startswith("stats/") and n.endswith("running_var")]
        first_slice = next(n for n in t if n.startswith("slice/"))
        if case == "strip stats":
            return {n: v for n, v in t.items() if not n.startswith("stats/")}
        if case == "rename stats":
            return {n.replace("running_var", "running_vaz"): v for n, v in t.items()}
        if case == "(1,) running_var":
            return {**t, stats[0]: torch.ones(1)}
        if case == "extra tensor":
            return {**t, "slice/evil": torch.zeros(2)}
        if case == "float64 stats":
            return {**t, stats[0]: t[stats[0]].double()}
        dtype = {"int slice": torch.int32, "bool slice": torch.bool, "complex slice": torch.complex64}[case]
        if dtype is torch.complex64:  # safetensors has no complex dtype: the raw bytes of one, as int64
            return {**t, first_slice: torch.zeros(t[first_slice].shape, dtype=torch.int64)}
        return {**t, first_slice: t[first_slice].to(dtype)}

    _member_edit(ens_dir, edit)
    with pytest.raises(ValueError, match=match) as info:
        load_ensemble(ens_dir)
    assert "member_001.safetensors" in str(info.value)


def test_shared_statistics_must_be_present_from_this_backbone_and_listed(tmp_path):
    ens = sb.Ensemble(_frozen(), sb.Head(), members=2)
    d = save_ensemble(ens, tmp_path / "e")
    assert (d / "shared.safetensors").is_file()
    other = save_ensemble(sb.Ensemble(_frozen(seed=7), sb.Head(), members=2), tmp_path / "other")
    (d / "shared.safetensors").write_bytes((other / "shared.safetensors").read_bytes())  # another backbone's
    _reseal(d, "ensemble.json")
    with pytest.raises(sb.FingerprintMismatch, match="shared.safetensors"):
        load_ensemble(d)
    _edit_json(d / "ensemble.json", lambda m: m["files"].pop("shared.safetensors"))
    with pytest.raises(ValueError, match="lists no shared.safetensors"):
        load_ensemble(d)


def test_non_finite_weights_are_never_saved(tmp_path):
    ens = sb.Ensemble(_frozen(), SPEC, members=2)
    with torch.no_grad():
        next(iter(ens.slices.values()))[1].fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN or infinite"):
        save_ensemble(ens, tmp_path / "e")
    assert not (tmp_path / "e").exists()
    bank = AdapterBank(_frozen())
    bank.add_task("t", sb.Head(), num_classes=3)
    with torch.no_grad():
        next(bank.adapter("t").parameters()).fill_(float("inf"))
    with pytest.raises(ValueError, match="NaN or infinite"):
        bank.save_adapter("t", tmp_path / "t")


def test_checkpoint_backbone_tensors_of_another_dtype_are_refused(tmp_path):
    module = sb.build_backbone("resnet20", width=4, in_channels=1, num_classes=5)
    state = {n: t.double() if t.is_floating_point() else t for n, t in module.state_dict().items()}
    with pytest.raises(ValueError, match="no silent casts"):
        sb.FrozenBackbone.from_checkpoint(sb.build_backbone("resnet20", width=4, in_channels=1, num_classes=5), state)


# ----------------------------------------------------------------------------- sizes before allocation
def test_hostile_sizes_fail_fast_under_a_memory_ceiling(tmp_path, ens_dir, adapter_dir):
    """Each hostile file is refused within a 1 GiB address-space allowance and a few seconds."""
    # num_classes 10**8 in a consistent adapter (a head that large would take ~2.5 GB)
    _edit_json(adapter_dir / ADAPTER_CONFIG, lambda m: m.__setitem__("num_classes", 10**8))
    # the same within the class limit but not backed by the tensors on disk
    big = tmp_path / "big"
    big.mkdir()
    for f in adapter_dir.iterdir():
        (big / f.name).write_bytes(f.read_bytes())
    _edit_json(big / ADAPTER_CONFIG, lambda m: m.update(num_classes=100_000, class_names=None))
    # members=10**6, and K within bounds but not backed by member files
    _edit_json(ens_dir / "ensemble.json", lambda m: m.__setitem__("members", 10**6))
    ens2 = save_ensemble(sb.Ensemble(_frozen(), SPEC, members=2), tmp_path / "ens2")
    _edit_json(ens2 / "ensemble.json", lambda m: m.__setitem__("members", 60_000))
    # backbone configs of absurd size
    recipes = {}
    for key, value in {"width": 10**5, "expansion": 10**7, "depth": 1_200_002, "num_classes": 10**8}.items():
        d = tmp_path / f"bb_{key}"
        sb.saving.save_backbone(sb.FrozenBackbone(sb.build_backbone("lcresnet", width=4, in_channels=1)), d)
        _edit_json(d / "backbone.json", lambda m: m["config"].__setitem__(key, value))
        recipes[key] = str(d)
    # a sparse file whose header claims a [1e6, 1e6] tensor
    sp = tmp_path / "sparse.safetensors"
    save_sparse(sp, {"w": torch.zeros(100)})
    tensors, meta = load_tensors(sp)
    meta["sparse_shapes"] = {"w": [10**6, 10**6]}
    save_tensors(sp, tensors, meta)
    script = textwrap.dedent(f"""
        import resource, sys, time, json
        import torch
        torch.set_num_threads(1)
        from shared_backbone.adapters import AdapterBank
        from shared_backbone.saving import load_backbone, load_ensemble
        from shared_backbone.lc import load_sparse
        from shared_backbone.frozen import FrozenBackbone
        import shared_backbone as sb
        frozen = FrozenBackbone(sb.build_backbone("resnet20", width=4, in_channels=1, num_classes=5), seed=0)
        vm = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (vm + 2**30, vm + 2**30))
        cases = {{
            "num_classes 1e8": lambda: AdapterBank(frozen).load_adapter({str(adapter_dir)!r}),
            "num_classes not on disk": lambda: AdapterBank(frozen).load_adapter({str(big)!r}),
            "members 1e6": lambda: load_ensemble({str(ens_dir)!r}),
            "members not on disk": lambda: load_ensemble({str(ens2)!r}),
            "sparse [1e6, 1e6]": lambda: load_sparse({str(sp)!r}),
            **{{f"recipe {{k}}": (lambda d=d: load_backbone(d)) for k, d in {recipes!r}.items()}},
        }}
        out = {{}}
        for name, fn in cases.items():
            t = time.perf_counter()
            try:
                fn()
                out[name] = "loaded"
            except ValueError as e:
                out[name] = ["ValueError", time.perf_counter() - t, str(e)[:200]]
            except MemoryError:
                out[name] = "MemoryError"
        print(json.dumps(out))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(out) == 9
    for name, result in out.items():
        assert isinstance(result, list) and result[0] == "ValueError", (name, result)
        assert result[1] < 5.0, (name, result)  # refused before any large allocation or long build


def test_the_size_limit_can_be_raised_on_purpose(monkeypatch):
    with pytest.raises(ValueError, match="max_parameters"):
        sb.build_backbone("resnet20", width=2000, in_channels=1)
    monkeypatch.setattr(schema.LIMITS, "max_parameters", 10**12)
    assert sb.backbones.estimate_parameters("resnet20", width=2000, in_channels=1) > 10**9


def test_sparse_header_that_disagrees_with_its_mask_is_refused(tmp_path):
    sp = tmp_path / "s.safetensors"
    save_sparse(sp, {"w": torch.zeros(100), "v": torch.ones(3)})
    tensors, meta = load_tensors(sp)
    for shape in ([10, 11], [-1, 100], "100", [1.5]):
        save_tensors(sp, tensors, {**meta, "sparse_shapes": {"w": shape}})
        with pytest.raises(ValueError, match="sparse tensor 'w'"):
            load_sparse(sp)


# ----------------------------------------------------------------------------- untrusted strings
def test_an_embedded_task_card_cannot_point_evaluation_at_arbitrary_files():
    known = sb.data.load_task("fashion_mnist")
    card = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(known).items()}
    assert _untrusted_card(card, "x").local_dir == known.local_dir  # the known card's own data root: kept
    hostile = {**card, "local_dir": "/etc"}
    assert _untrusted_card(hostile, "x").local_dir == ""  # anything else: cleared (the user passes data_dir)
    assert _untrusted_card({**card, "name": "mine", "local_dir": "/home"}, "x").local_dir == ""
    with pytest.raises(ValueError, match="plain file names"):
        _untrusted_card({**card, "local_files": {"test": ["../../etc/passwd", "x"]}}, "x")


def test_task_names_are_checked_on_save_and_on_load(adapter_dir):
    bank = AdapterBank(_frozen())
    for bad in ("a\nb", "../x", "x/y", ".hidden", "", "a" * 65, "\x1b[2J", "a.b"):
        with pytest.raises(ValueError, match="task name"):
            bank.add_task(bad, sb.Head(), num_classes=2)
    with pytest.raises(ValueError, match="task name"):
        bank.load_adapter(adapter_dir, name="../evil")


def test_eval_adapters_prints_names_escaped():
    from shared_backbone.cli import eval_adapters

    assert eval_adapters.safe_text("ok\n| forged | row |\x1b[2J") == "ok\\n| forged | row |\\x1b[2J"


def test_a_huge_member_count_fails_fast_and_small():
    import time

    t = time.perf_counter()
    with pytest.raises(ValueError, match="members=1,000,000"):
        sb.Ensemble(_frozen(), SPEC, members=10**6)
    assert time.perf_counter() - t < 2.0
