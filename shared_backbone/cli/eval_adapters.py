"""Evaluate saved adapters on their tasks' test splits: task, learned params, adapter bytes, accuracy.

    shared-backbone eval-adapters runs/adapters/mnist5k runs/adapters/digits
    shared-backbone eval-adapters runs/transfer/random          # a whole bank (AdapterBank.save)
    shared-backbone eval-adapters runs/adapters                 # every adapter folder inside (train-adapter --task A B)

Each adapter is loaded onto its backbone (``backbone.json`` beside it, or regenerated from the recipe
in its config), checked against the fingerprint, and run on its task card's test split.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..adapter_cards import card_of
from ..adapters import ADAPTER_CONFIG, BANK_CONFIG, AdapterBank, adapter_bytes
from ..data import TensorData
from ..io import read_config, write_json
from ..schema import BankConfig, safe_text
from ..train import predict
from ._args import add_runtime


def _adapter_dirs(paths: list[str]) -> list[Path]:
    out = []
    for p in map(Path, paths):
        if p.is_file() and len(paths) > 1:  # a shell glob over train_adapter's output: backbone.json, *.results.json
            continue
        if p.is_dir() and not (p / ADAPTER_CONFIG).is_file() and not (p / BANK_CONFIG).is_file():
            inner = sorted(q for q in p.iterdir() if (q / ADAPTER_CONFIG).is_file())
            if inner:  # a folder of adapter folders (train-adapter --task A B ... --out DIR)
                out += inner
                continue
        if (p / ADAPTER_CONFIG).is_file():
            out.append(p)
        elif (p / BANK_CONFIG).is_file():  # task names checked by the schema: folders inside the bank only
            out += [p / t for t in BankConfig.from_dict(read_config(p / BANK_CONFIG), str(p / BANK_CONFIG)).tasks]
        else:
            raise SystemExit(f"{safe_text(str(p), 200)} is neither an adapter folder ({ADAPTER_CONFIG}) nor a bank "
                             f"({BANK_CONFIG})")
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="shared-backbone eval-adapters", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", help="adapter folders, bank folders, or folders of adapter folders")
    ap.add_argument("--test-subset", type=int, default=0, help="0 = the whole test split")
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    add_runtime(ap)
    return ap


def main(argv=None) -> list[dict]:
    ap = parser()
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for d in _adapter_dirs(args.dirs):
        bank = AdapterBank.load(d)
        adapter = bank.adapter()
        card = card_of(adapter)
        if card is None:
            raise SystemExit(f"{safe_text(str(d), 200)} was saved without a task card; cannot find its test data")
        test = TensorData.from_card(card, "test")
        if args.test_subset and args.test_subset < len(test):
            test = test.subset(args.test_subset, seed=1)
        logits = predict(adapter, test, progress=not args.no_progress)[0]  # (N, C)
        full = sum(t.numel() * t.element_size() for t in bank.frozen.tensors().values())
        rows.append({"dir": str(d), "task": adapter.name, "card": card.name, "spec": repr(adapter.spec),
                     "learned": adapter.num_learned(), "adapter_bytes": adapter_bytes(d), "full_model_bytes": full,
                     "accuracy": (logits.argmax(-1) == test.y).float().mean().item(), "test_size": len(test),
                     "fingerprint": bank.frozen.fingerprint})
    shown = [safe_text(r["task"], 64) for r in rows]  # names from files are data: control characters escaped
    width = max(len(t) for t in shown)
    print(f"| {'task':<{width}} | {'learned params':>14} | {'adapter bytes':>13} | {'accuracy':>8} |")
    print(f"|{'-' * (width + 2)}|{'-' * 16}|{'-' * 15}|{'-' * 10}|")
    for t, r in zip(shown, rows):
        print(f"| {t:<{width}} | {r['learned']:>14,} | {r['adapter_bytes']:>13,} | {r['accuracy']:>8.4f} |")
    print(f"(one full model: {rows[0]['full_model_bytes']:,} bytes of tensors)")
    if args.out:
        write_json(args.out, rows)
    return rows


if __name__ == "__main__":
    main()
