"""Files on disk: safetensors and JSON written durably, and multi-file artifacts with one commit point.

How an artifact (an ensemble, an adapter, a bank, a checkpoint) is written, by :func:`write_artifact`:

1. only the artifact's own file names inside the target folder are written; nothing else there is
   touched, and the folder itself is never renamed (so ``.``, a mount point, or a folder inside a
   read-only parent all work);
2. each new or changed file is written, fsynced, under a *staged* name beside its final one,
   ``.sb-<first 16 hex of its sha256>.<name>`` (unchanged files are not rewritten);
3. the manifest (the artifact's JSON: its fields plus ``files``: name -> size and sha256) is written
   to a temp file, fsynced and renamed over the old one: **the commit point**; the folder is fsynced;
4. each staged file is renamed onto its final name, and files of the old artifact that the new one
   no longer lists are removed, as are leftovers of crashed saves (names ``.sb-*`` only).

:func:`read_artifact` trusts only the files the manifest lists, and only with the listed size and
sha256: it looks for each at its final name, then at its staged name (a crash between 3 and 4
leaves it there). A reader that finds a file changed or gone re-reads the manifest and retries a
bounded number of times; if the manifest has not changed either, the artifact is damaged and the
error says which file. So a reader sees the old or the new artifact, whole, and never nothing.
One writer per artifact at a time.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import struct
import time
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .schema import LIMITS, SchemaError, check_relpath, parse_files, safe_text

__all__ = ["save_tensors", "load_tensors", "write_json", "read_json", "read_config", "tensors_to_bytes",
           "tensors_from_bytes", "header_shapes", "manifest_bytes", "write_artifact", "read_artifact",
           "ArtifactConflict", "KNOWN_MANIFESTS"]

_META_KEY = "shared_backbone"
KNOWN_MANIFESTS = {"ensemble.json": "ensemble", "adapter_config.json": "adapter", "adapter_bank.json": "adapter_bank",
                   "state.json": "checkpoint", "backbone.json": "backbone"}
_OWN_FILE = re.compile(  # the only names a save ever removes
    r"^(adapter_config\.json|adapter_model\.safetensors|backbone\.json|backbone\.safetensors|"
    r"shared\.safetensors|state\.safetensors|member_\d{3,7}\.safetensors)$")
_OURS = re.compile(r"^\.sb-(tmp-[0-9a-f]{12}|[0-9a-f]{16})\.")  # staged and temp files: the only names cleaned up
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_on_boundary: Callable[[str], None] | None = None  # test hook: called after every durable write, rename, unlink
T = TypeVar("T")


class ArtifactConflict(FileExistsError):
    """The target holds another kind of artifact, or one on another backbone (pass ``overwrite=True``)."""


def _boundary(event: str) -> None:
    if _on_boundary is not None:
        _on_boundary(event)


# ------------------------------------------------------------------------------------- durable single files
def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_durable(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (a name nobody reads yet) and fsync it."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, 0o644)
    _boundary(f"write {path.name}")


def _atomic_write(path: Path, data: bytes) -> Path:
    """Replace ``path`` with ``data`` in one rename (temp file beside it, fsynced, folder fsynced)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".sb-tmp-{secrets.token_hex(6)}.{path.name}"
    try:
        _write_durable(tmp, data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    _boundary(f"rename {path.name}")
    return path


def _finite_or_raise(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    for n, t in tensors.items():
        if (t.is_floating_point() or t.is_complex()) and t.numel() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"refusing to save {what}: tensor {safe_text(n)!r} holds NaN or infinite values "
                             "(training diverged; lower the learning rate)")


def tensors_to_bytes(tensors: Mapping[str, torch.Tensor], meta: Mapping | None = None, *,
                     finite: str | None = None) -> bytes:
    """Safetensors bytes of ``tensors`` with a JSON ``meta`` header; ``finite`` names what refuses NaN/inf."""
    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    if finite is not None:
        _finite_or_raise(data, finite)
    return st_save(data, metadata={_META_KEY: json.dumps(dict(meta or {}))})


def save_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor], meta: Mapping | None = None) -> Path:
    """Write ``tensors`` (and a JSON ``meta`` header) to a ``.safetensors`` file, atomically and durably."""
    return _atomic_write(Path(path), tensors_to_bytes(tensors, meta))


