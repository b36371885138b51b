"""Typed, bounded schemas for every JSON file the library reads, and one ``format_version`` policy.

Everything read from disk is data from an unknown source: each field is checked for its type and
its bounds *before* anything is built or allocated from it, and an error names the file, the
field, the (escaped, shortened) value and what is accepted. One schema per file kind:

=====================  =================================  ==============================
file                   schema                             kind
=====================  =================================  ==============================
``backbone.json``      :class:`BackboneConfig`            what rebuilds the frozen backbone
``ensemble.json``      :class:`EnsembleConfig`            an ensemble (its manifest)
``adapter_config.json``:class:`AdapterConfig`             one task adapter (its manifest)
``adapter_bank.json``  :class:`BankConfig`                a bank of adapters (its manifest)
``state.json``         :class:`CheckpointState`           a training checkpoint (its manifest)
=====================  =================================  ==============================

Sizes the library refuses are in :data:`LIMITS`; raise them (``LIMITS.max_parameters = ...``)
to load a bigger model on purpose.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = [
    "FORMAT_VERSION", "LIMITS", "Limits", "SchemaError", "FileEntry", "BackboneConfig", "BackboneRecipe",
    "EnsembleConfig", "AdapterConfig", "BankConfig", "CheckpointState", "check_name", "safe_text", "check_format_version",
    "parse_files",
]

FORMAT_VERSION = 1  # every file kind; a reader accepts 1..FORMAT_VERSION and refuses newer with "upgrade"


class SchemaError(ValueError):
    """A file's field has the wrong type, is out of bounds, or is missing."""


@dataclass
class Limits:
    """What the library refuses to read or build (raise a limit to go past it on purpose)."""

    max_parameters: int = 1_000_000_000  # estimated backbone parameters (frozen + head)
    max_members: int = 65_536  # ensemble members K
    max_classes: int = 100_000  # classes of one task or head
    max_tasks: int = 10_000  # tasks in one bank
    max_json_bytes: int = 16 * 2**20  # one JSON file
    max_file_bytes: int = 64 * 2**30  # one tensor file listed in a manifest
    max_files: int = 200_000  # files listed in one manifest
    max_depth: int = 2_000  # a backbone's "depth" option
    max_int_option: int = 1 << 20  # any other integer option of a backbone (width, expansion, ...)


LIMITS = Limits()
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$")  # task / adapter names
_HEX16 = re.compile(r"^[0-9a-f]{16}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_REL_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\-.]{0,127}$")


