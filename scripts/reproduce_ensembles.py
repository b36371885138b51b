#!/usr/bin/env python
"""The partial-learning paper's ensemble table (its Table 4) on Fashion-MNIST.

    python scripts/reproduce_ensembles.py --members 5 --warm-start-epochs 1 --epochs 1

As in the paper: train the full network for a warm-start epoch, freeze it, then train K members
that differ only by the fc layer, by a fraction of every conv's filters (0.1, 0.4, 0.7; their
BN and head too), or fully independent models. Columns: learned parameters (beyond the shared
backbone), mean member accuracy, ensemble accuracy, ECE and OOD AUROC against MNIST digits.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from shared_backbone import BatchNorm, Filters, Full, Head
from shared_backbone.io import write_json
from shared_backbone.recipes import train_ensemble
from shared_backbone.train import TrainConfig

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
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = TrainConfig(epochs=args.epochs, lr=args.lr, seed=args.seed)
    rows = []
    for label, spec in ROWS:
        _, r, _ = train_ensemble(spec, members=args.members, backbone_cfg={"width": args.width}, config=config,
                                 warm_start_epochs=args.warm_start_epochs, train_subset=args.train_subset or None,
                                 test_subset=args.test_subset or None, seed=args.seed, progress=not args.no_progress,
                                 vectorized=args.execution == "vmap", baseline="none")
        m = r["metrics"]
        rows.append({"model": label, "spec": repr(spec), "learned": r["params"]["learned_all_members"],
                     "mean_member_accuracy": m["mean_member_accuracy"], "ensemble_accuracy": m["accuracy"],
                     "ece": m["ece"], "ood_auroc": m["ood_auroc_max_prob"], "ood_auroc_mi": m["ood_auroc_mutual_info"],
                     "disagreement": m["disagreement"], "seconds": r["wall_seconds"]})
        write_json(Path(args.out), {"args": vars(args), "rows": rows})
    print(f"\n{'model':<14}{'learned':>12}{'mean member':>13}{'ensemble':>10}{'ECE':>8}{'OOD AUROC':>11}{'disagree':>10}")
    for r in rows:
        print(f"{r['model']:<14}{r['learned']:>12,}{r['mean_member_accuracy']:>13.4f}{r['ensemble_accuracy']:>10.4f}"
              f"{r['ece']:>8.4f}{r['ood_auroc']:>11.4f}{r['disagreement']:>10.4f}")
    print(f"\nJSON: {args.out}")
    return rows


if __name__ == "__main__":
    main()
