"""An adapter's and a bank's files: what ``AdapterBank`` writes and how it reads them back as untrusted data
(PEFT's ``utils/save_and_load.py``). The bank's verbs (``save_adapter``, ``load_adapter``, ``save``, ``load``)
call these functions; the layout on disk is drawn in :mod:`shared_backbone.adapters`.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from ..frozen import FingerprintMismatch, FrozenBackbone
from ..io import (ArtifactConflict, _parse_json, header_shapes, manifest_bytes, read_artifact, read_config,
                  tensors_from_bytes, tensors_to_bytes, write_artifact)
from ..saving import _frozen_from, backbone_files, load_backbone
from ..schema import FORMAT_VERSION, AdapterConfig, BackboneConfig, BankConfig, check_name, safe_text
from ..slices import spec_from_dict
from .config import ADAPTER_CONFIG, ADAPTER_WEIGHTS, BANK_CONFIG, bank_config
from .task import TaskAdapter, classifier

if TYPE_CHECKING:
    from .bank import AdapterBank

__all__ = ["adapter_files", "check_backbone", "adapter_bytes", "save_adapter", "load_adapter", "save_bank",
           "load_bank"]


# ------------------------------------------------------------------------------------- files
def adapter_files(a: TaskAdapter, frozen: FrozenBackbone) -> tuple[dict, bytes]:
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


def check_backbone(frozen: FrozenBackbone, recipe: BackboneConfig | dict, what: str) -> None:
    """Raise :class:`FingerprintMismatch` naming the difference if ``recipe`` is not ``frozen``'s."""
    if isinstance(recipe, dict):
        recipe = BackboneConfig.from_dict(recipe, what)
    mine = frozen.config
    if (recipe.arch, recipe.config) != (mine["arch"], mine["config"]):
        raise FingerprintMismatch(
            f"{what} was made for another architecture: {recipe.arch} {recipe.config}, but this bank's "
            f"backbone is {mine['arch']} {mine['config']}"
        )
    frozen.check_fingerprint(recipe.fingerprint, what=what)


def _backbone_for_adapter(directory: Path) -> FrozenBackbone:
    for d in (directory, directory.parent):
        if (d / "backbone.json").is_file():
            return load_backbone(d)
    return FrozenBackbone.from_config(read_config(directory / ADAPTER_CONFIG)["backbone"])


def adapter_bytes(directory: str | Path) -> int:
    """Bytes of one adapter on disk (config + safetensors)."""
    directory = Path(directory)
    return sum(f.stat().st_size for f in (directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS) if f.is_file())


# ------------------------------------------------------------------------------------- one adapter
def save_adapter(bank: "AdapterBank", name: str, directory: str | Path, *, overwrite: bool = False) -> Path:
    """Write task ``name`` of ``bank`` as ``adapter_config.json`` (the manifest, last) + its safetensors."""
    config, weights = adapter_files(bank.adapter(name), bank.frozen)
    write_artifact(directory, ADAPTER_CONFIG, config, {ADAPTER_WEIGHTS: weights}, overwrite=overwrite)
    return Path(directory)


