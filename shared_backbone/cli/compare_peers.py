r"""The library's cheap ensemble next to its peers at one wall-clock budget: one table, JSON + PNG.

    shared-backbone compare-peers --out results/peers                      # the default recipe, full data
    shared-backbone compare-peers --budget-epochs 0 --warm-start-epochs 0 --epochs 2 --members 4 \
        --slice "Filters(0.1)+BatchNorm()+Head()" --train-subset 10000     # a cheap arm of your own recipe

Arms: the library's cheap ensemble (trained first; its wall time, warm start included, is the
budget), one full model, a deep ensemble of K full models, and torch-uncertainty's BatchEnsemble
and Packed-Ensembles ResNets (skipped, with a message, when torch-uncertainty is not installed:
pip install 'shared_backbone[peers]'). By default the cheap arm is `train-ensemble`'s default
recipe (a budget of --budget-epochs of one model; the single model's run is cut at
--warm-start-epochs and the members finish its schedule), and the single model is that run
trained to the end of the budget. --budget-epochs 0: the cheap arm trains --epochs on its own.
Same data, seed, recipe and evaluation code for all; the in-distribution test set is
Fashion-MNIST's, OOD is MNIST (5,000 digits). See shared_backbone/peers.py for how the budget is
shared out.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..data import TensorData, mnist5k
from ..io import write_json
from ..peers import ARMS, TU_ARMS, check_arms, compare_peers, compare_with_recipe, torch_uncertainty_missing
from ..plots import new_figure, save_png
from ..recipes import load_train_test
from ..slices import parse_spec
from ._args import add_runtime, add_train_config, train_config
from .train_ensemble import MEMBER_DEFAULTS, default_slice, member_config

TRAIN_DEFAULTS = {"precise_bn": 20}  # where this job's defaults differ from TrainConfig's (BN re-estimation, every arm)

COLUMNS = [("accuracy", "acc", "{:.4f}"), ("nll", "NLL", "{:.3f}"), ("ece", "ECE", "{:.3f}"),
           ("brier", "Brier", "{:.3f}"), ("ood_auroc_max_prob", "AUROC mp", "{:.3f}"),
           ("ood_auroc_mutual_info", "AUROC MI", "{:.3f}"), ("ood_fpr95_max_prob", "FPR95 in+", "{:.3f}"),
           ("ood_fpr95_ood_positive_max_prob", "FPR95 ood+", "{:.3f}"), ("train_seconds", "train s", "{:.0f}"),
           ("flops_per_image", "MFLOP/img", "{:.1f}"), ("bytes_stored", "stored MB", "{:.2f}")]


def format_table(res: dict) -> str:
    """The rows as a plain-text table (FLOPs in millions, bytes in MB)."""
    scale = {"flops_per_image": 1e-6, "bytes_stored": 1e-6}
    lines = [f"{'arm':<62}" + "".join(f"{h:>11}" for _, h, _ in COLUMNS)]
    for r in res["rows"]:
        cells = []
        for key, _, fmt in COLUMNS:
            v = r.get(key)
            cells.append(f"{'-' if v is None else fmt.format(v * scale.get(key, 1)):>11}")
        lines.append(f"{r['label'][:61]:<62}" + "".join(cells))
    lines.append(f"budget: {res['budget_seconds']:.0f} s of training per arm. FPR95 in+: in-distribution positive "
                 "(ODIN); ood+: OOD positive (torch-uncertainty)")
    for arm, why in res["skipped"].items():
        lines.append(f"skipped {arm}: {why}")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> Path:
    """Four panels (accuracy, NLL, ECE, max-prob OOD AUROC), one bar per arm, train seconds in the labels."""
    rows = res["rows"]
    fig = new_figure((11, 3.6))
    axes = fig.subplots(1, 4)
    names = [f"{r['arm']}\n{r['train_seconds']:.0f} s" for r in rows]
    for ax, (key, title) in zip(axes, [("accuracy", "accuracy"), ("nll", "NLL (lower better)"),
                                       ("ece", "ECE (lower better)"), ("ood_auroc_max_prob", "OOD AUROC max-prob")]):
        vals = [r.get(key) if r.get(key) is not None else float("nan") for r in rows]
        ax.bar(range(len(rows)), vals, color=["C0" if r["arm"] == "cheap" else "C7" for r in rows])
        ax.set_xticks(range(len(rows)), names, fontsize=7, rotation=30)
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"equal wall-clock budget ({res['budget_seconds']:.0f} s per arm)", fontsize=10)
    fig.tight_layout()
    return save_png(fig, path)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="shared-backbone compare-peers", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    ap.add_argument("--members", type=int, default=3, help="K of the cheap ensemble")
    ap.add_argument("--peer-members", type=int, default=4,
                    help="K of the deep ensemble, BatchEnsemble and Packed-Ensembles (Packed-Ensembles needs its "
                         "channels divisible by K: 2 or 4 at width 16, alpha 2)")
    ap.add_argument("--slice", default=None, help="what each cheap member learns (default: train-ensemble's, 12.5%% "
                                                  "of the last block's filters, its BatchNorm and the head)")
    ap.add_argument("--budget-epochs", type=float, default=3.0,
                    help="the cheap arm's whole cost in epochs of one full model, as train-ensemble's (0 = the "
                         "cheap arm trains --epochs on its own recipe, without the shared schedule)")
    ap.add_argument("--warm-start-epochs", type=float, default=None,
                    help="cheap arm: train the full net first, then freeze (default 2.7 of the budget, cut from the "
                         "single model's run; 0 with --budget-epochs 0; whole epochs there)")
    ap.add_argument("--schedule", choices=["auto", "shared", "restart"], default="auto",
                    help="as train-ensemble's: auto = shared after a warm start (only with --budget-epochs)")
    ap.add_argument("--member-opt", action="append", default=None, metavar="KEY=VALUE",
                    help=f"a training field that differs for the cheap members (default: {' '.join(MEMBER_DEFAULTS)})")
    ap.add_argument("--budget-seconds", type=float, default=None, help="fixed budget instead of the cheap arm's time")
    ap.add_argument("--backbone", default="resnet20")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--train-subset", type=int, default=0, help="0 = all 60,000")
    ap.add_argument("--test-subset", type=int, default=0, help="0 = all 10,000")
    ap.add_argument("--packed-alpha", type=float, default=2)
    ap.add_argument("--packed-gamma", type=int, default=1)
    ap.add_argument("--no-ood", action="store_true", help="skip the MNIST out-of-distribution set")
    ap.add_argument("--out", default="results/peers")
    add_runtime(ap)
    add_train_config(ap, defaults=TRAIN_DEFAULTS)  # --epochs: the cheap arm's, which sets the budget
    return ap


def main(argv=None) -> dict:
    ap = parser()
    args = ap.parse_args(argv)
    config = train_config(ap, args)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in arms if a not in ARMS]
    if bad or not arms:
        ap.error(f"--arms: unknown {bad or args.arms!r}; accepted: {', '.join(ARMS)}")
    torch.set_num_threads(args.threads)
    why = torch_uncertainty_missing() if any(a in TU_ARMS for a in arms) else None
    if why:
        print(f"note: skipping {', '.join(a for a in arms if a in TU_ARMS)}: {why}")
    train, test, card = load_train_test("fashion_mnist", args.train_subset or None, args.test_subset or None,
                                        args.seed)
    ood = None
    if not args.no_ood:
        images, _ = mnist5k()
        ood = TensorData.from_uint8(images, torch.zeros(len(images), dtype=torch.int64), card.mean, card.std)
    spec = parse_spec(args.slice if args.slice is not None else default_slice(args.backbone, {"width": args.width}))
    if args.budget_epochs:
        if "cheap" not in arms or args.budget_seconds is not None:
            ap.error("--budget-epochs > 0 makes the cheap arm's recipe the budget: keep 'cheap' in --arms and drop "
                     "--budget-seconds (or pass --budget-epochs 0)")
        warm = 2.7 if args.warm_start_epochs is None else args.warm_start_epochs
        schedule = args.schedule if args.schedule != "auto" else ("shared" if warm else "restart")
        if schedule == "shared" and not warm:
            ap.error("--schedule shared splits one schedule between a warm start and the members: it needs "
                     "--warm-start-epochs > 0")
        members_config = member_config(ap, config, MEMBER_DEFAULTS if args.member_opt is None else args.member_opt)
        run = lambda: compare_with_recipe(  # noqa: E731
            train, test, ood, arms=arms, members=args.members, spec=spec, budget_epochs=args.budget_epochs,
            warm_start_epochs=warm, schedule=schedule, config=config, member_config=members_config,
            backbone=args.backbone, width=args.width, packed_alpha=args.packed_alpha, packed_gamma=args.packed_gamma,
            progress=not args.no_progress, peer_members=args.peer_members, num_classes=card.num_classes)
    else:
        warm = args.warm_start_epochs or 0
        if warm != int(warm):
            ap.error(f"--warm-start-epochs {warm:g}: whole epochs without --budget-epochs")
        ignored = [flag for flag, given in (("--schedule", args.schedule != "auto"),
                                            ("--member-opt", args.member_opt is not None)) if given]
        if ignored:
            ap.error(f"{', '.join(ignored)}: only with --budget-epochs > 0 (the default recipe's path)")
        run = lambda: compare_peers(  # noqa: E731
            train, test, ood, arms=arms, members=args.members, spec=spec, warm_start_epochs=int(warm),
            epochs=args.epochs, backbone=args.backbone, width=args.width, config=config,
            budget_seconds=args.budget_seconds, packed_alpha=args.packed_alpha, packed_gamma=args.packed_gamma,
            num_classes=card.num_classes, progress=not args.no_progress, peer_members=args.peer_members)
    try:  # what would be refused, before anything trains; a failure later is a traceback, not a usage error
        check_arms(arms, members=args.members, peer_members=args.peer_members, backbone=args.backbone,
                   width=args.width, in_channels=card.input_shape[0], num_classes=card.num_classes,
                   packed_alpha=args.packed_alpha, packed_gamma=args.packed_gamma)
    except ValueError as err:
        ap.error(str(err))
    res = run()
    res.update(args=vars(args), train_size=len(train), test_size=len(test), ood="mnist5k" if ood is not None else None)
    out = Path(args.out)
    write_json(out / "peers.json", res)
    plot(res, out / "peers.png")
    print("\n" + format_table(res))
    print(f"\nJSON: {out / 'peers.json'}  plot: {out / 'peers.png'}")
    return res


if __name__ == "__main__":
    main()
