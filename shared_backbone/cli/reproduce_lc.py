r"""The LC paper on a CPU: accuracy vs expansion E for frozen random vs learned spatial filters.

    shared-backbone reproduce-lc --table1                  # Table 1 parameter counts (no training)
    shared-backbone reproduce-lc --table3                  # checkpoint sizes (Table 3's last column)
    shared-backbone reproduce-lc --expansions 1,4,16 --epochs 1 --train-subset 5000 --test-subset 2000
    shared-backbone reproduce-lc --sharing global,recycled ...  # adds frozen arms with shared spatial weights
    shared-backbone reproduce-lc --paper --epochs 15 --expansions 1,8,128 --frozen-only --learned-resnet \
        --train-subset 0 --test-subset 0 --out runs/lc --resume   # long: rerun the same command to continue

Training (Figure 1): LCResNet-20-{W}x{E} on Fashion-MNIST with one recipe for every arm: "learned"
trains everything (Full()), "frozen" only the 1x1s, BN and head (Pointwise()+BatchNorm()+Head()) over
frozen random spatial filters. Writes JSON, a Figure-1-style plot and the stem's reconstructed
filters for every E (Figure 12), plus FVE and FGSM (eps=1/255) of every model. ``--learned-resnet``
adds the plain learned ResNet-20-{W} (Full()) the paper compares against.

Every arm's row (and its stem filters) is saved under ``OUT/arms/<arm>_E<e>/`` as the arm finishes,
and fit() checkpoints inside the arm; ``--resume`` keeps finished arms and continues the unfinished one.
"""
from __future__ import annotations

import argparse
import copy
import os
import tempfile
from dataclasses import fields
from pathlib import Path

import torch

from ..backbones import build_backbone
from ..frozen import FrozenBackbone
from ..io import load_tensors, save_tensors, write_json
from ..lc import LCConv2d, pointwise_weights, prune_pointwise, save_sparse
from ..lc_analysis import (fgsm_accuracy, fve_report, plot_filter_grid, plot_pointwise_histograms,
                           plot_position_variance, reconstructed_filters)
from ..plots import new_figure, save_png
from ..recipes import load_train_test, train_ensemble
from ..slices import BatchNorm, Full, Head, Pointwise, resolve
from ..train import TrainConfig
from ._args import add_runtime, add_train_config, train_config
from ._resume import ArmStore, add_resume, check_resume, run_settings

TRAIN_DEFAULTS = {"epochs": 1, "precise_bn": 20}  # where this job's defaults differ from TrainConfig's

FROZEN_SPEC = Pointwise() + BatchNorm() + Head()


# -- Table 1: parameter counts ---------------------------------------------------------------------
def table1(depth: int = 20, width: int = 16, expansion: int = 128, fraction: float = 1 / 16,
           prune: float = 0.7, in_channels: int = 3, num_classes: int = 10) -> list[dict]:
    """Total and learnable parameters as the paper's techniques are applied one after another (on meta)."""
    def build(**cfg):
        with torch.device("meta"):
            return build_backbone("lcresnet", depth=depth, width=width, expansion=expansion, in_channels=in_channels,
                                  num_classes=num_classes, **cfg)

    rows = []
    for name, cfg, spec in [("Baseline (all learned)", {}, Full()),
                            ("+ Frozen", {}, FROZEN_SPEC),
                            ("+ Weight sharing (global)", {"sharing": "global"}, FROZEN_SPEC),
                            (f"+ Recycled WS (1/{round(1 / fraction)})",
                             {"sharing": "recycled", "share_fraction": fraction}, FROZEN_SPEC)]:
        m = build(**cfg)
        rows.append({"method": name, "total": sum(p.numel() for p in m.parameters()),
                     "learnable": resolve(spec, m).numel(m)})
    pw = sum(w.numel() for w in pointwise_weights(m).values())
    pruned = round(prune * pw)
    rows.append({"method": f"+ 1x1 pruning (rho={prune})", "total": rows[-1]["total"] - pruned,
                 "learnable": rows[-1]["learnable"], "note": f"non-zero; {pruned:,} of {pw:,} 1x1 weights zeroed"})
    return rows


