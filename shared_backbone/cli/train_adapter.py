"""Train task adapters on a frozen backbone and save each (PEFT layout: adapter_config.json + adapter_model.safetensors).

    shared-backbone train-adapter --task mnist5k --slice "Blocks('block2')+Head()" --out runs/adapters/mnist5k
    shared-backbone train-adapter --task mnist5k digits fashion_coarse --out runs/adapters     # one folder per task
    accelerate launch --multi_gpu --num_processes 2 -m shared_backbone train-adapter --task mnist5k digits --out runs/adapters

With one task ``--out`` is its adapter folder; with several it is the folder that receives one
adapter folder per task. Under ``accelerate launch`` several tasks are split over the processes
(``--parallel tasks``: each process trains its own tasks, no traffic between processes); one task
is trained data-parallel (``--parallel data``: each process takes a shard of every batch).

The backbone is saved once next to the adapters (``backbone.json`` in the parent of ``--out``, plus
``backbone.safetensors`` for a trained one). Without ``--backbone-dir`` it is ``--backbone`` (ResNet-20) frozen
at random (``--width``, ``--backbone-opt``, ``--seed``); a ``backbone.json`` already beside ``--out`` is reused,
so several tasks share one.
"""
from __future__ import annotations

import argparse
from datetime import timedelta
from pathlib import Path

import torch
from accelerate.utils import InitProcessGroupKwargs

from ..adapter_cards import add_task_from_card
from ..adapters import ADAPTER_CONFIG, BANK_CONFIG, AdapterBank, adapter_bytes
from ..backbones import build_backbone
from ..data import load_task
from ..distributed import make_accelerator
from ..frozen import FrozenBackbone
from ..io import read_json, write_json
from ..recipes import load_train_test
from ..saving import load_backbone, save_backbone
from ..slices import parse_spec
from ..train import TrainConfig, fit
from ._args import add_backbone, add_runtime, add_train_config, backbone_options, train_config

TRAIN_DEFAULTS = {"precise_bn": 20}  # where this job's defaults differ from TrainConfig's


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="shared-backbone train-adapter", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", required=True, nargs="+",
                    help="task card names (tasks/) or paths to .toml cards; several train one adapter each")
    ap.add_argument("--slice", default="Filters(0.1)+BatchNorm()+Head()", help="what the task learns (its head always)")
    ap.add_argument("--out", required=True, help="the adapter folder to write")
    ap.add_argument("--name", default=None, help="task name inside the bank (default: the card's name; one task only)")
    ap.add_argument("--parallel", choices=["auto", "tasks", "data"], default="auto",
                    help="under accelerate launch: split the tasks over processes, or shard each batch "
                         "(auto: tasks when there are several)")
    ap.add_argument("--backbone-dir", default=None, help="a folder with backbone.json (default: beside --out, else random)")
    ap.add_argument("--backbone-classes", type=int, default=10, help="classes of a new random backbone's own head")
    ap.add_argument("--train-subset", type=int, default=0, help="0 = the whole training split")
    ap.add_argument("--test-subset", type=int, default=0)
    ap.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no")
    ap.add_argument("--sync-timeout-h", type=float, default=24.0, help=argparse.SUPPRESS)
    add_runtime(ap)
    add_backbone(ap, None)  # None: the backbone already beside --out (or in --backbone-dir), else resnet20
    add_train_config(ap, defaults=TRAIN_DEFAULTS)
    return ap


