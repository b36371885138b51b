"""Training slices with HF Accelerate: SGD/Nesterov + cosine, label smoothing, resume.

Model code never imports this module; scripts do.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import TensorData
from .ensemble import MemberStack
from .io import load_tensors, read_json, save_tensors, write_json

__all__ = ["TrainConfig", "fit", "predict", "NonFiniteLoss"]


class NonFiniteLoss(FloatingPointError):
    """The loss became NaN or infinite."""


@dataclass
class TrainConfig:
    """The recipe: SGD Nesterov + cosine per step, label smoothing, crop/flip, as in the LC paper.

    The defaults suit short runs (a few epochs on a CPU: higher lr, lower weight decay);
    :meth:`paper` gives the paper's own numbers for 28-32 px data.
    """

    epochs: int = 2  # passes over the training data
    batch_size: int = 128  # samples per step (each member sees this many)
    lr: float = 0.05  # peak learning rate, cosine-annealed per step to 0
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4  # on every learnable tensor, BatchNorm included
    label_smoothing: float = 0.1
    augment: bool = True  # the task's random crop / flip, batched on tensors
    seed: int = 0  # data order and augmentation
    bootstrap: bool = False  # with data="own": each member trains on a bootstrap sample
    eval_batch_size: int = 1000
    max_steps_per_epoch: int | None = None  # cap, for smoke tests

    def __post_init__(self) -> None:
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
    """Yield ``(x, y)``: shared ``(N, ...)``/``(N,)`` or one batch per member ``(K, N, ...)``/``(K, N)``."""
    if model.data == "shared":
        g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        yield from train.batches(cfg.batch_size, shuffle=True, generator=g, augment=cfg.augment)
        return
    gens = [torch.Generator().manual_seed(cfg.seed * 100_003 + epoch * 1_009 + i) for i in range(model.members)]
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
    for x, _ in tqdm(list(data.batches(batch_size, shuffle=False)), desc="eval", disable=not progress, leave=False):
        outs.append(model(x.to(device)).float().cpu())
    model.train(was)
    return torch.cat(outs, dim=1)


def _save_checkpoint(path: Path, model: MemberStack, opt: torch.optim.Optimizer, epoch: int, step: int, cfg: TrainConfig):
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    for idx, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim/{idx}/{k}"] = v
    save_tensors(path / "state.safetensors", tensors)
    write_json(path / "state.json", {"epoch": epoch, "step": step, "config": asdict(cfg)})


def _load_checkpoint(path: Path, model: MemberStack, opt: torch.optim.Optimizer) -> tuple[int, int]:
    meta = read_json(path / "state.json")
    tensors, _ = load_tensors(path / "state.safetensors")
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model/")})
    sd = opt.state_dict()
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("optim/"):
            _, idx, name = k.split("/", 2)
            state.setdefault(int(idx), {})[name] = v
    sd["state"] = state
    opt.load_state_dict(sd)
    return int(meta["epoch"]), int(meta["step"])


def fit(model: MemberStack, train: TensorData, test: TensorData | None = None, config: TrainConfig | None = None,
        *, accelerator=None, out_dir: str | Path | None = None, resume: bool = False, progress: bool = True) -> dict:
    """Train every member's slice; return a JSON-ready record (losses, test logits' metrics, time).

    Each member gets its own cross-entropy; their sum is minimised, so K members train exactly as
    K independent models would. A NaN or infinite loss stops training with :class:`NonFiniteLoss`.
    """
    from accelerate import Accelerator

    cfg = config or TrainConfig()
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                          weight_decay=cfg.weight_decay)
    steps = _steps_per_epoch(len(train), cfg)
    total = steps * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    model, opt = accelerator.prepare(model, opt)
    inner: MemberStack = accelerator.unwrap_model(model)
    train = train.to(accelerator.device)
    sets = None
    if inner.data == "own":
        gens = [torch.Generator().manual_seed(cfg.seed * 7_919 + i) for i in range(inner.members)]
        sets = [train.bootstrap(g) if cfg.bootstrap else train for g in gens]

    ckpt = Path(out_dir) / "checkpoint" if out_dir else None
    start_epoch, step, history = 0, 0, []
    if resume and ckpt and (ckpt / "state.json").exists():
        start_epoch, step = _load_checkpoint(ckpt, inner, opt)
        history = read_json(Path(out_dir) / "history.json") if (Path(out_dir) / "history.json").exists() else []
        sched.last_epoch = step - 1
        with warnings.catch_warnings():  # stepping the schedule to where it was, before any optimizer step
            warnings.simplefilter("ignore", UserWarning)
            sched.step()
    t0 = time.perf_counter()
    model.train()
    for epoch in range(start_epoch, cfg.epochs):
        loss_sum, correct, seen = 0.0, 0, 0
        bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress or not accelerator.is_main_process)
        for i, (x, y) in enumerate(_member_batches(inner, train, cfg, epoch, sets)):
            if i >= steps:
                break
            logits = model(x)  # (K, N, C)
            target = y if y.dim() == 2 else y.expand(logits.shape[0], -1)  # (K, N)
            loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), label_smoothing=cfg.label_smoothing)
            loss = loss * logits.shape[0]  # sum over members of each member's mean loss
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
            loss_sum += loss.item() / logits.shape[0] * y.shape[-1]
            correct += (logits.argmax(-1) == target).float().mean(0).sum().item()
            seen += y.shape[-1]
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", lr=f"{sched.get_last_lr()[0]:.4f}")
            bar.update()
        bar.close()
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1)})
        if ckpt and accelerator.is_main_process:
            _save_checkpoint(ckpt, inner, opt, epoch + 1, step, cfg)
            write_json(Path(out_dir) / "history.json", history)
    record = {"config": asdict(cfg), "history": history, "train_seconds": time.perf_counter() - t0, "steps": step}
    if test is not None:
        from .metrics import evaluate_ensemble

        logits = predict(inner, test, cfg.eval_batch_size)
        record["test"] = evaluate_ensemble(logits, test.y.cpu())
        record["_test_logits"] = logits
    return record
