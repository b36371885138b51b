"""The files of one adapter: what ``AdapterBank`` writes and how it reads them back as untrusted data."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .data import TaskCard, load_task
from .frozen import FingerprintMismatch, FrozenBackbone
from .io import _parse_json, read_config, tensors_to_bytes
from .schema import FORMAT_VERSION, NAME_RE, AdapterConfig, BackboneRecipe, check_name, safe_text

if TYPE_CHECKING:
    from .adapters import TaskAdapter

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "BANK_CONFIG", "read_adapter_config", "check_backbone", "adapter_bytes"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BANK_CONFIG = "adapter_bank.json"


def _adapter_files(a: "TaskAdapter", frozen: FrozenBackbone) -> tuple[dict, bytes]:
    """(``adapter_config.json`` body, ``adapter_model.safetensors`` bytes) of one task."""
    check_name(a.name)
    tensors = {f"slice/{n}": t for n, t in a.slice_of(0).items()}
    tensors.update({f"stats/{n}": t for n, t in a.stats_of(0).items()})
    weights = tensors_to_bytes(tensors, {"fingerprint": frozen.fingerprint, "task": a.name, "spec": repr(a.spec),
                                         "num_classes": a.num_classes, "format_version": FORMAT_VERSION},
                               finite=f"task {a.name!r}")
    return a.config(frozen), weights


def _config_bytes(raw: bytes, where: Path) -> dict:
    obj = _parse_json(raw, str(where))
    if not isinstance(obj, dict):
        raise ValueError(f"{where} must hold a JSON object, got a {type(obj).__name__}")
    return obj


def read_adapter_config(directory: Path) -> AdapterConfig:
    """``adapter_config.json`` checked against its schema (types, bounds, format version)."""
    if not directory.is_dir():
        raise FileNotFoundError(f"no adapter directory at {directory}")
    return AdapterConfig.from_dict(read_config(directory / ADAPTER_CONFIG), str(directory / ADAPTER_CONFIG))


def _untrusted_card(d: dict, origin: str) -> TaskCard:
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


def check_backbone(frozen: FrozenBackbone, recipe: BackboneRecipe | dict, what: str) -> None:
    """Raise :class:`FingerprintMismatch` naming the difference if ``recipe`` is not ``frozen``'s."""
    if isinstance(recipe, dict):
        recipe = BackboneRecipe.from_dict(recipe, what)
    mine = frozen.recipe
    if (recipe.arch, recipe.config) != (mine["arch"], mine["config"]):
        raise FingerprintMismatch(
            f"{what} was made for another architecture: {recipe.arch} {recipe.config}, but this bank's "
            f"backbone is {mine['arch']} {mine['config']}"
        )
    frozen.check_fingerprint(recipe.fingerprint, what=what)


def _backbone_for_adapter(directory: Path) -> FrozenBackbone:
    from .saving import load_backbone

    for d in (directory, directory.parent):
        if (d / "backbone.json").is_file():
            return load_backbone(d)
    return FrozenBackbone.from_recipe(read_config(directory / ADAPTER_CONFIG)["backbone"])


def adapter_bytes(directory: str | Path) -> int:
    """Bytes of one adapter on disk (config + safetensors)."""
    directory = Path(directory)
    return sum(f.stat().st_size for f in (directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS) if f.is_file())

