"""End-to-end recipes the scripts call: build, (warm start,) train, evaluate, save, report."""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch

from .backbones import build_backbone
from .data import TensorData, load_task, mnist5k
from .describe import describe
from .ensemble import Ensemble
from .frozen import FrozenBackbone
from .metrics import evaluate_ensemble
from .slices import Full, SliceSpec
from .train import TrainConfig, fit, predict

__all__ = ["load_train_test", "warm_start", "train_ensemble", "format_report"]


def load_train_test(task: str = "fashion_mnist", train_subset: int | None = None, test_subset: int | None = None,
                    seed: int = 0) -> tuple[TensorData, TensorData, object]:
    """The task's train and test splits as in-memory tensors (optionally seeded subsets)."""
    card = load_task(task)
    train = TensorData.from_card(card, "train")
    test = TensorData.from_card(card, "test")
    if train_subset and train_subset < len(train):
        train = train.subset(train_subset, seed=seed)
    if test_subset and test_subset < len(test):
        test = test.subset(test_subset, seed=seed + 1)
    return train, test, card


def warm_start(backbone_name: str, backbone_cfg: dict, train: TensorData, epochs: int, config: TrainConfig,
               seed: int = 0, progress: bool = True, accelerator=None) -> FrozenBackbone:
    """Train the full network for ``epochs`` and freeze it: the partial-learning paper's ensemble set-up."""
    frozen = FrozenBackbone(build_backbone(backbone_name, **backbone_cfg), seed=seed)
    model = Ensemble(frozen, Full(), members=1, member_init="backbone")
    cfg = TrainConfig.from_dict({**asdict(config), "epochs": epochs})
    fit(model, train, None, cfg, accelerator=accelerator, progress=progress)
    return FrozenBackbone.from_module(model.member(0))


def train_ensemble(spec: SliceSpec, *, members: int = 8, backbone: str = "resnet20", backbone_cfg: dict | None = None,
                   task: str = "fashion_mnist", config: TrainConfig | None = None, warm_start_epochs: int = 0,
                   train_subset: int | None = None, test_subset: int | None = None, data: str = "shared",
                   seed: int = 0, ood: str | None = "mnist5k", out_dir: str | Path | None = None,
                   progress: bool = True, vectorized: bool = True, accelerator=None, parallel: str = "data",
                   resume: bool = False, checkpoint_every: int | None = None) -> tuple[Ensemble, dict, dict]:
    """Train a K-member ensemble of ``spec`` slices; return ``(ensemble, report, arrays)``.

    ``report`` is JSON-ready; ``arrays`` holds the test and OOD logits for plots. ``accelerator``,
    ``parallel``, ``resume`` and ``checkpoint_every`` go to :func:`~shared_backbone.train.fit`.
    """
    config = config or TrainConfig(seed=seed)
    train, test, card = load_train_test(task, train_subset, test_subset, seed)
    cfg = {"in_channels": card.input_shape[0], "num_classes": card.num_classes, **(backbone_cfg or {})}
    t0 = time.perf_counter()
    if warm_start_epochs:
        frozen = warm_start(backbone, cfg, train, warm_start_epochs, config, seed, progress, accelerator)
        member_init = "backbone"
        data = "own" if data == "shared" else data  # same start: members differ by their data order
    else:
        frozen = FrozenBackbone(build_backbone(backbone, **cfg), seed=seed)
        member_init = "random"
    warm_seconds = time.perf_counter() - t0
    ens = Ensemble(frozen, spec, members=members, member_init=member_init, seed=seed, data=data,
                   vectorized=vectorized)
    record = fit(ens, train, test, config, accelerator=accelerator, parallel=parallel, out_dir=out_dir,
                 resume=resume, checkpoint_every=checkpoint_every, progress=progress)
    logits = record.pop("_test_logits")
    arrays = {"test_logits": logits, "test_labels": test.y.cpu()}
    ood_logits = None
    if ood == "mnist5k":
        images, _ = mnist5k()
        ood_data = TensorData.from_uint8(images, torch.zeros(len(images), dtype=torch.int64), card.mean, card.std)
        ood_logits = predict(ens, ood_data, config.eval_batch_size)
        arrays["ood_logits"] = ood_logits
    elif ood is not None:
        raise ValueError(f"unknown OOD set {ood!r}; available: 'mnist5k' or None")
    metrics = evaluate_ensemble(logits, test.y.cpu(), ood_logits)
    counts = describe(frozen, spec, members=members, verbose=False)
    report = {
        "task": task, "backbone": backbone, "backbone_config": cfg, "spec": repr(spec), "members": members,
        "data": data, "warm_start_epochs": warm_start_epochs, "train_size": len(train), "test_size": len(test),
        "fingerprint": frozen.fingerprint, "train": {k: v for k, v in record.items() if k != "test"},
        "warm_start_seconds": warm_seconds, "wall_seconds": time.perf_counter() - t0,
        "params": {"backbone_total": counts["total"], "learned_per_member": counts["learnable"],
                   "learned_all_members": counts["learnable"] * members,
                   "stored_bytes_per_member": counts["stored_bytes"],
                   "full_model_bytes": counts["total"] * 4},
        "metrics": metrics,
    }
    return ens, report, arrays


def format_report(r: dict) -> str:
    """A readable table of one ensemble report."""
    m, p = r["metrics"], r["params"]
    lines = [
        f"{r['members']} x {r['backbone']} {r['spec']} on {r['task']} "
        f"({r['train_size']:,} train / {r['test_size']:,} test, {r['train']['config']['epochs']} epochs"
        f"{', warm start ' + str(r['warm_start_epochs']) + ' epochs' if r['warm_start_epochs'] else ''})",
        "",
        f"{'member':<22}{'accuracy':>10}{'nll':>10}",
    ]
    for i, (a, n) in enumerate(zip(m["member_accuracy"], m["member_nll"])):
        lines.append(f"{'  member ' + str(i):<22}{a:>10.4f}{n:>10.4f}")
    lines += [
        f"{'mean member':<22}{m['mean_member_accuracy']:>10.4f}{sum(m['member_nll']) / len(m['member_nll']):>10.4f}",
        f"{'ensemble (mean prob)':<22}{m['accuracy']:>10.4f}{m['nll']:>10.4f}",
        "",
        f"calibration: ECE(15 bins) {m['ece']:.4f}   Brier {m['brier']:.4f}   member disagreement {m['disagreement']:.4f}",
    ]
    if "ood_auroc_max_prob" in m:
        lines.append(
            f"OOD (MNIST digits): AUROC max-prob {m['ood_auroc_max_prob']:.4f} / mutual-info "
            f"{m['ood_auroc_mutual_info']:.4f}; FPR@95 {m['ood_fpr95_max_prob']:.4f} / {m['ood_fpr95_mutual_info']:.4f}"
        )
    lines += [
        f"parameters: backbone {p['backbone_total']:,} shared; learned {p['learned_per_member']:,} per member, "
        f"{p['learned_all_members']:,} in all",
        f"stored per member: {p['stored_bytes_per_member'] / 1024:.1f} KiB (a full model: {p['full_model_bytes'] / 1024:.1f} KiB)",
        f"wall time: {r['wall_seconds']:.1f} s (training {r['train']['train_seconds']:.1f} s)",
    ]
    return "\n".join(lines)