# ------------------------------------------------------------------------------------- printing
def safe_text(value: Any, limit: int = 80) -> str:
    """``repr``-like text of an untrusted value: control characters escaped, at most ``limit`` chars."""
    text = value if isinstance(value, str) else repr(value)
    text = "".join(c if c.isprintable() and c not in "\x1b" else c.encode("unicode_escape").decode("ascii")
                   for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _show(value: Any) -> str:
    if isinstance(value, str):
        return "'" + safe_text(value, 60) + "'"
    if isinstance(value, (dict, list)):
        return f"a {type(value).__name__} of {len(value)} entries"
    return safe_text(value, 60)


def _fail(file: str, name: str, value: Any, accepted: str) -> SchemaError:
    shown = "missing" if value is _MISSING else f"{_show(value)} ({type(value).__name__})"
    return SchemaError(f"{file}: field {name!r} is {shown}; accepted: {accepted}")


_MISSING = object()


# ------------------------------------------------------------------------------------- field readers
class _Reader:
    """Typed getters over one JSON object, naming ``file`` and the field path in every error."""

    def __init__(self, d: Any, file: str, path: str = ""):
        if not isinstance(d, dict):
            what = path or "the file"
            raise SchemaError(f"{file}: {what} must be a JSON object, got {_show(d)} ({type(d).__name__})")
        self.d, self.file, self.path = d, file, path

    def _name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        v = self.d.get(key, _MISSING)
        if v is _MISSING or (v is None and default is None):
            if default is _MISSING:
                raise _fail(self.file, self._name(key), _MISSING, "a value (the field is required)")
            return default
        return v

    def int(self, key: str, lo: int, hi: int, default: Any = _MISSING) -> int:
        v = self.raw(key, default)
        if v is default and default is not _MISSING:
            return v
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise _fail(self.file, self._name(key), v, f"an integer in [{lo:,}, {hi:,}]")
        return v

    def float(self, key: str, lo: float = -math.inf, hi: float = math.inf, default: Any = _MISSING) -> float:
        v = self.raw(key, default)
        if v is default and default is not _MISSING:
            return v
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or not lo <= v <= hi:
            raise _fail(self.file, self._name(key), v, f"a finite number in [{lo}, {hi}]")
        return float(v)

    def bool(self, key: str, default: Any = _MISSING) -> bool:
        v = self.raw(key, default)
        if not isinstance(v, bool):
            raise _fail(self.file, self._name(key), v, "true or false")
        return v

    def str(self, key: str, *, max_len: int = 256, pattern: re.Pattern | None = None,
            choices: tuple[str, ...] | None = None, default: Any = _MISSING) -> str:
        v = self.raw(key, default)
        if v is default and default is not _MISSING:
            return v
        if choices is not None:
            if v not in choices:
                raise _fail(self.file, self._name(key), v, f"one of {list(choices)}")
            return v
        if not isinstance(v, str) or len(v) > max_len or (pattern is not None and not pattern.match(v)):
            accepted = f"a string of at most {max_len} characters" + (f" matching {pattern.pattern}" if pattern else "")
            raise _fail(self.file, self._name(key), v, accepted)
        return v

    def list(self, key: str, max_len: int, default: Any = _MISSING) -> list:
        v = self.raw(key, default)
        if v is default and default is not _MISSING:
            return v
        if not isinstance(v, list) or len(v) > max_len:
            raise _fail(self.file, self._name(key), v, f"a list of at most {max_len:,} entries")
        return v

    def obj(self, key: str, default: Any = _MISSING) -> "_Reader | None":
        v = self.raw(key, default)
        if v is default and default is not _MISSING:
            return v
        return _Reader(v, self.file, self._name(key))


def check_format_version(d: Mapping, file: str) -> int:
    """The one policy: ``format_version`` is required, an integer 1..FORMAT_VERSION; newer means upgrade."""
    v = d.get("format_version", _MISSING) if isinstance(d, dict) else _MISSING
    if v is _MISSING:
        raise SchemaError(f"{file} is missing the field 'format_version' (accepted: an integer 1..{FORMAT_VERSION})")
    if isinstance(v, int) and not isinstance(v, bool) and v > FORMAT_VERSION:
        raise SchemaError(f"{file} has format_version {v}; this library reads up to {FORMAT_VERSION}; "
                          "upgrade shared_backbone")
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise _fail(file, "format_version", v, f"an integer 1..{FORMAT_VERSION}")
    return v


def check_name(name: Any, what: str = "task name") -> str:
    """A task/adapter name: 1-64 characters of ``A-Z a-z 0-9 _ -``, starting with a letter or digit."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ValueError(f"{what} must be 1-64 characters of letters, digits, '_' or '-' (starting with a "
                         f"letter or digit), got {_show(name)}")
    return name


def _required(d: Mapping, file: str, keys: tuple[str, ...], path: str = "") -> None:
    for key in keys:
        if key not in d:
            raise SchemaError(f"{file} is missing the field {f'{path}.{key}' if path else key!r}")


# ------------------------------------------------------------------------------------- files of a manifest
@dataclass(frozen=True)
class FileEntry:
    """One file a manifest lists: its path inside the artifact's folder, size and sha256."""

    path: str
    size: int
    sha256: str


def check_relpath(rel: Any, file: str) -> str:
    """A path inside the artifact's folder: relative, at most 2 parts, no ``..``, no hidden names."""
    parts = rel.split("/") if isinstance(rel, str) else None
    if not parts or len(parts) > 2 or not all(_REL_PART.match(p) and p not in (".", "..") for p in parts):
        raise SchemaError(f"{file}: field 'files' names {_show(rel)}, not a plain path inside its folder "
                          "(accepted: 'name' or 'folder/name', letters, digits, '_', '-', '.', no '..')")
    return rel


def parse_files(d: Mapping, file: str) -> dict[str, FileEntry]:
    """The ``files`` field of a manifest: ``{path: {"size": int, "sha256": hex}}``, bounded."""
    r = _Reader(d, file)
    files = r.raw("files")
    if not isinstance(files, dict) or len(files) > LIMITS.max_files:
        raise _fail(file, "files", files, f"an object of at most {LIMITS.max_files:,} file entries")
    out = {}
    for rel, entry in files.items():
        check_relpath(rel, file)
        e = _Reader(entry, file, f"files[{safe_text(rel)!r}]")
        out[rel] = FileEntry(rel, e.int("size", 0, LIMITS.max_file_bytes), e.str("sha256", pattern=_HEX64))
    return out


# ------------------------------------------------------------------------------------- schemas
_ARCH_RE = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
_KINDS = ("filters", "batchnorm", "blocks", "pointwise", "head", "full")


@dataclass(frozen=True)
class BackboneConfig:
    """``backbone.json`` and the ``backbone`` field of every other file: what rebuilds the frozen state."""

    arch: str
    config: dict
    seed: int
    init: str
    source: str
    fingerprint: str
    format_version: int = FORMAT_VERSION
    files: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Any, file: str, path: str = "") -> "BackboneConfig":
        r = _Reader(d, file, path)
        _required(d, file, ("arch", "config", "fingerprint", "source"), path)
        version = check_format_version(d, file if not path else f"{file} (field {path!r})")
        cfg = r.obj("config")
        config = {}
        for key, v in cfg.d.items():
            if not isinstance(key, str) or not _ARCH_RE.match(key):
                raise _fail(file, f"{cfg.path}", key, "option names of letters, digits, '_' or '-'")
            if isinstance(v, bool) or v is None:
                config[key] = v
            elif isinstance(v, int):
                hi = LIMITS.max_classes if key == "num_classes" else \
                    LIMITS.max_depth if key == "depth" else LIMITS.max_int_option
                config[key] = cfg.int(key, 0, hi)
            elif isinstance(v, float):
                config[key] = cfg.float(key, 0.0, float(LIMITS.max_int_option))
            elif isinstance(v, str):
                config[key] = cfg.str(key, max_len=64)
            else:
                raise _fail(file, f"{cfg.path}.{key}", v, "a number, a string, true/false or null")
        source = r.str("source", choices=("random", "checkpoint"))
        seed = r.int("seed", -1, 2**63 - 1, default=-1 if source == "checkpoint" else _MISSING)
        files = parse_files(d, file) if "files" in d else {}
        return cls(arch=r.str("arch", pattern=_ARCH_RE), config=config, seed=seed,
                   init=r.str("init", max_len=64, default="checkpoint" if source == "checkpoint" else _MISSING),
                   source=source, fingerprint=r.str("fingerprint", pattern=_HEX16), format_version=version,
                   files=files)


