#!/usr/bin/env python
"""Screen cheap-ensemble recipes on the full data, every warm start a snapshot of the single model's own run.

One single model trains for the whole budget (``--budget`` single-model steps, the default recipe's
cosine schedule); snapshots of it at the fractions ``--alphas`` are the warm starts. An ensemble arm
starts from the snapshot at ALPHA and spends the rest of the budget, ``(1 - ALPHA) * budget`` single
steps, on K members (each ensemble step's cost in single steps is timed interleaved in the run), so
that every arm costs what the single model cost.

An arm is 'SPEC|K|ALPHA|INIT|DATA|LR': LR='cont' continues the single model's cosine schedule from
ALPHA to its end (lr 0.05 peak), a number restarts a cosine from that lr; 'deep|M' is M full models
sharing the budget.
"""
import argparse
import json
import os
import time

import torch
from shared_backbone import Ensemble, FrozenBackbone, build_backbone, parse_spec
from shared_backbone.data import TensorData
from shared_backbone.metrics import evaluate_ensemble
from shared_backbone.recipes import _config_for_steps, _step_fn, equal_cost_steps, load_train_test
from shared_backbone.slices import Full
from shared_backbone.train import TrainConfig, fit, predict
from shared_backbone.data.sources import mnist5k

ap = argparse.ArgumentParser()
ap.add_argument("--budget", type=int, required=True)
ap.add_argument("--alphas", default="0.5,0.75,0.9")
ap.add_argument("--arm", action="append", default=[])
ap.add_argument("--log", required=True)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--precise-bn", type=int, default=0)
ap.add_argument("--train-subset", type=int, default=0)
ap.add_argument("--cache", default=None, help="folder keeping the single model's snapshots and row between screens")
a = ap.parse_args()
torch.set_num_threads(a.threads)
train, test, card = load_train_test("fashion_mnist", a.train_subset or None, None)
images, _ = mnist5k()
ood = TensorData.from_uint8(images, torch.zeros(len(images), dtype=torch.int64), card.mean, card.std)
n = len(train)


def log(row):
    print(json.dumps(row), flush=True)
    with open(a.log, "a") as f:
        f.write(json.dumps(row) + "\n")


def evaluate(model, name, extra):
    t0 = time.perf_counter()
    logits, ood_logits = predict(model, test, 1000), predict(model, ood, 1000)
    m = evaluate_ensemble(logits, test.y.cpu(), ood_logits)
    row = {"arm": name, "acc": m["accuracy"], "nll": m["nll"], "ece": m["ece"], "brier": m["brier"],
         "auroc_mp": m.get("ood_auroc_max_prob"), "auroc_mi": m.get("ood_auroc_mutual_info"),
         "auroc_ent": m.get("ood_auroc_entropy"), "mean_member_acc": m["mean_member_accuracy"],
         "disagree": m["disagreement"], "eval_s": time.perf_counter() - t0, **extra}
    log(row)
    return row


fr0 = FrozenBackbone(build_backbone("resnet20", width=16, in_channels=1, num_classes=10), seed=0)
single = Ensemble(fr0, Full(), 1, member_init="backbone")
cfg = _config_for_steps(TrainConfig(precise_bn=a.precise_bn), a.budget, n)
B = cfg.epochs * cfg.max_steps_per_epoch if cfg.max_steps_per_epoch else cfg.epochs * -(-n // cfg.batch_size)
alphas = [float(x) for x in a.alphas.split(",")]
at = {round(al * B): al for al in alphas}
snaps = {}


def on_step(step):
    if step % 100 == 0:
        print(f"single step {step}/{B} {time.perf_counter() - t0:.0f}s", flush=True)
    if step in at:
        snaps[at[step]] = FrozenBackbone.from_module(single.member(0))


cache = os.path.join(a.cache, f"b{B}_s{n}.pt") if a.cache else None
if cache and os.path.exists(cache):
    saved = torch.load(cache, weights_only=False)
    snaps = {al: FrozenBackbone.from_module(m) for al, m in saved["snaps"].items()}
    log({**saved["row"], "cached": True})
else:
    t0 = time.perf_counter()
    rec = fit(single, train, None, cfg, on_step=on_step, progress=True)
    row = evaluate(single, "single", {"budget": B, "train_s": time.perf_counter() - t0})
    if cache:
        os.makedirs(a.cache, exist_ok=True)
        torch.save({"snaps": {al: fb.backbone for al, fb in snaps.items()}, "row": row}, cache)
missing = [al for al in alphas if al not in snaps]
assert not missing, f"no snapshot at {missing}; the cache holds {sorted(snaps)}"
ratios = {}
for arm in a.arm:
    t0 = time.perf_counter()
    if arm.startswith("single|"):  # another single model, e.g. 'single|label_smoothing=0'
        over = {k: type(getattr(TrainConfig(), k))(v) for k, v in (kv.split("=") for kv in arm[7:].split(","))}
        other = Ensemble(fr0, Full(), 1, member_init="backbone")
        fit(other, train, None, _config_for_steps(TrainConfig(precise_bn=a.precise_bn, **over), B, n), progress=True)
        evaluate(other, arm, {"train_s": time.perf_counter() - t0})
        continue
    if arm.startswith("deep|"):
        M = int(arm.split("|")[1])
        deep = Ensemble(fr0, Full(), M, member_init="random", data="own", vectorized=False)
        dcfg = _config_for_steps(TrainConfig(precise_bn=a.precise_bn), round(B / M), n)
        fit(deep, train, None, dcfg, progress=True)
        evaluate(deep, arm, {"train_s": time.perf_counter() - t0})
        continue
    spec_s, K, al, init, data, lr, *rest = arm.split("|")
    over = {k: type(getattr(TrainConfig(), k))(v) for k, v in (kv.split("=") for kv in rest[0].split(","))} if rest else {}
    K, al = int(K), float(al)
    spec = parse_spec(spec_s)
    key = (spec_s, K, data)
    if key not in ratios:
        probe = Ensemble(fr0, spec, K, member_init="backbone", data=data)
        t = equal_cost_steps({"e": _step_fn(probe, train, TrainConfig()), "s": _step_fn(single, train, TrainConfig())})
        ratios[key] = t["e"] / t["s"]
    ratio = ratios[key]
    msteps = max(1, round((1 - al) * B / ratio))
    base = TrainConfig(precise_bn=a.precise_bn, schedule_from=al, **over) if lr == "cont" else \
        TrainConfig(precise_bn=a.precise_bn, lr=float(lr), **over)
    mcfg = _config_for_steps(base, msteps, n)
    ens = Ensemble(snaps[al], spec, K, member_init=init, data=data, seed=0)
    fit(ens, train, None, mcfg, progress=True)
    evaluate(ens, arm, {"ratio": round(ratio, 3), "member_steps": msteps, "train_s": time.perf_counter() - t0})
