"""Adapter banks: named tasks over one frozen backbone, each saved on its own as a small adapter.

A task owns a slice (any :class:`~shared_backbone.slices.SliceSpec`; its own classifier head is
always learned), its BatchNorm statistics (every BN layer: a task's inputs differ from every other
task's, so no running statistic is shared) and its task card. The files and verbs follow PEFT,
plus what PEFT lacks: the backbone's recipe and fingerprint, and the BN statistics per task.

=========================================  ==============================================
this library                               PEFT's name (an alias here)
=========================================  ==============================================
``bank.add_task(name, spec, task)``        ``add_adapter(adapter_name, ...)``
``bank.set_active(name)``, ``bank.active``  ``set_adapter(adapter_name)``, ``active_adapter``
``bank.delete_task(name)``                 ``delete_adapter(adapter_name)``
``bank.save_adapter(name, dir)``           ``save_pretrained(dir, selected_adapters=[name])``
``bank.save(dir)``                         ``save_pretrained(dir)`` (several tasks)
``bank.load_adapter(dir, name, trainable)``  ``load_adapter(dir, adapter_name, is_trainable)``
``AdapterBank.load(dir, trainable=...)``   ``AdapterBank.from_pretrained(dir, is_trainable=...)``
=========================================  ==============================================

On disk (each JSON below is its folder's manifest, written last: it lists the other files with
their sizes and sha256, and a loader trusts nothing else; see :mod:`shared_backbone.io`)::

    bank/                              # AdapterBank.save(dir) / AdapterBank.load(dir)
        adapter_bank.json              # the bank's manifest: task names, the active task, fingerprint
        backbone.json                  # the backbone recipe, once (+ backbone.safetensors if trained)
        mnist5k/adapter_config.json    # spec, classes, task card, backbone recipe + fingerprint, version
        mnist5k/adapter_model.safetensors  # "slice/<param>" and "stats/<buffer>" tensors; header: fingerprint
        digits/...

A bank is one artifact (a save commits every task at once; unchanged tasks' files are not
rewritten); every task folder also loads on its own (``AdapterBank.load(bank / "mnist5k")``).

A mixed batch (``bank(x, tasks=[...])``, one task name per sample) runs as one ``vmap`` over the
tasks present: samples are gathered per task into a padded ``(T, n_max, ...)`` batch, the frozen
tensors stay unbatched (one dense conv over all samples), each task's slice, head and statistics
are stacked on the leading axis. Tasks with different specs run on the union of their specs, each
task carrying the frozen values where it learns nothing; heads are zero-padded to the largest
class count and the padded logits are ``-inf``.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from torch.func import vmap

from ._split import merge_param
from .data import TaskCard, load_task
from .ensemble import MemberStack
from .frozen import FingerprintMismatch, FrozenBackbone
from ._adapter_files import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, BANK_CONFIG, _adapter_files, _backbone_for_adapter,
                             _config_bytes, _untrusted_card, adapter_bytes, check_backbone, read_adapter_config)
from .io import (ArtifactConflict, header_shapes, manifest_bytes, read_artifact, read_config, tensors_from_bytes,
                 write_artifact)
from .schema import FORMAT_VERSION, AdapterConfig, BackboneRecipe, BankConfig, check_name, safe_text
from .slices import Head, SliceLayout, SliceSpec, resolve, spec_from_dict

__all__ = ["AdapterBank", "TaskAdapter", "adapter_bytes", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "ADAPTER_FORMAT_VERSION"]

ADAPTER_FORMAT_VERSION = FORMAT_VERSION  # one format_version policy for every file (shared_backbone.schema)


# ------------------------------------------------------------------------------------- heads
def _classifier(backbone: nn.Module) -> tuple[str, nn.Linear]:
    """The head stage's (last) Linear: the module a task replaces with its own classes."""
    found = [(f"stages.head.{n}", m) for n, m in backbone.stages["head"].named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ValueError(f"{getattr(backbone, 'arch', 'this backbone')} has no nn.Linear in its head stage")
    return found[-1]


class _HeadView:
    """The frozen backbone with its classifier resized to ``num_classes`` (every other tensor shared, not copied)."""

    def __init__(self, frozen: FrozenBackbone, num_classes: int, seed: int = 0):
        bb = frozen.backbone
        memo = {id(t): t for t in itertools.chain(bb.parameters(), bb.buffers())}
        view = copy.deepcopy(bb, memo)  # shares every tensor with ``bb``
        name, old = _classifier(view)
        parent, _, child = name.rpartition(".")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None,
                            device=old.weight.device, dtype=old.weight.dtype)
        new.requires_grad_(False)
        setattr(view.get_submodule(parent), child, new)
        view.num_classes = num_classes
        self.backbone, self.fingerprint, self.head = view, frozen.fingerprint, name