def format_table1(rows: list[dict], title: str) -> str:
    base = rows[0]
    lines = [title, f"{'method':<32}{'total':>14}{'learnable':>14}{'total [M]':>11}{'learn. [M]':>11}"]
    for r in rows:
        lines.append(f"{r['method']:<32}{r['total']:>14,}{r['learnable']:>14,}{r['total'] / 1e6:>11.2f}"
                     f"{r['learnable'] / 1e6:>11.2f}")
    lines.append(f"{'reduction':<32}{base['total'] / rows[-1]['total']:>13.1f}x{base['learnable'] / rows[-1]['learnable']:>13.1f}x")
    lines.append("paper (Table 1): 38.4/38.4, 38.4/4.2, recycled 4.6/4.2, pruned 1.7/4.2 (22.6x / 9.1x)")
    return "\n".join(lines)


# -- Table 3: checkpoint sizes -----------------------------------------------------------------------
def table3(depth: int = 20, width: int = 16, expansion: int = 128, fraction: float = 1 / 16, prune: float = 0.7,
           seed: int = 0) -> list[dict]:
    """Bytes on disk of the whole state dict (safetensors) as the techniques are applied; the last
    rows: sparse (bitmask + values) after pruning, and a member's slice alone (the backbone regenerates)."""
    rows = []
    cfg = {"depth": depth, "width": width, "expansion": expansion, "in_channels": 3, "num_classes": 10}
    with tempfile.TemporaryDirectory() as tmp:
        def size(name, tensors, sparse=False):
            path = Path(tmp) / f"{len(rows)}.safetensors"
            save_sparse(path, tensors, min_zero_fraction=0.1 if sparse else 2.0)
            rows.append({"method": name, "bytes": path.stat().st_size, "MiB": path.stat().st_size / 2**20})
            path.unlink()

        for name, extra in [("Baseline / + Freezing", {}), ("+ Weight sharing (global)", {"sharing": "global"}),
                            (f"+ Recycled WS (1/{round(1 / fraction)})", {"sharing": "recycled", "share_fraction": fraction})]:
            frozen = FrozenBackbone(build_backbone("lcresnet", **cfg, **extra), seed=seed)
            size(name, frozen.backbone)
        prune_pointwise(frozen.backbone, prune)
        size(f"+ 1x1 pruning (rho={prune}), dense file", frozen.backbone)
        size(f"+ 1x1 pruning (rho={prune}), sparse file", frozen.backbone, sparse=True)
        params = dict(frozen.backbone.named_parameters())
        layout = resolve(FROZEN_SPEC, frozen.backbone)
        stats = {n: b for n, b in frozen.backbone.named_buffers()}
        size("slice only (1x1 + BN + head + BN stats), sparse", {**{n: params[n] for n in layout}, **stats}, sparse=True)
    return rows


def format_table3(rows: list[dict], title: str) -> str:
    lines = [title, f"{'method':<52}{'bytes':>14}{'MiB':>9}"]
    lines += [f"{r['method']:<52}{r['bytes']:>14,}{r['MiB']:>9.2f}" for r in rows]
    lines.append("paper (Table 3, torch pickles): 146.66, 146.66, 33.84, 17.74, 17.74 MB (pruning not stored sparsely)")
    return "\n".join(lines)


# -- Figure 1: accuracy vs E ---------------------------------------------------------------------------
RESNET_ARM = "learned_resnet"  # the plain ResNet (no LC-Blocks), everything learned