def _header(raw: bytes, where: str) -> tuple[dict, int]:
    """The safetensors JSON header of ``raw``, checked against its length before anything is allocated."""
    if len(raw) < 8:
        raise ValueError(f"{where} is truncated or corrupt, not a readable safetensors file ({len(raw)} bytes)")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > min(len(raw) - 8, 100 * 2**20):
        raise ValueError(f"{where} is truncated or corrupt, not a readable safetensors file (header of {n} bytes)")
    try:
        header = json.loads(raw[8: 8 + n])
    except (ValueError, RecursionError):
        raise ValueError(f"{where} is truncated or corrupt, not a readable safetensors file (bad header)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{where} is truncated or corrupt, not a readable safetensors file (bad header)")
    body = len(raw) - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        ok = isinstance(info, dict) and info.get("dtype") in _DTYPES and isinstance(info.get("shape"), list) \
            and all(isinstance(s, int) and 0 <= s < 2**40 for s in info["shape"]) \
            and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
        if ok:
            a, b = info["data_offsets"]
            size = math.prod(info["shape"]) * torch.empty((), dtype=_DTYPES[info["dtype"]]).element_size()
            ok = isinstance(a, int) and isinstance(b, int) and 0 <= a <= b <= body and b - a == size
        if not ok:
            raise ValueError(f"{where} is truncated or corrupt: tensor {safe_text(name)!r} has a bad entry "
                             f"(dtype, shape and offsets must agree with the file's {body} data bytes)")
    return header, n


def header_shapes(raw: bytes, where: str) -> dict[str, tuple[tuple, torch.dtype]]:
    """Name -> (shape, dtype) of every tensor in safetensors ``raw``, read from its header alone."""
    header, _ = _header(raw, where)
    return {k: (tuple(v["shape"]), _DTYPES[v["dtype"]]) for k, v in header.items() if k != "__metadata__"}


def tensors_from_bytes(raw: bytes, where: str, expect: Mapping[str, tuple[tuple, torch.dtype]] | None = None
                       ) -> tuple[dict[str, torch.Tensor], dict]:
    """Parse safetensors ``raw``; with ``expect`` (name -> (shape, dtype)) the header must match it exactly
    (no missing, no extra, no other shape or dtype), checked before any tensor is built."""
    header, _ = _header(raw, where)
    if expect is not None:
        have = {k: v for k, v in header.items() if k != "__metadata__"}
        missing, extra = sorted(set(expect) - set(have)), sorted(set(have) - set(expect))
        if missing or extra:
            raise ValueError(f"{where} does not hold the expected tensors: missing {missing[:4]}, "
                             f"unexpected {[safe_text(e) for e in extra[:4]]}")
        for name, (shape, dtype) in expect.items():
            got_shape, got_dtype = tuple(have[name]["shape"]), _DTYPES[have[name]["dtype"]]
            if got_shape != tuple(shape):
                raise ValueError(f"{where}: tensor {name!r} has shape {got_shape}, expected {tuple(shape)}")
            if got_dtype != dtype:
                raise ValueError(f"{where}: tensor {name!r} has dtype {got_dtype}, expected {dtype} "
                                 "(no silent casts)")
    try:
        tensors = st_load(raw)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise ValueError(f"{where} is truncated or corrupt, not a readable safetensors file ({e})") from None
    meta_raw = (header.get("__metadata__") or {}).get(_META_KEY, "{}")
    try:
        meta = json.loads(meta_raw) if isinstance(meta_raw, str) else None
    except (ValueError, RecursionError):
        meta = None
    if not isinstance(meta, dict):
        raise ValueError(f"{where} has a corrupt metadata header")
    return tensors, meta


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Read a file written by :func:`save_tensors` (or a plain safetensors/torch state dict).

    A missing, truncated or corrupt file is a clear error naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if path.suffix in (".pt", ".pth", ".bin"):
        try:
            state = torch.load(path, map_location=device, weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many kinds for bad files
            raise ValueError(f"{path} is not a readable torch state dict ({type(e).__name__})") from None
        if not isinstance(state, dict):
            raise ValueError(f"{path} is not a state dict (a {type(state).__name__})")
        return dict(state.get("state_dict", state)), {}
    tensors, meta = tensors_from_bytes(path.read_bytes(), str(path))
    return {k: v.to(device) for k, v in tensors.items()}, meta


# ------------------------------------------------------------------------------------- JSON
def _jsonable(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot write {type(o).__name__} to JSON")


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, default=_jsonable, allow_nan=False) + "\n").encode()