def _with_head(spec: SliceSpec, backbone: nn.Module) -> SliceSpec:
    """``spec`` plus ``Head()`` unless it already learns the classifier: a task always owns its head."""
    name, _ = _classifier(backbone)
    return spec if f"{name}.weight" in resolve(spec, backbone) else spec + Head()


# ------------------------------------------------------------------------------------- one task
class TaskAdapter(MemberStack):
    """One task: its slice, head and BN statistics as a one-member stack (trainable with ``train.fit``).

    Every BN layer keeps the task's own statistics (``data="own"``: nothing runs as a shared prefix).
    The slice starts at the frozen values; the head is a fresh ``nn.Linear`` seeded by ``seed``.

    Shape:
        ``adapter(x)``: ``(N, C, H, W) -> (1, N, num_classes)``.
    """

    def __init__(self, frozen: FrozenBackbone, spec: SliceSpec, num_classes: int, *, name: str = "task",
                 card: TaskCard | None = None, seed: int = 0):
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        view = _HeadView(frozen, num_classes, seed)
        spec = _with_head(spec, view.backbone)
        super().__init__(view, resolve(spec, view.backbone), 1, data="own")  # type: ignore[arg-type]
        object.__setattr__(self, "_view", view)
        self.name, self.spec, self.card, self.num_classes, self.seed = name, spec, card, num_classes, seed

    def full_parameters(self) -> dict[str, torch.Tensor]:
        """Every parameter the task uses (frozen part merged with its slice), by backbone name."""
        learned = self.slice_of(0)
        return {n: merge_param(p, learned[n].detach(), self.layout[n]) if n in learned else p
                for n, p in self._view.backbone.named_parameters()}

    def num_learned(self) -> int:
        return sum(p[0].numel() for p in self.slices.values())

    def config(self, frozen: FrozenBackbone) -> dict:
        """The JSON written as ``adapter_config.json``."""
        from . import __version__

        return {
            "format_version": ADAPTER_FORMAT_VERSION, "kind": "adapter", "peft_type": "SHARED_BACKBONE_SLICE",
            "task": self.name, "spec": self.spec.to_dict(), "spec_repr": repr(self.spec),
            "num_classes": self.num_classes, "class_names": list(self.card.class_names) if self.card else None,
            "task_card": _card_dict(self.card), "learned_parameters": self.num_learned(), "seed": self.seed,
            "base_model": frozen.recipe["arch"], "backbone": frozen.recipe, "library_version": __version__,
        }

    def extra_repr(self) -> str:
        return f"name={self.name!r}, spec={self.spec!r}, num_classes={self.num_classes}, learned={self.num_learned():,}"


def _card_dict(card: TaskCard | None) -> dict | None:
    return None if card is None else {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(card).items()}


