r"""Train a cheap ensemble on one frozen backbone and, in the same run, one full model at the same cost.

By default (the frozen-trunk recipe, see docs/RESULTS.md): the budget of 3 epochs
of one full model; a single model's run covers the first 2.7 epochs of its cosine schedule and is frozen
there; K=3 members each own 12.5 % of the last stage's filters, its BatchNorm and the head, copied from it,
and finish the schedule on their own data orders without label smoothing. The single model trained for
the whole budget is the baseline, printed beside it.

    shared-backbone train-ensemble
    shared-backbone train-ensemble --members 8 --slice "Filters(0.1)+BatchNorm()+Head()" --warm-start-epochs 0 \
        --budget-epochs 0 --epochs 3 --member-opt label_smoothing=0.1
    shared-backbone train-ensemble --backbone vgg19_bn --width 16 --backbone-opt kernel_size=3

`make demo` runs the recipe measured best against one model at equal cost (docs/RESULTS.md, session 10):
members on a trunk that trains on from 2.5 of the 3 epochs, without label smoothing, made to disagree on 8
jigsawed images a step. In five runs (three seeds) it lowered NLL and ECE by about 0.03 and raised max-prob
OOD AUROC by 0.004-0.055; accuracy was a tie (-0.25 to +0.02 points). Its phase is sized in the loop to the seconds the
single model's run has left after the warm start. It runs in one process without checkpoints, so the bare
default stays the frozen trunk:

    shared-backbone train-ensemble --trunk joint --warm-start-epochs 2.5 --member-opt label_smoothing=0 \
        --diversity batch=8

Runs unchanged on many processes (GPUs, or CPU processes joined in one gloo group):

    accelerate launch --multi_gpu --num_processes 2 -m shared_backbone train-ensemble --parallel members
    torchrun --nproc_per_node 2 --no-python shared-backbone train-ensemble --parallel data
"""
from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

import torch

from ..backbones import build_backbone
from ..distributed import make_accelerator
from ..io import write_json
from ..late_phase import Diversity, check_diversity
from ..plots import plot_ensemble_report
from ..recipes import check_joint, format_report, train_ensemble
from ..saving import save_ensemble
from ..slices import parse_spec
from ..train import ResumeMismatch, TrainConfig
from ._args import add_backbone, add_runtime, add_train_config, parse_job

# where this job's defaults differ from TrainConfig's (a longer run, precise BN)
TRAIN_DEFAULTS = {"epochs": 3, "precise_bn": 20}
# where the members' recipe differs from the warm start's and the baseline's: ensembles of models trained
# with label smoothing are under-confident (averaging softens them further), so members train without it
MEMBER_DEFAULTS = ("label_smoothing=0",)


def default_slice(backbone: str, backbone_cfg: dict) -> str:
    """12.5 % of the last block's filters, its BatchNorm and the head: the stages before it run once."""
    with torch.device("meta"):
        stages = build_backbone(backbone, **{"in_channels": 1, "num_classes": 2, **backbone_cfg}).stage_names
    last = stages[-2]
    return f"Filters(0.125, stages=['{last}']) + BatchNorm(stages=['{last}']) + Head()"


