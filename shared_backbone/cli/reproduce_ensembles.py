r"""The partial-learning paper's ensemble table (its Table 4) on Fashion-MNIST.

    shared-backbone reproduce-ensembles --members 5 --warm-start-epochs 1 --epochs 1
    shared-backbone reproduce-ensembles --members 5 --warm-start-epochs 1 --epochs 4 \
        --out runs/ensembles.json --resume    # long: rerun the same command to continue after an interruption

As in the paper: train the full network for a warm-start epoch, freeze it, then train K members
that differ only by the fc layer, by a fraction of every conv's filters (0.1, 0.4, 0.7; their
BN and head too), or fully independent models. Columns: learned parameters (beyond the shared
backbone), mean member accuracy, ensemble accuracy, ECE and OOD AUROC against MNIST digits.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..io import write_json
from ..recipes import train_ensemble
from ..slices import BatchNorm, Filters, Full, Head
from ._args import add_backbone, add_runtime, add_train_config, parse_job
from ._resume import ArmStore, add_resume, check_resume, run_settings

TRAIN_DEFAULTS = {"epochs": 1}  # where this job's defaults differ from TrainConfig's (epochs after the warm start)

ROWS = [("FC", Head()), ("Filters-0.1", Filters(0.1) + BatchNorm() + Head()),
        ("Filters-0.4", Filters(0.4) + BatchNorm() + Head()), ("Filters-0.7", Filters(0.7) + BatchNorm() + Head()),
        ("Full", Full())]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="shared-backbone reproduce-ensembles", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--members", type=int, default=5)
    ap.add_argument("--warm-start-epochs", type=int, default=1)
    ap.add_argument("--train-subset", type=int, default=0, help="0 = all 60,000")
    ap.add_argument("--test-subset", type=int, default=0)
    ap.add_argument("--execution", choices=["vmap", "loop"], default="vmap" if torch.cuda.is_available() else "loop")
    ap.add_argument("--out", default="results/ensembles.json")
    add_runtime(ap)
    add_resume(ap, "keep finished rows and continue an unfinished one from its last checkpoint (work directory: "
                   "--out without .json, plus _arms; the row's warm start is recomputed, seeded)")
    add_backbone(ap, "resnet20")
    add_train_config(ap, defaults=TRAIN_DEFAULTS)
    return ap


def main(argv=None) -> list[dict]:
    ap = parser()
    args, config, backbone_cfg = parse_job(ap, argv)
    check_resume(ap, args)
    out = Path(args.out)
    store = ArmStore(out.with_name(out.stem + "_arms"), run_settings(args), args.resume)
    rows = []
    for label, spec in ROWS:
        row = store.done(label)
        if row is None:
            _, r, _ = train_ensemble(spec, members=args.members, backbone=args.backbone, backbone_cfg=backbone_cfg,
                                     config=config, warm_start_epochs=args.warm_start_epochs,
                                     train_subset=args.train_subset or None, test_subset=args.test_subset or None,
                                     seed=args.seed, progress=not args.no_progress,
                                     vectorized=args.execution == "vmap", out_dir=store.arm_dir(label),
                                     resume=args.resume, checkpoint_every=args.checkpoint_every, baseline="none")
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


if __name__ == "__main__":
    main()