# ------------------------------------------------------------------------------------- the bank
class AdapterBank(nn.Module):
    """Named tasks over one frozen backbone (PEFT's verbs, one small adapter file per task).

    >>> bank = AdapterBank(frozen)
    >>> bank.add_task("digits", Blocks("block2") + Head(), "digits")
    >>> fit(bank.adapter("digits"), train, test, config)    # train.fit trains one task
    >>> bank.save_adapter("digits", "adapters/digits")
    >>> bank(x, task="digits")                              # (N, 10)
    >>> bank(x, tasks=["digits", "mnist5k", ...])           # (N, C_max), one vmapped call

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
        self._mixed: tuple | None = None

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
        name = self._resolve_name(name)
        return self.adapters[f"task:{name}"]  # type: ignore[return-value]

    def _resolve_name(self, name: str | None) -> str:
        if name is None:
            if self.active is None:
                raise ValueError(f"no task given and no active task; set_active() one of {self.task_names}")
            return self.active
        if name not in self:
            raise KeyError(f"task {name!r} is not in the bank; tasks: {self.task_names}")
        return name

    def add_task(self, name: str, spec: SliceSpec, task: TaskCard | str | None = None, *,
                 num_classes: int | None = None, seed: int = 0) -> TaskAdapter:
        """Add task ``name`` learning ``spec`` (plus its own head) for ``task`` (a card, a card name or path).

        Without a card give ``num_classes``. The first task added becomes the active one.
        """
        self._check_new_name(name)
        card = load_task(task) if isinstance(task, (str, Path)) else task
        if card is not None and not isinstance(card, TaskCard):
            raise TypeError(f"task must be a TaskCard, a card name or a path, got {type(card).__name__}")
        if card is not None:
            if num_classes is not None and num_classes != card.num_classes:
                raise ValueError(f"num_classes={num_classes} but task card {card.name!r} has {card.num_classes} classes")
            num_classes = card.num_classes
            in_ch = getattr(self.frozen.backbone, "in_channels", None)
            if in_ch is not None and card.input_shape[0] != in_ch:
                raise ValueError(
                    f"task card {card.name!r} has {card.input_shape[0]}-channel inputs {card.input_shape}, "
                    f"but the backbone takes {in_ch} channels"
                )
        if num_classes is None:
            raise ValueError("give a task card or num_classes")
        adapter = TaskAdapter(self.frozen, spec, num_classes, name=name, card=card, seed=seed)
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
        self._mixed = None

    def set_active(self, name: str) -> None:
        """The task ``bank(x)`` runs when no task is named."""
        self.active = self._resolve_name(name)

    def delete_task(self, name: str) -> None:
        name = self._resolve_name(name)
        del self.adapters[f"task:{name}"]
        if self.active == name:
            self.active = self.task_names[0] if len(self) else None
        self._mixed = None

    # PEFT's names for the same verbs
    def add_adapter(self, adapter_name: str, spec: SliceSpec, task: TaskCard | str | None = None, **kw) -> TaskAdapter:
        """PEFT's name for :meth:`add_task`."""
        return self.add_task(adapter_name, spec, task, **kw)

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
        stack, widths = self._mixed_stack(x.device)
        stack.check_input(x)
        x = stack.prefix(x)  # the stages no task owns, once over the whole batch (none when prefixes differ)
        present = torch.unique(ids)  # sorted task indices in this batch
        local = torch.full((len(self),), -1, dtype=torch.int64, device=x.device)
        local[present] = torch.arange(len(present), device=x.device)
        lid = local[ids]  # (N,) index among the present tasks
        counts = torch.bincount(lid, minlength=len(present))
        order = torch.argsort(lid, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(lid)
        rank[order] = torch.arange(len(lid), device=x.device) - starts[lid[order]]  # position within its task
        h = x.new_zeros((len(present), int(counts.max()), *x.shape[1:]))  # (T, n_max, C, H, W)
        h[lid, rank] = x
        out = _members_forward(stack, present, h)  # (T, n_max, C_max)
        logits = out[lid, rank]  # (N, C_max)
        pad = torch.arange(logits.shape[1], device=x.device)[None, :] >= widths.to(x.device)[ids][:, None]
        return logits.masked_fill(pad, float("-inf"))

    def _mixed_stack(self, device: torch.device) -> tuple[MemberStack, torch.Tensor]:
        """Every task stacked on one leading axis over the union of their specs (cached until a task changes)."""
        adapters: list[TaskAdapter] = list(self.adapters.values())  # type: ignore[assignment]
        if not adapters:
            raise ValueError("the bank has no task; add_task() or load_adapter() first")
        key = (str(device), tuple((id(a), tuple(t._version for t in itertools.chain(a.parameters(), a.buffers())))
                                  for a in adapters))
        if self._mixed is not None and self._mixed[0] == key:
            return self._mixed[1], self._mixed[2]
        c_max = max(a.num_classes for a in adapters)
        view = _HeadView(self.frozen, c_max)
        spec = adapters[0].spec
        for a in adapters[1:]:
            spec = spec + a.spec
        try:
            layout = resolve(spec, view.backbone)
        except ValueError as err:
            raise ValueError(f"these tasks' slices cannot run in one mixed batch: {err}") from err
        # the leading stages no task learns run once for the whole batch when every task normalises
        # them with the same statistics (tasks keep their own; after training on their own data they differ)
        stack = MemberStack(view, layout, len(adapters), data="shared")  # type: ignore[arg-type]
        prefix_stats = stack.shared_stats.as_dict()
        stats = [a.stats_of(0) for a in adapters]
        if any(not torch.equal(st[n], t) for st in stats for n, t in prefix_stats.items()):
            stack = MemberStack(view, layout, len(adapters), data="own")  # type: ignore[arg-type]
        for i, a in enumerate(adapters):
            stack.set_member(i, _union_slice(a, layout, view, c_max), a.stats_of(0))
        stack = stack.to(device).eval()
        widths = torch.tensor([a.num_classes for a in adapters])
        self._mixed = (key, stack, widths)
        return stack, widths

    # -- saving (PEFT's verbs; see the module docstring for the files and guarantees) --------------
    def save_adapter(self, name: str, directory: str | Path, *, overwrite: bool = False) -> Path:
        """Write ``adapter_config.json`` (the manifest, last) + ``adapter_model.safetensors`` for one task.

        Only these two names are written in ``directory``; another kind of artifact there is refused
        unless ``overwrite``; NaN or infinite weights are refused.
        """
        a = self.adapter(self._resolve_name(name))
        config, weights = _adapter_files(a, self.frozen)
        write_artifact(directory, ADAPTER_CONFIG, config, {ADAPTER_WEIGHTS: weights}, overwrite=overwrite)
        return Path(directory)

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
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"no adapter directory at {directory}")
        name = adapter_name if adapter_name is not None else name
        trainable = is_trainable if is_trainable is not None else trainable
        config, files = read_artifact(directory, ADAPTER_CONFIG, AdapterConfig.from_dict)
        if ADAPTER_WEIGHTS not in files or len(files) != 1:
            raise ValueError(f"{directory / ADAPTER_CONFIG} must list exactly {ADAPTER_WEIGHTS}, lists "
                             f"{sorted(files)[:4]}")
        return self._load_checked(directory, config, files[ADAPTER_WEIGHTS], name, trainable)

    def _load_checked(self, directory: Path, config: AdapterConfig, weights: bytes, name: str | None,
                      trainable: bool) -> TaskAdapter:
        where = str(directory / ADAPTER_WEIGHTS)
        check_backbone(self.frozen, config.backbone, what=f"the adapter in {directory}")
        name = config.task if name is None else name
        self._check_new_name(name)
        card = _untrusted_card(config.task_card, str(directory / ADAPTER_CONFIG)) if config.task_card else None
        try:
            spec = spec_from_dict(config.spec)
        except (TypeError, KeyError, ValueError) as err:
            raise ValueError(f"{directory / ADAPTER_CONFIG} has an unreadable spec: {safe_text(err, 200)}") from None
        head, linear = _classifier(self.frozen.backbone)
        shapes = header_shapes(weights, where)
        got = shapes.get(f"slice/{head}.weight", (None,))[0]
        if got != (config.num_classes, linear.in_features):  # before a head of num_classes rows is built
            raise ValueError(f"{where}: the head {head}.weight has shape {got}, but the config says "
                             f"num_classes={config.num_classes} ({(config.num_classes, linear.in_features)})")
        adapter = TaskAdapter(self.frozen, spec, config.num_classes, name=name, card=card, seed=config.seed)
        expect = {f"slice/{n}": (t.shape, t.dtype) for n, t in adapter.slice_of(0).items()}
        expect.update({f"stats/{n}": (t.shape, t.dtype) for n, t in adapter.stats_of(0).items()})
        tensors, header = tensors_from_bytes(weights, where, expect)
        self.frozen.check_fingerprint(header.get("fingerprint", "<none>"), what=where)
        with torch.no_grad():
            adapter.set_member(0, {n[6:]: t for n, t in tensors.items() if n.startswith("slice/")},
                               {n[6:]: t for n, t in tensors.items() if n.startswith("stats/")})
        for p in adapter.parameters():
            p.requires_grad_(trainable)
        self._insert(name, adapter)
        adapter.train(trainable and self.training)  # a frozen adapter serves in eval mode
        return adapter

    def save(self, directory: str | Path, *, overwrite: bool = False, tasks: Sequence[str] | None = None) -> Path:
        """The whole bank as one artifact: ``adapter_bank.json`` (the manifest, last), the backbone once,
        one adapter folder per task. Files of unchanged tasks are not rewritten.

        A bank (or ``backbone.json``) on another backbone already there is refused, naming both
        fingerprints, unless ``overwrite``. ``tasks`` saves those tasks only (default: every task).
        """
        from .saving import backbone_files

        names = [self._resolve_name(t) for t in tasks] if tasks is not None else self.task_names
        if not names:
            raise ValueError("the bank has no task to save; add_task() first")

        directory = Path(directory)
        fp = self.frozen.fingerprint
        there = directory / "backbone.json"
        if there.is_file() and not overwrite and not (directory / BANK_CONFIG).is_file():
            theirs = read_config(there).get("fingerprint")
            if theirs != fp:
                raise ArtifactConflict(f"{there} is backbone fingerprint {safe_text(theirs)!r}, this bank's is "
                                       f"{fp!r}; the adapters beside it would no longer load; save elsewhere "
                                       "or pass overwrite=True")
        bb = backbone_files(self.frozen)
        files = {"backbone.json": manifest_bytes({**self.frozen.recipe, "kind": "backbone"}, bb), **bb}
        for name in names:
            config, weights = _adapter_files(self.adapter(name), self.frozen)
            files[f"{name}/{ADAPTER_CONFIG}"] = manifest_bytes(config, {ADAPTER_WEIGHTS: weights})
            files[f"{name}/{ADAPTER_WEIGHTS}"] = weights
        write_artifact(directory, BANK_CONFIG, {"format_version": FORMAT_VERSION, "kind": "adapter_bank",
                                                "tasks": names, "fingerprint": fp,
                                                "active": self.active if self.active in names else names[0]},
                       files, overwrite=overwrite, same_fingerprint=True)
        return directory

    @classmethod
    def load(cls, directory: str | Path, *, trainable: bool = False, is_trainable: bool | None = None
             ) -> "AdapterBank":
        """A bank saved by :meth:`save`, or one adapter folder (its backbone beside it or from its recipe).

        The bank comes back in eval mode, or in train mode with slices requiring grad when ``trainable``
        (PEFT: ``is_trainable``). Every file is checked as :meth:`load_adapter` describes.
        """
        directory = Path(directory)
        trainable = is_trainable if is_trainable is not None else trainable
        if (directory / ADAPTER_CONFIG).is_file():
            bank = cls(_backbone_for_adapter(directory))
            bank.load_adapter(directory, trainable=trainable)
            return bank.train(trainable)
        if not (directory / BANK_CONFIG).is_file():
            raise FileNotFoundError(f"no adapter bank at {directory} ({BANK_CONFIG} or {ADAPTER_CONFIG} missing)")
        from .saving import _frozen_from

        meta, files = read_artifact(directory, BANK_CONFIG, BankConfig.from_dict)
        if "backbone.json" not in files:
            raise ValueError(f"{directory / BANK_CONFIG} lists no backbone.json")
        recipe = _config_bytes(files["backbone.json"], directory / "backbone.json")
        frozen = _frozen_from(BackboneRecipe.from_dict(recipe, str(directory / "backbone.json")), recipe, files,
                              directory / "backbone.json")
        if frozen.fingerprint != meta.fingerprint:
            raise FingerprintMismatch(f"{directory / BANK_CONFIG} is for backbone {meta.fingerprint!r}, its "
                                      f"backbone.json is {frozen.fingerprint!r}")
        bank = cls(frozen)
        for name in meta.tasks:  # names checked by the schema: plain folder names inside the bank
            cfg_file, w_file = f"{name}/{ADAPTER_CONFIG}", f"{name}/{ADAPTER_WEIGHTS}"
            if cfg_file not in files or w_file not in files:
                raise ValueError(f"{directory / BANK_CONFIG} lists task {name!r} but not its files")
            where = directory / cfg_file
            config = AdapterConfig.from_dict(_config_bytes(files[cfg_file], where), str(where))
            entry = config.files.get(ADAPTER_WEIGHTS)
            if entry is None or entry.sha256 != hashlib.sha256(files[w_file]).hexdigest():
                raise ValueError(f"{where} does not describe {directory / w_file}")
            bank._load_checked(directory / name, config, files[w_file], name, trainable)
        if meta.active is not None:
            bank.set_active(meta.active)
        return bank.train(trainable)

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, is_trainable: bool = False) -> "AdapterBank":
        """PEFT's name for :meth:`load`."""
        return cls.load(directory, trainable=is_trainable)

    def extra_repr(self) -> str:
        return f"backbone={self.frozen!r}, tasks={self.task_names}, active={self.active!r}"


