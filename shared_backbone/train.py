"""Training slices with HF Accelerate: SGD/Nesterov + cosine, label smoothing, resume.

:func:`fit` runs in phases of one screen each: ``_set_up`` (processes, members, optimiser, loss
terms), ``_restore`` (a checkpoint's state and position), ``_prepare`` (schedule, DDP, data on the
device), ``_one_epoch`` (steps, sums, checkpoints) and ``_finish`` (members gathered, precise BN,
test metrics); a ``_Run`` carries the state between them. Checkpoint files: :mod:`._checkpoint`.
Model code never imports this module; scripts do.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from . import regularizers as _regularizers
from ._checkpoint import (CHECKPOINT_STATE, RESUMABLE_CHANGES, ResumeMismatch, _full_state, _identity,
                          _load_checkpoint, _save_checkpoint)
from ._member_groups import auto_group_size, forward_in_groups
from .data import TensorData
from ._norms import BATCH_NORMS_ONLY
from .distributed import PARALLEL_MODES, check_process_group, make_accelerator, member_split
from .ensemble import MemberStack
from .io import write_json
from .metrics import evaluate_ensemble
from .regularizers import Regularizer

__all__ = ["TrainConfig", "fit", "predict", "predict_sharded", "recalibrate_bn", "NonFiniteLoss", "ResumeMismatch",
           "RESUMABLE_CHANGES", "Regularizer"]


class NonFiniteLoss(FloatingPointError):
    """The loss, or a learned weight after a step, became NaN or infinite."""


@dataclass
class TrainConfig:
    """The recipe: SGD Nesterov + cosine per step, label smoothing, crop/flip, as in the LC paper.

    The defaults suit short runs (a few epochs on a CPU: higher lr, lower weight decay);
    :meth:`paper` gives the paper's own numbers for 28-32 px data.
    """

    epochs: int = field(default=2, metadata={"help": "passes over the training data"})
    batch_size: int = field(default=128, metadata={"help": "samples per step (each member sees this many)"})
    lr: float = field(default=0.05, metadata={"help": "peak learning rate, cosine-annealed per step to 0"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    nesterov: bool = field(default=True, metadata={"help": "Nesterov momentum"})
    weight_decay: float = field(default=5e-4, metadata={"help": "on every learnable tensor, BatchNorm included"})
    label_smoothing: float = field(default=0.1, metadata={"help": "label smoothing of the cross-entropy"})
    augment: bool = field(default=True, metadata={"help": "the task's random crop / flip, batched on tensors"})
    seed: int = field(default=0, metadata={"help": "data order and augmentation (and, in the jobs, the backbone)"})
    bootstrap: bool = field(default=False, metadata={
        "help": "with data='own': each member trains on a bootstrap sample"})
    eval_batch_size: int = field(default=1000, metadata={"help": "samples per evaluation batch"})
    precise_bn: int = field(default=0, metadata={
        "help": "after training, recompute BatchNorm statistics as exact averages over this many batches (0 = off)"})
    l1_pointwise: float = field(default=0.0, metadata={
        "help": "L1 penalty lambda on every learned 1x1 conv weight (the LC paper's Eq. 5), per member (0 = off)"})
    max_steps_per_epoch: int | None = field(default=None, metadata={"help": "cap on steps per epoch, for smoke tests"})
    schedule_from: float = field(default=0.0, metadata={
        "help": "where in one cosine schedule this run starts, as a fraction of it (0 = at the peak lr)"})
    schedule_to: float = field(default=1.0, metadata={
        "help": "where in that schedule this run stops (1 = at lr 0); a warm start and the members that "
                "continue from it can share one schedule: 0 to f, then f to 1"})
    member_group_size: int | None = field(default=None, metadata={
        "help": "train the members in groups of this many, each group's forward and backward before the next "
                "(one optimiser step): the same gradients, the peak memory of one group's activations; "
                "0 = all members at once; unset = auto: the member loop one member at a time, vmap on CPU "
                "the chunks it splits the members into (about 4 each), vmap elsewhere all at once",
        "unset": "auto"})

    def __post_init__(self) -> None:
        if not isinstance(self.precise_bn, int) or self.precise_bn < 0:
            raise ValueError(f"precise_bn must be a number of batches >= 0 (0 = off), got {self.precise_bn!r}")
        for name in ("epochs", "batch_size", "eval_batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if self.max_steps_per_epoch is not None and (not isinstance(self.max_steps_per_epoch, int)
                                                     or isinstance(self.max_steps_per_epoch, bool)
                                                     or self.max_steps_per_epoch < 1):
            raise ValueError(f"max_steps_per_epoch must be a positive integer or None (no cap), "
                             f"got {self.max_steps_per_epoch!r}")
        if not (isinstance(self.l1_pointwise, (int, float)) and math.isfinite(self.l1_pointwise)
                and self.l1_pointwise >= 0):
            raise ValueError(f"l1_pointwise must be a finite number >= 0 (0 = off), got {self.l1_pointwise!r}")
        if not (isinstance(self.schedule_from, (int, float)) and isinstance(self.schedule_to, (int, float))
                and 0 <= self.schedule_from < self.schedule_to <= 1):
            raise ValueError(f"schedule_from and schedule_to must satisfy 0 <= schedule_from < schedule_to <= 1 "
                             f"(a piece of one cosine schedule), got {self.schedule_from!r} and {self.schedule_to!r}")
        if self.member_group_size is not None and (not isinstance(self.member_group_size, int)
                                                   or isinstance(self.member_group_size, bool)
                                                   or self.member_group_size < 0):
            raise ValueError(f"member_group_size must be a number of members per group >= 1, 0 (all at once) or "
                             f"None (auto), got {self.member_group_size!r}")

    @classmethod
    def paper(cls, **overrides) -> "TrainConfig":
        """The LC paper's recipe: 75 epochs, batch 256, lr 1e-2, weight decay 1e-2 on everything learned."""
        return cls(**{"epochs": 75, "batch_size": 256, "lr": 1e-2, "weight_decay": 1e-2, **overrides})

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _steps_per_epoch(n: int, cfg: TrainConfig) -> int:
    steps = math.ceil(n / cfg.batch_size)
    return min(steps, cfg.max_steps_per_epoch) if cfg.max_steps_per_epoch else steps


