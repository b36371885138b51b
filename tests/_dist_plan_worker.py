"""Launched by tests/test_distributed.py under `accelerate launch` (2 CPU processes).

    python tests/_dist_plan_worker.py OUT_DIR

Runs the main job's recipe with a clock that makes every process measure a different cost for an
ensemble step (rank r: r * 2 + 1 single-model steps); writes each process's plan as OUT_DIR/rank<r>.json.
"""
from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

from shared_backbone import Head  # noqa: E402
from shared_backbone.distributed import make_accelerator  # noqa: E402
from shared_backbone.recipes import train_ensemble  # noqa: E402
from shared_backbone.train import TrainConfig  # noqa: E402


def clock_for(rank: int):
    """Successive start/stop pairs measuring ensemble, single, ensemble, ... steps of these lengths."""
    now, out = 0.0, []
    for d in itertools.islice(itertools.cycle([rank * 2.0 + 1.0, 1.0]), 200):
        out += [now, now + d]
        now += d
    return iter(out).__next__


def main() -> None:
    acc = make_accelerator()
    _, report, _ = train_ensemble(Head(), members=2, task="digits", train_subset=64, test_subset=32,
                                  backbone_cfg={"width": 4}, config=TrainConfig(epochs=1, batch_size=16),
                                  ood=None, progress=False, accelerator=acc, parallel="members",
                                  clock=clock_for(acc.process_index))
    plan = {"timing": report["baseline"]["timing"], "baseline_steps": report["baseline"]["steps"],
            "ensemble_steps": report["ensemble"]["steps"]}
    Path(sys.argv[1], f"rank{acc.process_index}.json").write_text(json.dumps(plan))
    acc.wait_for_everyone()  # no process leaves while another still uses the group (rank 0 aborted at exit once)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