def run_arm(arm: str, expansion: int, args, config: TrainConfig, out_dir: Path | None = None) -> dict:
    learned = arm in ("learned", RESNET_ARM)
    sharing = "none" if learned else (arm.split("_", 1)[1] if "_" in arm else "none")
    spec = Full() if learned else FROZEN_SPEC
    if arm == RESNET_ARM:
        backbone, bcfg = args.backbone.replace("lcresnet", "resnet"), {"width": args.width}
    else:
        backbone, bcfg = args.backbone, {"width": args.width, "expansion": expansion, "sharing": sharing}
    if sharing == "recycled":
        bcfg["share_fraction"] = args.share_fraction
    ens, report, _ = train_ensemble(spec, members=1, backbone=backbone, backbone_cfg=bcfg, config=config,
                                    train_subset=args.train_subset or None, test_subset=args.test_subset or None,
                                    seed=args.seed, ood=None, progress=not args.no_progress, out_dir=out_dir,
                                    resume=args.resume, checkpoint_every=args.checkpoint_every if out_dir else None,
                                    baseline="none")
    member = ens.member(0).eval()
    _, test, _ = load_train_test("fashion_mnist", args.train_subset or None, args.test_subset or None, args.seed)
    fve = fve_report(member)
    norm = [v["normalized_fve"] for v in fve.values() if v["normalized_fve"] is not None]
    return {
        "arm": arm, "backbone": backbone, "expansion": expansion, "sharing": sharing, "spec": repr(spec),
        "test_accuracy": report["metrics"]["accuracy"], "test_nll": report["metrics"]["nll"],
        "learned": report["params"]["learned_per_member"], "total": report["params"]["backbone_total"],
        "train_seconds": report["train"]["train_seconds"],
        "fgsm": fgsm_accuracy(member, test, eps=1 / 255),
        "mean_normalized_fve": sum(norm) / len(norm) if norm else None,
        "stem_fve": fve.get("stages.stem.0"),
        "pruned": [_pruned_accuracy(member, test, rho) for rho in args.prune_ratios] if not learned else [],
        "_stem_filters": (reconstructed_filters(stem) if isinstance(stem := member.stages.stem[0], LCConv2d)
                          else stem.weight.detach().clone()),
        "_member": member,
    }


@torch.no_grad()
def _pruned_accuracy(member, test, ratio: float, batch_size: int = 1000) -> dict:
    """Test accuracy after global magnitude pruning of the 1x1 weights at ``ratio`` (no fine-tuning),
    and the bytes of the pruned slice's 1x1 weights stored sparsely vs densely."""
    m = copy.deepcopy(member).eval()
    prune_pointwise(m, ratio)
    device = next(m.parameters()).device
    correct = sum(int((m(test.x[i:i + batch_size].to(device)).argmax(-1).cpu() == test.y[i:i + batch_size].cpu())
                      .sum())
                  for i in range(0, len(test.y), batch_size))
    with tempfile.TemporaryDirectory() as tmp:
        pw = {n: w.detach() for n, w in pointwise_weights(m).items()}
        dense = save_sparse(Path(tmp) / "dense.safetensors", pw, min_zero_fraction=2.0)  # never sparse
        sparse = save_sparse(Path(tmp) / "sparse.safetensors", pw)
        sizes = (os.path.getsize(dense), os.path.getsize(sparse))
    return {"ratio": ratio, "test_accuracy": correct / len(test.y), "pointwise_bytes_dense": sizes[0],
            "pointwise_bytes_sparse": sizes[1]}


