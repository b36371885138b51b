"""One task: its slice, its own head and its BatchNorm statistics over the shared frozen backbone (PEFT's ``layer.py``)."""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from .._template import merge_param
from ..ensemble import MemberStack
from ..frozen import FrozenBackbone
from ..slices import Head, SliceSpec, resolve
from .config import adapter_config

__all__ = ["TaskAdapter", "HeadView", "classifier", "with_head"]


def classifier(backbone: nn.Module) -> tuple[str, nn.Linear]:
    """The head stage's (last) Linear, by parameter-name prefix: the module a task replaces with its own classes."""
    found = [(f"stages.head.{n}", m) for n, m in backbone.stages["head"].named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ValueError(f"{getattr(backbone, 'arch', 'this backbone')} has no nn.Linear in its head stage")
    return found[-1]


@dataclass(frozen=True)
class HeadView:
    """The frozen backbone with its classifier resized to ``num_classes``: every other tensor shared, not copied.

    What a task's stack is built on (a :class:`~shared_backbone.ensemble.FrozenSource`): ``fingerprint`` is
    the frozen backbone's own, ``head`` the name of the resized classifier.
    """

    backbone: nn.Module
    fingerprint: str
    head: str

    @classmethod
    def of(cls, frozen: FrozenBackbone, num_classes: int, seed: int = 0) -> "HeadView":
        """A view of ``frozen`` whose classifier is a fresh ``nn.Linear`` of ``num_classes`` rows, seeded by ``seed``."""
        bb = frozen.backbone
        memo = {id(t): t for t in itertools.chain(bb.parameters(), bb.buffers())}
        view = copy.deepcopy(bb, memo)  # shares every tensor with ``bb``
        name, old = classifier(view)
        parent, _, child = name.rpartition(".")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None,
                            device=old.weight.device, dtype=old.weight.dtype)
        new.requires_grad_(False)
        setattr(view.get_submodule(parent), child, new)
        view.num_classes = num_classes
        return cls(backbone=view, fingerprint=frozen.fingerprint, head=name)


def with_head(spec: SliceSpec, backbone: nn.Module) -> SliceSpec:
    """``spec`` plus ``Head()`` unless it already learns the classifier: a task always owns its head."""
    name, _ = classifier(backbone)
    return spec if f"{name}.weight" in resolve(spec, backbone) else spec + Head()


class TaskAdapter(MemberStack):
    """One task: its slice, head and BN statistics as a one-member stack (trainable with ``train.fit``).

    Every BN layer keeps the task's own statistics (``data="own"``: nothing runs as a shared prefix).
    The slice starts at the frozen values; the head is a fresh ``nn.Linear`` seeded by ``seed``.
    ``task_card`` (the task's card as JSON data) and ``class_names`` are carried into the adapter's
    files; model code never reads them (:mod:`shared_backbone.adapter_cards` turns them back into a card).

    Shape:
        ``adapter(x)``: ``(N, C, H, W) -> (1, N, num_classes)``.
    """

    def __init__(self, frozen: FrozenBackbone, spec: SliceSpec, num_classes: int, *, name: str = "task",
                 task_card: dict | None = None, class_names: Sequence[str] | None = None, seed: int = 0):
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names names {len(class_names)} classes, but num_classes={num_classes}")
        if task_card is not None and not isinstance(task_card, dict):
            raise TypeError(f"task_card must be a JSON object (dict) or None, got {type(task_card).__name__}")
        view = HeadView.of(frozen, num_classes, seed)
        spec = with_head(spec, view.backbone)
        super().__init__(view, resolve(spec, view.backbone), 1, data="own")
        object.__setattr__(self, "_view", view)
        self.name, self.spec, self.num_classes, self.seed = name, spec, num_classes, seed
        self.task_card = copy.deepcopy(task_card)
        self.class_names = None if class_names is None else tuple(class_names)

    def full_parameters(self) -> dict[str, torch.Tensor]:
        """Every parameter the task uses (frozen part merged with its slice), by backbone name."""
        learned = self.slice_of(0)
        return {n: merge_param(p, learned[n].detach(), self.layout[n]) if n in learned else p
                for n, p in self._view.backbone.named_parameters()}

    def num_learned(self) -> int:
        return sum(p[0].numel() for p in self.slices.values())

    def config(self, frozen: FrozenBackbone) -> dict:
        """The JSON written as ``adapter_config.json``."""
        return adapter_config(self, frozen)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, spec={self.spec!r}, num_classes={self.num_classes}, learned={self.num_learned():,}"