def load_adapter(bank: "AdapterBank", directory: str | Path, name: str | None, trainable: bool) -> TaskAdapter:
    """Read an adapter folder's manifest and weights, then :func:`load_checked` them into ``bank``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no adapter directory at {directory}")
    config, files = read_artifact(directory, ADAPTER_CONFIG, AdapterConfig.from_dict)
    if ADAPTER_WEIGHTS not in files or len(files) != 1:
        raise ValueError(f"{directory / ADAPTER_CONFIG} must list exactly {ADAPTER_WEIGHTS}, lists "
                         f"{sorted(files)[:4]}")
    return load_checked(bank, directory, config, files[ADAPTER_WEIGHTS], name, trainable)


def load_checked(bank: "AdapterBank", directory: Path, config: AdapterConfig, weights: bytes, name: str | None,
                 trainable: bool) -> TaskAdapter:
    """Task ``name`` (default: its saved name) from a checked config and its weights' bytes, added to ``bank``.

    Checks the backbone (architecture and fingerprint), the spec, the head's shape before building it,
    then every tensor's name, shape and dtype. The task card stays JSON data.
    """
    where = str(directory / ADAPTER_WEIGHTS)
    check_backbone(bank.frozen, config.backbone, what=f"the adapter in {directory}")
    name = config.task if name is None else name
    bank._check_new_name(name)
    try:
        spec = spec_from_dict(config.spec)
    except (TypeError, KeyError, ValueError) as err:
        raise ValueError(f"{directory / ADAPTER_CONFIG} has an unreadable spec: {safe_text(err, 200)}") from None
    head, linear = classifier(bank.frozen.backbone)
    got = header_shapes(weights, where).get(f"slice/{head}.weight", (None,))[0]
    if got != (config.num_classes, linear.in_features):  # before a head of num_classes rows is built
        raise ValueError(f"{where}: the head {head}.weight has shape {got}, but the config says "
                         f"num_classes={config.num_classes} ({(config.num_classes, linear.in_features)})")
    adapter = TaskAdapter(bank.frozen, spec, config.num_classes, name=name, task_card=config.task_card,
                          class_names=config.class_names, seed=config.seed)
    expect = {f"slice/{n}": (t.shape, t.dtype) for n, t in adapter.slice_of(0).items()}
    expect.update({f"stats/{n}": (t.shape, t.dtype) for n, t in adapter.stats_of(0).items()})
    tensors, header = tensors_from_bytes(weights, where, expect)
    bank.frozen.check_fingerprint(header.get("fingerprint", "<none>"), what=where)
    with torch.no_grad():
        adapter.set_member(0, {n[6:]: t for n, t in tensors.items() if n.startswith("slice/")},
                           {n[6:]: t for n, t in tensors.items() if n.startswith("stats/")})
    for p in adapter.parameters():
        p.requires_grad_(trainable)
    bank._insert(name, adapter)
    adapter.train(trainable and bank.training)  # a frozen adapter serves in eval mode
    return adapter


# ------------------------------------------------------------------------------------- a bank
def save_bank(bank: "AdapterBank", directory: str | Path, *, overwrite: bool = False,
              tasks: Sequence[str] | None = None) -> Path:
    """``adapter_bank.json`` (the manifest, last), the backbone once, one adapter folder per task."""
    names = [bank._resolve_name(t) for t in tasks] if tasks is not None else bank.task_names
    if not names:
        raise ValueError("the bank has no task to save; add_task() first")
    directory = Path(directory)
    fp = bank.frozen.fingerprint
    there = directory / "backbone.json"
    if there.is_file() and not overwrite and not (directory / BANK_CONFIG).is_file():
        theirs = read_config(there).get("fingerprint")
        if theirs != fp:
            raise ArtifactConflict(f"{there} is backbone fingerprint {safe_text(theirs)!r}, this bank's is "
                                   f"{fp!r}; the adapters beside it would no longer load; save elsewhere "
                                   "or pass overwrite=True")
    bb = backbone_files(bank.frozen)
    files = {"backbone.json": manifest_bytes({**bank.frozen.config, "kind": "backbone"}, bb), **bb}
    for name in names:
        config, weights = adapter_files(bank.adapter(name), bank.frozen)
        files[f"{name}/{ADAPTER_CONFIG}"] = manifest_bytes(config, {ADAPTER_WEIGHTS: weights})
        files[f"{name}/{ADAPTER_WEIGHTS}"] = weights
    active = bank.active if bank.active in names else names[0]
    write_artifact(directory, BANK_CONFIG, bank_config(names, fp, active), files, overwrite=overwrite,
                   same_fingerprint=True)
    return directory


def load_bank(cls: type["AdapterBank"], directory: str | Path, trainable: bool) -> "AdapterBank":
    """A bank saved by :func:`save_bank`, or one adapter folder (its backbone beside it or from its recipe)."""
    directory = Path(directory)
    if (directory / ADAPTER_CONFIG).is_file():
        bank = cls(_backbone_for_adapter(directory))
        bank.load_adapter(directory, trainable=trainable)
        return bank.train(trainable)
    if not (directory / BANK_CONFIG).is_file():
        raise FileNotFoundError(f"no adapter bank at {directory} ({BANK_CONFIG} or {ADAPTER_CONFIG} missing)")
    meta, files = read_artifact(directory, BANK_CONFIG, BankConfig.from_dict)
    if "backbone.json" not in files:
        raise ValueError(f"{directory / BANK_CONFIG} lists no backbone.json")
    recipe = _config_bytes(files["backbone.json"], directory / "backbone.json")
    frozen = _frozen_from(BackboneConfig.from_dict(recipe, str(directory / "backbone.json")), recipe, files,
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
        load_checked(bank, directory / name, config, files[w_file], name, trainable)
    if meta.active is not None:
        bank.set_active(meta.active)
    return bank.train(trainable)