def plot_pruning(rows: list[dict], path: Path, lam: float) -> Path:
    """Test accuracy vs 1x1 pruning ratio, one line per frozen arm and E (the paper's Figure 19)."""
    fig = new_figure((5.5, 4))
    ax = fig.subplots()
    for r in rows:
        if r["pruned"]:
            ratios = [0.0] + [p["ratio"] for p in r["pruned"]]
            accs = [r["test_accuracy"]] + [p["test_accuracy"] for p in r["pruned"]]
            ax.plot(ratios, [100 * a for a in accs], "o-", label=f"{r['arm']} E={r['expansion']}")
    ax.set(xlabel="pruning ratio rho (1x1 weights, global magnitude)", ylabel="test accuracy [%]",
           title=f"after pruning, no fine-tuning (L1 lambda={lam:g})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_png(fig, path)


def plot_accuracy(rows: list[dict], path: Path) -> Path:
    fig = new_figure((5.5, 4))
    ax = fig.subplots()
    for r in rows:
        if r["arm"] == RESNET_ARM:
            ax.axhline(100 * r["test_accuracy"], color="gray", ls="--", label=f"learned {r['backbone']}")
    for arm in dict.fromkeys(r["arm"] for r in rows if r["arm"] != RESNET_ARM):
        rs = sorted((r for r in rows if r["arm"] == arm), key=lambda r: r["expansion"])
        ax.plot([r["expansion"] for r in rs], [100 * r["test_accuracy"] for r in rs], "o-", label=arm)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="expansion E", ylabel="test accuracy [%]", title="LCResNet-20: frozen random vs learned spatial")
    ax.legend()
    fig.tight_layout()
    return save_png(fig, path)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="shared-backbone reproduce-lc", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table1", action="store_true", help="print Table 1 parameter counts and exit")
    ap.add_argument("--table3", action="store_true", help="print checkpoint sizes (builds the models) and exit")
    ap.add_argument("--backbone", default="lcresnet20")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--expansions", default="1,2,4,8,16", help="comma-separated E values")
    ap.add_argument("--sharing", default="none",
                    help="also train a frozen arm with this weight sharing: none, global, recycled or a "
                         "comma-separated list (global,recycled)")
    ap.add_argument("--share-fraction", type=float, default=1 / 16)
    ap.add_argument("--frozen-only", action="store_true", help="skip the arm that learns its spatial filters")
    ap.add_argument("--learned-resnet", action="store_true",
                    help="also train the plain ResNet of the same depth and width, everything learned (once)")
    ap.add_argument("--paper", action="store_true",
                    help="TrainConfig.paper()'s recipe (75 epochs, batch 256, lr 1e-2, weight decay 1e-2) for "
                         "every one of those fields not given as a flag")
    ap.add_argument("--train-subset", type=int, default=5000, help="0 = all 60,000")
    ap.add_argument("--test-subset", type=int, default=2000, help="0 = all 10,000")
    ap.add_argument("--prune", default="", help="comma-separated pruning ratios: frozen arms are also evaluated "
                                                "after global magnitude pruning of their 1x1 weights (no fine-tuning)")
    ap.add_argument("--out", default="results/lc", help="output directory")
    add_runtime(ap)
    add_resume(ap, "keep finished arms (OUT/arms/*/row.json) and continue an unfinished one from its checkpoint")
    add_train_config(ap, defaults=TRAIN_DEFAULTS, aliases={"l1_pointwise": ("--l1",)})
    return ap


def _given(argv) -> set[str]:
    """The dests the command line sets explicitly (a parse with every default suppressed)."""
    probe = parser()
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    return set(vars(probe.parse_args(argv)))


def apply_paper(args: argparse.Namespace, given: set[str]) -> None:
    """``--paper``: TrainConfig.paper()'s value for every field where it differs from TrainConfig's default
    and the command line does not set the field itself."""
    paper, base = TrainConfig.paper(), TrainConfig()
    for f in fields(TrainConfig):
        if getattr(paper, f.name) != getattr(base, f.name) and f.name not in given:
            setattr(args, f.name, getattr(paper, f.name))


# the training flags this job had before they were generated from TrainConfig: always in run.json (as the
# flags were named then), so an ``--resume`` of a run started then finds the same settings
LEGACY_TRAIN = ("epochs", "batch_size", "lr", "weight_decay", "precise_bn", "seed")


