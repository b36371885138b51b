"""Per-arm results for the long reproduction scripts, so that ``--resume`` continues an interrupted run.

Layout under a run's work directory::

    run.json              the settings every arm was trained with (checked on --resume)
    arms/<name>/row.json  an arm's result row, written atomically once the arm has finished
    arms/<name>/checkpoint/, history.json   fit()'s own checkpoints while the arm trains

With ``resume=True`` a finished arm is read back instead of trained, and an unfinished one is
handed to :func:`~shared_backbone.train.fit` with ``resume=True`` so it continues from its last
checkpoint (every epoch's end and every ``checkpoint_every`` steps). Without it every arm trains
from the start and overwrites what an earlier run left.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..io import read_json, write_json

__all__ = ["ArmStore", "add_resume", "check_resume", "run_settings", "RUNTIME"]

RUNTIME = ("out", "threads", "no_progress", "resume")  # where a run writes and how it shows, not what it trains


def add_resume(ap: argparse.ArgumentParser, help_: str) -> None:
    """``--resume`` and ``--checkpoint-every`` (fit()'s mid-epoch checkpoints; not a TrainConfig field)."""
    ap.add_argument("--resume", action="store_true", help=help_)
    ap.add_argument("--checkpoint-every", type=int, default=100, help="steps between mid-epoch checkpoints")


def check_resume(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A usage error for a ``--checkpoint-every`` that is not a number of steps."""
    if args.checkpoint_every < 1:
        ap.error(f"--checkpoint-every must be a number of steps >= 1, got {args.checkpoint_every}")


def run_settings(args: argparse.Namespace, exclude: tuple[str, ...] = ()) -> dict:
    """What every arm's training depends on: the flags, less :data:`RUNTIME` and ``exclude``."""
    return {k: v for k, v in vars(args).items() if k not in RUNTIME and k not in exclude}


class ArmStore:
    """Where one run keeps its arms' rows and checkpoints (see the module docstring)."""

    def __init__(self, root: str | Path, settings: dict, resume: bool) -> None:
        self.root = Path(root)
        self.resume = resume
        run = self.root / "run.json"
        if resume and run.is_file():
            old = read_json(run)
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            if diff:
                changes = ", ".join(f"{k}: {old.get(k)!r} now {settings.get(k)!r}" for k in diff)
                raise SystemExit(f"--resume: {run} was written with other settings ({changes}); rerun with the "
                                 "same arguments, or without --resume to start over")
        write_json(run, settings)

    def arm_dir(self, name: str) -> Path:
        """The directory fit() checkpoints this arm into."""
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"arm name must be a plain file name, got {name!r}")
        return self.root / "arms" / name

    def done(self, name: str) -> dict | None:
        """The finished arm's row when resuming, else None (the arm must be trained)."""
        path = self.arm_dir(name) / "row.json"
        return read_json(path) if self.resume and path.is_file() else None

    def finish(self, name: str, row: dict) -> dict:
        """Record the finished arm's row (atomically) and return it."""
        write_json(self.arm_dir(name) / "row.json", row)
        return row
