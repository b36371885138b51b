"""Many processes through HF Accelerate: data-parallel (DDP) or member-parallel (no gradient traffic).

- **data-parallel**: every process holds all members (or tasks) and trains on its shard of each
  global batch; Accelerate wraps the stack in DDP, which averages the slices' gradients. BatchNorm
  statistics are computed on each process's shard, as in any DDP run without SyncBatchNorm.
- **member-parallel**: members are split over processes (:func:`member_split`); each
  process trains its own members on the whole data stream and nothing crosses processes until
  the logits are gathered for ensemble metrics. Never wrapped in DDP: DDP broadcasts rank 0's
  parameters and buffers at construction and would overwrite every other rank's members.
- **task-parallel** (adapters): tasks are split over processes and each process trains its own
  tasks' adapters with ``fit(..., parallel="local")``: no collective at all while training.
"""
from __future__ import annotations

import os

import torch
from accelerate import Accelerator

__all__ = ["PARALLEL_MODES", "SilentSingleProcess", "make_accelerator", "check_process_group",
           "member_split", "launched_processes", "main_process_value"]

PARALLEL_MODES = ("data", "members", "local")


class SilentSingleProcess(RuntimeError):
    """Several processes were launched but each one trains alone."""


def launched_processes() -> int:
    """How many processes the launcher (``accelerate launch``, ``torchrun``) started: ``WORLD_SIZE``."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def make_accelerator(mixed_precision: str | None = None, cpu: bool | None = None, **kwargs):
    """An ``Accelerator`` that joins every launched process into one group, on GPUs or on the CPU.

    Without CUDA, ``accelerate launch --multi_gpu --num_processes N`` (or ``torchrun``) starts N
    processes that each train alone unless the Accelerator is asked for the CPU; this asks for it,
    so they join one gloo group. ``mixed_precision``: ``"no"``, ``"bf16"`` or ``"fp16"`` (CUDA only).
    """
    if mixed_precision not in (None, "no", "bf16", "fp16"):
        raise ValueError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {mixed_precision!r}")
    if cpu is None:
        cpu = not torch.cuda.is_available()
    if mixed_precision == "fp16" and cpu:
        raise ValueError("mixed_precision='fp16' needs CUDA; on the CPU use 'bf16'")
    acc = Accelerator(cpu=cpu, mixed_precision=mixed_precision, **kwargs)
    check_process_group(acc)
    return acc


def main_process_value(value, accelerator):
    """``value`` as the main process has it, on every process (a collective: every process calls it).

    For what each process measures but all must agree on: a plan made from each process's own step
    timings would give the processes different step counts, and the first collective of the longer
    run would wait forever.
    """
    if accelerator is None or accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list
    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def check_process_group(accelerator) -> None:
    """Refuse the silent case: N processes launched, but the Accelerator sees only its own."""
    n = launched_processes()
    if n > 1 and accelerator.num_processes != n:
        raise SilentSingleProcess(
            f"{n} processes were launched (WORLD_SIZE={n}) but this Accelerator sees "
            f"{accelerator.num_processes}: each process would train alone. On a machine without CUDA build it "
            "with Accelerator(cpu=True) (or shared_backbone.distributed.make_accelerator()), or set "
            "ACCELERATE_USE_CPU=1; launch with `accelerate launch --multi_gpu --num_processes N script.py` "
            "or `torchrun --nproc_per_node N script.py` (`accelerate launch --cpu --num_processes N` starts "
            "only one process)."
        )


def member_split(members: int, num_processes: int, index: int) -> list[int]:
    """The members process ``index`` of ``num_processes`` trains: a contiguous run, the first ones longer.

    The same split ``accelerate``'s ``split_between_processes`` makes; :func:`~shared_backbone.train.fit`
    uses this one, which also gives every other process's count (to gather their members).
    """
    if num_processes > members:
        raise ValueError(
            f"member-parallel training needs at least one member per process: {members} members over "
            f"{num_processes} processes; use fewer processes or --parallel data"
        )
    base, extra = divmod(members, num_processes)
    start = index * base + min(index, extra)
    return list(range(start, start + base + (1 if index < extra else 0)))
