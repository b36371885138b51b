"""Members on a trunk that goes on training: "late-phase weights" (von Oswald et al., ICLR 2021).

The frozen-backbone recipes cut the members from one model's run and freeze everything else, so the
trunk stops annealing where the members start; a member then anneals only its slice while the single
model it is compared with anneals every weight. Here the trunk keeps training with the members: each
step, one member (in turn, ``step % K``) runs on the batch with its slice merged into the trunk, and
the step updates that member's slice and the whole trunk. A step costs one model's step; the trunk
sees every batch, each member's slice one batch in K. At the end the trunk is frozen (stored once
beside the slices, like a warm start) and the members are an ordinary :class:`Ensemble` on it.

``LatePhase`` holds the trunk (a plain module, every weight trainable) and K slices keyed by the
backbone's parameter names, kept apart; ``forward(x, member)`` merges them with ``functional_call``
as the ensemble's template does. Training code lives in :func:`train_late_phase`.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from .data import TensorData
from .ensemble import Ensemble, _esc
from .frozen import FrozenBackbone
from .slices import SliceSpec
from .train import NonFiniteLoss, TrainConfig, _cosine, _steps_per_epoch, recalibrate_bn

__all__ = ["LatePhase", "train_late_phase"]


def _merge(trunk: torch.Tensor, learned: torch.Tensor, sl) -> torch.Tensor:
    """The member's full tensor: its learned rows, then the trunk's rest (which trains too, unlike
    :func:`._template.merge_param`'s frozen rest)."""
    if sl.whole:
        return learned
    rest = trunk.narrow(sl.dim, sl.n, trunk.shape[sl.dim] - sl.n)
    return torch.cat([learned, torch.zeros_like(rest) if sl.fixed == "zero" else rest], dim=sl.dim)


class LatePhase(nn.Module):
    """A trainable trunk and K members' slices of it; one member per forward.

    Args:
        module: the trunk, a plain backbone module (copied; every weight of the copy trains).
        spec: what each member owns, e.g. ``Filters(0.125, stages=["block3"]) + BatchNorm(...) + Head()``.
        members: K.
        member_init: ``"backbone"`` (every slice starts as the trunk's values) or ``"random"`` (drawn
            afresh per member, as :class:`Ensemble` draws them).
        seed: seeds ``"random"`` slices.

    Shape:
        ``forward(x, member)``: ``(N, C, H, W) -> (N, classes)``.
    """

    def __init__(self, module: nn.Module, spec: SliceSpec, members: int, *, member_init: str = "backbone",
                 seed: int = 0):
        super().__init__()
        start = Ensemble(FrozenBackbone.from_module(module), spec, members=members, member_init=member_init, seed=seed)
        self.spec, self.layout, self.members = spec, start.layout, members
        self.trunk = copy.deepcopy(module)
        for p in self.trunk.parameters():
            p.requires_grad_(True)
        self.slices = nn.ModuleList(
            nn.ParameterDict({_esc(n): nn.Parameter(t.detach().clone()) for n, t in start.slice_of(i).items()})
            for i in range(members))

    def merged(self, member: int) -> dict[str, torch.Tensor]:
        """Member ``member``'s full tensors for every parameter it owns a slice of (gradients reach both parts)."""
        trunk = dict(self.trunk.named_parameters())
        mine = self.slices[member]
        return {n: _merge(trunk[n], mine[_esc(n)], sl) for n, sl in self.layout.items()}

    def forward(self, x: torch.Tensor, member: int) -> torch.Tensor:
        return functional_call(self.trunk, self.merged(member), (x,))  # (N, classes)

    def train_layout(self) -> "LatePhase":
        """Every 4-d weight in channels_last (with inputs in it too, oneDNN's and cuDNN's fast convs: on
        this 2-core CPU a step costs 0.8x the NCHW one); values and results are unchanged."""
        return self.to(memory_format=torch.channels_last)

    def to_ensemble(self) -> Ensemble:
        """The trained members on the trunk, frozen as it is now: an ordinary :class:`Ensemble`
        (shared data, so the stages no member owns run once). BatchNorm statistics are the trunk's."""
        trunk = copy.deepcopy(self.trunk).requires_grad_(False).to(memory_format=torch.contiguous_format)
        ens = Ensemble(FrozenBackbone.from_module(trunk), self.spec, members=self.members, member_init="backbone")
        for i, mine in enumerate(self.slices):
            ens.set_member(i, {n: mine[_esc(n)].detach().contiguous() for n in self.layout})
        return ens.train(self.training)


def _sgd(model: LatePhase, config: TrainConfig, slice_lr_scale: float = 1.0) -> torch.optim.SGD:
    # one tensor per member slice: a member's slice that sat out a step has no gradient and SGD skips it
    # (no weight decay, no momentum), so each slice trains as if alone on its own steps
    groups = [{"params": list(model.trunk.parameters())},
              {"params": list(model.slices.parameters()), "lr": config.lr * slice_lr_scale}]
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                           nesterov=config.nesterov and config.momentum > 0, weight_decay=config.weight_decay)


