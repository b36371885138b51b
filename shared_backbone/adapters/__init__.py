"""Adapter banks: named tasks over one frozen backbone, each saved on its own as a small adapter.

A task owns a slice (any :class:`~shared_backbone.slices.SliceSpec`; its own classifier head is
always learned), its BatchNorm statistics (every BN layer: a task's inputs differ from every other
task's, so no running statistic is shared) and its task card. The files and verbs follow PEFT,
plus what PEFT lacks: the backbone's recipe and fingerprint, and the BN statistics per task.

=========================================  ==============================================
this library                               PEFT's name (an alias here)
=========================================  ==============================================
``bank.add_task(name, spec, classes)``     ``add_adapter(adapter_name, ...)``
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
tasks present (:mod:`.mixed`).

The package follows PEFT's ``tuners/<method>/{config,layer,model}.py`` + ``utils/save_and_load.py``:

- :mod:`.config`: the files' names and the JSON bodies written (read back through ``schema``);
- :mod:`.task`: :class:`TaskAdapter` (one task) and its resized head (:class:`HeadView`);
- :mod:`.bank`: :class:`AdapterBank` (tasks by name, PEFT's verbs);
- :mod:`.mixed`: batches mixing tasks;
- :mod:`.save_and_load`: writing and checking the files.

Model code takes sizes (``num_classes``, ``in_channels``) and keeps a task card as JSON data;
:mod:`shared_backbone.adapter_cards` resolves cards (``add_task_from_card``, ``card_of``).
"""
from __future__ import annotations

from .bank import AdapterBank
from .config import (ADAPTER_CONFIG, ADAPTER_FORMAT_VERSION, ADAPTER_WEIGHTS, BANK_CONFIG, AdapterConfig, BankConfig,
                     read_adapter_config)
from .mixed import MixedBatches
from .save_and_load import adapter_bytes, check_backbone
from .task import HeadView, TaskAdapter

__all__ = ["AdapterBank", "TaskAdapter", "adapter_bytes", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "ADAPTER_FORMAT_VERSION",
           "BANK_CONFIG", "AdapterConfig", "BankConfig", "read_adapter_config", "check_backbone", "HeadView",
           "MixedBatches"]
