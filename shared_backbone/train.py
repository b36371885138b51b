"""Training slices with HF Accelerate: SGD/Nesterov + cosine, label smoothing, resume.

Model code never imports this module; scripts do.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import TensorData
from .ensemble import MemberStack
from .io import header_shapes, read_artifact, tensors_from_bytes, tensors_to_bytes, write_artifact, write_json
from .schema import FORMAT_VERSION, CheckpointState
from .lc import l1_penalty, pointwise_weights

__all__ = ["TrainConfig", "fit", "predict", "predict_sharded", "recalibrate_bn", "NonFiniteLoss", "ResumeMismatch",
           "RESUMABLE_CHANGES"]

RESUMABLE_CHANGES = ("epochs", "eval_batch_size", "precise_bn")  # recipe fields --resume lets change


class NonFiniteLoss(FloatingPointError):
    """The loss, or a learned weight after a step, became NaN or infinite."""


class ResumeMismatch(ValueError):
    """The checkpoint was made by another run (backbone, spec, members, seed or recipe differ)."""


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
    bns = [m for m in model._template.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
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


def _gather_members(accelerator, t: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Concatenate every process's ``(K_p, ...)`` members along dim 0 (padded to one size for the collective)."""
    if accelerator.num_processes == 1:
        return t
    kmax = max(counts)
    pad = t.new_zeros(kmax - t.shape[0], *t.shape[1:])
    every = accelerator.gather(torch.cat([t, pad]).contiguous())  # (P * kmax, ...)
    return torch.cat([every[p * kmax: p * kmax + c] for p, c in enumerate(counts)])


def _momenta(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> list[torch.Tensor | None]:
    return [opt.state.get(p, {}).get("momentum_buffer") for p in params]


def _full_state(accelerator, full: MemberStack, local: MemberStack, opt, params, counts) -> dict[str, torch.Tensor]:
    """The whole stack's slices, statistics and momenta, gathered from every process when members are split."""
    split = local is not full
    tensors = {}
    for k, v in local.state_dict().items():
        member_axis = k.startswith(("slices.", "member_stats."))
        tensors[f"model/{k}"] = (_gather_members(accelerator, v.detach(), counts) if split and member_axis
                                 else v.detach()).cpu()
    for i, m in enumerate(_momenta(opt, params)):
        if m is not None:
            tensors[f"optim/{i}/momentum_buffer"] = (_gather_members(accelerator, m, counts) if split else m).cpu()
    return tensors


CHECKPOINT_STATE = "state.json"  # the checkpoint's manifest: position, identity, recipe, history, file hashes
CHECKPOINT_TENSORS = "state.safetensors"


def _identity(full: MemberStack) -> dict:
    """What a checkpoint continues: the backbone, the spec, the members (checked on resume)."""
    spec = getattr(full, "spec", None)
    return {"fingerprint": full.frozen_ref, "spec": repr(spec) if spec is not None else repr(sorted(full.layout)),
            "members": full.members, "member_ids": list(full.member_ids), "data": full.data}


def _save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], position: dict, cfg: TrainConfig,
                     identity: dict, history: list) -> None:
    """One artifact: ``state.safetensors`` (slices, statistics, momenta) then ``state.json`` (its manifest)."""
    data = tensors_to_bytes(tensors, finite="a checkpoint")
    write_artifact(path, CHECKPOINT_STATE, {"format_version": FORMAT_VERSION, "kind": "checkpoint", **position,
                                            **identity, "config": asdict(cfg), "history": history},
                   {CHECKPOINT_TENSORS: data})


def _check_resume(state: CheckpointState, raw: dict, identity: dict, cfg: TrainConfig, path: Path) -> None:
    """Refuse a checkpoint of another run, naming every difference and what may change."""
    diffs = [f"{k}: checkpoint {raw.get(k)!r}, now {v!r}" for k, v in identity.items() if raw.get(k) != v]
    now = asdict(cfg)
    for k, v in now.items():
        if k not in RESUMABLE_CHANGES and state.config.get(k, v) != v:
            diffs.append(f"{k}: checkpoint {state.config.get(k)!r}, now {v!r}")
    unknown = sorted(set(state.config) - set(now))
    if unknown:
        diffs.append(f"recipe fields this library does not know: {unknown[:4]}")
    if state.epoch > cfg.epochs:
        diffs.append(f"epochs: the checkpoint is at epoch {state.epoch}, past the {cfg.epochs} asked for")
    if diffs:
        raise ResumeMismatch(f"cannot resume from {path}: it was made by another run; " + "; ".join(diffs) +
                             f". Only {', '.join(RESUMABLE_CHANGES)} may change on resume (epochs to train "
                             "longer); start in a new output folder to train anything else")


