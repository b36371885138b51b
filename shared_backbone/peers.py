"""The library's cheap ensemble next to its peers, at one wall-clock budget, in one run.

Arms (see :data:`ARMS`):

- ``cheap``: the library's ensemble, K members of ``spec`` on one frozen backbone (optionally
  warm-started); trained first, for ``epochs``; its wall time, warm start included, is the budget
  unless ``budget_seconds`` is given;
- ``single``: one full model of the same backbone (``Full()``);
- ``deep``: K independent full models, sharing the budget;
- ``batch_ensemble``, ``packed``: torch-uncertainty's BatchEnsemble and Packed-Ensembles
  ResNets (its own builders, ``style="cifar"``, the same depth and width), K estimators.

Every arm sees the same data in the same order (the recipe's seeded batches and augmentation),
the same optimizer, learning rate, weight decay, label smoothing and per-step cosine schedule,
set for the number of steps that fit in the budget (timed over a few steps on a throw-away copy
first), and the same evaluation code (:func:`~shared_backbone.metrics.evaluate_ensemble` on
``(K, N, C)`` logits, :func:`~shared_backbone.flops.inference_flops`). The library's arms train
with :func:`~shared_backbone.train.fit`; torch-uncertainty's with the loss its own
``ClassificationRoutine`` uses (mean cross-entropy over all estimators' outputs, targets repeated
for Packed-Ensembles). ``precise_bn`` batches of BN re-estimation apply to every arm.
torch-uncertainty is optional (``pip install 'shared_backbone[peers]'``): without it those arms
are skipped, with the reason in ``skipped``.

:func:`compare_with_recipe` puts the library's *default recipe* in the ``cheap`` row instead:
:func:`~shared_backbone.recipes.train_ensemble` with a budget in single-model epochs, the members
finishing the single model's own schedule; its single model (the run the warm start is cut from,
trained to the end of the same budget) is the ``single`` row, and the ensemble's wall time is the
budget of every other arm.
"""
from __future__ import annotations

import copy
import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace

import torch
import torch.nn.functional as F
from torch import nn

from ._norms import BATCH_NORMS_ONLY
from .backbones import build_backbone
from .data import TensorData
from .describe import describe
from .ensemble import Ensemble
from .flops import inference_flops
from .frozen import FrozenBackbone
from .metrics import evaluate_ensemble
from .recipes import train_ensemble, warm_start
from .slices import BatchNorm, Filters, Full, Head, SliceSpec
from .train import TrainConfig, fit, predict

__all__ = ["ARMS", "TU_ARMS", "torch_uncertainty_missing", "check_arms", "compare_peers", "compare_with_recipe",
           "state_bytes"]

log = logging.getLogger(__name__)

ARMS = ("cheap", "single", "deep", "batch_ensemble", "packed")
TU_ARMS = ("batch_ensemble", "packed")
_CALIBRATION_STEPS = 4  # timed steps (after one untimed) that set each arm's step count


def torch_uncertainty_missing() -> str | None:
    """None when torch-uncertainty's ResNet builders import, else why not (for a skip message)."""
    try:  # an optional extra ([peers]): imported only when its arms run
        from torch_uncertainty.models.classification import batched_resnet, packed_resnet  # noqa: F401
    except ImportError as e:
        return (f"torch-uncertainty is not importable ({e}); install the extra: pip install "
                "'shared_backbone[peers]'")
    return None


