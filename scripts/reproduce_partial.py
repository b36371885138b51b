#!/usr/bin/env python
"""The partial-learning comparison on Fashion-MNIST: the same recipe for every slice kind.

    python scripts/reproduce_partial.py --epochs 2 --train-subset 10000

Trains one model per spec (fully trained; 10% of filters with the rest random or zero, plus
BN and head; BN + head; head only), prints a table of test accuracy and learned parameters
and writes JSON. The paper's ordering is full > 10% filters > BN > fc.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from shared_backbone import BatchNorm, Filters, Full, Head, parse_spec
from shared_backbone.io import write_json
from shared_backbone.recipes import train_ensemble
from shared_backbone.train import TrainConfig

DEFAULT_SPECS = [Full(), Filters(0.1) + BatchNorm() + Head(), Filters(0.1, fixed="zero") + BatchNorm() + Head(),
                 BatchNorm() + Head(), Head()]


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="resnet20")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--train-subset", type=int, default=0, help="0 = all 60,000 training images")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=TrainConfig.lr)
    ap.add_argument("--spec", action="append", help="repeatable; default: the five of the paper's comparison")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/partial.json")
    ap.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 4))
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    specs = [parse_spec(s) for s in args.spec] if args.spec else DEFAULT_SPECS
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    rows = []
    for spec in specs:
        _, report, _ = train_ensemble(spec, members=1, backbone=args.backbone, backbone_cfg={"width": args.width},
                                      config=config, train_subset=args.train_subset or None, seed=args.seed,
                                      ood=None, progress=not args.no_progress, baseline="none")
        rows.append({"spec": repr(spec), "test_accuracy": report["metrics"]["accuracy"],
                     "test_nll": report["metrics"]["nll"], "learned": report["params"]["learned_per_member"],
                     "total": report["params"]["backbone_total"], "train_seconds": report["train"]["train_seconds"]})
        write_json(Path(args.out), {"args": vars(args), "rows": rows})
    print(f"\n{'spec':<52}{'test acc':>10}{'learned':>12}{'of total':>10}{'train s':>9}")
    for r in rows:
        print(f"{r['spec']:<52}{r['test_accuracy']:>10.4f}{r['learned']:>12,}{r['learned'] / r['total']:>10.2%}"
              f"{r['train_seconds']:>9.0f}")
    print(f"\nJSON: {args.out}")
    return rows


if __name__ == "__main__":
    main()
