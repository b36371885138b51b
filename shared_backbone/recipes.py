"""End-to-end recipes the scripts call: build, (warm start,) train, evaluate, save, report."""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from . import late_phase
from .backbones import build_backbone
from .data import TensorData, load_task, mnist5k
from .describe import describe
from .distributed import main_process_value, make_accelerator
from .ensemble import Ensemble
from .frozen import FrozenBackbone
from .metrics import evaluate_ensemble
from .slices import Full, SliceSpec
from .train import TrainConfig, _steps_per_epoch, fit, predict

__all__ = ["load_train_test", "warm_start", "train_ensemble", "format_report", "equal_cost_steps", "BASELINES",
           "SCHEDULES", "TRUNKS", "check_joint"]

BASELINES = ("none", "single", "deep")


def load_train_test(task: str = "fashion_mnist", train_subset: int | None = None, test_subset: int | None = None,
                    seed: int = 0) -> tuple[TensorData, TensorData, object]:
    """The task's train and test splits as in-memory tensors (optionally seeded subsets)."""
    card = load_task(task)
    train = TensorData.from_card(card, "train")
    test = TensorData.from_card(card, "test")
    if train_subset and train_subset < len(train):
        train = train.subset(train_subset, seed=seed)
    if test_subset and test_subset < len(test):
        test = test.subset(test_subset, seed=seed + 1)
    return train, test, card


def _config_for_steps(config: TrainConfig, steps: int, n_train: int) -> TrainConfig:
    """``config`` made to run ``steps`` optimizer steps in all: whole epochs of at most that many batches.

    The run is ``steps`` rounded up to a multiple of ``epochs`` (fewer than ``epochs`` extra steps,
    in the baseline's favour), and the cosine schedule spans exactly it.
    """
    per_epoch = _steps_per_epoch(n_train, config)
    epochs = max(1, math.ceil(steps / per_epoch))
    return TrainConfig.from_dict({**asdict(config), "epochs": epochs,
                                  "max_steps_per_epoch": max(1, math.ceil(steps / epochs))})


def warm_start(backbone_name: str, backbone_cfg: dict, train: TensorData, epochs: float, config: TrainConfig,
               seed: int = 0, progress: bool = True, accelerator=None) -> FrozenBackbone:
    """Train the full network for ``epochs`` (fractions allowed) and freeze it: the partial-learning
    paper's ensemble set-up."""
    frozen = FrozenBackbone(build_backbone(backbone_name, **backbone_cfg), seed=seed)
    model = Ensemble(frozen, Full(), members=1, member_init="backbone")
    steps = max(1, round(epochs * _steps_per_epoch(len(train), config)))
    fit(model, train, None, _config_for_steps(config, steps, len(train)), accelerator=accelerator, progress=progress)
    return FrozenBackbone.from_module(model.member(0))


