"""The ``shared-backbone`` command: one subcommand per job, each also a module with ``main(argv)``.

    shared-backbone train-ensemble --members 8 --epochs 3
    shared-backbone train-adapter --task mnist5k digits --out runs/adapters
    shared-backbone eval-adapters runs/adapters
    shared-backbone reproduce-ensembles | reproduce-partial | reproduce-transfer | reproduce-lc ...
    shared-backbone compare-peers --members 4 --epochs 2   # peers at one wall-clock budget
    shared-backbone backbones | tasks          # what the registry and the shipped task cards offer
    shared-backbone bench ...                  # a checkout's developer benchmark, scripts/bench.py

The same jobs run as ``python -m shared_backbone JOB ...``, ``python -m shared_backbone.cli.train_ensemble``,
under ``accelerate launch -m shared_backbone JOB ...`` and ``torchrun --no-python shared-backbone JOB ...``.
"""
from __future__ import annotations

import argparse
import importlib
import runpy
import sys
from pathlib import Path

from ..backbones import backbone_config, list_backbones
from ..data import list_tasks, load_task

__all__ = ["JOBS", "main", "run"]

# subcommand -> (module in shared_backbone.cli, one line of help)
JOBS: dict[str, tuple[str, str]] = {
    "train-ensemble": ("train_ensemble", "train a cheap ensemble on one frozen backbone; accuracy, calibration, OOD"),
    "train-adapter": ("train_adapter", "train task adapters on a frozen backbone and save each (PEFT layout)"),
    "eval-adapters": ("eval_adapters", "evaluate saved adapters on their tasks' test splits"),
    "reproduce-ensembles": ("reproduce_ensembles", "the partial-learning paper's ensemble table on Fashion-MNIST"),
    "reproduce-partial": ("reproduce_partial", "the partial-learning comparison: one recipe for every slice kind"),
    "reproduce-transfer": ("reproduce_transfer", "adapters on a random vs a partially trained frozen backbone"),
    "reproduce-lc": ("reproduce_lc", "the LC paper: accuracy vs expansion, frozen random vs learned spatial filters"),
    "compare-peers": ("compare_peers", "the cheap ensemble next to its peers (deep ensemble, BatchEnsemble, "
                                       "Packed-Ensembles) at one wall-clock budget"),
}


def _list_backbones(argv) -> dict:
    from ._args import FROM_TASK  # _args imports the training stack; `shared-backbone --help` need not

    argparse.ArgumentParser(prog="shared-backbone backbones", description="registered backbones and their "
                            "options (--width / --backbone-opt KEY=VALUE)").parse_args(argv)
    rows = {n: {k: v for k, v in backbone_config(n).items() if k not in FROM_TASK} for n in list_backbones()}
    for name, opts in rows.items():
        print(f"{name:<18}{', '.join(f'{k}={v!r}' for k, v in opts.items())}")
    return rows


def _list_tasks(argv) -> list:
    argparse.ArgumentParser(prog="shared-backbone tasks", description="task cards shipped with the package "
                            "and in $SHARED_BACKBONE_TASKS").parse_args(argv)
    names = list_tasks()
    for name in names:
        card = load_task(name)
        print(f"{name:<16}{card.dataset:<28}{card.num_classes:>4} classes  input {tuple(card.input_shape)}")
    return names


def _bench(argv) -> None:
    """The benchmark stays a developer script of the checkout (it launches itself and its workers by path)."""
    script = Path(__file__).resolve().parents[2] / "scripts" / "bench.py"
    if not script.is_file():
        raise SystemExit("shared-backbone bench runs scripts/bench.py of a source checkout (an editable install); "
                         "this installation has none: clone the repository to benchmark")
    saved = sys.argv
    sys.argv = [str(script), *argv]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = saved


def run(argv: list[str] | None = None):
    """Run one job from its command line; returns what the job's ``main`` returns."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="shared-backbone", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="job", metavar="JOB", required=True)
    for name, (_, help_) in JOBS.items():
        sub.add_parser(name, help=help_, add_help=False)
    sub.add_parser("backbones", help="list the registered backbones and the options each takes", add_help=False)
    sub.add_parser("tasks", help="list the shipped task cards", add_help=False)
    sub.add_parser("bench", help="training-step benchmarks (a checkout's scripts/bench.py)", add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0].startswith("-"):
        ap.parse_args(argv)  # prints help, or the usage error
    job, rest = argv[0], argv[1:]
    if job == "backbones":
        return _list_backbones(rest)
    if job == "tasks":
        return _list_tasks(rest)
    if job == "bench":
        return _bench(rest)
    if job not in JOBS:
        ap.error(f"unknown job {job!r}; choose from: {', '.join([*JOBS, 'backbones', 'tasks', 'bench'])}")
    module = importlib.import_module(f"{__name__}.{JOBS[job][0]}")
    return module.main(rest)


def main(argv: list[str] | None = None) -> int:
    """The console entry point: run the job, exit status 0 (errors exit through ``SystemExit``)."""
    run(argv)
    return 0
