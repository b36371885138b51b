"""Task cards and data: card → decoded uint8 tensors (cached) → ``TensorData`` with batched augmentation.

- :mod:`.cards`: the ``TaskCard`` schema (a TOML file in ``tasks/``) and finding cards
  (``list_tasks``, ``load_task``).
- :mod:`.sources`: where images come from (IDX files, the built-in ``mnist5k`` / ``sklearn_digits``,
  an image folder, the HF hub) and ``load_arrays``, which decodes a split once per process.
- :mod:`.tensors`: ``TensorData`` (normalised tensors in memory) and augmentation on whole batches.
"""
from .cards import (AUGMENTATIONS, BUILTIN_DATASETS, IMAGEFOLDER, TASKS_ENV, TaskCard, _PACKAGE_TASKS, list_tasks,
                    load_task)
from .sources import (SOURCES, Source, clear_cache, hub_offline, load_arrays, load_dataset_for, mnist5k,
                      read_idx, read_imagefolder, sklearn_digits)
from .tensors import TensorData, augment_batch, random_crop, random_hflip

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