def _member_batches(model: MemberStack, train: TensorData, cfg: TrainConfig, epoch: int, sets):
    """Yield ``(x, y)``: shared ``(N, ...)``/``(N,)`` or one batch per member ``(K, N, ...)``/``(K, N)``.

    Every member's stream is seeded by its global index, so a member sees the same batches whether
    it trains alone, with the others, or on another process.
    """
    if model.data == "shared":
        g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        yield from train.batches(cfg.batch_size, shuffle=True, generator=g, augment=cfg.augment)
        return
    gens = [torch.Generator().manual_seed(cfg.seed * 100_003 + epoch * 1_009 + i) for i in model.member_ids]
    streams = [d.batches(cfg.batch_size, shuffle=True, generator=g, augment=cfg.augment) for d, g in zip(sets, gens)]
    for parts in zip(*streams):
        yield torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])


@torch.no_grad()
def predict(model: MemberStack, data: TensorData, batch_size: int = 1000, *, progress: bool = False) -> torch.Tensor:
    """Member logits on ``data`` in eval mode. Shape: ``(K, N, C)``, on the CPU."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    outs = []
    for x, _ in tqdm(list(data.batches(batch_size, shuffle=False)), desc="eval", leave=False,
                     disable=None if progress else True):  # None: tqdm turns itself off when not on a terminal
        outs.append(model(x.to(device)).float().cpu())
    model.train(was)
    return torch.cat(outs, dim=1)


@torch.no_grad()
def recalibrate_bn(model: MemberStack, data: TensorData, num_batches: int, batch_size: int = 128,
                   seed: int = 0) -> int:
    """Recompute every BatchNorm running statistic as the exact average over ``num_batches`` batches.

    The running statistics of a short run still carry their initial values (mean 0, variance 1)
    and lag the weights: after 30 steps at momentum 0.1, 4 % of every variance is the initial 1,
    which on a frozen random backbone, whose activations are small, is enough to put evaluation at
    chance. This is "precise BN": the statistics averaged with equal weights over training batches
    (momentum 1/j for batch j, so the first batch replaces the old values), without augmentation,
    members in train mode, no gradients. Returns the number of batches used.
    """
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    bns = [m for m in model._template.modules() if isinstance(m, BATCH_NORMS_ONLY)]
    if not bns:
        return 0
    momenta = [m.momentum for m in bns]
    was = model.training
    device = next(model.parameters()).device
    try:
        model.train()
        g = torch.Generator().manual_seed(seed)
        used = 0
        for x, _ in data.batches(batch_size, shuffle=True, generator=g):
            if used == num_batches:
                break
            for m in bns:  # momentum 1/j: batch j's statistics enter with weight 1/j, an equal-weight average
                m.momentum = 1.0 / (used + 1)
            model(x.to(device))  # every member sees the same batches (data="own" too)
            used += 1
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.train(was)
    return used


def _eval_loader(accelerator, data: TensorData, batch_size: int):
    return accelerator.prepare_data_loader(DataLoader(TensorDataset(data.x, data.y), batch_size=batch_size))


@torch.no_grad()
def predict_sharded(model: MemberStack, data: TensorData, accelerator, batch_size: int = 1000) -> torch.Tensor:
    """Member logits on ``data``, each process evaluating its shard; gathered without the padding
    duplicates Accelerate adds to even out the shards. Shape: ``(K, N, C)`` on every process, on the CPU."""
    was = model.training
    model.eval()
    outs = []
    for x, _ in _eval_loader(accelerator, data, batch_size):
        logits = model(x.to(accelerator.device)).float()  # (K, n, C)
        outs.append(accelerator.gather_for_metrics(logits.transpose(0, 1).contiguous()).cpu())  # (n_all, K, C)
    model.train(was)
    return torch.cat(outs).transpose(0, 1)


@dataclass
class _Run:
    """What one call of :func:`fit` carries from phase to phase."""

    cfg: TrainConfig
    accelerator: Any
    parallel: str
    procs: int  # processes taking part (1 for parallel="local")
    rank: int
    main_process: bool
    full: MemberStack  # the whole stack, as passed in
    local: MemberStack  # the members this process trains (``full`` itself unless members are split)
    ids: list[int] | None  # those members' indices in ``full``, when split
    counts: list[int] | None  # every process's member count, when split
    params: list[torch.nn.Parameter]
    opt: Any  # SGD; Accelerate's wrapper once prepared
    regularizers: list[Regularizer]
    steps: int  # per epoch
    ckpt: Path | None
    out_dir: Path | None
    identity: dict
    train: TensorData
    history: list = field(default_factory=list)
    step: int = 0
    sched: Any = None
    wrapped: Any = None  # ``local``, in DDP when data-parallel over several processes
    sets: list[TensorData] | None = None  # one training set per member, for data="own"
    group_size: int | None = None  # members per forward + backward (None: all in one)

    @property
    def split(self) -> bool:
        return self.ids is not None

    @property
    def shard(self) -> bool:
        return self.parallel == "data" and self.procs > 1


def _set_up(model: MemberStack, train: TensorData, cfg: TrainConfig, accelerator, parallel: str,
            out_dir: str | Path | None, checkpoint_every: int | None,
            regularizers: Sequence[Regularizer]) -> _Run:
    """Check the arguments, place this process's members on its device, build the optimiser and the loss terms."""
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {PARALLEL_MODES}, got {parallel!r}")
    if checkpoint_every is not None and (not isinstance(checkpoint_every, int) or checkpoint_every < 1):
        raise ValueError(f"checkpoint_every must be a positive number of steps or None, got {checkpoint_every!r}")
    accelerator = accelerator or make_accelerator()
    check_process_group(accelerator)
    local_only = parallel == "local"  # this process alone, even under a launcher: no collective at all
    procs, rank = (1, 0) if local_only else (accelerator.num_processes, accelerator.process_index)
    ids = counts = None
    if parallel == "members" and procs > 1:  # a contiguous run of members per process; refuses K < processes
        ids = member_split(model.members, procs, rank)
        counts = [len(member_split(model.members, procs, p)) for p in range(procs)]
        local = model.select(ids).to(accelerator.device)
    else:
        local = model.to(accelerator.device)
    terms = _regularizers.from_config(cfg, local) + list(regularizers)
    params = [p for p in local.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                          weight_decay=cfg.weight_decay)
    if len(train) == 0:
        raise ValueError("the training set is empty: nothing to train on (check the task's split and subset sizes)")
    return _Run(cfg=cfg, accelerator=accelerator, parallel=parallel, procs=procs, rank=rank,
                main_process=local_only or accelerator.is_main_process, full=model, local=local, ids=ids,
                counts=counts, params=params, opt=opt, regularizers=terms, steps=_steps_per_epoch(len(train), cfg),
                ckpt=Path(out_dir) / "checkpoint" if out_dir else None, out_dir=Path(out_dir) if out_dir else None,
                identity=_identity(model), train=train)