def member_config(ap: argparse.ArgumentParser, config: TrainConfig, items) -> TrainConfig:
    """``config`` with the ``--member-opt KEY=VALUE`` overrides; a bad one is a usage error naming it."""
    values = asdict(config)
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in values:
            ap.error(f"--member-opt takes KEY=VALUE with KEY a training field ({', '.join(values)}), got {item!r}")
        kind = type(values[key]) if values[key] is not None else int
        try:
            values[key] = (text.strip().lower() in ("1", "true", "yes", "on")) if kind is bool else kind(text)
        except ValueError:
            ap.error(f"--member-opt {key}={text!r}: expected {kind.__name__}")
    try:
        return TrainConfig(**values)
    except (TypeError, ValueError) as err:
        ap.error(f"bad --member-opt: {err}")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="shared-backbone train-ensemble", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--members", type=int, default=3, help="K, ensemble members")
    ap.add_argument("--slice", default=None,
                    help="what each member learns (default: 12.5%% of the last block's filters, its BatchNorm and the "
                         "head: \"Filters(0.125, stages=['block3']) + BatchNorm(stages=['block3']) + Head()\" on "
                         "resnet20)")
    ap.add_argument("--budget-epochs", type=float, default=3.0,
                    help="the whole ensemble's cost, warm start included, in epochs of one full model; the members "
                         "get what the warm start leaves (0 = no budget: members train --epochs)")
    ap.add_argument("--schedule", choices=["auto", "shared", "restart"], default="auto",
                    help="shared: the warm start and the members are two pieces of one cosine schedule (the warm "
                         "start cut from the single model's run); restart: a cosine each; auto: shared after a "
                         "warm start")
    ap.add_argument("--trunk", choices=["frozen", "joint"], default="frozen",
                    help="frozen: the members train their slices on the warm start as it is; joint: the trunk goes "
                         "on training under them, one member per step in turn (late-phase weights), frozen at the end")
    ap.add_argument("--slice-lr-scale", type=float, default=1.0,
                    help="with --trunk joint: the members' slices learn at this multiple of the trunk's lr")
    ap.add_argument("--diversity", action="append", default=None, metavar="KEY=VALUE",
                    help="with --trunk joint: make the members disagree on jigsawed outliers (D-BAT's idea); "
                         "weight=W (default 1), patch=P pixels (default 14), batch=N images a step (default 16), "
                         "reach=trunk|slice (where its gradient goes; default trunk); "
                         "'--diversity weight=1' turns it on with the defaults")
    ap.add_argument("--member-opt", action="append", default=None, metavar="KEY=VALUE",
                    help="a training field that differs for the members (repeatable; default: "
                         f"{' '.join(MEMBER_DEFAULTS)}; pass --member-opt label_smoothing=0.1 for the same recipe)")
    ap.add_argument("--task", default="fashion_mnist", help="a shipped task card's name, or a path to a .toml card")
    ap.add_argument("--warm-start-epochs", type=float, default=2.7,
                    help="train the full net first (fractions allowed), then freeze it (0 = members on a random "
                         "backbone)")
    ap.add_argument("--member-init", choices=["random", "backbone"], default=None,
                    help="members' learned rows: drawn afresh, or copied from the backbone (default: backbone after "
                         "a warm start)")
    ap.add_argument("--baseline", choices=["none", "single", "deep"], default="single",
                    help="also train, at the ensemble's cost, one full model or a deep ensemble of full models")
    ap.add_argument("--train-subset", type=int, default=0, help="0 = the whole training split")
    ap.add_argument("--test-subset", type=int, default=0, help="0 = the whole test split")
    ap.add_argument("--data", choices=["shared", "own"], default="shared", help="same batches for all members, or own shuffles")
    ap.add_argument("--execution", choices=["auto", "vmap", "loop"], default="auto",
                    help="members in one vmapped call or a loop; auto = vmap on CUDA, loop on CPU (faster on 2 cores today)")
    ap.add_argument("--parallel", choices=["members", "data"], default="members",
                    help="with several processes: split the members (no gradient traffic) or the data (DDP)")
    ap.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no",
                    help="autocast the forward (bf16 works on CPUs too; fp16 needs CUDA)")
    ap.add_argument("--checkpoint-every", type=int, default=None, help="also checkpoint every N steps (mid-epoch)")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint if there is one")
    ap.add_argument("--ood", default="mnist5k", help="'mnist5k' or 'none'")
    ap.add_argument("--out", default="runs/ensemble", help="results, plot and saved ensemble go here")
    add_runtime(ap)
    add_backbone(ap, "resnet20")
    add_train_config(ap, defaults=TRAIN_DEFAULTS)
    return ap


def main(argv=None) -> dict:
    ap = parser()
    args, config, backbone_cfg = parse_job(ap, argv)
    accelerator = make_accelerator(args.mixed_precision)
    main_process = accelerator.is_main_process
    execution = args.execution if args.execution != "auto" else ("vmap" if torch.cuda.is_available() else "loop")
    out = Path(args.out)
    members_config = member_config(ap, config, MEMBER_DEFAULTS if args.member_opt is None else args.member_opt)
    schedule = args.schedule if args.schedule != "auto" else ("shared" if args.warm_start_epochs else "restart")
    if args.trunk == "joint":  # refused before anything trains: a usage error, not a traceback
        try:
            check_joint(args.data, args.resume, args.checkpoint_every, accelerator, args.slice_lr_scale)
        except ValueError as err:
            ap.error(str(err))
    elif args.diversity is not None:
        ap.error("--diversity needs --trunk joint (the members disagree one step at a time on a trunk that trains)")
    elif args.slice_lr_scale != 1.0:
        ap.error(f"--slice-lr-scale {args.slice_lr_scale} needs --trunk joint (a frozen trunk has no lr of its own; "
                 "set the members' with --member-opt lr=...)")
    try:
        diversity = Diversity.parse(args.diversity) if args.diversity is not None else None
        if diversity is not None:
            check_diversity(diversity, args.members)
    except ValueError as err:
        ap.error(f"--diversity: {err}")
    try:
        spec = parse_spec(default_slice(args.backbone, backbone_cfg) if args.slice is None else args.slice)
        ens, report, arrays = train_ensemble(
            spec, members=args.members, backbone=args.backbone, backbone_cfg=backbone_cfg,
            task=args.task, config=members_config, full_config=config, warm_start_epochs=args.warm_start_epochs,
            budget_epochs=args.budget_epochs or None, schedule=schedule,
            trunk=args.trunk, slice_lr_scale=args.slice_lr_scale, diversity=diversity,
            train_subset=args.train_subset or None, test_subset=args.test_subset or None, data=args.data,
            seed=args.seed, ood=None if args.ood == "none" else args.ood, out_dir=out,
            progress=not args.no_progress, vectorized=execution == "vmap", accelerator=accelerator,
            parallel=args.parallel, resume=args.resume, checkpoint_every=args.checkpoint_every,
            baseline=args.baseline, member_init=args.member_init,
        )
    except ResumeMismatch as err:  # --resume on another run's checkpoint: a usage error naming each difference
        ap.error(str(err))
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