def _timing_batch(train: TensorData, config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed augmented batch that step timings run on."""
    g = torch.Generator().manual_seed(config.seed)
    return next(iter(train.batches(config.batch_size, shuffle=True, generator=g, augment=config.augment)))


def _step_fn(model, train: TensorData, config: TrainConfig) -> Callable[[], None]:
    """One optimizer step of ``model`` on a fixed augmented batch (for timing only: ``model`` is a throwaway)."""
    x, y = _timing_batch(train, config)
    if model.data == "own":
        x, y = x.expand(model.members, *x.shape).contiguous(), y.expand(model.members, -1)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-6, momentum=config.momentum)
    model.train()

    def step() -> None:
        logits = model(x)  # (K, N, C)
        target = y if y.dim() == 2 else y.expand(logits.shape[0], -1)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten()) * logits.shape[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def equal_cost_steps(steps: dict[str, Callable[[], None]], repeats: int = 5,
                     clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median seconds of one call of each function in ``steps``, timed interleaved.

    Each round calls every function once, in turn, after one untimed warm-up round, so a load
    that comes and goes on a shared machine slows all of them alike and their ratios hold.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats!r}")
    for fn in steps.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            t = clock()
            fn()
            times[name].append(clock() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _predict_all(model, test: TensorData, ood_data: TensorData | None, config: TrainConfig,
                 record: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    logits = record.pop("_test_logits") if "_test_logits" in record else predict(model, test, config.eval_batch_size)
    ood_logits = predict(model, ood_data, config.eval_batch_size) if ood_data is not None else None
    return logits, ood_logits


def _side(kind: str, members: int, metrics: dict, record: dict, train_seconds: float, stored_bytes: int,
          steps: int, **extra) -> dict:
    """One arm of the comparison, in the same fields for the ensemble and its baseline."""
    return {"kind": kind, "members": members, "steps": steps, "train_seconds": train_seconds,
            "stored_bytes": stored_bytes, "metrics": metrics,
            "history": record.get("history", []), **extra}


SCHEDULES = ("restart", "shared")
TRUNKS = ("frozen", "joint")


class _Snapshot:
    """``on_step`` hook: freeze a copy of a single model's run at one step, and note the time then."""

    def __init__(self, model: Ensemble, at: int):
        self.model, self.at = model, at
        self.t0 = time.perf_counter()
        self.frozen: FrozenBackbone | None = None
        self.seconds = 0.0

    def __call__(self, step: int) -> None:
        if step == self.at:
            self.frozen = FrozenBackbone.from_module(self.model.member(0))
            self.seconds = time.perf_counter() - self.t0


def _ood_set(ood: str | None, card) -> TensorData | None:
    if ood is None:
        return None
    if ood != "mnist5k":
        raise ValueError(f"unknown OOD set {ood!r}; available: 'mnist5k' or None")
    images, _ = mnist5k()
    return TensorData.from_uint8(images, torch.zeros(len(images), dtype=torch.int64), card.mean, card.std)


def _cost(spec, members, data, vectorized, random_frozen, train, config, full_config, clock, trunk="frozen",
          diversity=None) -> dict:
    """One step of the ensemble (one member and the trunk, for a joint trunk) and one of a full model,
    timed interleaved."""
    single = Ensemble(random_frozen, Full(), members=1, member_init="backbone")
    extra = {}
    if trunk == "joint":
        batch = _timing_batch(train, config)
        ensemble_step = late_phase.timing_step(late_phase.LatePhase(random_frozen.backbone, spec, members), *batch,
                                               config.momentum)
        if diversity is not None:
            extra["ensemble_diversity"] = late_phase.timing_step(
                late_phase.LatePhase(random_frozen.backbone, spec, members), *batch, config.momentum, diversity)
    else:
        ensemble_step = _step_fn(Ensemble(random_frozen, spec, members=members, member_init="backbone", data=data,
                                          vectorized=vectorized), train, config)
    steps = {"ensemble": ensemble_step, "single": _step_fn(single, train, full_config), **extra}
    step_seconds = equal_cost_steps(steps, clock=clock)
    ratio = step_seconds["ensemble"] / max(step_seconds["single"], 1e-12)
    if trunk == "joint":  # a joint step does one model's forward and backward and more: never counted as less,
        ratio = max(ratio, 1.0)  # so a faster memory layout never buys the ensemble extra steps
        if diversity is not None:  # and the diversity term's extra work on top of that, as timed
            ratio *= max(step_seconds["ensemble_diversity"] / max(step_seconds["ensemble"], 1e-12), 1.0)
    return {"step_seconds": step_seconds, "ensemble_step_in_single_steps": ratio}


def _deep_cost(deep_members, vectorized, random_frozen, train, full_config, clock) -> dict:
    """One step of ``deep_members`` full models against one of a single full model, timed interleaved."""
    single = Ensemble(random_frozen, Full(), members=1, member_init="backbone")
    deep = Ensemble(random_frozen, Full(), members=deep_members, member_init="random", data="own",
                    vectorized=vectorized)
    t = equal_cost_steps({"single": _step_fn(single, train, full_config), "deep": _step_fn(deep, train, full_config)},
                         clock=clock)
    return {"deep_members": deep_members, "deep_step_in_single_steps": t["deep"] / max(t["single"], 1e-12)}


def _late_phase_seconds(plan: dict, warm_seconds: float, single_run) -> float | None:
    """The joint trunk's wall-clock budget after its warm start: the single model's whole run less the warm
    start when that run was the baseline (equal seconds, exactly), else the warm start's seconds a step times
    the steps left. None without a budget or a warm start to time."""
    budget, warm = plan["budget_single_steps"], plan["warm_steps"]
    if budget is None or not warm or warm_seconds <= 0:
        return None
    if single_run is not None:
        return max(single_run[1]["train_seconds"] - warm_seconds, 1e-3)
    return (budget - warm) * warm_seconds / warm


def _plan(train, config, full_config, warm_start_epochs, budget_epochs, schedule, timing) -> dict:
    """Steps of each part: warm start, members, the single-model budget; the members' config."""
    per_epoch = _steps_per_epoch(len(train), config)
    full_per_epoch = _steps_per_epoch(len(train), full_config)
    warm = max(1, round(warm_start_epochs * full_per_epoch)) if warm_start_epochs else 0
    ratio = timing.get("ensemble_step_in_single_steps")
    if budget_epochs is not None:
        budget = max(1, round(budget_epochs * full_per_epoch))
        if warm >= budget:
            raise ValueError(f"warm_start_epochs ({warm_start_epochs}) must be below budget_epochs ({budget_epochs}): "
                             "the members need a part of the budget")
        member_steps = max(1, round((budget - warm) / ratio))
        member_config = _config_for_steps(config, member_steps, len(train))
        member_steps = member_config.epochs * member_config.max_steps_per_epoch
    else:
        member_config, member_steps = config, per_epoch * config.epochs
        budget = max(1, round(warm + member_steps * ratio)) if ratio is not None else None
    plan = {"warm_steps": warm, "ensemble_steps": member_steps, "budget_single_steps": budget,
            "member_config": member_config, "single_config": None}
    if schedule == "shared":  # one cosine over the whole budget: the warm start covers [0, f], the members [f, 1]
        single = _config_for_steps(full_config, budget, len(train))
        f = warm / (single.epochs * single.max_steps_per_epoch)
        plan["single_config"] = single
        plan["member_config"] = TrainConfig.from_dict({**asdict(member_config), "schedule_from": f})
        plan["schedule_split"] = f
    return plan


def train_ensemble(spec: SliceSpec, *, members: int = 8, backbone: str = "resnet20", backbone_cfg: dict | None = None,
                   task: str = "fashion_mnist", config: TrainConfig | None = None, warm_start_epochs: float = 0,
                   full_config: TrainConfig | None = None, member_init: str | None = None,
                   budget_epochs: float | None = None, schedule: str = "restart", trunk: str = "frozen",
                   slice_lr_scale: float = 1.0, diversity: late_phase.Diversity | None = None,
                   train_subset: int | None = None, test_subset: int | None = None, data: str = "shared",
                   seed: int = 0, ood: str | None = "mnist5k", baseline: str = "single",
                   deep_members: int | None = None, out_dir: str | Path | None = None,
                   progress: bool = True, vectorized: bool = True, accelerator=None, parallel: str = "data",
                   resume: bool = False, checkpoint_every: int | None = None,
                   clock: Callable[[], float] = time.perf_counter,
                   datasets: tuple[TensorData, TensorData, TensorData | None] | None = None,
                   ) -> tuple[Ensemble, dict, dict]:
    """Train a K-member ensemble of ``spec`` slices and, in the same run, its equal-cost baseline.

    Returns ``(ensemble, report, arrays)``: ``report`` is JSON-ready, with both arms under
    ``report["ensemble"]`` and ``report["baseline"]`` (same fields, same evaluation code) and the
    ensemble's own fields at the top level as before; ``arrays`` holds test and OOD logits.

    ``warm_start_epochs`` (fractions allowed) first trains the full network with ``full_config``
    (default: ``config``) and freezes it. ``member_init``: ``"random"`` re-draws each member's
    learned rows (the default without a warm start), ``"backbone"`` copies the frozen values
    (the default after one; members then need ``data="own"`` to differ, which is then chosen).

    ``budget_epochs``: the whole ensemble's cost, warm start included, in epochs of one full model;
    the members then train for what the warm start leaves (``config.epochs`` is not used). Without
    it the members train ``config.epochs`` and the budget is what that costs.
    ``schedule``: ``"restart"`` gives the warm start and the members a cosine each; ``"shared"``
    makes them two pieces of one cosine over the budget (warm start ``[0, f]``, members ``[f, 1]``
    from ``config.lr``'s peak), and the warm start is then cut from the single model's own run at
    the step ``f`` of its budget: with ``baseline="single"`` that run *is* the baseline, trained once.

    ``baseline``: ``"single"`` trains one ``Full()`` model of the same backbone, seed, data and
    ``full_config`` for the ensemble's whole cost, warm start included; ``"deep"`` trains as many
    independent full models as fit (``deep_members``, default ``min(K, budget in epochs)``, at
    least 1); ``"none"`` skips it. The cost is made equal in steps, so that the cosine schedule
    knows its length: before training, one step of the ensemble and one of the baseline are
    timed interleaved (:func:`equal_cost_steps`, medians of 5, ``clock``), and the baseline gets
    ``warm steps + ensemble steps * t_ensemble / t_baseline`` steps (a warm-start step *is* a
    baseline step). Both arms' measured train seconds are reported beside it.

    ``trunk``: ``"frozen"`` (the members train their slices on the backbone as it is) or ``"joint"``:
    the trunk goes on training under the members, one member per step in turn, and is frozen at the
    end (:mod:`.late_phase`, late-phase weights; one process, ``data="shared"``, no checkpoints).
    ``slice_lr_scale`` (joint only) sets the slices' lr as a multiple of the trunk's.
    ``diversity`` (joint only): a :class:`~shared_backbone.late_phase.Diversity` term that makes the
    members disagree on self-made outliers; the step is timed with it, so it costs the members steps.

    ``accelerator``, ``parallel``, ``resume`` and ``checkpoint_every`` go to the ensemble's
    :func:`~shared_backbone.train.fit`.

    ``datasets``: ``(train, test, ood)`` already loaded (``ood`` may be ``None``), instead of reading
    ``task``'s files with ``train_subset``/``test_subset``/``ood`` (``task`` then only names them in
    the report); the channels and classes come from the tensors.
    """
    if trunk not in TRUNKS:
        raise ValueError(f"trunk must be one of {TRUNKS}, got {trunk!r}")
    accelerator = accelerator or make_accelerator()  # the same one for every phase, and for the plan
    if trunk == "joint":
        check_joint(data, resume, checkpoint_every, accelerator, slice_lr_scale)
        late_phase.check_diversity(diversity, members)
    elif diversity is not None:
        raise ValueError("diversity trains the members against each other on outliers, one member per step: it "
                         "needs trunk='joint'")
    elif slice_lr_scale != 1.0:
        raise ValueError(f"slice_lr_scale ({slice_lr_scale!r}) scales the slices' lr against the trunk's: it needs "
                         "trunk='joint' (with a frozen trunk set the members' lr in config)")
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if warm_start_epochs < 0:
        raise ValueError(f"warm_start_epochs must be >= 0, got {warm_start_epochs!r}")
    if schedule == "shared" and not warm_start_epochs:
        raise ValueError("schedule='shared' splits one schedule between a warm start and the members: "
                         "it needs warm_start_epochs > 0")
    if budget_epochs is not None and not (isinstance(budget_epochs, (int, float)) and budget_epochs > 0):
        raise ValueError(f"budget_epochs must be a number of epochs > 0 or None, got {budget_epochs!r}")
    config = config or TrainConfig(seed=seed)
    full_config = full_config or config
    if datasets is None:
        train, test, card = load_train_test(task, train_subset, test_subset, seed)
        sizes = {"in_channels": card.input_shape[0], "num_classes": card.num_classes}
        ood_data = _ood_set(ood, card)
    else:
        train, test, ood_data = datasets
        sizes = {"in_channels": train.x.shape[1], "num_classes": int(max(train.y.max(), test.y.max())) + 1}
    cfg = {**sizes, **(backbone_cfg or {})}
    member_init = member_init or ("backbone" if warm_start_epochs else "random")
    if member_init == "backbone" and data == "shared" and members > 1 and trunk == "frozen":
        data = "own"  # same start: members differ by their data order

    # the cost of one step of each arm, measured side by side before anything trains
    timing: dict = {}
    if baseline != "none" or budget_epochs is not None or schedule == "shared":
        random_frozen = FrozenBackbone(build_backbone(backbone, **cfg), seed=seed)
        timing = _cost(spec, members, data, vectorized, random_frozen, train, config, full_config, clock, trunk,
                       diversity)
        timing = main_process_value(timing, accelerator)  # one plan for every process, or they hang
    plan = _plan(train, config, full_config, warm_start_epochs, budget_epochs, schedule, timing)
    timing.update({k: plan[k] for k in ("warm_steps", "ensemble_steps", "budget_single_steps")})
    if baseline == "deep":
        full_per_epoch = _steps_per_epoch(len(train), full_config)
        m = deep_members or max(1, min(members, plan["budget_single_steps"] // full_per_epoch))
        timing.update(main_process_value(_deep_cost(m, vectorized, random_frozen, train, full_config, clock),
                                         accelerator))

    t0 = time.perf_counter()
    single_run = None
    if schedule == "shared":  # the single model's run, cut at the warm start (and run to its end if it is the baseline)
        single = Ensemble(FrozenBackbone(build_backbone(backbone, **cfg), seed=seed), Full(), members=1,
                          member_init="backbone")
        snap = _Snapshot(single, plan["warm_steps"])
        go_on = baseline == "single"
        srecord = fit(single, train, test if go_on else None, plan["single_config"], accelerator=accelerator,
                      progress=progress, on_step=snap, stop_after=None if go_on else plan["warm_steps"])
        frozen, warm_seconds = snap.frozen, snap.seconds
        single_run = (single, srecord) if go_on else None
    elif warm_start_epochs:
        frozen = warm_start(backbone, cfg, train, warm_start_epochs, full_config, seed, progress, accelerator)
        warm_seconds = time.perf_counter() - t0
    else:
        frozen = FrozenBackbone(build_backbone(backbone, **cfg), seed=seed)
        warm_seconds = time.perf_counter() - t0
    member_config = plan["member_config"]
    if trunk == "joint":  # the trunk goes on training under the members: frozen only at the end
        seconds = _late_phase_seconds(plan, warm_seconds, single_run)
        ens, record = late_phase.train_late_phase(frozen.backbone, spec, members, train, member_config,
                                                  member_init=member_init, seed=seed,
                                                  slice_lr_scale=slice_lr_scale, diversity=diversity,
                                                  seconds=seconds, progress=progress)
        if seconds is not None:  # sized in the loop: the plan's count was its first guess
            timing.update({"ensemble_steps": record["steps"], "timed_in": "loop",
                           "ensemble_step_in_single_steps": (record["train_seconds"] / record["steps"])
                           / (warm_seconds / plan["warm_steps"])})
        ens.vectorized, frozen = vectorized, ens.frozen
    else:
        ens = Ensemble(frozen, spec, members=members, member_init=member_init, seed=seed, data=data,
                       vectorized=vectorized)
        record = fit(ens, train, test, member_config, accelerator=accelerator, parallel=parallel, out_dir=out_dir,
                     resume=resume, checkpoint_every=checkpoint_every, progress=progress)
    logits, ood_logits = _predict_all(ens, test, ood_data, member_config, record)
    arrays = {"test_logits": logits, "test_labels": test.y.cpu()}
    if ood_logits is not None:
        arrays["ood_logits"] = ood_logits
    metrics = evaluate_ensemble(logits, test.y.cpu(), ood_logits)
    counts = describe(frozen, spec, members=members, verbose=False)
    full_bytes = counts["total"] * 4
    ens_seconds = warm_seconds + record["train_seconds"]
    report = {
        "task": task, "backbone": backbone, "backbone_config": cfg, "spec": repr(spec), "members": members,
        "data": data, "member_init": member_init, "warm_start_epochs": warm_start_epochs,
        "budget_epochs": budget_epochs, "schedule": schedule, "trunk": trunk,
        "slice_lr_scale": slice_lr_scale if trunk == "joint" else None,
        "diversity": asdict(diversity) if diversity is not None else None, "schedule_split": plan.get("schedule_split"),
        "train_size": len(train), "test_size": len(test),
        "fingerprint": frozen.fingerprint, "train": {k: v for k, v in record.items() if k != "test"},
        "warm_start_seconds": warm_seconds, "wall_seconds": time.perf_counter() - t0,
        "params": {"backbone_total": counts["total"], "learned_per_member": counts["learnable"],
                   "learned_all_members": counts["learnable"] * members,
                   "stored_bytes_per_member": counts["stored_bytes"],
                   "full_model_bytes": full_bytes},
        "metrics": metrics,
    }
    # a warm-started backbone cannot be regenerated from a seed: it is stored once beside the slices
    stored = counts["stored_bytes"] * members + (0 if frozen.regenerable else full_bytes)
    report["ensemble"] = _side(f"{members} x {spec!r}", members, metrics, record, ens_seconds, stored,
                               plan["warm_steps"] + record["steps"], warm_steps=plan["warm_steps"],
                               stored_bytes_per_member=counts["stored_bytes"])
    report["baseline"] = None
    if baseline != "none":
        report["baseline"] = _baseline(baseline, single_run, timing, backbone, cfg, seed, vectorized, train, test,
                                       ood_data, full_config, accelerator, progress, full_bytes, arrays)
    return ens, report, arrays


def check_joint(data: str, resume: bool, checkpoint_every, accelerator, slice_lr_scale: float = 1.0) -> None:
    """What a joint trunk cannot do (yet): own data orders, checkpoints, several processes; and its lr scale."""
    if not (isinstance(slice_lr_scale, (int, float)) and math.isfinite(slice_lr_scale) and slice_lr_scale > 0):
        raise ValueError(f"slice_lr_scale must be a finite number > 0, got {slice_lr_scale!r}")
    if data != "shared":
        raise ValueError(f"trunk='joint' trains one member per step on the shared batch stream (each member sees "
                         f"one batch in K); data must be 'shared', got {data!r}")
    if resume or checkpoint_every:
        raise ValueError("trunk='joint' does not checkpoint its phase (it is a part of one budget: rerun it); "
                         f"resume must be False and checkpoint_every None, got {resume!r} and {checkpoint_every!r}")
    if accelerator is not None and accelerator.num_processes > 1:
        raise ValueError(f"trunk='joint' runs in one process, got {accelerator.num_processes} processes; "
                         "use trunk='frozen' under a launcher")


def _baseline(kind, single_run, timing, backbone, cfg, seed, vectorized, train, test, ood_data, full_config,
              accelerator, progress, full_bytes, arrays) -> dict:
    """The equal-cost baseline: trained here, or the single model's run the warm start was cut from."""
    k = timing.get("deep_members", 1)
    if single_run is not None:
        base, brecord = single_run
        base_cfg = full_config
    else:
        steps = timing["budget_single_steps"] if kind == "single" else \
            max(1, round(timing["budget_single_steps"] / timing["deep_step_in_single_steps"]))
        base = Ensemble(FrozenBackbone(build_backbone(backbone, **cfg), seed=seed), Full(), members=k,
                        member_init="backbone" if k == 1 else "random", seed=seed,
                        data="shared" if k == 1 else "own", vectorized=vectorized)
        base_cfg = _config_for_steps(full_config, steps, len(train))
        brecord = fit(base, train, test, base_cfg, accelerator=accelerator, progress=progress)
    b_logits, b_ood = _predict_all(base, test, ood_data, base_cfg, brecord)
    arrays["baseline_test_logits"] = b_logits
    if b_ood is not None:
        arrays["baseline_ood_logits"] = b_ood
    return _side(f"{k} x Full()", k, evaluate_ensemble(b_logits, test.y.cpu(), b_ood), brecord,
                 brecord["train_seconds"], full_bytes * k, brecord["steps"], timing=timing)


_ROWS = (("accuracy", "accuracy", "{:.4f}"), ("NLL", "nll", "{:.4f}"), ("ECE (15 bins)", "ece", "{:.4f}"),
         ("Brier", "brier", "{:.4f}"), ("OOD AUROC max-prob", "ood_auroc_max_prob", "{:.4f}"),
         ("OOD AUROC mutual-info", "ood_auroc_mutual_info", "{:.4f}"),
         ("FPR@95 max-prob", "ood_fpr95_max_prob", "{:.4f}"),
         ("FPR@95 mutual-info", "ood_fpr95_mutual_info", "{:.4f}"))


def _comparison(r: dict) -> list[str]:
    """The ensemble and its equal-cost baseline side by side, one row per metric."""
    sides = [r["ensemble"]] + ([r["baseline"]] if r.get("baseline") else [])
    names = [f"ensemble K={sides[0]['members']}"] + [
        f"{'1 full model' if s['members'] == 1 else str(s['members']) + ' full models'}" for s in sides[1:]]
    lines = [f"{'same wall-clock budget':<24}" + "".join(f"{n:>16}" for n in names)]
    for label, key, fmt in _ROWS:
        if key not in sides[0]["metrics"]:
            continue
        cells = []
        for s in sides:
            v = s["metrics"].get(key)
            single = s["members"] == 1 and "mutual" in key  # one model has no member disagreement
            cells.append("-" if v is None or single else fmt.format(v))
        lines.append(f"{label:<24}" + "".join(f"{c:>16}" for c in cells))
    lines.append(f"{'train seconds':<24}" + "".join(f"{s['train_seconds']:>16.1f}" for s in sides))
    lines.append(f"{'steps':<24}" + "".join(f"{s['steps']:>16,}" for s in sides))
    lines.append(f"{'bytes stored':<24}" + "".join(f"{s['stored_bytes']:>16,}" for s in sides))
    if len(sides) > 1:
        t = sides[1]["timing"]
        lines.append(f"equal cost: one ensemble step = {t['ensemble_step_in_single_steps']:.2f} single-model steps "
                     f"(timed {'in the loop' if t.get('timed_in') == 'loop' else 'interleaved'}); "
                     f"budget {t['budget_single_steps']:,} single-model steps "
                     f"= {t['warm_steps']:,} warm + {t['ensemble_steps']:,} x {t['ensemble_step_in_single_steps']:.2f}")
    return lines


def _length(r: dict) -> str:
    """How long the run was: its budget and schedule, or the members' epochs and the warm start."""
    warm = f"warm start {r['warm_start_epochs']} epochs" if r["warm_start_epochs"] else ""
    if r.get("budget_epochs"):
        return (f"budget {r['budget_epochs']} epochs of one model: {warm}, then {r['train']['steps']:,} member steps"
                f"{' finishing its cosine schedule' if r.get('schedule') == 'shared' else ''}")
    return f"{r['train']['config']['epochs']} epochs" + (f", {warm}" if warm else "")


def format_report(r: dict) -> str:
    """A readable table of one ensemble report, with its equal-cost baseline beside it when there is one."""
    m, p = r["metrics"], r["params"]
    lines = [
        f"{r['members']} x {r['backbone']} {r['spec']} on {r['task']} "
        f"({r['train_size']:,} train / {r['test_size']:,} test, {_length(r)})",
        "",
        f"{'member':<22}{'accuracy':>10}{'nll':>10}",
    ]
    for i, (a, n) in enumerate(zip(m["member_accuracy"], m["member_nll"])):
        lines.append(f"{'  member ' + str(i):<22}{a:>10.4f}{n:>10.4f}")
    lines += [
        f"{'mean member':<22}{m['mean_member_accuracy']:>10.4f}{sum(m['member_nll']) / len(m['member_nll']):>10.4f}",
        f"{'ensemble (mean prob)':<22}{m['accuracy']:>10.4f}{m['nll']:>10.4f}",
        "",
        f"member disagreement {m['disagreement']:.4f}",
    ]
    if "ensemble" in r:
        lines += [""] + _comparison(r) + [""]
    else:  # a report from before the comparison existed
        lines.append(f"calibration: ECE(15 bins) {m['ece']:.4f}   Brier {m['brier']:.4f}")
    lines += [
        f"parameters: backbone {p['backbone_total']:,} shared; learned {p['learned_per_member']:,} per member, "
        f"{p['learned_all_members']:,} in all",
        f"stored per member: {p['stored_bytes_per_member'] / 1024:.1f} KiB (a full model: {p['full_model_bytes'] / 1024:.1f} KiB)",
        f"wall time: {r['wall_seconds']:.1f} s (training {r['train']['train_seconds']:.1f} s)",
    ]
    return "\n".join(lines)
