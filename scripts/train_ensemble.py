#!/usr/bin/env python
"""Train a cheap ensemble on one frozen backbone and report accuracy, calibration and OOD detection.

    python scripts/train_ensemble.py --members 8 --slice "Filters(0.1)+BatchNorm()+Head()" --epochs 3

Runs unchanged on many processes (GPUs, or CPU processes joined in one gloo group):

    accelerate launch --multi_gpu --num_processes 2 scripts/train_ensemble.py --parallel members
    torchrun --nproc_per_node 2 scripts/train_ensemble.py --parallel data
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from shared_backbone import parse_spec
from shared_backbone.distributed import make_accelerator
from shared_backbone.io import write_json
from shared_backbone.plots import plot_ensemble_report
from shared_backbone.recipes import format_report, train_ensemble
from shared_backbone.saving import save_ensemble
from shared_backbone.train import TrainConfig


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--members", type=int, default=8, help="K, ensemble members")
    ap.add_argument("--slice", default="Filters(0.1)+BatchNorm()+Head()", help="what each member learns")
    ap.add_argument("--backbone", default="resnet20")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--task", default="fashion_mnist", help="a task card in tasks/")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--warm-start-epochs", type=float, default=0, help="train the full net first (fractions allowed), then freeze it")
    ap.add_argument("--member-init", choices=["random", "backbone"], default=None,
                    help="members' learned rows: drawn afresh, or copied from the backbone (default: backbone after a warm start)")
    ap.add_argument("--baseline", choices=["none", "single", "deep"], default="single",
                    help="also train, at the ensemble's cost, one full model or a deep ensemble of full models")
    ap.add_argument("--train-subset", type=int, default=10000, help="0 = the whole training split")
    ap.add_argument("--test-subset", type=int, default=5000, help="0 = the whole test split")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=TrainConfig.lr)
    ap.add_argument("--weight-decay", type=float, default=TrainConfig.weight_decay)
    ap.add_argument("--data", choices=["shared", "own"], default="shared", help="same batches for all members, or own shuffles")
    ap.add_argument("--bootstrap", action="store_true", help="with --data own: bootstrap samples per member")
    ap.add_argument("--execution", choices=["auto", "vmap", "loop"], default="auto",
                    help="members in one vmapped call or a loop; auto = vmap on CUDA, loop on CPU (faster on 2 cores today)")
    ap.add_argument("--parallel", choices=["members", "data"], default="members",
                    help="with several processes: split the members (no gradient traffic) or the data (DDP)")
    ap.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no",
                    help="autocast the forward (bf16 works on CPUs too; fp16 needs CUDA)")
    ap.add_argument("--precise-bn", type=int, default=20,
                    help="batches to recompute BatchNorm statistics over after training (0 = off)")
    ap.add_argument("--checkpoint-every", type=int, default=None, help="also checkpoint every N steps (mid-epoch)")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint if there is one")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ood", default="mnist5k", help="'mnist5k' or 'none'")
    ap.add_argument("--out", default="runs/ensemble", help="results, plot and saved ensemble go here")
    ap.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 4))
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    accelerator = make_accelerator(args.mixed_precision)
    main_process = accelerator.is_main_process
    execution = args.execution if args.execution != "auto" else ("vmap" if torch.cuda.is_available() else "loop")
    out = Path(args.out)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                         seed=args.seed, bootstrap=args.bootstrap, precise_bn=args.precise_bn)
    backbone_cfg = {"width": args.width} if "resnet" in args.backbone and "wide" not in args.backbone else {}
    ens, report, arrays = train_ensemble(
        parse_spec(args.slice), members=args.members, backbone=args.backbone, backbone_cfg=backbone_cfg,
        task=args.task, config=config, warm_start_epochs=args.warm_start_epochs,
        train_subset=args.train_subset or None, test_subset=args.test_subset or None, data=args.data,
        seed=args.seed, ood=None if args.ood == "none" else args.ood, out_dir=out, progress=not args.no_progress,
        vectorized=execution == "vmap", accelerator=accelerator, parallel=args.parallel, resume=args.resume,
        checkpoint_every=args.checkpoint_every, baseline=args.baseline, member_init=args.member_init,
    )
    report["execution"] = execution
    report["mixed_precision"] = args.mixed_precision
    if main_process:
        save_ensemble(ens, out / "ensemble")
        write_json(out / "results.json", report)
        plot_ensemble_report(report["metrics"], out / "report.png",
                             baseline=report["baseline"]["metrics"] if report["baseline"] else None)
        print()
        print(format_report(report))
        print(f"\nresults: {out / 'results.json'}   plot: {out / 'report.png'}   ensemble: {out / 'ensemble'}/")
    accelerator.wait_for_everyone()
    return report


if __name__ == "__main__":
    main()