def _load_checkpoint(path: Path, full: MemberStack, local: MemberStack, opt: torch.optim.Optimizer, params,
                     ids: list[int] | None, cfg: TrainConfig, steps: int) -> CheckpointState:
    """Verify the checkpoint (manifest, identity, recipe, every tensor) and load it into ``local``
    (its members ``ids`` only, when split)."""
    state, files = read_artifact(path, CHECKPOINT_STATE, CheckpointState.from_dict)
    from .io import read_config

    _check_resume(state, read_config(path / CHECKPOINT_STATE), _identity(full), cfg, path)
    if state.step != state.epoch * steps + state.step_in_epoch or state.step_in_epoch >= steps:
        raise ResumeMismatch(f"{path / CHECKPOINT_STATE}: position epoch {state.epoch}, step {state.step_in_epoch} "
                             f"of the epoch, step {state.step} overall does not fit {steps} steps per epoch")
    where = str(path / CHECKPOINT_TENSORS)
    if CHECKPOINT_TENSORS not in files:
        raise ValueError(f"{path / CHECKPOINT_STATE} lists no {CHECKPOINT_TENSORS}")
    raw = files[CHECKPOINT_TENSORS]
    want = {f"model/{k}": (tuple(v.shape), v.dtype) for k, v in full.state_dict().items()}
    k_full = full.members
    for i, p in enumerate(params):  # momenta: the whole stack's shape
        shape = (k_full, *p.shape[1:]) if ids is not None else tuple(p.shape)
        want[f"optim/{i}/momentum_buffer"] = (shape, p.dtype)
    have = header_shapes(raw, where)
    missing = sorted(k for k in want if k.startswith("model/") and k not in have)
    extra = sorted(set(have) - set(want))
    bad = [f"{k} {have[k]} (expected {want[k]})" for k in have if k in want and have[k] != want[k]]
    if missing or extra or bad:
        raise ValueError(f"{where} does not hold this model's state: missing {missing[:3]}, unexpected {extra[:3]}, "
                         f"wrong shape or dtype {bad[:3]}")
    tensors, _ = tensors_from_bytes(raw, where)
    model_state = {}
    for k, v in tensors.items():
        if k.startswith("model/"):
            k = k[len("model/"):]
            model_state[k] = v[ids] if ids is not None and k.startswith(("slices.", "member_stats.")) else v
    local.load_state_dict(model_state)
    for i, p in enumerate(params):
        m = tensors.get(f"optim/{i}/momentum_buffer")
        if m is not None:
            opt.state[p]["momentum_buffer"] = (m[ids] if ids is not None else m).to(p.device).clone()
    return state


def _eval_loader(accelerator, data: TensorData, batch_size: int):
    from torch.utils.data import DataLoader, TensorDataset

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