def _settings(ap: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """What every arm depends on (checked on --resume): the job's flags, the legacy training flags, and any
    other TrainConfig field set away from this job's default."""
    train = {f.name for f in fields(TrainConfig)}
    settings = run_settings(args, exclude=("table1", "table3", *train))
    settings.update({k: getattr(args, k) for k in LEGACY_TRAIN})
    settings["l1"] = args.l1_pointwise
    settings.update({k: getattr(args, k) for k in sorted(train - {*LEGACY_TRAIN, "l1_pointwise"})
                     if getattr(args, k) != ap.get_default(k)})
    return settings


def main(argv=None) -> dict:
    ap = parser()
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.table1 or args.table3:
        res = {}
        if args.table1:
            rows = table1(width=args.width)
            print(format_table1(rows, f"Table 1: LCResNet-20-{args.width}x128 (Pointwise()+BatchNorm()+Head() learned)"))
            res["table1"] = rows
        if args.table3:
            rows = table3(width=args.width)
            print(format_table3(rows, f"Table 3 (checkpoint sizes): LCResNet-20-{args.width}x128, safetensors"))
            res["table3"] = rows
        write_json(out / "tables.json", res)
        print(f"\nJSON: {out / 'tables.json'}")
        return res

    check_resume(ap, args)
    if args.paper:
        apply_paper(args, _given(argv))
    config = train_config(ap, args)
    try:
        args.prune_ratios = [float(r) for r in args.prune.split(",") if r.strip()]
    except ValueError:
        ap.error(f"--prune must be comma-separated numbers in [0, 1), got {args.prune!r}")
    if any(not 0 <= r < 1 for r in args.prune_ratios):
        ap.error(f"--prune ratios must be in [0, 1), got {args.prune!r}")
    expansions = [int(e) for e in args.expansions.split(",") if e.strip()]
    if not expansions or min(expansions) < 1:
        ap.error(f"--expansions must be integers >= 1, got {args.expansions!r}")
    sharings = list(dict.fromkeys(x.strip() for x in args.sharing.split(",") if x.strip() and x.strip() != "none"))
    bad = [x for x in sharings if x not in ("global", "recycled")]
    if bad:
        ap.error(f"--sharing {bad[0]!r} is not one of none, global, recycled")
    arms = (["frozen"] if args.frozen_only else ["learned", "frozen"]) + [f"frozen_{x}" for x in sharings]
    store = ArmStore(out, _settings(ap, args), args.resume)
    todo = ([(RESNET_ARM, 1)] if args.learned_resnet else []) + [(arm, e) for e in expansions for arm in arms]
    rows, filters = [], {}
    for arm, e in todo:
        name = f"{arm}_E{e}"
        r = store.done(name)
        if r is None:
            r = run_arm(arm, e, args, config, store.arm_dir(name))
            f = r.pop("_stem_filters")
            member = r.pop("_member")
            save_tensors(store.arm_dir(name) / "stem_filters.safetensors", {"filters": f})
            if arm == "frozen" and e == expansions[-1]:
                plot_pointwise_histograms(member, out / f"pointwise_histograms_E{e}.png")
            store.finish(name, r)
        else:
            f = load_tensors(store.arm_dir(name) / "stem_filters.safetensors")[0]["filters"]
        if arm not in ("learned", RESNET_ARM) or e == expansions[-1]:
            filters[f"{arm} E={e}"] = f
        rows.append(r)
        write_json(out / "accuracy_vs_expansion.json", {"args": vars(args), "config": vars(config), "rows": rows})
    plot_accuracy(rows, out / "accuracy_vs_expansion.png")
    if args.prune_ratios:
        plot_pruning(rows, out / "pruning.png", args.l1_pointwise)
    plot_filter_grid(filters, out / "stem_filters.png", n=12)
    plot_position_variance({k: v for k, v in filters.items() if k.endswith(f" E={expansions[-1]}")},
                           out / "stem_position_variance.png")
    print(f"\n{'arm':<18}{'E':>4}{'test acc':>10}{'FGSM':>8}{'FVE/T':>8}{'learned':>12}{'total':>12}{'train s':>9}")
    for r in rows:
        fve = "-" if r["mean_normalized_fve"] is None else f"{r['mean_normalized_fve']:.3f}"
        print(f"{r['arm']:<18}{r['expansion']:>4}{r['test_accuracy']:>10.4f}{r['fgsm']['fgsm_accuracy']:>8.4f}"
              f"{fve:>8}{r['learned']:>12,}{r['total']:>12,}{r['train_seconds']:>9.0f}")
        for p in r["pruned"]:
            print(f"{'':<18}{'':>4}{p['test_accuracy']:>10.4f}  after pruning rho={p['ratio']}: 1x1 weights "
                  f"{p['pointwise_bytes_dense']:,} B dense -> {p['pointwise_bytes_sparse']:,} B sparse")
    print(f"\nJSON: {out / 'accuracy_vs_expansion.json'}  plots: {out / 'accuracy_vs_expansion.png'}, "
          f"{out / 'stem_filters.png'}")
    return {"rows": rows}


if __name__ == "__main__":
    main()
