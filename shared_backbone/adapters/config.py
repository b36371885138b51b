"""What an adapter's JSON files say: their names, the bodies written, the typed readers (PEFT's ``config.py``).

``adapter_config.json`` (one task) and ``adapter_bank.json`` (a bank's task list) are read back through
the bounded schemas :class:`~shared_backbone.schema.AdapterConfig` and
:class:`~shared_backbone.schema.BankConfig`; one ``format_version`` policy holds for every file.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from .._version import __version__
from ..frozen import FrozenBackbone
from ..io import read_config
from ..schema import FORMAT_VERSION, AdapterConfig, BankConfig

if TYPE_CHECKING:
    from .task import TaskAdapter

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "BANK_CONFIG", "ADAPTER_FORMAT_VERSION", "AdapterConfig", "BankConfig",
           "adapter_config", "bank_config", "read_adapter_config"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BANK_CONFIG = "adapter_bank.json"
ADAPTER_FORMAT_VERSION = FORMAT_VERSION  # one format_version policy for every file (shared_backbone.schema)


def adapter_config(adapter: "TaskAdapter", frozen: FrozenBackbone) -> dict:
    """The JSON written as ``adapter_config.json`` for one task (before the manifest adds its files)."""
    names = adapter.class_names
    return {
        "format_version": ADAPTER_FORMAT_VERSION, "kind": "adapter", "peft_type": "SHARED_BACKBONE_SLICE",
        "task": adapter.name, "spec": adapter.spec.to_dict(), "spec_repr": repr(adapter.spec),
        "num_classes": adapter.num_classes, "class_names": list(names) if names is not None else None,
        "task_card": adapter.task_card, "learned_parameters": adapter.num_learned(), "seed": adapter.seed,
        "base_model": frozen.config["arch"], "backbone": frozen.config, "library_version": __version__,
    }


def bank_config(tasks: Sequence[str], fingerprint: str, active: str) -> dict:
    """The JSON written as ``adapter_bank.json``: the tasks (folders inside the bank), the active one, the backbone."""
    return {"format_version": FORMAT_VERSION, "kind": "adapter_bank", "tasks": list(tasks), "fingerprint": fingerprint,
            "active": active}


def read_adapter_config(directory: Path) -> AdapterConfig:
    """``adapter_config.json`` checked against its schema (types, bounds, format version)."""
    if not directory.is_dir():
        raise FileNotFoundError(f"no adapter directory at {directory}")
    return AdapterConfig.from_dict(read_config(directory / ADAPTER_CONFIG), str(directory / ADAPTER_CONFIG))