_START = {"epoch": 0, "step_in_epoch": 0, "step": 0}


def _restore(run: _Run) -> dict:
    """Load the checkpoint, if there is one, into ``run``; return where training stands."""
    if not (run.ckpt and (run.ckpt / CHECKPOINT_STATE).exists()):
        return dict(_START)
    meta = _load_checkpoint(run.ckpt, run.full, run.local, run.opt, run.params, run.ids, run.cfg, run.steps)
    position = {"epoch": meta.epoch, "step_in_epoch": meta.step_in_epoch, "sums": meta.epoch_sums,
                "step": meta.step}
    run.history = [h for h in meta.history if isinstance(h, dict) and h.get("epoch", 0) <= position["epoch"]]
    return position


def _cosine(total: int, start: float = 0.0, stop: float = 1.0) -> Callable[[int], float]:
    """The lr factor at step ``s`` of a run covering ``[start, stop]`` of one cosine schedule."""
    if (start, stop) == (0.0, 1.0):
        return lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    return lambda s: 0.5 * (1 + math.cos(math.pi * (start + (stop - start) * min(s, total) / total)))


def _prepare(run: _Run, step: int) -> None:
    """The schedule at ``step``, DDP when it has something to average, the data on the device."""
    cfg = run.cfg
    for group in run.opt.param_groups:  # the schedule's base lr, as a fresh LambdaLR would record it
        group.setdefault("initial_lr", group["lr"])
    factor = _cosine(run.steps * cfg.epochs, cfg.schedule_from, cfg.schedule_to)
    run.sched = torch.optim.lr_scheduler.LambdaLR(run.opt, factor, last_epoch=step - 1)
    run.step = step
    run.wrapped = run.accelerator.prepare_model(run.local) if run.shard else run.local
    run.group_size = _group_size(run)
    run.opt = run.accelerator.prepare_optimizer(run.opt)
    run.train = run.train.to(run.accelerator.device)
    if run.local.data == "own":
        gens = {i: torch.Generator().manual_seed(cfg.seed * 7_919 + i) for i in run.local.member_ids}
        run.sets = [run.train.bootstrap(gens[i]) if cfg.bootstrap else run.train for i in run.local.member_ids]