# ------------------------------------------------------------------------------------- helpers
@torch.no_grad()
def _union_slice(a: TaskAdapter, layout: SliceLayout, view: _HeadView, c_max: int) -> dict[str, torch.Tensor]:
    """Task ``a``'s tensors for the union ``layout``: its own where it learns, frozen values elsewhere."""
    full = a.full_parameters()
    frozen = dict(view.backbone.named_parameters())
    out = {}
    for n, sl in layout.items():
        t = full[n]
        if n.startswith(view.head + "."):  # (C_t, d) -> (C_max, d), zero rows
            t = torch.cat([t, t.new_zeros((c_max - t.shape[0], *t.shape[1:]))])
        if sl.whole:
            out[n] = t
            continue
        rest = t.narrow(sl.dim, sl.n, t.shape[sl.dim] - sl.n)
        expect = frozen[n].narrow(sl.dim, sl.n, t.shape[sl.dim] - sl.n)
        if sl.fixed == "zero":
            expect = torch.zeros_like(expect)
        if not torch.equal(rest, expect):
            raise ValueError(f"task {a.name!r} ({a.spec!r}) cannot share one mixed batch with the other tasks: "
                             f"{n} would lose its own values beyond the union's first {sl.n} rows")
        out[n] = t.narrow(sl.dim, 0, sl.n)
    return out


def _members_forward(stack: MemberStack, idx: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Members ``idx`` of ``stack`` on their own inputs, one vmapped call. Shape: ``(T, n, ...) -> (T, n, C)``."""
    if len(idx) == stack.members:
        return stack.forward_members(h, per_member=True, vectorized=True)
    slices = {n: p[idx] for n, p in stack.slices.items()}
    stats = {n: b[idx] for n, b in stack.member_stats.as_dict().items()}
    return stack.forward_members(h, per_member=True, vectorized=True, slices=slices, stats=stats)