def state_bytes(module: nn.Module) -> int:
    """Bytes of every tensor in ``module.state_dict()``: what saving it costs."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def _depth(backbone: str) -> int:
    digits = "".join(c for c in backbone if c.isdigit())
    if not backbone.startswith("resnet") or not digits:
        raise ValueError(f"the peers need a CIFAR ResNet backbone (resnet20, resnet32, ...), got {backbone!r}")
    return int(digits)


# -- torch-uncertainty's models as (K, N, C) predictors ---------------------------------------------
class _Estimators(nn.Module):
    """A torch-uncertainty model whose ``(K*N, C)`` output (estimator-major) becomes ``(K, N, C)``."""

    def __init__(self, model: nn.Module, k: int):
        super().__init__()
        self.model, self.k = model, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).unflatten(0, (self.k, -1))


def _tu_model(arm: str, k: int, depth: int, width: int, in_channels: int, num_classes: int, alpha: float,
              gamma: int) -> nn.Module:
    from torch_uncertainty.models.classification import batched_resnet, packed_resnet  # optional extra ([peers])

    common = {"in_channels": in_channels, "num_classes": num_classes, "arch": depth, "num_estimators": k,
              "style": "cifar", "width_multiplier": width / 16}
    if arm == "batch_ensemble":
        return batched_resnet(**common)
    return packed_resnet(**common, alpha=alpha, gamma=gamma)


def _check_tu_arms(arms: Sequence[str], k: int, depth: int, width: int, in_channels: int, num_classes: int,
                   alpha: float, gamma: int) -> None:
    """Build each asked torch-uncertainty model on the meta device (no memory, no time) so that a
    setting it refuses (Packed-Ensembles needs its channels divisible by K) fails before any arm trains."""
    if torch_uncertainty_missing() is not None:
        return
    for arm in (a for a in arms if a in TU_ARMS):
        try:
            with torch.device("meta"):
                _tu_model(arm, k, depth, width, in_channels, num_classes, alpha, gamma)
        except (ValueError, AssertionError) as err:
            hint = (" Choose peer_members (--peer-members) that divides its channels, e.g. 2 or 4 at width 16,"
                    if "divisible" in str(err) else "")
            raise ValueError(f"torch-uncertainty refuses {arm} with K={k} (width {width}, alpha {alpha:g}, "
                             f"gamma {gamma}): {str(err).rstrip('.')}.{hint} or leave {arm} out of arms") from None


def check_arms(arms: Sequence[str], *, members: int, peer_members: int | None = None, backbone: str = "resnet20",
               width: int = 16, in_channels: int = 1, num_classes: int = 10, packed_alpha: float = 2,
               packed_gamma: int = 1) -> int:
    """Every check :func:`compare_peers` and :func:`compare_with_recipe` make before training anything
    (arm names, K, the backbone's depth for torch-uncertainty's builders, settings they refuse);
    a ``ValueError`` names the bad value. Returns the peers' K."""
    bad = [a for a in arms if a not in ARMS]
    if bad or not arms:
        raise ValueError(f"unknown arm(s) {bad or list(arms)!r}; accepted: {', '.join(ARMS)}")
    peer_members = members if peer_members is None else peer_members
    for name, value in (("members", members), ("peer_members", peer_members)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if any(a in TU_ARMS for a in arms):
        _check_tu_arms(arms, peer_members, _depth(backbone), width, in_channels, num_classes, packed_alpha,
                       packed_gamma)
    return peer_members


def _tu_loss(arm: str, k: int, label_smoothing: float) -> Callable:
    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = model.model(x)  # train mode: packed (K*N, C); batch ensemble "paper" strategy: (N, C)
        target = y.repeat(k) if out.shape[0] == k * y.shape[0] and arm == "packed" else y
        return F.cross_entropy(out, target, label_smoothing=label_smoothing)
    return loss


def _train_steps(model: nn.Module, train: TensorData, cfg: TrainConfig, steps: int, loss_fn: Callable,
                 on_step: Callable[[int], None] | None = None) -> None:
    """``steps`` optimizer steps of the recipe fit() uses (SGD Nesterov, cosine per step, the same
    seeded batches and augmentation, weight decay on every parameter) on a plain module."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                          weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    step, epoch = 0, 0
    while step < steps:
        g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)  # fit()'s shared-data stream
        for x, y in train.batches(cfg.batch_size, shuffle=True, generator=g, augment=cfg.augment):
            loss = loss_fn(model, x, y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at step {step}; lower lr (now {cfg.lr})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if on_step is not None:
                on_step(step)
            if step == steps:
                break
        epoch += 1


@torch.no_grad()
def _precise_bn(model: nn.Module, train: TensorData, batches: int, batch_size: int, seed: int) -> None:
    """fit()'s precise BN for a plain module: running statistics as equal-weight averages over
    ``batches`` unaugmented training batches (momentum None = cumulative average)."""
    bns = [m for m in model.modules() if isinstance(m, BATCH_NORMS_ONLY)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    g = torch.Generator().manual_seed(seed)
    for i, (x, _) in enumerate(train.batches(batch_size, shuffle=True, generator=g)):
        if i == batches:
            break
        model(x)
    for m, mom in zip(bns, momenta):
        m.momentum = mom


def _seconds_per_step(run: Callable[[Callable[[int], None]], None]) -> float:
    """Median seconds per step of ``run(on_step)`` between its steps (the first step, with its set-up, untimed)."""
    t0 = time.perf_counter()
    stamps: list[float] = []
    run(lambda step: stamps.append(time.perf_counter()))
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    if not stamps:
        raise RuntimeError("the timing run took no step: is the training set empty?")
    return statistics.median(gaps) if gaps else stamps[0] - t0


def _fit_config(cfg: TrainConfig, steps: int, n_train: int) -> TrainConfig:
    """A fit() config that takes ``steps`` steps (within one per epoch) with the cosine over all of them."""
    per_epoch = math.ceil(n_train / cfg.batch_size)
    epochs = max(1, math.ceil(steps / per_epoch))
    return replace(cfg, epochs=epochs, max_steps_per_epoch=max(1, math.ceil(steps / epochs)))


def _steps_in(budget: float, per_step: float) -> int:
    return max(1, int(budget / per_step))


def _row(arm: str, label: str, predictor: Callable, k: int, steps: int, seconds: float, stored: int, flops: float,
         test: TensorData, ood: TensorData | None) -> dict:
    """One table row: the arm's costs and :func:`evaluate_ensemble` of its ``(K, N, C)`` logits."""
    m = evaluate_ensemble(predictor(test), test.y.cpu(), predictor(ood) if ood is not None else None)
    row = _table_row(arm, label, k, steps, seconds, flops, stored, m)
    log.info("%s: accuracy %.4f in %.0f s", label, row["accuracy"], seconds)
    return row


_METRICS = ("accuracy", "nll", "ece", "brier", "mean_member_accuracy", "disagreement")
_OOD_METRICS = ("ood_auroc_max_prob", "ood_auroc_mutual_info", "ood_fpr95_max_prob", "ood_fpr95_ood_positive_max_prob")


def _table_row(arm: str, label: str, k: int, steps: int, seconds: float, flops: float, stored: int,
               metrics: dict) -> dict:
    """One row from :func:`evaluate_ensemble`'s ``metrics`` (OOD keys only where it has them)."""
    row = {"arm": arm, "label": label, "members": k, "steps": steps, "train_seconds": seconds,
           "flops_per_image": flops, "bytes_stored": stored, **{key: metrics[key] for key in _METRICS}}
    if "ood_auroc_max_prob" in metrics:
        row.update({key: metrics[key] for key in _OOD_METRICS})
        if k == 1:
            row["ood_auroc_mutual_info"] = None  # one model has no mutual information
    return row


def _cheap_arm(train, backbone, bcfg, spec, members, warm_start_epochs, cfg, progress):
    """The library's ensemble for ``cfg.epochs``: ``(model, steps, seconds incl. warm start, bytes stored)``."""
    t0 = time.perf_counter()
    if warm_start_epochs:
        frozen = warm_start(backbone, bcfg, train, warm_start_epochs, cfg, cfg.seed, progress)
    else:
        frozen = FrozenBackbone(build_backbone(backbone, **bcfg), seed=cfg.seed)
    ens = Ensemble(frozen, spec, members=members, member_init="backbone" if warm_start_epochs else "random",
                   seed=cfg.seed, data="own" if warm_start_epochs else "shared")
    record = fit(ens, train, None, cfg, progress=progress)
    seconds = time.perf_counter() - t0
    stored = members * describe(frozen, spec, members=members, verbose=False)["stored_bytes"]
    stored += state_bytes(frozen.backbone) if warm_start_epochs else 0  # a trained backbone must be stored
    return ens, record["steps"], seconds, stored


def _full_arm(train, backbone, bcfg, k, budget, cfg, progress):
    """K full models (fit(), Full()) for the steps that fit in ``budget``: ``(model, steps, seconds, bytes)``."""
    def build():
        frozen = FrozenBackbone(build_backbone(backbone, **bcfg), seed=cfg.seed)
        return Ensemble(frozen, Full(), members=k, seed=cfg.seed, vectorized=torch.cuda.is_available())

    probe = replace(cfg, epochs=1, max_steps_per_epoch=_CALIBRATION_STEPS + 1, precise_bn=0)
    steps = _steps_in(budget, _seconds_per_step(
        lambda on_step: fit(build(), train, None, probe, on_step=on_step, progress=False)))
    model = build()
    t0 = time.perf_counter()
    record = fit(model, train, None, _fit_config(cfg, steps, len(train)), progress=progress)
    seconds = time.perf_counter() - t0
    return model, record["steps"], seconds, sum(state_bytes(model.member(i)) for i in range(k))


def _tu_arm(arm, train, depth, width, in_channels, num_classes, k, budget, cfg, alpha, gamma):
    """A torch-uncertainty model for the steps that fit in ``budget``: ``(model, steps, seconds, bytes)``."""
    torch.manual_seed(cfg.seed)
    model = _Estimators(_tu_model(arm, k, depth, width, in_channels, num_classes, alpha, gamma), k)
    loss = _tu_loss(arm, k, cfg.label_smoothing)
    probe = copy.deepcopy(model)
    steps = _steps_in(budget, _seconds_per_step(
        lambda on_step: _train_steps(probe, train, cfg, _CALIBRATION_STEPS + 1, loss, on_step)))
    t0 = time.perf_counter()
    _train_steps(model, train, cfg, steps, loss)
    if cfg.precise_bn:
        # the raw model: in train mode BatchEnsemble gives (N, C), one estimator per chunk, not (K*N, C)
        _precise_bn(model.model, train, cfg.precise_bn, cfg.batch_size, cfg.seed)
    return model, steps, time.perf_counter() - t0, state_bytes(model.model)


def compare_peers(train: TensorData, test: TensorData, ood: TensorData | None = None, *,
                  arms: Sequence[str] = ARMS, members: int = 4, spec: SliceSpec | None = None,
                  warm_start_epochs: int = 0, epochs: int = 2, backbone: str = "resnet20", width: int = 16,
                  config: TrainConfig | None = None, budget_seconds: float | None = None,
                  packed_alpha: float = 2, packed_gamma: int = 1, num_classes: int | None = None,
                  flops_batch: int = 8, progress: bool = False, peer_members: int | None = None) -> dict:
    """Train every arm at one wall-clock budget and evaluate them alike; return a JSON-ready dict:
    ``{"budget_seconds", "config", "rows": [...], "skipped": {arm: reason}}`` (module docstring).
    ``members``: K of the cheap arm, and of the deep and torch-uncertainty arms unless ``peer_members``.

    Each row: ``arm``, ``label``, ``members``, ``steps``, ``train_seconds``, ``flops_per_image``,
    ``bytes_stored`` and the metrics (accuracy, NLL, ECE, Brier, OOD AUROC and both FPR@95
    conventions; ``ood_auroc_mutual_info`` is None for one model).
    """
    num_classes = num_classes or _labels_seen(train, test)
    in_channels = train.x.shape[1]
    peer_members = check_arms(arms, members=members, peer_members=peer_members, backbone=backbone, width=width,
                              in_channels=in_channels, num_classes=num_classes, packed_alpha=packed_alpha,
                              packed_gamma=packed_gamma)
    if "cheap" not in arms and budget_seconds is None:
        raise ValueError("without the 'cheap' arm, pass budget_seconds (the budget is the cheap arm's wall time)")
    if budget_seconds is not None and not (budget_seconds > 0 and math.isfinite(budget_seconds)):
        raise ValueError(f"budget_seconds must be a positive number of seconds, got {budget_seconds!r}")
    depth = _depth(backbone) if any(a in TU_ARMS for a in arms) else None
    spec = spec if spec is not None else Filters(0.1) + BatchNorm() + Head()
    cfg = replace(config or TrainConfig(), epochs=epochs)
    bcfg = {"width": width, "in_channels": in_channels, "num_classes": num_classes}
    example = test.x[:flops_batch]
    rows, skipped, budget = [], {}, budget_seconds
    missing = torch_uncertainty_missing() if any(a in TU_ARMS for a in arms) else None

    if "cheap" in arms:  # first: its wall time is the budget
        ens, steps, seconds, stored = _cheap_arm(train, backbone, bcfg, spec, members, warm_start_epochs, cfg,
                                                 progress)
        budget = budget if budget is not None else seconds
        label = f"cheap ensemble K={members} {spec!r}" + (f", warm start {warm_start_epochs} ep"
                                                          if warm_start_epochs else "")
        rows.append(_row("cheap", label, lambda d: predict(ens, d, cfg.eval_batch_size), members, steps, seconds,
                         stored, inference_flops(ens, example), test, ood))
    for arm in arms:
        k = 1 if arm == "single" else peer_members
        if arm == "cheap":
            continue
        if arm in TU_ARMS and missing:
            skipped[arm] = missing
            log.warning("skipping %s: %s", arm, missing)
            continue
        if arm in ("single", "deep"):
            model, steps, seconds, stored = _full_arm(train, backbone, bcfg, k, budget, cfg, progress)
            label = "single model Full()" if k == 1 else f"deep ensemble {k} x Full()"
            predictor = lambda d, m=model: predict(m, d, cfg.eval_batch_size)  # noqa: E731
        else:
            model, steps, seconds, stored = _tu_arm(arm, train, depth, width, in_channels, num_classes, k, budget,
                                                    cfg, packed_alpha, packed_gamma)
            label = ("torch-uncertainty BatchEnsemble" if arm == "batch_ensemble" else
                     f"torch-uncertainty Packed-Ensembles (alpha={packed_alpha:g}, gamma={packed_gamma})") + f" K={k}"

            @torch.no_grad()
            def predictor(d, model=model):  # (K, N, C)
                model.eval()
                return torch.cat([model(x) for x, _ in d.batches(cfg.eval_batch_size, shuffle=False)], dim=1)
        rows.append(_row(arm, label, predictor, k, steps, seconds, stored, inference_flops(model, example), test,
                         ood))
    return {"budget_seconds": budget, "config": asdict(cfg), "rows": rows, "skipped": skipped}


def _labels_seen(train: TensorData, test: TensorData) -> int:
    """Classes when none are given: the largest label seen, plus one."""
    return int(max(train.y.max(), test.y.max())) + 1


def _side_row(arm: str, label: str, side: dict, flops: float) -> dict:
    """A :func:`~shared_backbone.recipes.train_ensemble` report's side as a row of :func:`compare_peers`."""
    return _table_row(arm, label, side["members"], side["steps"], side["train_seconds"], flops,
                      side["stored_bytes"], side["metrics"])


def compare_with_recipe(train: TensorData, test: TensorData, ood: TensorData | None = None, *,
                        arms: Sequence[str] = ARMS, members: int = 3, spec: SliceSpec,
                        budget_epochs: float = 3.0, warm_start_epochs: float = 2.7, schedule: str = "shared",
                        config: TrainConfig | None = None, member_config: TrainConfig | None = None,
                        backbone: str = "resnet20", width: int = 16, packed_alpha: float = 2, packed_gamma: int = 1,
                        flops_batch: int = 8, progress: bool = False, peer_members: int | None = None,
                        num_classes: int | None = None) -> dict:
    """:func:`compare_peers` with the library's default recipe in the ``cheap`` row (module docstring).

    ``config``: the single model's (and the warm start's, and every peer's) recipe; ``member_config``:
    the members' (default ``config``). ``cheap`` is trained first and always (its wall time is the
    budget); ``single`` is its baseline, trained in the same run. Returns the same dict as
    :func:`compare_peers`, rows in ``arms`` order, plus ``"recipe"`` (the ensemble's settings).
    """
    if "cheap" not in arms:
        raise ValueError(f"arms must include 'cheap' (its wall time is every other arm's budget); got {list(arms)!r}")
    config = config or TrainConfig()
    num_classes = num_classes or _labels_seen(train, test)
    peer_members = check_arms(arms, members=members, peer_members=peer_members, backbone=backbone, width=width,
                              in_channels=train.x.shape[1], num_classes=num_classes, packed_alpha=packed_alpha,
                              packed_gamma=packed_gamma)  # before an hour of training
    ens, report, _ = train_ensemble(
        spec, members=members, backbone=backbone, backbone_cfg={"width": width, "num_classes": num_classes},
        config=member_config or config,
        full_config=config, warm_start_epochs=warm_start_epochs, budget_epochs=budget_epochs, schedule=schedule,
        seed=config.seed, baseline="single" if "single" in arms else "none", progress=progress,
        vectorized=torch.cuda.is_available(), datasets=(train, test, ood))
    example = test.x[:flops_batch]
    recipe = f"{budget_epochs:g} ep budget, {schedule}, warm {warm_start_epochs:g}"
    rows = {"cheap": _side_row("cheap", f"cheap K={members} ({recipe})",
                               report["ensemble"], inference_flops(ens, example))}
    if report["baseline"] is not None:
        single = Ensemble(ens.frozen, Full(), members=1, member_init="backbone", seed=config.seed)
        how = "the run the warm start is cut from" if schedule == "shared" else "the budget's steps"
        rows["single"] = _side_row("single", f"single model Full() ({how})", report["baseline"],
                                   inference_flops(single, example))
    budget = report["ensemble"]["train_seconds"]
    others = [a for a in arms if a not in rows]
    res = {"budget_seconds": budget, "config": asdict(config), "rows": [], "skipped": {}}
    if others:
        res = compare_peers(train, test, ood, arms=others, members=members, epochs=max(1, round(budget_epochs)),
                            backbone=backbone, width=width, config=config, budget_seconds=budget,
                            packed_alpha=packed_alpha, packed_gamma=packed_gamma,
                            num_classes=num_classes, flops_batch=flops_batch,
                            progress=progress, peer_members=peer_members)
    rows.update({r["arm"]: r for r in res["rows"]})
    res["rows"] = [rows[a] for a in arms if a in rows]
    res["recipe"] = {k: report[k] for k in ("spec", "members", "data", "member_init", "warm_start_epochs",
                                             "budget_epochs", "schedule", "schedule_split")}
    res["member_config"] = asdict(member_config or config)
    return res