def _layout(x: torch.Tensor) -> torch.Tensor:
    """Images in channels_last, the layout :meth:`LatePhase.train_layout` puts the weights in."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def _step(model: LatePhase, opt, x: torch.Tensor, y: torch.Tensor, member: int, label_smoothing: float
          ) -> torch.Tensor:
    """One optimizer step of member ``member`` and the trunk on ``(x, y)``; returns the logits (detached)."""
    logits = model(_layout(x), member)  # (N, C)
    loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
    if not torch.isfinite(loss):
        raise NonFiniteLoss(f"late-phase loss became {loss.item()} (member {member}); lower lr or check the "
                            "inputs for NaN")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return logits.detach()


def timing_step(model: LatePhase, x: torch.Tensor, y: torch.Tensor, momentum: float):
    """One late-phase step on the batch ``(x, y)``, as a function to time (``model`` is a throwaway)."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-6, momentum=momentum)
    model.train_layout().train()
    return lambda: _step(model, opt, x, y, 0, 0.0)


def train_late_phase(module: nn.Module, spec: SliceSpec, members: int, train: TensorData, config: TrainConfig, *,
                     member_init: str = "backbone", seed: int = 0, slice_lr_scale: float = 1.0,
                     progress: bool = True) -> tuple[Ensemble, dict]:
    """Train K members' slices and the trunk under them, one member per step in turn; return the
    ensemble (trunk frozen at the end, precise BN per member when ``config.precise_bn``) and a record.

    ``config`` as for :func:`~shared_backbone.train.fit`: its epochs (of at most
    ``max_steps_per_epoch`` batches), lr and cosine piece ``[schedule_from, schedule_to]``, label
    smoothing, augmentation and seed. Every member sees the same seeded batch stream, one batch in K.
    ``slice_lr_scale`` multiplies the members' slices' learning rate (the trunk keeps ``config.lr``),
    on the same cosine: members that move further apart while the trunk anneals as one model's would.
    """
    if not (isinstance(slice_lr_scale, (int, float)) and math.isfinite(slice_lr_scale) and slice_lr_scale > 0):
        raise ValueError(f"slice_lr_scale must be a finite number > 0, got {slice_lr_scale!r}")
    if not isinstance(members, int) or members < 1:
        raise ValueError(f"members must be a positive integer (K >= 1), got {members!r}")
    if len(train) == 0:
        raise ValueError("the training set is empty: nothing to train on")
    model = LatePhase(module, spec, members, member_init=member_init, seed=seed)
    device = next(module.parameters()).device
    model.to(device).train_layout().train()
    opt = _sgd(model, config, slice_lr_scale)
    steps = _steps_per_epoch(len(train), config)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _cosine(steps * config.epochs, config.schedule_from,
                                                           config.schedule_to))
    history, step, t0 = [], 0, time.perf_counter()
    for epoch in range(config.epochs):
        g = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        loss_sum = correct = seen = 0.0
        bar = tqdm(total=steps, desc=f"late phase {epoch + 1}/{config.epochs}", disable=None if progress else True)
        for i, (x, y) in enumerate(train.batches(config.batch_size, shuffle=True, generator=g, augment=config.augment)):
            if i >= steps:
                break
            x, y = x.to(device), y.to(device)
            logits = _step(model, opt, x, y, step % members, config.label_smoothing)
            sched.step()
            step += 1
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
            correct += (logits.argmax(-1) == y).sum().item()
            seen += len(y)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
            bar.update()
        bar.close()
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            raise NonFiniteLoss(f"a late-phase weight became NaN or infinite in epoch {epoch + 1}; lower lr "
                                f"(now {config.lr})")
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1),
                        "train_accuracy": correct / max(seen, 1)})
    seconds = time.perf_counter() - t0
    ens = model.to_ensemble()
    if config.precise_bn:
        recalibrate_bn(ens, train, config.precise_bn, config.batch_size, config.seed)
    return ens, {"config": asdict(config), "history": history,
                 "train_seconds": seconds, "steps": step, "members_per_step": 1, "slice_lr_scale": slice_lr_scale,
                 "steps_per_member": [len(range(i, step, members)) for i in range(members)]}
