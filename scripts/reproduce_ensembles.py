#!/usr/bin/env python
"""The partial-learning paper's ensemble table (its Table 4) on Fashion-MNIST.

    python scripts/reproduce_ensembles.py --members 5 --warm-start-epochs 1 --epochs 1
    python scripts/reproduce_ensembles.py --members 5 --warm-start-epochs 1 --epochs 4 \
        --out runs/ensembles.json --resume    # long: rerun the same command to continue after an interruption

As in the paper: train the full network for a warm-start epoch, freeze it, then train K members
that differ only by the fc layer, by a fraction of every conv's filters (0.1, 0.4, 0.7; their
BN and head too), or fully independent models. Columns: learned parameters (beyond the shared
backbone), mean member accuracy, ensemble accuracy, ECE and OOD AUROC against MNIST digits.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from shared_backbone import BatchNorm, Filters, Full, Head
from shared_backbone.io import write_json
from shared_backbone.recipes import train_ensemble
from shared_backbone.train import TrainConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _resume import ArmStore  # noqa: E402

ROWS = [("FC", Head()), ("Filters-0.1", Filters(0.1) + BatchNorm() + Head()),
        ("Filters-0.4", Filters(0.4) + BatchNorm() + Head()), ("Filters-0.7", Filters(0.7) + BatchNorm() + Head()),
        ("Full", Full())]


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--members", type=int, default=5)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=1, help="epochs of member training after the warm start")
    ap.add_argument("--warm-start-epochs", type=int, default=1)
    ap.add_argument("--train-subset", type=int, default=0, help="0 = all 60,000")
    ap.add_argument("--test-subset", type=int, default=0)
    ap.add_argument("--lr", type=float, default=TrainConfig.lr)
    ap.add_argument("--execution", choices=["vmap", "loop"], default="vmap" if torch.cuda.is_available() else "loop")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/ensembles.json")
    ap.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 4))
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--resume", action="store_true",
                    help="keep finished rows and continue an unfinished one from its last checkpoint (work "
                         "directory: --out without .json, plus _arms; the row's warm start is recomputed, seeded)")
    ap.add_argument("--checkpoint-every", type=int, default=100, help="steps between mid-epoch checkpoints")
    args = ap.parse_args(argv)
    if args.checkpoint_every < 1:
        ap.error(f"--checkpoint-every must be a number of steps >= 1, got {args.checkpoint_every}")
    torch.set_num_threads(args.threads)
    config = TrainConfig(epochs=args.epochs, lr=args.lr, seed=args.seed)
    out = Path(args.out)
    store = ArmStore(out.with_name(out.stem + "_arms"), _settings(args), args.resume)
    rows = []
    for label, spec in ROWS:
        row = store.done(label)
        if row is None:
            _, r, _ = train_ensemble(spec, members=args.members, backbone_cfg={"width": args.width}, config=config,
                                     warm_start_epochs=args.warm_start_epochs, train_subset=args.train_subset or None,
                                     test_subset=args.test_subset or None, seed=args.seed,
                                     progress=not args.no_progress, vectorized=args.execution == "vmap",
                                     out_dir=store.arm_dir(label), resume=args.resume,
                                     checkpoint_every=args.checkpoint_every)
            m = r["metrics"]
            row = store.finish(label, {
                "model": label, "spec": repr(spec), "learned": r["params"]["learned_all_members"],
                "mean_member_accuracy": m["mean_member_accuracy"], "ensemble_accuracy": m["accuracy"],
                "nll": m["nll"], "ece": m["ece"], "ood_auroc": m["ood_auroc_max_prob"],
                "ood_auroc_mi": m["ood_auroc_mutual_info"], "disagreement": m["disagreement"],
                "seconds": r["wall_seconds"]})
        rows.append(row)
        write_json(out, {"args": vars(args), "rows": rows})
    print(f"\n{'model':<14}{'learned':>12}{'mean member':>13}{'ensemble':>10}{'ECE':>8}{'OOD AUROC':>11}{'disagree':>10}")
    for r in rows:
        print(f"{r['model']:<14}{r['learned']:>12,}{r['mean_member_accuracy']:>13.4f}{r['ensemble_accuracy']:>10.4f}"
              f"{r['ece']:>8.4f}{r['ood_auroc']:>11.4f}{r['disagreement']:>10.4f}")
    print(f"\nJSON: {args.out}")
    return rows


def _settings(args) -> dict:
    """What every row's training depends on (not where it writes, threads or progress bars)."""
    return {k: v for k, v in vars(args).items() if k not in ("out", "threads", "no_progress", "resume")}


if __name__ == "__main__":
    main()
