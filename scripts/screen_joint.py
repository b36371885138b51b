#!/usr/bin/env python
r"""Screen joint-trunk ensembles (``train_ensemble(..., trunk="joint")``) from snapshots of one single run.

One single model trains for the budget (3 epochs of Fashion-MNIST, the default recipe: lr 0.05 cosine,
label smoothing 0.1, crop + flip, precise BN over 20 batches) and is evaluated: that is the baseline,
exactly the run ``train_ensemble(schedule="shared")`` trains. Its snapshots at ``--warms`` (epochs)
are the warm starts. Each arm then trains the trunk on from its snapshot, K members' slices on top,
one member per step in turn (:mod:`shared_backbone.late_phase`), for the rest of the budget in
single-model steps, finishing the same cosine, and is evaluated on the same test set and MNIST-5k.
The snapshots are cached (``--cache``), so arms can be added later without training the single
model again.

An arm is ``NAME|SPEC|K|WARM|INIT|LS|SLICE_LR[|DIV]``: WARM one of ``--warms``; INIT backbone or random;
LS the late phase's label smoothing; SLICE_LR the slices' lr as a multiple of the trunk's; DIV
``jigsawP:W:N[:COST[:REACH]]`` adds ``Diversity(weight=W, patch=P, batch=N, reach=REACH)`` and divides the
arm's steps by COST, its step's cost in single-model steps (measured beforehand), so that every arm costs the same.

    python scripts/screen_joint.py --log runs/joint.jsonl --cache runs/joint_cache --warms 2.0 \
        --arm "k3|Filters(0.125, stages=['block3']) + BatchNorm(stages=['block3']) + Head()|3|2.0|backbone|0.1|1"
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from shared_backbone import Ensemble, FrozenBackbone, build_backbone, parse_spec
from shared_backbone.late_phase import Diversity, train_late_phase
from shared_backbone.metrics import evaluate_ensemble
from shared_backbone.recipes import _config_for_steps, _ood_set, load_train_test
from shared_backbone.slices import Full
from shared_backbone.train import TrainConfig, _steps_per_epoch, fit, predict

BUDGET_EPOCHS = 3


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warms", default="2.0", help="comma-separated warm starts, in epochs of the single run")
    ap.add_argument("--arm", action="append", default=[], help="NAME|SPEC|K|WARM|INIT|LS|SLICE_LR[|DIV] (repeatable)")
    ap.add_argument("--log", required=True, help="JSON lines, one row per arm (appended)")
    ap.add_argument("--cache", required=True, help="folder of the single run's snapshots")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--train-subset", type=int, default=0, help="0 = all 60,000 images")
    return ap


def _diversity(field: str | None) -> tuple[Diversity | None, float]:
    """DIV = 'jigsawP:W:N[:COST[:REACH]]': ``Diversity(weight=W, patch=P, batch=N, reach=REACH)``; COST (one step
    in single-model steps, measured beforehand) divides the arm's steps so that it costs what the others cost."""
    if not field:
        return None, 1.0
    kind, weight, n, *rest = field.split(":")
    reach = rest[1] if len(rest) > 1 else "trunk"
    return (Diversity(weight=float(weight), patch=int(kind.removeprefix("jigsaw")), batch=int(n), reach=reach),
            float(rest[0]) if rest else 1.0)


def main(argv=None) -> None:
    a = parser().parse_args(argv)
    torch.set_num_threads(a.threads)
    train, test, card = load_train_test("fashion_mnist", a.train_subset or None, None, a.seed)
    ood = _ood_set("mnist5k", card)
    sizes = {"in_channels": card.input_shape[0], "num_classes": card.num_classes}
    full = TrainConfig(seed=a.seed, epochs=BUDGET_EPOCHS, precise_bn=20)
    per_epoch = _steps_per_epoch(len(train), full)
    budget = round(BUDGET_EPOCHS * per_epoch)
    warms = {w: round(float(w) * per_epoch) for w in a.warms.split(",")}
    cache = Path(a.cache)
    cache.mkdir(parents=True, exist_ok=True)
    snap = {w: cache / f"seed{a.seed}_warm{w}.pt" for w in warms}

    def log(row: dict) -> None:
        print(json.dumps(row), flush=True)
        with open(a.log, "a") as f:
            f.write(json.dumps(row) + "\n")

    def evaluate(model, name: str, extra: dict) -> None:
        logits, ood_logits = predict(model, test, 1000), predict(model, ood, 1000)
        m = evaluate_ensemble(logits, test.y.cpu(), ood_logits)
        each = [evaluate_ensemble(logits[k:k + 1], test.y.cpu(), ood_logits[k:k + 1]) for k in range(len(logits))]
        log({"arm": name, "seed": a.seed, "acc": m["accuracy"], "nll": m["nll"], "ece": m["ece"], "brier": m["brier"],
             "auroc_mp": m["ood_auroc_max_prob"], "auroc_mi": m.get("ood_auroc_mutual_info"),
             "mean_member_acc": m["mean_member_accuracy"], "disagree": m["disagreement"],
             "member_auroc_mp": [e["ood_auroc_max_prob"] for e in each], "member_nll": m["member_nll"],
             "member_ece": [e["ece"] for e in each], **extra})

    if not all(p.exists() for p in snap.values()):  # the single run, once: the baseline and every warm start
        single = Ensemble(FrozenBackbone(build_backbone("resnet20", **sizes), seed=a.seed), Full(), members=1,
                          member_init="backbone")
        at = {steps: w for w, steps in warms.items()}

        def keep(step: int) -> None:
            if step in at:
                torch.save(single.member(0).state_dict(), snap[at[step]])

        t0 = time.perf_counter()
        record = fit(single, train, None, _config_for_steps(full, budget, len(train)), progress=False, on_step=keep)
        evaluate(single, "single", {"steps": record["steps"], "train_s": time.perf_counter() - t0})
    for arm in a.arm:
        name, spec, k, warm, init, ls, slice_lr, *div = arm.split("|")
        diversity, cost = _diversity(div[0] if div else None)
        trunk = build_backbone("resnet20", **sizes)
        trunk.load_state_dict(torch.load(snap[warm]))
        steps = round((budget - warms[warm]) / cost)
        config = _config_for_steps(TrainConfig(seed=a.seed, precise_bn=20, label_smoothing=float(ls)), steps,
                                   len(train))
        config = TrainConfig.from_dict({**asdict(config), "schedule_from": warms[warm] / budget})
        t0 = time.perf_counter()
        ens, record = train_late_phase(trunk, parse_spec(spec), int(k), train, config, member_init=init,
                                       seed=a.seed, slice_lr_scale=float(slice_lr), diversity=diversity,
                                       progress=False)
        evaluate(ens, name, {"spec": spec, "K": int(k), "warm": warm, "init": init, "ls": float(ls),
                             "slice_lr": float(slice_lr), "diversity": div[0] if div else None,
                             "steps": record["steps"], "train_s": time.perf_counter() - t0})


if __name__ == "__main__":
    main()
