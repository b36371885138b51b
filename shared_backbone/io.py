"""Saving and loading: safetensors files with a JSON header, written atomically."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

__all__ = ["save_tensors", "load_tensors", "atomic_dir", "write_json", "read_json"]

_META_KEY = "shared_backbone"


def save_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor], meta: Mapping | None = None) -> Path:
    """Write ``tensors`` (and a JSON ``meta`` header) to a ``.safetensors`` file, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(data, tmp, metadata={_META_KEY: json.dumps(dict(meta or {}))})
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


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
            raise ValueError(f"{path} is not a readable torch state dict ({type(e).__name__}: {e})") from e
        return dict(state.get("state_dict", state)), {}
    try:
        tensors = load_file(str(path), device=str(device))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is truncated or corrupt, not a readable safetensors file ({e})") from e
    try:
        meta = json.loads(header.get(_META_KEY, "{}"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} has a corrupt metadata header ({e})") from e
    return tensors, meta


def write_json(path: str | Path, obj) -> Path:
    """Write JSON atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, default=_jsonable)
        f.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


def read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from e


def _jsonable(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot write {type(o).__name__} to JSON")


class atomic_dir:
    """Build a directory in a temp sibling, then swap it in: the old one survives any failure.

    >>> with atomic_dir("runs/ens") as tmp:
    ...     save_tensors(tmp / "member_000.safetensors", ...)
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(dir=self.path.parent, prefix=f".{self.path.name}.new-"))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = None
        if self.path.exists():
            old = Path(tempfile.mkdtemp(dir=self.path.parent, prefix=f".{self.path.name}.old-"))
            os.replace(self.path, old / "x")
        os.replace(self.tmp, self.path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
