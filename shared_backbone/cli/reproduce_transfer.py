"""Transfer with adapters: new tasks on a frozen random backbone vs one partially trained on another task.

    shared-backbone reproduce-transfer --warm-start-epochs 1 --backbone-train-subset 10000 --epochs 2

Backbones: ResNet-20 (``--backbone``) frozen at random, and the same net trained for ``--warm-start-epochs`` on
Fashion-MNIST then frozen. On each, one adapter per (task, slice kind): ``Head()``,
``Blocks("block2") + Head()`` and ``Filters(0.1) + BatchNorm() + Head()`` for mnist5k and digits
(the partial-learning paper finds a middle block beats the fc alone). Every task keeps its own BN
statistics. Columns: learned parameters, adapter bytes on disk, test accuracy.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ..adapter_cards import add_task_from_card
from ..adapters import ADAPTER_WEIGHTS, AdapterBank, adapter_bytes
from ..backbones import build_backbone
from ..frozen import FrozenBackbone
from ..io import write_json
from ..recipes import load_train_test, warm_start
from ..slices import BatchNorm, Blocks, Filters, Head
from ..train import fit
from ._args import add_backbone, add_runtime, add_train_config, parse_job

TRAIN_DEFAULTS = {"precise_bn": 20}  # where this job's defaults differ from TrainConfig's (epochs: adapter training)

SLICES = [("fc", Head()), ("block2+fc", Blocks("block2") + Head()),
          ("filters0.1+bn+fc", Filters(0.1) + BatchNorm() + Head())]


def _task_name(task: str, label: str) -> str:
    return f"{task}-{label.replace('+', '_').replace('.', '')}"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="shared-backbone reproduce-transfer", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone-task", default="fashion_mnist", help="task the partially trained backbone learns")
    ap.add_argument("--backbone-train-subset", type=int, default=10000, help="0 = the whole training split")
    ap.add_argument("--warm-start-epochs", type=int, default=1)
    ap.add_argument("--tasks", default="mnist5k,digits", help="comma-separated task cards for the adapters")
    ap.add_argument("--train-subset", type=int, default=0, help="adapter training images per task (0 = all)")
    ap.add_argument("--out", default="results/transfer.json")
    ap.add_argument("--adapters-dir", default="runs/transfer", help="banks are saved here, one per backbone")
    add_runtime(ap)
    add_backbone(ap, "resnet20")
    add_train_config(ap, defaults=TRAIN_DEFAULTS)
    return ap


def main(argv=None) -> list[dict]:
    ap = parser()
    args, config, backbone_cfg = parse_job(ap, argv)
    progress = not args.no_progress
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]

    bb_train, bb_test, bb_card = load_train_test(args.backbone_task, args.backbone_train_subset or None, None, args.seed)
    cfg = {**backbone_cfg, "in_channels": bb_card.input_shape[0], "num_classes": bb_card.num_classes}
    t0 = time.perf_counter()
    trained = warm_start(args.backbone, cfg, bb_train, args.warm_start_epochs, config, args.seed, progress)
    warm_seconds = time.perf_counter() - t0
    trained.backbone.eval()
    with torch.no_grad():
        bb_acc = (trained.backbone(bb_test.x).argmax(-1) == bb_test.y).float().mean().item()
    backbones = {
        "random": FrozenBackbone(build_backbone(args.backbone, **cfg), seed=args.seed),
        f"{args.backbone_task}-{args.warm_start_epochs}ep": trained,
    }
    data = {t: load_train_test(t, args.train_subset or None, None, args.seed)[:2] for t in tasks}
    rows = []
    for bb_name, frozen in backbones.items():
        bank = AdapterBank(frozen)
        for task in tasks:
            train, test = data[task]
            for label, spec in SLICES:
                name = _task_name(task, label)
                adapter = add_task_from_card(bank, name, spec, task, seed=args.seed)
                rec = fit(adapter, train, test, config, progress=progress)
                rows.append({"backbone": bb_name, "task": task, "slice": label, "spec": repr(adapter.spec),
                             "learned": adapter.num_learned(), "accuracy": rec["test"]["accuracy"],
                             "train_seconds": rec["train_seconds"], "train_size": len(train), "test_size": len(test)})
        out_dir = Path(args.adapters_dir) / bb_name
        bank.eval().save(out_dir)
        full_bytes = sum(t.numel() * t.element_size() for t in frozen.tensors().values())
        for r in rows:
            if r["backbone"] == bb_name:
                d = out_dir / _task_name(r['task'], r['slice'])
                r["adapter_bytes"] = adapter_bytes(d)
                r["tensor_file_bytes"] = (d / ADAPTER_WEIGHTS).stat().st_size
                r["full_model_bytes"] = full_bytes
        write_json(Path(args.out), {"args": vars(args), "backbone_accuracy_on_" + args.backbone_task: bb_acc,
                                    "warm_start_seconds": warm_seconds, "rows": rows})
    print(f"\nbackbone: {args.backbone} {trained.config['config']}; partially trained = {args.warm_start_epochs} epoch(s) on "
          f"{len(bb_train):,} {args.backbone_task} images (test accuracy {bb_acc:.4f}); full model "
          f"{rows[0]['full_model_bytes']:,} bytes\n")
    print(f"| {'backbone':<20} | {'task':<8} | {'slice':<17} | {'learned':>8} | {'adapter bytes':>13} | {'accuracy':>8} |")
    print(f"|{'-' * 22}|{'-' * 10}|{'-' * 19}|{'-' * 10}|{'-' * 15}|{'-' * 10}|")
    for r in rows:
        print(f"| {r['backbone']:<20} | {r['task']:<8} | {r['slice']:<17} | {r['learned']:>8,} | "
              f"{r['adapter_bytes']:>13,} | {r['accuracy']:>8.4f} |")
    print(f"\nJSON: {args.out}   adapters: {args.adapters_dir}/")
    return rows


if __name__ == "__main__":
    main()
