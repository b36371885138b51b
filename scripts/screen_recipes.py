#!/usr/bin/env python
r"""Screen cheap-ensemble recipes at one equal budget (in single-model steps) against one full model.

    python scripts/screen_recipes.py --budget 120 --log runs/screen.jsonl --arm single \
        --arm "Filters(0.125,stages=['block3'])+BatchNorm(stages=['block3'])+Head()|2|0.75|backbone|own|0.02" \
        --arm "deep|2"

An arm is 'single', 'deep|M' (M full models sharing the budget) or 'SPEC|K|WARM|INIT|DATA|LR': K members
learning SPEC after a warm start of the full net for the fraction WARM of the budget, their learned rows
drawn afresh (INIT=random) or copied from the warm backbone (backbone), on shared or own data orders, at
lr LR. Each ensemble arm is sized to the budget by one ensemble step's cost in single-model steps, timed
interleaved in the run (recipes.equal_cost_steps). One JSON row per arm goes to --log (and stdout).
This is the driver behind the README's design-space table (ResNet-20-16 on Fashion-MNIST).
"""
import argparse
import json
import math
import time

import torch
from dataclasses import asdict
from shared_backbone.recipes import load_train_test, equal_cost_steps, _step_fn, train_ensemble
from shared_backbone import FrozenBackbone, build_backbone, Ensemble, parse_spec
from shared_backbone.slices import Full
from shared_backbone.train import TrainConfig, _steps_per_epoch

ap = argparse.ArgumentParser()
ap.add_argument("--budget", type=int, required=True, help="single-model steps")
ap.add_argument("--train-subset", type=int, default=10000)
ap.add_argument("--test-subset", type=int, default=5000)
ap.add_argument("--arm", action="append", required=True,
                help="'single' or 'spec|K|warm_fraction|member_init|data|lr'")
ap.add_argument("--log", required=True)
a = ap.parse_args()
torch.set_num_threads(1)
train, test, card = load_train_test("fashion_mnist", a.train_subset, a.test_subset)
spe = _steps_per_epoch(len(train), TrainConfig())
fr = FrozenBackbone(build_backbone("resnet20", width=16, in_channels=1, num_classes=10), seed=0)
for arm in a.arm:
    t0 = time.time()
    if arm.startswith("deep|"):
        M = int(arm.split("|")[1])
        steps = round(a.budget / M)  # M full models cost about M single steps per step (not timed: an upper bound for deep)
        epochs = math.ceil(steps / spe)
        cfg = TrainConfig(epochs=epochs, max_steps_per_epoch=math.ceil(steps / epochs))
        _, r, _ = train_ensemble(Full(), members=M, member_init="random", data="own", config=cfg, baseline="none",
                                 train_subset=a.train_subset, test_subset=a.test_subset, progress=True, vectorized=False)
        ratio = float(M)
    elif arm == "single":
        epochs = math.ceil(a.budget / spe)
        cfg = TrainConfig(epochs=epochs, max_steps_per_epoch=math.ceil(a.budget / epochs))
        _, r, _ = train_ensemble(Full(), members=1, member_init="backbone", config=cfg, baseline="none",
                                 train_subset=a.train_subset, test_subset=a.test_subset, progress=True, vectorized=False)
        ratio = 1.0
    else:
        spec_s, K, wf, init, data, lr = arm.split("|")
        K, wf, lr = int(K), float(wf), float(lr)
        spec = parse_spec(spec_s)
        warm = round(wf * a.budget)
        probe = Ensemble(fr, spec, K, member_init="backbone", data=data, vectorized=False)
        t = equal_cost_steps({"e": _step_fn(probe, train, TrainConfig()),
                              "s": _step_fn(Ensemble(fr, Full(), 1, member_init="backbone"), train, TrainConfig())})
        ratio = t["e"] / t["s"]
        msteps = max(1, round((a.budget - warm) / ratio))
        epochs = math.ceil(msteps / spe)
        cfg = TrainConfig(epochs=epochs, max_steps_per_epoch=math.ceil(msteps / epochs), lr=lr)
        _, r, _ = train_ensemble(spec, members=K, config=cfg, full_config=TrainConfig(),
                                 warm_start_epochs=warm / spe, member_init=init, data=data, baseline="none",
                                 train_subset=a.train_subset, test_subset=a.test_subset, progress=True, vectorized=False)
    m = r["metrics"]
    row = {"arm": arm, "budget": a.budget, "ratio": round(ratio, 3), "acc": m["accuracy"], "nll": m["nll"], "ece": m["ece"],
           "brier": m["brier"], "auroc_mp": m.get("ood_auroc_max_prob"), "auroc_mi": m.get("ood_auroc_mutual_info"),
           "mean_member_acc": m["mean_member_accuracy"], "disagree": m["disagreement"],
           "stored_frac": r["params"]["stored_bytes_per_member"] / r["params"]["full_model_bytes"],
           "train_s": r["ensemble"]["train_seconds"], "steps": r["ensemble"]["steps"], "wall": time.time() - t0}
    print(json.dumps(row), flush=True)
    with open(a.log, "a") as f:
        f.write(json.dumps(row) + "\n")
