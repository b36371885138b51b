"""Launched by tests/test_distributed.py under `accelerate launch` (2 CPU processes) or run plainly.

    python tests/_dist_worker.py SETUP[,SETUP...] OUT_DIR [--parallel members|data]
                                 [--kill-after STEP --ckpt DIR] [--resume --ckpt DIR]

Trains a tiny ensemble on 8x8 digits and writes every member's slices, statistics and test
logits (main process only).
"""
from __future__ import annotations

import argparse
import os
import signal

import torch

torch.set_num_threads(1)

import shared_backbone as sb  # noqa: E402
from shared_backbone.data import TensorData, sklearn_digits  # noqa: E402
from shared_backbone.distributed import make_accelerator  # noqa: E402
from shared_backbone.io import save_tensors  # noqa: E402
from shared_backbone.train import TrainConfig, fit  # noqa: E402

# (backbone, spec): resnet20 has BatchNorm, whose batch statistics depend on the shard; vgg19 has none
SETUPS = {
    "members": ("resnet20", "Filters(0.5)+BatchNorm()+Head()", "shared"),
    "members_own": ("resnet20", "Filters(0.5)+BatchNorm()+Head()", "own"),
    "data": ("vgg19", "Filters(0.5)+Head()", "shared"),
}


def build(setup: str, members: int = 3) -> tuple[sb.Ensemble, TensorData, TensorData]:
    """In float64: float noise (the op order differs with the number of members per process) must not
    grow over the steps into differences a test cannot tell from a bug."""
    arch, spec, data = SETUPS[setup]
    x, y = sklearn_digits(size=16)
    full = TensorData.from_uint8(x, y, [0.5], [0.25], dtype=torch.float64)
    train, test = TensorData(full.x[:256], full.y[:256], [0.5], [0.25]), \
        TensorData(full.x[256:256 + 203], full.y[256:256 + 203], [0.5], [0.25])  # 203: not a multiple of 2 x 16
    frozen = sb.FrozenBackbone(sb.build_backbone(arch, width=4, in_channels=1, num_classes=10), seed=0)
    ens = sb.Ensemble(frozen, sb.parse_spec(spec), members=members, seed=1, data=data).double()
    return ens, train, test


def config(setup: str) -> TrainConfig:
    # members_own also carries the L1 penalty on its learned 1x1 rows (the shortcut convs'), per member, and
    # trains its members one at a time (groups of 1: 3 in one process, 2 + 1 member-parallel); data asks for
    # groups of 2, which one process uses and DDP declines (a warning): the two must still agree
    return TrainConfig(epochs=2, batch_size=32, lr=0.05, augment=False, eval_batch_size=16, seed=3,
                       l1_pointwise=1e-3 if setup == "members_own" else 0.0,
                       member_group_size={"members_own": 1, "data": 2}.get(setup))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("setups", help="comma-separated, out of " + ", ".join(SETUPS))
    ap.add_argument("out", help="a directory: SETUP.safetensors each")
    ap.add_argument("--parallel", default="members")
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--kill-after", type=int, default=None)
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args()
    acc = make_accelerator()
    for setup in args.setups.split(","):
        ens, train, test = build(setup)

        def on_step(step: int) -> None:
            if args.kill_after is not None and step == args.kill_after:
                os.kill(os.getpid(), signal.SIGKILL)  # no clean-up: as if the machine went away

        record = fit(ens, train, test, config(setup), accelerator=acc, parallel=args.parallel, out_dir=args.ckpt,
                     resume=args.resume, checkpoint_every=3 if args.ckpt else None, on_step=on_step, progress=False)
        if acc.is_main_process:
            tensors = {f"state/{k}": v for k, v in ens.state_dict().items()}
            tensors["test_logits"] = record["_test_logits"]
            save_tensors(os.path.join(args.out, f"{setup}.safetensors"), tensors,
                         {"processes": acc.num_processes, "steps": record["steps"], "history": record["history"]})
        acc.wait_for_everyone()

if __name__ == "__main__":
    main()
