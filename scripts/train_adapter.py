#!/usr/bin/env python
"""Train one task's adapter on a frozen backbone and save it (PEFT layout: adapter_config.json + adapter_model.safetensors).

    python scripts/train_adapter.py --task mnist5k --slice "Blocks('block2')+Head()" --out runs/adapters/mnist5k

The backbone is saved once next to the adapters (``backbone.json`` in the parent of ``--out``, plus
``backbone.safetensors`` for a trained one). Without ``--backbone-dir`` it is ResNet-20 frozen at random
(``--width``, ``--seed``); a ``backbone.json`` already beside ``--out`` is reused, so several tasks share one.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from shared_backbone import FrozenBackbone, build_backbone, parse_spec
from shared_backbone.adapters import AdapterBank, adapter_bytes
from shared_backbone.distributed import make_accelerator
from shared_backbone.io import write_json
from shared_backbone.recipes import load_train_test
from shared_backbone.saving import load_backbone, save_backbone
from shared_backbone.train import TrainConfig, fit


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", required=True, help="a task card name (tasks/) or a path to a .toml card")
    ap.add_argument("--slice", default="Filters(0.1)+BatchNorm()+Head()", help="what the task learns (its head always)")
    ap.add_argument("--out", required=True, help="the adapter folder to write")
    ap.add_argument("--name", default=None, help="task name inside the bank (default: the card's name)")
    ap.add_argument("--backbone-dir", default=None, help="a folder with backbone.json (default: beside --out, else random)")
    ap.add_argument("--width", type=int, default=16, help="ResNet-20 width for a new random backbone")
    ap.add_argument("--backbone-classes", type=int, default=10, help="classes of a new random backbone's own head")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--train-subset", type=int, default=0, help="0 = the whole training split")
    ap.add_argument("--test-subset", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=TrainConfig.lr)
    ap.add_argument("--max-steps-per-epoch", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--precise-bn", type=int, default=20,
                    help="batches to recompute BatchNorm statistics over after training (0 = off)")
    ap.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 4))
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    accelerator = make_accelerator(args.mixed_precision)  # one process, or all of `accelerate launch` in one group

    out = Path(args.out)
    train, test, card = load_train_test(args.task, args.train_subset or None, args.test_subset or None, args.seed)
    home = Path(args.backbone_dir) if args.backbone_dir else out.parent
    if (home / "backbone.json").is_file():
        frozen = load_backbone(home)
    elif args.backbone_dir:
        raise SystemExit(f"--backbone-dir {home} holds no backbone.json")
    else:
        bb = build_backbone("resnet20", width=args.width, in_channels=card.input_shape[0],
                            num_classes=args.backbone_classes)
        frozen = FrozenBackbone(bb, seed=args.seed)
    if accelerator.is_main_process and not (out.parent / "backbone.json").is_file():
        save_backbone(frozen, out.parent)

    bank = AdapterBank(frozen)
    name = args.name or card.name
    adapter = bank.add_task(name, parse_spec(args.slice), card, seed=args.seed)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                         max_steps_per_epoch=args.max_steps_per_epoch, precise_bn=args.precise_bn)
    record = fit(adapter, train, test, config, accelerator=accelerator, progress=not args.no_progress)
    if not accelerator.is_main_process:  # data-parallel under `accelerate launch`: rank 0 writes
        accelerator.wait_for_everyone()
        return record["test"]
    bank.eval().save_adapter(name, out)
    report = {"task": name, "card": card.name, "spec": repr(adapter.spec), "learned": adapter.num_learned(),
              "adapter_bytes": adapter_bytes(out), "accuracy": record["test"]["accuracy"],
              "fingerprint": frozen.fingerprint, "train_size": len(train), "test_size": len(test),
              "train_seconds": record["train_seconds"], "history": record["history"]}
    write_json(out.parent / f"{out.name}.results.json", report)
    accelerator.wait_for_everyone()
    print(f"\n{name}: {adapter.spec!r} learns {report['learned']:,} parameters; adapter {report['adapter_bytes']:,} "
          f"bytes; test accuracy {report['accuracy']:.4f}\nadapter: {out}/   backbone: {out.parent}/backbone.json")
    return report


if __name__ == "__main__":
    main()
