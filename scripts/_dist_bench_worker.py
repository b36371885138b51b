#!/usr/bin/env python
"""One timed run of ``fit`` for ``scripts/bench.py --only distributed`` (launched by it, 1 or N processes).

    accelerate launch --multi_gpu --num_processes 2 scripts/_dist_bench_worker.py --parallel members OUT.json

Trains K members of ResNet-20 (``Filters(0.1)+BatchNorm()+Head()``) on a fixed synthetic batch
stream through :func:`shared_backbone.train.fit` and writes the median seconds per optimizer step
(after ``--warmup`` steps), measured on the main process between ``on_step`` calls.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import shared_backbone as sb  # noqa: E402
from shared_backbone.data import TensorData  # noqa: E402
from shared_backbone.distributed import make_accelerator  # noqa: E402
from shared_backbone.train import TrainConfig, fit  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--parallel", choices=["members", "data"], default="members")
    ap.add_argument("--members", type=int, default=8)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--batch", type=int, default=128, help="global batch")
    ap.add_argument("--image", type=int, default=28)
    ap.add_argument("--steps", type=int, default=6, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--mixed-precision", default="no")
    ap.add_argument("--execution", choices=["auto", "vmap", "loop"], default="auto",
                    help="members in one vmap or a loop (auto: vmap on CUDA, the loop on CPU, as the scripts do)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    acc = make_accelerator(args.mixed_precision)
    if acc.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    frozen = sb.FrozenBackbone(sb.build_backbone("resnet20", width=args.width, in_channels=1, num_classes=10), seed=0)
    ens = sb.Ensemble(frozen, sb.Filters(0.1) + sb.BatchNorm() + sb.Head(), members=args.members,
                      vectorized=args.execution == "vmap" or (args.execution == "auto" and acc.device.type == "cuda"))
    n = args.batch * (args.steps + args.warmup)
    g = torch.Generator().manual_seed(0)
    data = TensorData(torch.randn(n, 1, args.image, args.image, generator=g), torch.randint(0, 10, (n,), generator=g),
                      [0.0], [1.0])
    stamps: list[float] = []

    def on_step(step: int) -> None:
        if acc.device.type == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    t0 = time.perf_counter()
    fit(ens, data, None, TrainConfig(epochs=1, batch_size=args.batch, augment=False), accelerator=acc,
        parallel=args.parallel, on_step=on_step, progress=False)
    steps = [b - a for a, b in zip(stamps[args.warmup - 1:], stamps[args.warmup:])] if args.warmup else \
        [stamps[0] - t0] + [b - a for a, b in zip(stamps, stamps[1:])]
    if acc.is_main_process:
        Path(args.out).write_text(json.dumps({
            "processes": acc.num_processes, "parallel": args.parallel, "device": str(acc.device),
            "threads_per_process": args.threads, "execution": "vmap" if ens.vectorized else "loop",
            "members": args.members, "global_batch": args.batch,
            "median_step_s": statistics.median(steps), "all_step_s": steps,
        }))
    acc.wait_for_everyone()


if __name__ == "__main__":
    main()