def _group_size(run: _Run) -> int | None:
    """Members per forward + backward, or ``None`` (all in one forward) when groups would not split them.

    ``member_group_size`` unset: :func:`._member_groups.auto_group_size` (one member at a time for the
    member loop, vmap's chunks on CPU, all at once elsewhere). Never under DDP
    (data-parallel over several processes): DDP syncs gradients and broadcasts BatchNorm buffers
    inside its own forward of the whole stack, which a group's forward bypasses; there each process
    already holds only its shard of the batch's activations.
    """
    size = run.cfg.member_group_size
    if size is None:
        size = None if run.shard else auto_group_size(run.local.members, run.accelerator.device,
                                                      run.local.vectorized)
    if not size or size >= run.local.members:
        return None
    if run.shard:
        warnings.warn(f"member_group_size={size} is not used with parallel='data' over {run.procs} processes "
                      "(DDP runs the whole stack in one forward); each process holds its shard of the batch instead",
                      RuntimeWarning, stacklevel=4)
        return None
    return size


def _forwards(run: _Run, x: torch.Tensor):
    """Yield ``(members, logits)``: one forward of the whole stack (through DDP when it wraps it), or
    one per member group (:func:`._member_groups.forward_in_groups`), each under autocast.
    Shape: logits ``(G, N, C)``."""
    acc = run.accelerator
    if run.group_size is None:
        with acc.autocast():
            logits = run.wrapped(x)  # (K, N, C)
        yield range(run.local.members), logits
        return
    groups = forward_in_groups(run.local, x, run.group_size)
    while True:
        with acc.autocast():  # the group's forward (and, for the first, the shared prefix's)
            group = next(groups, None)
        if group is None:
            return
        yield group


def _checkpoint(run: _Run, epoch: int, step_in_epoch: int, sums=(0.0, 0.0, 0.0)) -> None:
    """Save the whole stack (a collective: every process calls it) with the running epoch's sums so far."""
    acc = run.accelerator
    tensors = _full_state(acc, run.full, run.local, run.opt.optimizer, run.params, run.counts)
    # the running epoch's loss/accuracy sums over every process, so a resumed epoch reports them whole
    sums = torch.tensor(sums, dtype=torch.float64, device=acc.device)
    if run.procs > 1:
        sums = acc.reduce(sums, "sum")
    if run.main_process:  # "epoch_partial": the file's key (kept) for the running epoch's sums
        _save_checkpoint(run.ckpt, tensors, {"epoch": epoch, "step_in_epoch": step_in_epoch, "step": run.step,
                                             "epoch_partial": sums.tolist()}, run.cfg, run.identity, run.history)
        write_json(run.out_dir / "history.json", run.history)  # for people; resume reads the checkpoint's
    if run.parallel != "local":
        acc.wait_for_everyone()