def fit(model: MemberStack, train: TensorData, test: TensorData | None = None, config: TrainConfig | None = None,
        *, accelerator=None, parallel: str = "data", out_dir: str | Path | None = None, resume: bool = False,
        checkpoint_every: int | None = None, on_step=None, progress: bool = True) -> dict:
    """Train every member's slice; return a JSON-ready record (losses, test logits' metrics, time).

    Each member gets its own cross-entropy; their sum is minimised, so K members train exactly as
    K independent models would. A NaN or infinite loss stops training with :class:`NonFiniteLoss`.

    Under ``accelerate launch``/``torchrun`` with several processes, ``parallel="data"`` shards each
    global batch over processes (DDP averages the gradients) and ``parallel="members"`` splits the
    members over processes (no gradient traffic; see :mod:`shared_backbone.distributed`). Either
    way ``model`` ends with every member trained, on every process.

    Checkpoints (``out_dir/checkpoint``: safetensors + JSON, written atomically) hold the whole
    stack whatever the process count, at every epoch's end and every ``checkpoint_every`` steps;
    ``resume`` continues from one mid-epoch to the same result as an uninterrupted run.
    ``on_step(step)`` is called after each optimizer step (and its checkpoint).

    ``parallel="local"`` trains on this process alone with no collective operation, also under a
    launcher: for task-parallel runs where each process trains its own tasks (``train_adapter.py``).
    """
    from .distributed import PARALLEL_MODES, check_process_group, make_accelerator, member_split

    cfg = config or TrainConfig()
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {PARALLEL_MODES}, got {parallel!r}")
    if checkpoint_every is not None and (not isinstance(checkpoint_every, int) or checkpoint_every < 1):
        raise ValueError(f"checkpoint_every must be a positive number of steps or None, got {checkpoint_every!r}")
    accelerator = accelerator or make_accelerator()
    check_process_group(accelerator)
    local_only = parallel == "local"  # this process alone, even under a launcher: no collective at all
    procs, rank = (1, 0) if local_only else (accelerator.num_processes, accelerator.process_index)
    main_process = local_only or accelerator.is_main_process
    full = model
    split = parallel == "members" and procs > 1
    ids = counts = None
    if split:
        counts = [len(member_split(full.members, procs, p)) for p in range(procs)]  # refuses K < processes
        with accelerator.split_between_processes(list(range(full.members))) as mine:
            ids = list(mine)
        local = full.select(ids).to(accelerator.device)
    else:
        local = full.to(accelerator.device)
    if cfg.l1_pointwise and not pointwise_weights(local):
        raise ValueError(f"l1_pointwise={cfg.l1_pointwise} but the slice learns no 1x1 conv weight; "
                         "learn Pointwise() (or set l1_pointwise=0)")
    params = [p for p in local.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                          weight_decay=cfg.weight_decay)
    if len(train) == 0:
        raise ValueError("the training set is empty: nothing to train on (check the task's split and subset sizes)")
    steps = _steps_per_epoch(len(train), cfg)
    total = steps * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    ckpt = Path(out_dir) / "checkpoint" if out_dir else None
    position = {"epoch": 0, "step_in_epoch": 0, "step": 0}
    history: list = []
    identity = _identity(full)
    if resume and ckpt and (ckpt / CHECKPOINT_STATE).exists():
        meta = _load_checkpoint(ckpt, full, local, opt, params, ids, cfg, steps)
        position = {"epoch": meta.epoch, "step_in_epoch": meta.step_in_epoch, "partial": meta.epoch_partial,
                    "step": meta.step}
        history = [h for h in meta.history if isinstance(h, dict) and h.get("epoch", 0) <= position["epoch"]]
        sched.last_epoch = position["step"] - 1
        with warnings.catch_warnings():  # stepping the schedule to where it was, before any optimizer step
            warnings.simplefilter("ignore", UserWarning)
            sched.step()
    # DDP only when it has something to average: data-parallel over several processes
    wrapped = accelerator.prepare_model(local) if parallel == "data" and procs > 1 else local
    opt = accelerator.prepare_optimizer(opt)
    train = train.to(accelerator.device)
    sets = None
    if local.data == "own":
        gens = {i: torch.Generator().manual_seed(cfg.seed * 7_919 + i) for i in local.member_ids}
        sets = [train.bootstrap(gens[i]) if cfg.bootstrap else train for i in local.member_ids]
    shard = parallel == "data" and procs > 1

    def checkpoint(epoch: int, step_in_epoch: int, step: int, partial=(0.0, 0.0, 0.0)) -> None:
        tensors = _full_state(accelerator, full, local, opt.optimizer, params, counts)  # collective: every rank
        # the running epoch's loss/accuracy sums so far, over every process, so a resumed epoch reports them whole
        partial = torch.tensor(partial, dtype=torch.float64, device=accelerator.device)
        if procs > 1:
            partial = accelerator.reduce(partial, "sum")
        if main_process:
            _save_checkpoint(ckpt, tensors, {"epoch": epoch, "step_in_epoch": step_in_epoch, "step": step,
                                             "epoch_partial": partial.tolist()}, cfg, identity, history)
            write_json(Path(out_dir) / "history.json", history)  # for people; resume reads the checkpoint's
        if not local_only:
            accelerator.wait_for_everyone()

    t0 = time.perf_counter()
    wrapped.train()
    step = position["step"]
    for epoch in range(position["epoch"], cfg.epochs):
        skip = position["step_in_epoch"] if epoch == position["epoch"] else 0
        loss_sum, correct, seen = 0.0, 0.0, 0
        if skip and main_process:  # resumed mid-epoch: the sums of the steps before the checkpoint (all processes)
            loss_sum, correct, seen = position.get("partial", (0.0, 0.0, 0.0))
        bar = tqdm(total=steps, initial=skip, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=None if progress and main_process else True)  # None: off when not a terminal
        for i, (x, y) in enumerate(_member_batches(local, train, cfg, epoch, sets)):
            if i >= steps:
                break
            if i < skip:  # resuming mid-epoch: replay the stream (same order, same augmentation draws)
                continue
            if shard:  # this process's part of the global batch
                dim = y.dim() - 1
                x, y = x.tensor_split(procs, dim=dim)[rank], y.tensor_split(procs, dim=dim)[rank]
            with accelerator.autocast():
                logits = wrapped(x)  # (K, N, C)
            if logits.dtype in (torch.float16, torch.bfloat16):  # mixed precision: the loss in float32
                logits = logits.float()
            target = y if y.dim() == 2 else y.expand(logits.shape[0], -1)  # (K, N)
            loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), label_smoothing=cfg.label_smoothing)
            loss = ce = loss * logits.shape[0]  # sum over members of each member's mean loss
            if cfg.l1_pointwise:  # summed over members too: each member's own penalty
                loss = ce + l1_penalty(local, cfg.l1_pointwise)
            if not torch.isfinite(loss):
                raise NonFiniteLoss(
                    f"loss became {loss.item()} at epoch {epoch + 1}, step {step}; lower lr (now {cfg.lr}) "
                    "or check the inputs for NaN"
                )
            opt.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            opt.step()
            sched.step()
            step += 1
            if not all(bool(torch.isfinite(p).all()) for p in params):
                raise NonFiniteLoss(f"a learned weight became NaN or infinite after step {step} (epoch {epoch + 1}); "
                                    f"lower lr (now {cfg.lr})")
            n = y.shape[-1]
            # sums over (member, sample) pairs, so that the sums of all processes make the mean over every
            # member and sample whether members or samples are split; the data loss, without the L1 penalty
            loss_sum += ce.item() * n
            correct += (logits.argmax(-1) == target).float().sum().item()
            seen += n * logits.shape[0]
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", lr=f"{sched.get_last_lr()[0]:.4f}")
            bar.update()
            if ckpt and checkpoint_every and step % checkpoint_every == 0 and i + 1 < steps:
                checkpoint(epoch, i + 1, step, (loss_sum, correct, float(seen)))
            if on_step is not None:
                on_step(step)
        bar.close()
        totals = torch.tensor([loss_sum, correct, float(seen)], dtype=torch.float64, device=accelerator.device)
        if procs > 1:
            totals = accelerator.reduce(totals, "sum")
        loss_sum, correct, seen = totals.tolist()
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1),
                        "train_accuracy": correct / max(seen, 1)})
        if ckpt:
            checkpoint(epoch + 1, 0, step)
    if split:  # every process ends with every member
        with torch.no_grad():
            state = _full_state(accelerator, full, local, opt.optimizer, params, counts)
            full.load_state_dict({k[len("model/"):]: v for k, v in state.items() if k.startswith("model/")})
    if cfg.precise_bn:
        recalibrate_bn(full, train, cfg.precise_bn, cfg.batch_size, cfg.seed)
    record = {"config": asdict(cfg), "history": history, "train_seconds": time.perf_counter() - t0, "steps": step,
              "processes": procs, "parallel": parallel}
    if test is not None:
        from .metrics import evaluate_ensemble

        logits = predict_sharded(full, test, accelerator, cfg.eval_batch_size) if procs > 1 else \
            predict(full, test, cfg.eval_batch_size)
        if not bool(torch.isfinite(logits).all()):
            warnings.warn(f"test logits hold NaN or infinite values after training (lr {cfg.lr}): the weights are "
                          "finite but absurd; lower the learning rate", RuntimeWarning, stacklevel=2)
        record["test"] = evaluate_ensemble(logits, test.y.cpu())
        record["_test_logits"] = logits
    return record