def write_json(path: str | Path, obj) -> Path:
    """Write JSON atomically and durably (temp file + fsync + rename)."""
    return _atomic_write(Path(path), _json_bytes(obj))


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _parse_json(raw: bytes, where: str) -> Any:
    if raw.startswith(b"\xef\xbb\xbf"):
        raise ValueError(f"{where} is not valid JSON (it starts with a UTF-8 byte order mark; save it without)")
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except RecursionError:
        raise ValueError(f"{where} is not valid JSON (nested too deeply)") from None
    except (UnicodeDecodeError, ValueError) as e:
        msg = f"line {e.lineno} column {e.colno}: {e.msg}" if isinstance(e, json.JSONDecodeError) else \
            type(e).__name__
        raise ValueError(f"{where} is not valid JSON ({msg})") from None


def read_json(path: str | Path, max_bytes: int | None = None) -> Any:
    """Read a JSON file of at most ``max_bytes`` (default :data:`LIMITS`); errors name the file, not its text."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    limit = max_bytes or LIMITS.max_json_bytes
    if path.stat().st_size > limit:
        raise ValueError(f"{path} is {path.stat().st_size:,} bytes; JSON files are read up to {limit:,} bytes")
    return _parse_json(path.read_bytes(), str(path))


def read_config(path: str | Path) -> dict:
    """:func:`read_json` that must find a JSON object."""
    obj = read_json(path)
    if not isinstance(obj, dict):
        raise SchemaError(f"{path} must hold a JSON object, got a {type(obj).__name__}")
    return obj


# ------------------------------------------------------------------------------------- artifacts
def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _entries(files: Mapping[str, bytes]) -> dict:
    return {rel: {"size": len(data), "sha256": _sha(data)} for rel, data in files.items()}


def manifest_bytes(body: Mapping, files: Mapping[str, bytes]) -> bytes:
    """The bytes :func:`write_artifact` writes as the manifest of ``body`` listing ``files``."""
    return _json_bytes({**body, "files": _entries(files)})


def _staged(directory: Path, rel: str, sha: str) -> Path:
    p = directory / rel
    return p.parent / f".sb-{sha[:16]}.{p.name}"


def _holds(p: Path, size: int, sha: str) -> bool:
    try:
        return p.is_file() and p.stat().st_size == size and _sha(p.read_bytes()) == sha
    except OSError:
        return False


def _read_listed(directory: Path, rel: str, size: int, sha: str) -> bytes | None:
    """The listed file's bytes from its final or its staged name, or None if neither holds them."""
    for p in (directory / rel, _staged(directory, rel, sha)):
        try:
            if p.stat().st_size != size:
                continue
            data = p.read_bytes()
        except OSError:
            continue
        if len(data) == size and _sha(data) == sha:
            return data
    return None


def _old_manifest(path: Path) -> dict | None:
    try:
        old = read_config(path)
        parse_files(old, str(path))
        return old
    except (OSError, ValueError):
        return None


def _retired(old: dict | None) -> set[str]:
    """Old files an earlier save retired but may not have removed yet (names checked: inside the folder)."""
    out = set()
    for rel in (old or {}).get("retired", []) if isinstance((old or {}).get("retired"), list) else []:
        try:
            out.add(check_relpath(rel, "retired"))
        except ValueError:
            continue
    return out


def _clean(folders: set[Path], keep: set[Path]) -> None:
    """Remove this library's temp and staged files (``.sb-*``) in ``folders``, except ``keep``."""
    for d in folders:
        try:
            names = os.listdir(d)
        except OSError:
            continue
        for name in names:
            p = d / name
            if _OURS.match(name) and p not in keep and p.is_file() and not p.is_symlink():
                try:
                    p.unlink()
                    _boundary(f"unlink {name}")
                except OSError:
                    pass