def main(argv=None) -> dict:
    ap = parser()
    args = ap.parse_args(argv)
    config = train_config(ap, args)
    try:
        backbone_cfg = backbone_options(args, name=args.backbone or "resnet20")
    except ValueError as err:
        ap.error(str(err))
    torch.set_num_threads(args.threads)
    # one process, or all of `accelerate launch` in one group; task-parallel processes meet only at the end,
    # after training tasks of unequal length, so the group's timeout must outlast the longest imbalance
    accelerator = make_accelerator(args.mixed_precision,
                                   kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=args.sync_timeout_h))])

    if args.name and len(args.task) > 1:
        ap.error("--name names one task; with several tasks each adapter takes its card's name")
    parallel = args.parallel if args.parallel != "auto" else ("tasks" if len(args.task) > 1 else "data")
    procs = accelerator.num_processes
    if parallel == "tasks" and procs > len(args.task):
        ap.error(f"--parallel tasks needs at least one task per process: {len(args.task)} task(s) over {procs} "
                 "processes; use fewer processes or --parallel data")

    out = Path(args.out)
    home_out = out if len(args.task) > 1 else out.parent  # where backbone.json goes
    if len(args.task) == 1 and out.is_dir():  # --out is the adapter folder itself: never a folder of others
        others = sorted(q.name for q in out.iterdir() if (q / ADAPTER_CONFIG).is_file())
        marks = [n for n in ("backbone.json", BANK_CONFIG) if (out / n).is_file()]
        if others or marks:
            ap.error(f"--out {out} holds other adapters ({', '.join(others[:4] + marks)}); with one task --out is "
                     f"that adapter's own folder: pass --out {out / 'NAME'}")
    cards = {t: load_task(t) for t in args.task}  # a bad card fails here, on every process, before any work
    names = [c.name for c in cards.values()]
    if len(set(names)) != len(names):
        ap.error(f"--task names one task twice (card names {names}); each task needs its own adapter folder")
    first = next(iter(cards.values()))
    channels = {t: c.input_shape[0] for t, c in cards.items()}
    home = Path(args.backbone_dir) if args.backbone_dir else home_out
    if (home / "backbone.json").is_file():
        frozen = load_backbone(home)
        asked = {"arch": args.backbone or frozen.config["arch"], **backbone_cfg}
        has = {"arch": frozen.config["arch"], **{k: frozen.config["config"].get(k) for k in backbone_cfg}}
        if asked != has:  # never train on another backbone than the flags ask for
            ap.error(f"{home}/backbone.json is {has}, not the {asked} that --backbone/--width/--backbone-opt "
                     "ask for; drop those flags to reuse it, or write the adapters elsewhere")
    elif args.backbone_dir:
        raise SystemExit(f"--backbone-dir {home} holds no backbone.json")
    else:
        bb = build_backbone(args.backbone or "resnet20", **backbone_cfg, in_channels=first.input_shape[0],
                            num_classes=args.backbone_classes)
        frozen = FrozenBackbone(bb, seed=args.seed)
    wrong = {t: c for t, c in channels.items() if c != frozen.backbone.in_channels}
    if wrong:
        ap.error(f"the backbone takes {frozen.backbone.in_channels}-channel images but task(s) "
                 f"{', '.join(f'{t} ({c} channels)' for t, c in wrong.items())} have another count; "
                 "train tasks of one channel count per backbone")
    if (home_out / "backbone.json").is_file() and home_out != home:
        there = load_backbone(home_out)
        if there.fingerprint != frozen.fingerprint:
            raise SystemExit(f"{home_out}/backbone.json is another backbone (fingerprint {there.fingerprint[:12]}) "
                             f"than --backbone-dir {home} ({frozen.fingerprint[:12]}); write the adapters elsewhere")
    if accelerator.is_main_process and not (home_out / "backbone.json").is_file():
        save_backbone(frozen, home_out)
    accelerator.wait_for_everyone()

    if parallel == "tasks" and procs > 1:
        with accelerator.split_between_processes(list(args.task)) as mine:
            mine = list(mine)
        mode = "local"  # this process's tasks, trained alone
    else:
        mine, mode = list(args.task), "data"
    reports = []
    for task in mine:
        folder = out if len(args.task) == 1 else out / cards[task].name
        reports.append(_train_one(task, folder, frozen, args, config, accelerator, mode,
                                  writes=mode == "local" or accelerator.is_main_process))
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return {"reports": reports}
    everything = [read_json(_results_path(out if len(args.task) == 1 else out / cards[t].name)) for t in args.task]
    print(f"\n{'task':<16}{'slice':<34}{'learned':>10}{'adapter bytes':>15}{'accuracy':>10}")
    for r in everything:
        print(f"{r['task']:<16}{r['spec']:<34}{r['learned']:>10,}{r['adapter_bytes']:>15,}{r['accuracy']:>10.4f}")
    print(f"\nadapters: {', '.join(str(out if len(args.task) == 1 else out / cards[t].name) for t in args.task)}"
          f"\nbackbone: {home_out}/backbone.json   "
          f"({f'{procs} processes, {parallel}-parallel' if procs > 1 else 'one process'})")
    return everything[0] if len(args.task) == 1 else {"reports": everything}


def _results_path(folder: Path) -> Path:
    return folder.parent / f"{folder.name}.results.json"


def _train_one(task: str, out: Path, frozen, args, config: TrainConfig, accelerator, parallel: str,
               writes: bool) -> dict:
    train, test, card = load_train_test(task, args.train_subset or None, args.test_subset or None, args.seed)
    bank = AdapterBank(frozen)
    name = args.name or card.name
    adapter = add_task_from_card(bank, name, parse_spec(args.slice), card, seed=args.seed)
    record = fit(adapter, train, test, config, accelerator=accelerator, parallel=parallel,
                 progress=not args.no_progress)
    if not writes:  # data-parallel: rank 0 writes
        return {"task": name, "accuracy": record["test"]["accuracy"]}
    bank.eval().save_adapter(name, out)
    report = {"task": name, "card": card.name, "spec": repr(adapter.spec), "learned": adapter.num_learned(),
              "adapter_bytes": adapter_bytes(out), "accuracy": record["test"]["accuracy"],
              "fingerprint": frozen.fingerprint, "train_size": len(train), "test_size": len(test),
              "train_seconds": record["train_seconds"], "process": accelerator.process_index,
              "parallel": parallel, "history": record["history"]}
    write_json(_results_path(out), report)
    return report


if __name__ == "__main__":
    main()
