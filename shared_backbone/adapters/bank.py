"""``AdapterBank``: named tasks over one frozen backbone, PEFT's verbs (PEFT's ``model.py``)."""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Sequence, cast

import torch
from torch import nn

from ..frozen import FrozenBackbone
from ..schema import check_name
from ..slices import SliceSpec
from . import save_and_load
from .mixed import MixedBatches
from .task import TaskAdapter

__all__ = ["AdapterBank"]


class AdapterBank(nn.Module):
    """Named tasks over one frozen backbone (PEFT's verbs, one small adapter file per task).

    >>> bank = AdapterBank(frozen)
    >>> bank.add_task("digits", Blocks("block2") + Head(), num_classes=10)
    >>> fit(bank.adapter("digits"), train, test, config)    # train.fit trains one task
    >>> bank.save_adapter("digits", "adapters/digits")
    >>> bank(x, task="digits")                              # (N, 10)
    >>> bank(x, tasks=["digits", "mnist5k", ...])           # (N, C_max), one vmapped call

    A task from its card: :func:`shared_backbone.adapter_cards.add_task_from_card`.

    Shape:
        ``bank(x)`` / ``bank(x, task=t)``: ``(N, C, H, W) -> (N, classes of t)``;
        ``bank(x, tasks=names)``: ``(N, C, H, W) -> (N, C_max)``, ``-inf`` beyond each sample's classes.
    """

    def __init__(self, frozen: FrozenBackbone):
        super().__init__()
        if not isinstance(frozen, FrozenBackbone):
            raise TypeError(f"AdapterBank needs a FrozenBackbone, got {type(frozen).__name__}")
        self.frozen = frozen
        self.adapters = nn.ModuleDict()  # key "task:<name>" (ModuleDict refuses names such as "train")
        self.active: str | None = None
        self._mixed = MixedBatches(frozen)

    # -- tasks --------------------------------------------------------------------------------
    @property
    def task_names(self) -> list[str]:
        return [k[5:] for k in self.adapters]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and f"task:{name}" in self.adapters

    def __len__(self) -> int:
        return len(self.adapters)

    def adapter(self, name: str | None = None) -> TaskAdapter:
        """Task ``name``'s :class:`TaskAdapter` (the active task by default)."""
        return cast(TaskAdapter, self.adapters[f"task:{self._resolve_name(name)}"])

    def _resolve_name(self, name: str | None) -> str:
        if name is None:
            if self.active is None:
                raise ValueError(f"no task given and no active task; set_active() one of {self.task_names}")
            return self.active
        if name not in self:
            raise KeyError(f"task {name!r} is not in the bank; tasks: {self.task_names}")
        return name

    def add_task(self, name: str, spec: SliceSpec, num_classes: int | None = None, *, in_channels: int | None = None,
                 class_names: Sequence[str] | None = None, task_card: dict | None = None, seed: int = 0
                 ) -> TaskAdapter:
        """Add task ``name`` learning ``spec`` (plus its own head of ``num_classes`` outputs).

        ``in_channels`` (the task's input channels) is checked against the backbone's; ``class_names``
        and ``task_card`` (the task's card as JSON data) go into the adapter's files. The first task
        added becomes the active one. From a task card: :func:`~shared_backbone.adapter_cards.add_task_from_card`.
        """
        if num_classes is not None and not isinstance(num_classes, int):
            raise TypeError(f"add_task takes the task's sizes (num_classes=...), got {num_classes!r}; for a task card "
                            "use shared_backbone.adapter_cards.add_task_from_card(bank, name, spec, card)")
        if num_classes is None:
            raise ValueError("give num_classes (add_task_from_card reads it from a task card)")
        self._check_new_name(name)
        backbone_channels = getattr(self.frozen.backbone, "in_channels", None)
        if in_channels is not None and backbone_channels is not None and in_channels != backbone_channels:
            raise ValueError(f"task {name!r} has {in_channels}-channel inputs, but the backbone takes "
                             f"{backbone_channels} channels")
        adapter = TaskAdapter(self.frozen, spec, num_classes, name=name, task_card=task_card,
                              class_names=class_names, seed=seed)
        self._insert(name, adapter)
        return adapter

    def _check_new_name(self, name: str) -> None:
        check_name(name)
        if name in self:
            raise ValueError(f"task {name!r} is already in the bank; delete_task({name!r}) first or pick another name")

    def _insert(self, name: str, adapter: TaskAdapter) -> None:
        adapter.name = name
        device = next(itertools.chain(self.frozen.backbone.parameters(), self.frozen.backbone.buffers())).device
        self.adapters[f"task:{name}"] = adapter.to(device).train(self.training)
        if self.active is None:
            self.active = name
        self._mixed.forget()

    def set_active(self, name: str) -> None:
        """The task ``bank(x)`` runs when no task is named."""
        self.active = self._resolve_name(name)

    def delete_task(self, name: str) -> None:
        name = self._resolve_name(name)
        del self.adapters[f"task:{name}"]
        if self.active == name:
            self.active = self.task_names[0] if len(self) else None
        self._mixed.forget()

    # PEFT's names for the same verbs
    def add_adapter(self, adapter_name: str, spec: SliceSpec, num_classes: int | None = None, **kw) -> TaskAdapter:
        """PEFT's name for :meth:`add_task`."""
        return self.add_task(adapter_name, spec, num_classes, **kw)

    def set_adapter(self, adapter_name: str) -> None:
        """PEFT's name for :meth:`set_active`."""
        self.set_active(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        """PEFT's name for :meth:`delete_task`."""
        self.delete_task(adapter_name)

    @property
    def active_adapter(self) -> str | None:
        """PEFT's name for :attr:`active`."""
        return self.active

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, task: str | None = None, *,
                tasks: Sequence[str] | torch.Tensor | None = None) -> torch.Tensor:
        """One task's logits ``(N, C_t)``, or with ``tasks`` (one per sample) a mixed batch ``(N, C_max)``."""
        if tasks is not None:
            if task is not None:
                raise ValueError("give either task= (one task for the batch) or tasks= (one per sample), not both")
            return self.forward_mixed(x, tasks)
        return self.adapter(task)(x)[0]

    def task_ids(self, tasks: Sequence[str] | torch.Tensor, n: int) -> torch.Tensor:
        """Each sample's task index into :attr:`task_names`. Shape: ``(N,)`` int64."""
        names = self.task_names
        if not names:
            raise ValueError("the bank has no task; add_task() or load_adapter() first")
        if isinstance(tasks, torch.Tensor):
            ids = tasks.to("cpu", torch.int64).reshape(-1)
            if len(ids) and (ids.min() < 0 or ids.max() >= len(names)):
                raise KeyError(f"task indices must be in [0, {len(names)}) for tasks {names}, got {ids.min()}..{ids.max()}")
        else:
            if isinstance(tasks, str):
                raise TypeError("tasks= takes one task name per sample; for one task use task=")
            index = {t: i for i, t in enumerate(names)}
            unknown = sorted({t for t in tasks if t not in index})
            if unknown:
                raise KeyError(f"mixed batch names unknown task(s) {unknown}; the bank has {names}")
            ids = torch.tensor([index[t] for t in tasks], dtype=torch.int64)
        if len(ids) != n:
            raise ValueError(f"tasks names {len(ids)} samples' tasks, but the batch has {n} samples")
        return ids

    @torch.no_grad()
    def forward_mixed(self, x: torch.Tensor, tasks: Sequence[str] | torch.Tensor) -> torch.Tensor:
        """Serve a batch mixing tasks in one vmapped call (eval mode: each task's running statistics).

        Shape: ``(N, C, H, W) -> (N, C_max)``; entries past a sample's own class count are ``-inf``.
        """
        if x.dim() != 4:
            raise ValueError(f"expected input of shape (N, C, H, W), got {tuple(x.shape)}")
        ids = self.task_ids(tasks, x.shape[0]).to(x.device)
        return self._mixed([cast(TaskAdapter, a) for a in self.adapters.values()], x, ids)

    # -- saving (PEFT's verbs; files and guarantees: shared_backbone.adapters) --------------------
    def save_adapter(self, name: str, directory: str | Path, *, overwrite: bool = False) -> Path:
        """Write ``adapter_config.json`` (the manifest, last) + ``adapter_model.safetensors`` for one task.

        Only these two names are written in ``directory``; another kind of artifact there is refused
        unless ``overwrite``; NaN or infinite weights are refused.
        """
        return save_and_load.save_adapter(self, self._resolve_name(name), directory, overwrite=overwrite)

    def save_pretrained(self, save_directory: str | Path, selected_adapters: Sequence[str] | None = None, *,
                        overwrite: bool = False) -> Path:
        """PEFT's verb: one task as an adapter folder (:meth:`save_adapter`), several as a bank (:meth:`save`)."""
        names = list(selected_adapters) if selected_adapters is not None else self.task_names
        if len(names) == 1:
            return self.save_adapter(names[0], save_directory, overwrite=overwrite)
        return self.save(save_directory, overwrite=overwrite, tasks=names)

    def load_adapter(self, directory: str | Path, name: str | None = None, trainable: bool = False, *,
                     is_trainable: bool | None = None, adapter_name: str | None = None) -> TaskAdapter:
        """Load an adapter saved by :meth:`save_adapter` as task ``name`` (PEFT: ``adapter_name``; default:
        its saved name).

        Checks the manifest (sizes, sha256), the schema (types, bounds), the backbone (architecture and
        fingerprint), the file's header and every tensor's name, shape and dtype before building
        anything. ``trainable`` (PEFT: ``is_trainable``) makes its slice require grad.
        """
        name = adapter_name if adapter_name is not None else name
        trainable = is_trainable if is_trainable is not None else trainable
        return save_and_load.load_adapter(self, directory, name, trainable)

    def save(self, directory: str | Path, *, overwrite: bool = False, tasks: Sequence[str] | None = None) -> Path:
        """The whole bank as one artifact: ``adapter_bank.json`` (the manifest, last), the backbone once,
        one adapter folder per task. Files of unchanged tasks are not rewritten.

        A bank (or ``backbone.json``) on another backbone already there is refused, naming both
        fingerprints, unless ``overwrite``. ``tasks`` saves those tasks only (default: every task).
        """
        return save_and_load.save_bank(self, directory, overwrite=overwrite, tasks=tasks)

    @classmethod
    def load(cls, directory: str | Path, *, trainable: bool = False, is_trainable: bool | None = None
             ) -> "AdapterBank":
        """A bank saved by :meth:`save`, or one adapter folder (its backbone beside it or from its recipe).

        The bank comes back in eval mode, or in train mode with slices requiring grad when ``trainable``
        (PEFT: ``is_trainable``). Every file is checked as :meth:`load_adapter` describes.
        """
        trainable = is_trainable if is_trainable is not None else trainable
        return save_and_load.load_bank(cls, directory, trainable)

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, is_trainable: bool = False) -> "AdapterBank":
        """PEFT's name for :meth:`load`."""
        return cls.load(directory, trainable=is_trainable)

    def extra_repr(self) -> str:
        return f"backbone={self.frozen!r}, tasks={self.task_names}, active={self.active!r}"
