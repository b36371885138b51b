"""Members on a trunk that goes on training: "late-phase weights" (von Oswald et al., ICLR 2021).

The frozen-backbone recipes cut the members from one model's run and freeze everything else, so the
trunk stops annealing where the members start; a member then anneals only its slice while the single
model it is compared with anneals every weight. Here the trunk keeps training with the members: each
step, one member (in turn, ``step % K``) runs on the batch with its slice merged into the trunk, and
the step updates that member's slice and the whole trunk. A step costs one model's step; the trunk
sees every batch, each member's slice one batch in K. At the end the trunk is frozen (stored once
beside the slices, like a warm start) and the members are an ordinary :class:`Ensemble` on it.

``diversity=Diversity(...)`` adds a term that pushes the members apart *off* the data: each step, some
of the batch's images are cut into patches and shuffled (:func:`jigsaw`: local texture kept, the object
gone) and the stepping member is penalised for agreeing with the others' mean prediction on them
(D-BAT's idea, Pagliardini et al., ICLR 2023, with self-made outliers). A single model cannot disagree
with itself, so this is a lever only an ensemble has; it costs more per step, and the step is timed
with it.

``LatePhase`` holds the trunk (a plain module, every weight trainable) and K slices keyed by the
backbone's parameter names, kept apart; ``forward(x, member)`` merges them with ``functional_call``
as the ensemble's template does. Training code lives in :func:`train_late_phase`.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, fields

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

__all__ = ["Diversity", "LatePhase", "jigsaw", "train_late_phase"]


def jigsaw(x: torch.Tensor, patch: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each image's ``patch`` x ``patch`` tiles put in a random order of its own (pixels past the last
    whole tile stay where they are): an outlier that keeps the data's local statistics.

    Shape: ``(N, C, H, W) -> (N, C, H, W)``.
    """
    if x.dim() != 4:
        raise ValueError(f"jigsaw takes images (N, C, H, W), got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    if not isinstance(patch, int) or not 1 <= patch <= min(h, w):
        raise ValueError(f"jigsaw patch must be an integer in [1, {min(h, w)}] for {h}x{w} images, got {patch!r}")
    gh, gw = h // patch, w // patch
    tiles = x[:, :, :gh * patch, :gw * patch].reshape(n, c, gh, patch, gw, patch).permute(0, 2, 4, 1, 3, 5)
    tiles = tiles.reshape(n, gh * gw, c, patch, patch)
    order = torch.argsort(torch.rand(n, gh * gw, generator=generator), dim=1).to(x.device)
    tiles = tiles[torch.arange(n, device=x.device)[:, None], order]
    out = x.clone()
    tiles = tiles.reshape(n, gh, gw, c, patch, patch).permute(0, 3, 1, 4, 2, 5)
    out[:, :, :gh * patch, :gw * patch] = tiles.reshape(n, c, gh * patch, gw * patch)
    return out


_REACHES = ("trunk", "slice")  # where a Diversity term's gradient goes


@dataclass(frozen=True)
class Diversity:
    """Members made to disagree on self-made outliers (see the module docstring).

    Args:
        weight: the term's weight against the cross-entropy (> 0).
        patch: the tile side in pixels of :func:`jigsaw` (14 on 28x28 images: 4 tiles).
        batch: how many of each batch's images become outliers (the first ``batch`` of it).
        reach: where the term's gradient goes. ``"trunk"``: the stepping member's slice and the whole trunk.
            ``"slice"``: its slice only; the stages no member owns then run once on the outliers, without
            gradient, so the term costs a small part of a step, and the trunk learns from the data alone.

    The outliers run through the network in training mode, so BatchNorm's running statistics see them
    too; ``TrainConfig(precise_bn=...)`` re-estimates them on the data at the end (the main job's default).
    """
    weight: float = 1.0
    patch: int = 14
    batch: int = 16
    reach: str = "trunk"

    def __post_init__(self) -> None:
        if self.reach not in _REACHES:
            raise ValueError(f"Diversity reach must be one of {', '.join(_REACHES)}, got {self.reach!r}")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not (
                math.isfinite(self.weight) and self.weight > 0):
            raise ValueError(f"Diversity weight must be a finite number > 0, got {self.weight!r}")
        for name in ("patch", "batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"Diversity {name} must be a positive integer, got {v!r}")

    @classmethod
    def parse(cls, items) -> "Diversity":
        """From ``KEY=VALUE`` strings (``weight=1``, ``patch=14``, ``batch=32``); unknown keys and bad
        values are errors naming them."""
        names = [f.name for f in fields(cls)]
        values = {}
        for item in items:
            key, sep, text = item.partition("=")
            key = key.strip()
            if not sep or key not in names:
                raise ValueError(f"diversity takes KEY=VALUE with KEY one of {', '.join(names)}, got {item!r}")
            kind = type(getattr(cls, key))  # the default's type: float for weight, int for patch and batch
            try:
                values[key] = kind(text)
            except ValueError:
                raise ValueError(f"diversity {key}={text!r}: expected {kind.__name__}") from None
        return cls(**values)

    def loss(self, model: "LatePhase", x: torch.Tensor, member: int, generator: torch.Generator | None
             ) -> torch.Tensor:
        """``weight`` x the mean probability that ``member`` and the others' mean pick the same class
        on jigsawed images of ``x`` (gradient through ``member`` only)."""
        outliers = _layout(jigsaw(x[:self.batch], self.patch, generator))
        if self.reach == "slice":
            with torch.no_grad():
                h = model.prefix(outliers)
                others = torch.stack([model.suffix(h, j).float().softmax(-1)
                                      for j in range(model.members) if j != member]).mean(0)  # (n, C)
            mine = model.suffix(h, member).float().softmax(-1)  # (n, C), gradient into the slice only
            return self.weight * (mine * others).sum(-1).mean()
        with torch.no_grad():
            others = torch.stack([model(outliers, j).float().softmax(-1)
                                  for j in range(model.members) if j != member]).mean(0)  # (n, C)
        mine = model(outliers, member).float().softmax(-1)  # (n, C)
        return self.weight * (mine * others).sum(-1).mean()


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
        self.prefix_stages, self.member_stages = start.prefix_stages, start.member_stages  # shared data: run once
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

    def prefix(self, x: torch.Tensor) -> torch.Tensor:
        """The trunk's stages before the first one a member owns (the same for every member)."""
        for s in self.prefix_stages:
            x = self.trunk.stages[s](x)
        return x

    def suffix(self, h: torch.Tensor, member: int) -> torch.Tensor:
        """Member ``member``'s stages on prefix features ``h``, with the trunk's tensors detached: a
        gradient reaches only the member's slice. Shape: ``(N, ...) -> (N, classes)``."""
        trunk = {n: p.detach() for n, p in self.trunk.named_parameters()}
        mine = self.slices[member]
        tensors = {**trunk, **{n: _merge(trunk[n], mine[_esc(n)], sl) for n, sl in self.layout.items()}}
        for s in self.member_stages:
            head = f"stages.{s}."
            h = functional_call(self.trunk.stages[s],
                                {n[len(head):]: t for n, t in tensors.items() if n.startswith(head)}, (h,))
        return h

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


def _step(model: LatePhase, opt, x: torch.Tensor, y: torch.Tensor, member: int, label_smoothing: float,
          diversity: Diversity | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One optimizer step of member ``member`` and the trunk on ``(x, y)``; returns the logits (detached)."""
    logits = model(_layout(x), member)  # (N, C)
    loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
    if diversity is not None:
        loss = loss + diversity.loss(model, x, member, generator)
    if not torch.isfinite(loss):
        raise NonFiniteLoss(f"late-phase loss became {loss.item()} (member {member}); lower lr or check the "
                            "inputs for NaN")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return logits.detach()


def timing_step(model: LatePhase, x: torch.Tensor, y: torch.Tensor, momentum: float,
                diversity: Diversity | None = None):
    """One late-phase step on the batch ``(x, y)`` (with its diversity term, if any), as a function to
    time (``model`` is a throwaway)."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-6, momentum=momentum)
    model.train_layout().train()
    g = torch.Generator().manual_seed(0)
    return lambda: _step(model, opt, x, y, 0, 0.0, diversity, g)


def check_diversity(diversity, members: int) -> None:
    """A diversity term needs a :class:`Diversity` and at least two members to disagree."""
    if diversity is None:
        return
    if not isinstance(diversity, Diversity):
        raise TypeError(f"diversity must be a Diversity(...) or None, got {type(diversity).__name__}")
    if members < 2:
        raise ValueError(f"diversity makes members disagree: it needs K >= 2 members, got {members}")


def _calibration_steps(guess: int) -> int:
    """How many steps (after the first) are timed to size a phase of about ``guess`` steps."""
    return max(1, min(20, guess // 4))


def train_late_phase(module: nn.Module, spec: SliceSpec, members: int, train: TensorData, config: TrainConfig, *,
                     member_init: str = "backbone", seed: int = 0, slice_lr_scale: float = 1.0,
                     diversity: Diversity | None = None, seconds: float | None = None,
                     progress: bool = True) -> tuple[Ensemble, dict]:
    """Train K members' slices and the trunk under them, one member per step in turn; return the
    ensemble (trunk frozen at the end, precise BN per member when ``config.precise_bn``) and a record.

    ``config`` as for :func:`~shared_backbone.train.fit`: its epochs (of at most
    ``max_steps_per_epoch`` batches), lr and cosine piece ``[schedule_from, schedule_to]``, label
    smoothing, augmentation and seed. Every member sees the same seeded batch stream, one batch in K.
    ``slice_lr_scale`` multiplies the members' slices' learning rate (the trunk keeps ``config.lr``),
    on the same cosine: members that move further apart while the trunk anneals as one model's would.
    ``diversity``: a :class:`Diversity` term added to each step's loss (its outliers drawn from a
    generator seeded by ``config.seed``).
    ``seconds``: a wall-clock budget for the phase's steps. Its steps are timed in the loop (a step's cost
    there, not a micro-benchmark's) and every few steps (up to 20) the phase's length, and its cosine, are
    set from their mean so that it ends with the budget; ``config``'s steps are only the first guess (later
    epochs may reshuffle the data).
    """
    if not (isinstance(slice_lr_scale, (int, float)) and math.isfinite(slice_lr_scale) and slice_lr_scale > 0):
        raise ValueError(f"slice_lr_scale must be a finite number > 0, got {slice_lr_scale!r}")
    if not isinstance(members, int) or members < 1:
        raise ValueError(f"members must be a positive integer (K >= 1), got {members!r}")
    if len(train) == 0:
        raise ValueError("the training set is empty: nothing to train on")
    check_diversity(diversity, members)
    if seconds is not None and not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"seconds must be a finite number > 0 (the phase's wall-clock budget), got {seconds!r}")
    outliers = torch.Generator().manual_seed(config.seed * 100_003 + 7)
    model = LatePhase(module, spec, members, member_init=member_init, seed=seed)
    device = next(module.parameters()).device
    model.to(device).train_layout().train()
    opt = _sgd(model, config, slice_lr_scale)
    steps = _steps_per_epoch(len(train), config)
    length = [steps * config.epochs]  # the phase's steps: the first guess, reset by the timing when seconds is given

    def factor(s: int) -> float:  # the cosine over the phase's length as it stands at step s
        return _cosine(length[0], config.schedule_from, config.schedule_to)(s)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    if seconds is not None:  # epochs as long as the data allows: the timed length may need more than the guess
        steps = _steps_per_epoch(len(train), TrainConfig.from_dict({**asdict(config), "max_steps_per_epoch": None}))
    calibrate = _calibration_steps(length[0]) if seconds is not None else 0
    history, step, epoch, t0 = [], 0, 0, time.perf_counter()
    while step < length[0]:
        g = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        loss_sum = correct = seen = 0.0
        bar = tqdm(total=min(steps, length[0] - step), desc=f"late phase {epoch + 1}",
                   disable=None if progress else True)
        for i, (x, y) in enumerate(train.batches(config.batch_size, shuffle=True, generator=g, augment=config.augment)):
            if i >= steps or step >= length[0]:
                break
            x, y = x.to(device), y.to(device)
            logits = _step(model, opt, x, y, step % members, config.label_smoothing, diversity, outliers)
            sched.step()
            step += 1
            if step == 1:
                t1 = time.perf_counter()  # the first step (warm-up, allocations) is not timed
            elif calibrate and (step - 1) % calibrate == 0:  # every `calibrate` steps, from the steps' own cost
                now = time.perf_counter()  # timed in the loop so far: as many steps as fit in what is left
                per_step = (now - t1) / (step - 1)
                length[0] = max(step, math.floor((seconds - (now - t0)) / per_step) + step)
                bar.total = min(steps, length[0] - step + i + 1)
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
            correct += (logits.argmax(-1) == y).sum().item()
            seen += len(y)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
            bar.update()
        bar.close()
        epoch += 1
        if seen == 0:  # an epoch without a batch would never end the phase
            raise ValueError(f"the late phase got no batch in epoch {epoch} ({len(train)} images, batch size "
                             f"{config.batch_size})")
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            raise NonFiniteLoss(f"a late-phase weight became NaN or infinite in epoch {epoch}; lower lr "
                                f"(now {config.lr})")
        history.append({"epoch": epoch, "train_loss": loss_sum / max(seen, 1),
                        "train_accuracy": correct / max(seen, 1)})
    spent = time.perf_counter() - t0
    ens = model.to_ensemble()
    if config.precise_bn:
        recalibrate_bn(ens, train, config.precise_bn, config.batch_size, config.seed)
    return ens, {"config": asdict(config), "history": history,
                 "train_seconds": spent, "seconds_budget": seconds, "steps": step, "members_per_step": 1,
                 "slice_lr_scale": slice_lr_scale,
                 "diversity": asdict(diversity) if diversity is not None else None,
                 "steps_per_member": [len(range(i, step, members)) for i in range(members)]}
