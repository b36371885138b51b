r"""The partial-learning comparison on Fashion-MNIST: the same recipe for every slice kind.

    shared-backbone reproduce-partial --epochs 2 --train-subset 10000
    shared-backbone reproduce-partial --epochs 15 --spec "Filters(0.1)+BatchNorm()+Head()" --spec "Full()" \
        --out runs/partial.json --resume      # long: rerun the same command to continue after an interruption

Trains one model per spec (fully trained; 10% of filters with the rest random or zero, plus
BN and head; BN + head; head only), prints a table of test accuracy and learned parameters
and writes JSON. The paper's ordering is full > 10% filters > BN > fc.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from ..io import write_json
from ..recipes import train_ensemble
from ..slices import BatchNorm, Filters, Full, Head, parse_spec
from ._args import add_backbone, add_runtime, add_train_config, parse_job
from ._resume import ArmStore, add_resume, check_resume, run_settings

DEFAULT_SPECS = [Full(), Filters(0.1) + BatchNorm() + Head(), Filters(0.1, fixed="zero") + BatchNorm() + Head(),
                 BatchNorm() + Head(), Head()]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="shared-backbone reproduce-partial", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-subset", type=int, default=0, help="0 = all 60,000 training images")
    ap.add_argument("--spec", action="append", help="repeatable; default: the five of the paper's comparison")
    ap.add_argument("--out", default="results/partial.json")
    add_runtime(ap)
    add_resume(ap, "keep finished specs' rows and continue an unfinished one from its last checkpoint "
                   "(work directory: --out without .json, plus _arms)")
    add_backbone(ap, "resnet20")
    add_train_config(ap)
    return ap


def main(argv=None) -> list[dict]:
    ap = parser()
    args, config, backbone_cfg = parse_job(ap, argv)
    check_resume(ap, args)
    specs = [parse_spec(s) for s in args.spec] if args.spec else DEFAULT_SPECS
    out = Path(args.out)
    store = ArmStore(out.with_name(out.stem + "_arms"), run_settings(args), args.resume)
    rows = []
    for i, spec in enumerate(specs):
        name = f"{i}_" + re.sub(r"[^A-Za-z0-9.]+", "_", repr(spec)).strip("_")  # 1_Filters_0.1_BatchNorm_Head
        row = store.done(name)
        if row is None:
            _, report, _ = train_ensemble(spec, members=1, backbone=args.backbone, backbone_cfg=backbone_cfg,
                                          config=config, train_subset=args.train_subset or None, seed=args.seed,
                                          ood=None, progress=not args.no_progress, out_dir=store.arm_dir(name),
                                          resume=args.resume, checkpoint_every=args.checkpoint_every, baseline="none")
            row = store.finish(name, {
                "spec": repr(spec), "test_accuracy": report["metrics"]["accuracy"],
                "test_nll": report["metrics"]["nll"], "learned": report["params"]["learned_per_member"],
                "total": report["params"]["backbone_total"], "train_seconds": report["train"]["train_seconds"]})
        rows.append(row)
        write_json(out, {"args": vars(args), "rows": rows})
    print(f"\n{'spec':<52}{'test acc':>10}{'learned':>12}{'of total':>10}{'train s':>9}")
    for r in rows:
        print(f"{r['spec']:<52}{r['test_accuracy']:>10.4f}{r['learned']:>12,}{r['learned'] / r['total']:>10.2%}"
              f"{r['train_seconds']:>9.0f}")
    print(f"\nJSON: {args.out}")
    return rows


if __name__ == "__main__":
    main()
