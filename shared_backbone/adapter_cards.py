"""Task cards for adapter banks: add a task from its card, read a saved adapter's card back as untrusted data.

The model code (:mod:`shared_backbone.adapters`) takes a task's sizes and keeps its card as plain JSON
data; this module, above both the adapters and the data layer, is where cards are resolved:

>>> adapter = add_task_from_card(bank, "digits", Blocks("block2") + Head(), "digits")  # card name, path or TaskCard
>>> card = card_of(bank.adapter("digits"))  # a TaskCard again (locations checked), or None
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from .adapters import AdapterBank, TaskAdapter
from .data import TaskCard, load_task
from .schema import NAME_RE, safe_text
from .slices import SliceSpec

__all__ = ["add_task_from_card", "card_of", "card_dict"]


def card_dict(card: TaskCard) -> dict:
    """``card`` as the JSON object an adapter's files carry (tuples as lists)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(card).items()}


def add_task_from_card(bank: AdapterBank, name: str, spec: SliceSpec, task: TaskCard | str | Path, *,
                       num_classes: int | None = None, seed: int = 0) -> TaskAdapter:
    """:meth:`AdapterBank.add_task` with the sizes (classes, input channels) and class names of a task card.

    ``task`` is a :class:`TaskCard`, a card name (``tasks/``) or a card's path; ``num_classes``, if
    given, must agree with the card.
    """
    card = load_task(task) if isinstance(task, (str, Path)) else task
    if not isinstance(card, TaskCard):
        raise TypeError(f"task must be a TaskCard, a card name or a path, got {type(card).__name__}")
    if num_classes is not None and num_classes != card.num_classes:
        raise ValueError(f"num_classes={num_classes} but task card {card.name!r} has {card.num_classes} classes")
    in_ch = getattr(bank.frozen.backbone, "in_channels", None)
    if in_ch is not None and card.input_shape[0] != in_ch:
        raise ValueError(f"task card {card.name!r} has {card.input_shape[0]}-channel inputs {card.input_shape}, "
                         f"but the backbone takes {in_ch} channels")
    return bank.add_task(name, spec, card.num_classes, in_channels=card.input_shape[0], class_names=card.class_names,
                         task_card=card_dict(card), seed=seed)


def card_of(adapter: TaskAdapter) -> TaskCard | None:
    """The task card ``adapter`` carries (``None`` without one), read as untrusted data (:func:`untrusted_card`)."""
    if not adapter.task_card:
        return None
    return untrusted_card(adapter.task_card, f"task {safe_text(adapter.name)!r}'s adapter config")


def untrusted_card(d: dict, origin: str) -> TaskCard:
    """A task card read from an adapter file: data, never a pointer to arbitrary files.

    Its data location (``local_dir``, ``hub_id``, ``local_package``) is kept only when it is the
    location of the known card of the same name (``tasks/``); otherwise it is cleared, so evaluation
    needs the data from a path the user passes. Its file names must be plain names.
    """
    try:
        card = TaskCard.from_dict(dict(d), origin=origin)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{origin}: unreadable task card: {safe_text(err, 200)}") from None
    for split, names in card.local_files.items():
        if not all(isinstance(n, str) and n and "/" not in n and "\\" not in n and n not in (".", "..")
                   for n in names):
            raise ValueError(f"{origin}: task card file names for split {safe_text(split)!r} must be plain "
                             f"file names, got {[safe_text(n) for n in names]}")
    try:
        known = load_task(card.name) if NAME_RE.match(card.name) else None
    except (OSError, ValueError):
        known = None
    where = ("local_dir", "hub_id", "local_package", "hub_config")
    if known is not None and all(getattr(known, f) == getattr(card, f) for f in where):
        return card
    for f in where:
        setattr(card, f, "")
    return card