BackboneRecipe = BackboneConfig  # the old name, kept for code that still imports it


def _spec(r: _Reader, key: str) -> list:
    parts = r.list(key, 16)
    if not parts:
        raise _fail(r.file, key, parts, "a non-empty list of slice terms")
    for i, p in enumerate(parts):
        t = _Reader(p, r.file, f"{key}[{i}]")
        t.str("kind", choices=_KINDS)
        if len(p) > 8:
            raise _fail(r.file, f"{key}[{i}]", p, "a slice term of at most 8 fields")
    return parts


@dataclass(frozen=True)
class EnsembleConfig:
    """``ensemble.json``: K, spec, data mode, the backbone config and the files of the ensemble."""

    members: int
    spec: list
    data: str
    backbone: BackboneConfig
    files: dict
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_dict(cls, d: Any, file: str) -> "EnsembleConfig":
        r = _Reader(d, file)
        version = check_format_version(d, file)
        _required(d, file, ("members", "spec", "backbone", "files"))
        r.str("kind", choices=("ensemble",), default="ensemble")
        return cls(members=r.int("members", 1, LIMITS.max_members), spec=_spec(r, "spec"),
                   data=r.str("data", choices=("shared", "own"), default="shared"),
                   backbone=BackboneConfig.from_dict(d["backbone"], file, "backbone"),
                   files=parse_files(d, file), format_version=version)