def _train_step(run: _Run, x: torch.Tensor, y: torch.Tensor, epoch: int) -> tuple[float, float, int]:
    """One optimiser step on a batch; returns its (loss sum, correct, seen) over (member, sample) pairs.

    With member groups each group's loss is backpropagated before the next group's forward; the
    gradients add up to the whole stack's (a group's land in its members' rows only).
    """
    cfg, acc = run.cfg, run.accelerator
    if run.shard:  # this process's part of the global batch
        dim = y.dim() - 1
        x, y = x.tensor_split(run.procs, dim=dim)[run.rank], y.tensor_split(run.procs, dim=dim)[run.rank]
    run.opt.zero_grad(set_to_none=True)
    ces, hits = [], []  # per group: its loss (the sum of its members' mean losses) and its correct predictions
    for members, logits in _forwards(run, x):
        if logits.dtype in (torch.float16, torch.bfloat16):  # mixed precision: the loss in float32
            logits = logits.float()
        target = y[members.start:members.stop] if y.dim() == 2 else y.expand(logits.shape[0], -1)  # (G, N)
        ce = F.cross_entropy(logits.flatten(0, 1), target.flatten(), label_smoothing=cfg.label_smoothing)
        loss = ce = ce * logits.shape[0]  # sum over members of each member's mean loss
        if members.start == 0:  # the loss terms once per step: summed over members too, each member's own penalty
            for term in run.regularizers:
                loss = loss + term(run.local)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"loss became {loss.item()} at epoch {epoch + 1}, step {run.step}; lower lr "
                                f"(now {cfg.lr}) or check the inputs for NaN")
        acc.backward(loss)
        ces.append(ce.detach())
        hits.append((logits.argmax(-1) == target).float().sum())
    run.opt.step()
    run.sched.step()
    run.step += 1
    if not all(bool(torch.isfinite(p).all()) for p in run.params):
        raise NonFiniteLoss(f"a learned weight became NaN or infinite after step {run.step} (epoch {epoch + 1}); "
                            f"lower lr (now {cfg.lr})")
    n = y.shape[-1]
    # sums over (member, sample) pairs, so that the sums of all processes make the mean over every member
    # and sample whether members or samples are split; the data loss, without the regularisers
    return sum(c.item() for c in ces) * n, sum(h.item() for h in hits), n * run.local.members


def _one_epoch(run: _Run, epoch: int, position: dict, checkpoint_every: int | None, on_step, progress: bool,
               stop_after: int | None = None) -> None:
    """Train one epoch (from ``position``'s step when resuming into it), record it, checkpoint at its end."""
    cfg, steps = run.cfg, run.steps
    skip = position["step_in_epoch"] if epoch == position["epoch"] else 0
    loss_sum, correct, seen = 0.0, 0.0, 0
    if skip and run.main_process:  # resumed mid-epoch: the sums of the steps before the checkpoint (all processes)
        loss_sum, correct, seen = position.get("sums", (0.0, 0.0, 0.0))
    bar = tqdm(total=steps, initial=skip, desc=f"epoch {epoch + 1}/{cfg.epochs}",
               disable=None if progress and run.main_process else True)  # None: off when not a terminal
    for i, (x, y) in enumerate(_member_batches(run.local, run.train, cfg, epoch, run.sets)):
        if i >= steps or (stop_after is not None and run.step >= stop_after):
            break
        if i < skip:  # resuming mid-epoch: replay the stream (same order, same augmentation draws)
            continue
        batch_loss, batch_correct, batch_seen = _train_step(run, x, y, epoch)
        loss_sum += batch_loss
        correct += batch_correct
        seen += batch_seen
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}",
                        lr=f"{run.sched.get_last_lr()[0]:.4f}")
        bar.update()
        if run.ckpt and checkpoint_every and run.step % checkpoint_every == 0 and i + 1 < steps:
            _checkpoint(run, epoch, i + 1, (loss_sum, correct, float(seen)))
        if on_step is not None:
            on_step(run.step)
    bar.close()
    totals = torch.tensor([loss_sum, correct, float(seen)], dtype=torch.float64, device=run.accelerator.device)
    if run.procs > 1:
        totals = run.accelerator.reduce(totals, "sum")
    loss_sum, correct, seen = totals.tolist()
    run.history.append({"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1),
                        "train_accuracy": correct / max(seen, 1)})
    if run.ckpt:
        _checkpoint(run, epoch + 1, 0)