def write_artifact(directory: str | Path, manifest: str, body: Mapping, files: Mapping[str, bytes], *,
                   overwrite: bool = False, same_fingerprint: bool = False) -> Path:
    """Write ``files`` (path inside ``directory`` -> bytes) and then the manifest ``manifest`` holding
    ``body`` plus ``files`` (sizes, sha256): one commit point (see the module docstring).

    Refused with :class:`ArtifactConflict` (unless ``overwrite``): another artifact kind's manifest in
    ``directory``; with ``same_fingerprint``, an old artifact of this kind on another backbone
    (``body["fingerprint"]``).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    claimed = {manifest, *files}
    in_way = [n for n in KNOWN_MANIFESTS if n not in claimed and (directory / n).is_file()]
    if in_way and not overwrite:
        raise ArtifactConflict(
            f"{directory} already holds a {KNOWN_MANIFESTS[in_way[0]]} ({in_way[0]}); saving a "
            f"{KNOWN_MANIFESTS.get(manifest, manifest)} there would mix two artifacts in one folder; "
            "save it elsewhere, or pass overwrite=True to write beside it")
    old = _old_manifest(directory / manifest)
    if old is not None and same_fingerprint and not overwrite and old.get("fingerprint") != body.get("fingerprint"):
        raise ArtifactConflict(
            f"{directory} holds a {KNOWN_MANIFESTS.get(manifest, manifest)} on backbone fingerprint "
            f"{safe_text(old.get('fingerprint'))!r}; this one is on {body.get('fingerprint')!r}; its adapters "
            "would no longer load; save elsewhere, or pass overwrite=True to replace it")
    old_files = parse_files(old, str(directory / manifest)) if old is not None else {}
    obsolete = set(old_files) | _retired(old)
    obsolete = {rel for rel in obsolete if rel not in files and rel != manifest and _OWN_FILE.match(Path(rel).name)}
    folders = {(directory / rel).parent for rel in files} | {directory}
    keep = {_staged(directory, rel, e.sha256) for rel, e in old_files.items()}
    _clean(folders, keep)  # leftovers of crashed saves

    entries, staged = _entries(files), []
    for rel, data in files.items():
        sha = entries[rel]["sha256"]
        was = old_files.get(rel)
        if was is not None and was.sha256 == sha and _holds(directory / rel, len(data), sha):
            continue  # unchanged and in place: not rewritten
        p = _staged(directory, rel, sha)
        p.parent.mkdir(parents=True, exist_ok=True)
        _write_durable(p, data)
        staged.append(rel)
    for d in folders:
        _fsync_dir(d)
    # the commit point; ``retired`` remembers the old files to remove, should this save stop before it does
    _atomic_write(directory / manifest, manifest_bytes({**body, "retired": sorted(obsolete)}, files))

    for rel in staged:
        os.replace(_staged(directory, rel, entries[rel]["sha256"]), directory / rel)
        _boundary(f"rename {rel}")
    for rel in sorted(obsolete):
        try:
            (directory / rel).unlink()
            _boundary(f"unlink {rel}")
        except FileNotFoundError:
            pass
    gone = {(directory / rel).parent for rel in obsolete} - folders
    _clean(folders | gone, set())
    for d in gone:  # a task folder the new artifact no longer has: removed only if nothing else is in it
        try:
            d.rmdir()
        except OSError:
            pass
    for d in folders:
        _fsync_dir(d)
    return directory


class _Changed(Exception):
    pass


def read_artifact(directory: str | Path, manifest: str, parse: Callable[[dict, str], T], *,
                  retries: int = 8) -> tuple[T, dict[str, bytes]]:
    """``(parse(manifest JSON, its path), {listed path: verified bytes})`` of an artifact written by
    :func:`write_artifact`; retries while a writer replaces it, then names the damaged file."""
    directory = Path(directory)
    path = directory / manifest
    same = 0
    for attempt in range(retries):
        raw = _read_bytes(path)
        obj = parse(_config_of(raw, path), str(path))
        files = obj.files if hasattr(obj, "files") else parse_files(_config_of(raw, path), str(path))
        out, bad = {}, None
        for rel, e in files.items():
            data = _read_listed(directory, rel, e.size, e.sha256)
            if data is None:
                bad = rel
                break
            out[rel] = data
        if bad is None:
            return obj, out
        same = same + 1 if _read_bytes(path) == raw else 0
        if same >= 2:
            p = directory / bad
            if not p.exists():
                raise FileNotFoundError(f"{p} is missing: the artifact in {directory} lists it in {manifest} but "
                                        "it was deleted; save the artifact again")
            raise ValueError(f"{p} does not match its manifest {manifest} (size {p.stat().st_size:,}, listed "
                             f"{files[bad].size:,}, or another sha256): the artifact in {directory} is damaged "
                             "(truncated or edited); save it again")
        time.sleep(0.005 * (attempt + 1))
    raise ValueError(f"{directory} kept changing while being read ({retries} tries); is a writer stuck in a loop?")


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    size = path.stat().st_size
    if size > LIMITS.max_json_bytes:
        raise ValueError(f"{path} is {size:,} bytes; JSON files are read up to {LIMITS.max_json_bytes:,} bytes")
    return path.read_bytes()


def _config_of(raw: bytes, path: Path) -> dict:
    obj = _parse_json(raw, str(path))
    if not isinstance(obj, dict):
        raise SchemaError(f"{path} must hold a JSON object, got a {type(obj).__name__}")
    return obj
