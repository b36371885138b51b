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

from pathlib import Path

from shared_backbone.io import read_json, write_json

__all__ = ["ArmStore"]


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