def _finish(run: _Run, test: TensorData | None, seconds: float) -> dict:
    """Every member on every process, precise BN, the record and the test metrics."""
    cfg, full = run.cfg, run.full
    if run.split:  # every process ends with every member
        with torch.no_grad():
            state = _full_state(run.accelerator, full, run.local, run.opt.optimizer, run.params, run.counts)
            full.load_state_dict({k[len("model/"):]: v for k, v in state.items() if k.startswith("model/")})
    if cfg.precise_bn:
        recalibrate_bn(full, run.train, cfg.precise_bn, cfg.batch_size, cfg.seed)
    record = {"config": asdict(cfg), "history": run.history, "train_seconds": seconds, "steps": run.step,
              "processes": run.procs, "parallel": run.parallel}
    if test is not None:
        logits = predict_sharded(full, test, run.accelerator, cfg.eval_batch_size) if run.procs > 1 else \
            predict(full, test, cfg.eval_batch_size)
        if not bool(torch.isfinite(logits).all()):
            warnings.warn(f"test logits hold NaN or infinite values after training (lr {cfg.lr}): the weights are "
                          "finite but absurd; lower the learning rate", RuntimeWarning, stacklevel=3)
        record["test"] = evaluate_ensemble(logits, test.y.cpu())
        record["_test_logits"] = logits
    return record


def fit(model: MemberStack, train: TensorData, test: TensorData | None = None, config: TrainConfig | None = None,
        *, accelerator=None, parallel: str = "data", out_dir: str | Path | None = None, resume: bool = False,
        checkpoint_every: int | None = None, on_step=None, progress: bool = True,
        regularizers: Sequence[Regularizer] = (), stop_after: int | None = None) -> dict:
    """Train every member's slice; return a JSON-ready record (losses, test logits' metrics, time).

    Each member gets its own cross-entropy; their sum is minimised, so K members train exactly as
    K independent models would. ``regularizers`` (callables ``model -> scalar``) add loss terms, after
    the ones ``config`` asks for (``l1_pointwise``; see :mod:`shared_backbone.regularizers`). A NaN or
    infinite loss stops training with :class:`NonFiniteLoss`.

    Under ``accelerate launch``/``torchrun`` with several processes, ``parallel="data"`` shards each
    global batch over processes (DDP averages the gradients) and ``parallel="members"`` splits the
    members over processes (no gradient traffic; see :mod:`shared_backbone.distributed`). Either
    way ``model`` ends with every member trained, on every process.

    Checkpoints (``out_dir/checkpoint``: safetensors + JSON, written atomically) hold the whole
    stack whatever the process count, at every epoch's end and every ``checkpoint_every`` steps;
    ``resume`` continues from one mid-epoch to the same result as an uninterrupted run.
    ``on_step(step)`` is called after each optimizer step (and its checkpoint). ``stop_after`` ends
    training after that many optimizer steps in all while the schedule still spans the whole
    ``config``: the first part of a longer run (a warm start cut from a single model's schedule).

    ``parallel="local"`` trains on this process alone with no collective operation, also under a
    launcher: for task-parallel runs where each process trains its own tasks (``train_adapter.py``).
    """
    if stop_after is not None and (isinstance(stop_after, bool) or not isinstance(stop_after, int) or stop_after < 1):
        raise ValueError(f"stop_after must be a positive number of steps or None, got {stop_after!r}")
    run = _set_up(model, train, config or TrainConfig(), accelerator, parallel, out_dir, checkpoint_every,
                  regularizers)
    position = _restore(run) if resume else dict(_START)
    _prepare(run, position["step"])
    t0 = time.perf_counter()
    run.wrapped.train()
    for epoch in range(position["epoch"], run.cfg.epochs):
        if stop_after is not None and run.step >= stop_after:
            break
        _one_epoch(run, epoch, position, checkpoint_every, on_step, progress, stop_after)
    return _finish(run, test, time.perf_counter() - t0)