@dataclass(frozen=True)
class AdapterConfig:
    """``adapter_config.json``: one task's spec, classes, task card, backbone config and files."""

    task: str
    spec: list
    num_classes: int
    backbone: BackboneConfig
    files: dict
    class_names: list | None = None
    task_card: dict | None = None
    seed: int = 0
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_dict(cls, d: Any, file: str) -> "AdapterConfig":
        r = _Reader(d, file)
        version = check_format_version(d, file)
        _required(d, file, ("task", "spec", "num_classes", "backbone", "library_version", "files"))
        r.str("kind", choices=("adapter",), default="adapter")
        r.str("library_version", max_len=64)
        task = r.raw("task")
        try:
            check_name(task)
        except ValueError as err:
            raise SchemaError(f"{file}: field 'task': {err}") from None
        num_classes = r.int("num_classes", 1, LIMITS.max_classes)
        names = r.list("class_names", num_classes, default=None)
        if names is not None and (len(names) != num_classes or not all(isinstance(n, str) and len(n) <= 128
                                                                        for n in names)):
            raise _fail(file, "class_names", names, f"{num_classes} strings of at most 128 characters")
        card = r.raw("task_card", default=None)
        if card is not None and not isinstance(card, dict):
            raise _fail(file, "task_card", card, "a JSON object or null")
        return cls(task=task, spec=_spec(r, "spec"), num_classes=num_classes,
                   backbone=BackboneConfig.from_dict(d["backbone"], file, "backbone"), files=parse_files(d, file),
                   class_names=names, task_card=card, seed=r.int("seed", -2**63, 2**63 - 1, default=0),
                   format_version=version)


@dataclass(frozen=True)
class BankConfig:
    """``adapter_bank.json``: the tasks (folders inside the bank), the active one, the backbone fingerprint."""

    tasks: list
    active: str | None
    fingerprint: str
    files: dict
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_dict(cls, d: Any, file: str) -> "BankConfig":
        r = _Reader(d, file)
        version = check_format_version(d, file)
        _required(d, file, ("tasks", "fingerprint", "files"))
        r.str("kind", choices=("adapter_bank",), default="adapter_bank")
        tasks = r.list("tasks", LIMITS.max_tasks)
        for t in tasks:
            try:
                check_name(t)
            except ValueError as err:
                raise SchemaError(f"{file}: field 'tasks': {err}") from None
        if len(set(tasks)) != len(tasks):
            raise _fail(file, "tasks", tasks, "distinct task names")
        active = r.raw("active", default=None)
        if active is not None and active not in tasks:
            raise _fail(file, "active", active, f"one of the tasks {[safe_text(t) for t in tasks][:8]} or null")
        return cls(tasks=tasks, active=active, fingerprint=r.str("fingerprint", pattern=_HEX16),
                   files=parse_files(d, file), format_version=version)


@dataclass(frozen=True)
class CheckpointState:
    """``checkpoint/state.json``: where training stopped and what it was training (all checked on resume)."""

    epoch: int
    step_in_epoch: int
    step: int
    epoch_sums: list  # the running epoch's (loss sum, correct, seen) so far; the file's key is epoch_partial
    config: dict
    fingerprint: str
    spec: str
    members: int
    member_ids: list
    history: list
    files: dict
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_dict(cls, d: Any, file: str) -> "CheckpointState":
        r = _Reader(d, file)
        version = check_format_version(d, file)
        _required(d, file, ("epoch", "step", "config", "fingerprint", "spec", "members", "member_ids", "files"))
        r.str("kind", choices=("checkpoint",), default="checkpoint")
        big = 2**62
        sums = r.list("epoch_partial", 3, default=[0.0, 0.0, 0.0])
        if len(sums) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                     and math.isfinite(v) for v in sums):
            raise _fail(file, "epoch_partial", sums, "3 finite numbers (loss sum, correct, seen)")
        members = r.int("members", 1, LIMITS.max_members)
        ids = r.list("member_ids", LIMITS.max_members)
        if len(ids) != members or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < big for i in ids):
            raise _fail(file, "member_ids", ids, f"{members} member indices >= 0")
        history = r.list("history", 1_000_000, default=[])
        config = r.obj("config")
        return cls(epoch=r.int("epoch", 0, big), step_in_epoch=r.int("step_in_epoch", 0, big, default=0),
                   step=r.int("step", 0, big), epoch_sums=[float(v) for v in sums], config=config.d,
                   fingerprint=r.str("fingerprint", pattern=_HEX16), spec=r.str("spec", max_len=4096),
                   members=members, member_ids=ids, history=history, files=parse_files(d, file),
                   format_version=version)
