"""Task cards: the ``TaskCard`` schema and where cards are found (``list_tasks`` / ``load_task``).

A task card (a TOML file in ``tasks/``) names a dataset, its classes, input shape, normalisation
and augmentation. Tasks are data, not code paths: a new card needs no code.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["TaskCard", "load_task", "list_tasks", "BUILTIN_DATASETS", "IMAGEFOLDER", "AUGMENTATIONS", "TASKS_ENV"]

BUILTIN_DATASETS = ("mnist5k", "sklearn_digits")  # ship inside installed packages, work offline
IMAGEFOLDER = "imagefolder"  # a user's folder: <root>/<split>/<class name>/<image files>
AUGMENTATIONS = ("crop_padding", "hflip")
TASKS_ENV = "SHARED_BACKBONE_TASKS"


def _shipped_tasks() -> Path:
    """Where the cards that come with the package are.

    In a source checkout (``pyproject.toml`` beside the package) that is the top-level ``tasks/``;
    in an installed wheel or sdist the build copies ``tasks/`` into the package as
    ``shared_backbone/tasks``, found through :mod:`importlib.resources` whatever the working folder.
    """
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file() and (checkout / "tasks").is_dir():
        return checkout / "tasks"
    return Path(str(resources.files("shared_backbone").joinpath("tasks")))




_PACKAGE_TASKS = _shipped_tasks()
_REQUIRED = ("name", "dataset", "num_classes", "class_names", "input_shape", "mean", "std")


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

