"""Training checkpoints: one manifest-verified artifact holding the whole stack, and its verified resume.

``checkpoint/state.safetensors`` holds every member's slices, statistics and SGD momenta (gathered
from every process when members are split); ``checkpoint/state.json`` is its manifest: position,
identity (backbone, spec, members), recipe, history and the tensors' hash. A resume refuses a
checkpoint of another run, naming each difference.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .ensemble import MemberStack
from .io import header_shapes, read_artifact, read_config, tensors_from_bytes, tensors_to_bytes, write_artifact
from .schema import FORMAT_VERSION, CheckpointState

if TYPE_CHECKING:  # for annotations only: train imports this module
    from .train import TrainConfig

__all__ = ["ResumeMismatch", "RESUMABLE_CHANGES", "CHECKPOINT_STATE", "CHECKPOINT_TENSORS"]

# recipe fields --resume lets change: more epochs, and how the same steps are computed or evaluated
RESUMABLE_CHANGES = ("epochs", "eval_batch_size", "precise_bn", "member_group_size")


class ResumeMismatch(ValueError):
    """The checkpoint was made by another run (backbone, spec, members, seed or recipe differ)."""


def _gather_members(accelerator, t: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Concatenate every process's ``(K_p, ...)`` members along dim 0 (padded to one size for the collective)."""
    if accelerator.num_processes == 1:
        return t
    kmax = max(counts)
    pad = t.new_zeros(kmax - t.shape[0], *t.shape[1:])
    every = accelerator.gather(torch.cat([t, pad]).contiguous())  # (P * kmax, ...)
    return torch.cat([every[p * kmax: p * kmax + c] for p, c in enumerate(counts)])


def _momenta(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> list[torch.Tensor | None]:
    return [opt.state.get(p, {}).get("momentum_buffer") for p in params]


def _full_state(accelerator, full: MemberStack, local: MemberStack, opt, params, counts) -> dict[str, torch.Tensor]:
    """The whole stack's slices, statistics and momenta, gathered from every process when members are split."""
    split = local is not full
    tensors = {}
    for k, v in local.state_dict().items():
        member_axis = k.startswith(("slices.", "member_stats."))
        tensors[f"model/{k}"] = (_gather_members(accelerator, v.detach(), counts) if split and member_axis
                                 else v.detach()).cpu()
    for i, m in enumerate(_momenta(opt, params)):
        if m is not None:
            tensors[f"optim/{i}/momentum_buffer"] = (_gather_members(accelerator, m, counts) if split else m).cpu()
    return tensors


CHECKPOINT_STATE = "state.json"  # the checkpoint's manifest: position, identity, recipe, history, file hashes
CHECKPOINT_TENSORS = "state.safetensors"


def _identity(full: MemberStack) -> dict:
    """What a checkpoint continues: the backbone, the spec, the members (checked on resume)."""
    spec = getattr(full, "spec", None)
    return {"fingerprint": full.frozen_ref, "spec": repr(spec) if spec is not None else repr(sorted(full.layout)),
            "members": full.members, "member_ids": list(full.member_ids), "data": full.data}


def _save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], position: dict, cfg: "TrainConfig",
                     identity: dict, history: list) -> None:
    """One artifact: ``state.safetensors`` (slices, statistics, momenta) then ``state.json`` (its manifest)."""
    data = tensors_to_bytes(tensors, finite="a checkpoint")
    write_artifact(path, CHECKPOINT_STATE, {"format_version": FORMAT_VERSION, "kind": "checkpoint", **position,
                                            **identity, "config": asdict(cfg), "history": history},
                   {CHECKPOINT_TENSORS: data})


def _check_resume(state: CheckpointState, raw: dict, identity: dict, cfg: "TrainConfig", path: Path) -> None:
    """Refuse a checkpoint of another run, naming every difference and what may change."""
    diffs = [f"{k}: checkpoint {raw.get(k)!r}, now {v!r}" for k, v in identity.items() if raw.get(k) != v]
    now = asdict(cfg)
    for k, v in now.items():
        if k not in RESUMABLE_CHANGES and state.config.get(k, v) != v:
            diffs.append(f"{k}: checkpoint {state.config.get(k)!r}, now {v!r}")
    unknown = sorted(set(state.config) - set(now))
    if unknown:
        diffs.append(f"recipe fields this library does not know: {unknown[:4]}")
    if state.epoch > cfg.epochs:
        diffs.append(f"epochs: the checkpoint is at epoch {state.epoch}, past the {cfg.epochs} asked for")
    if diffs:
        raise ResumeMismatch(f"cannot resume from {path}: it was made by another run; " + "; ".join(diffs) +
                             f". Only {', '.join(RESUMABLE_CHANGES)} may change on resume (epochs to train "
                             "longer); start in a new output folder to train anything else")


def _load_checkpoint(path: Path, full: MemberStack, local: MemberStack, opt: torch.optim.Optimizer, params,
                     ids: list[int] | None, cfg: "TrainConfig", steps: int) -> CheckpointState:
    """Verify the checkpoint (manifest, identity, recipe, every tensor) and load it into ``local``
    (its members ``ids`` only, when split)."""
    state, files = read_artifact(path, CHECKPOINT_STATE, CheckpointState.from_dict)
    _check_resume(state, read_config(path / CHECKPOINT_STATE), _identity(full), cfg, path)
    if state.step != state.epoch * steps + state.step_in_epoch or state.step_in_epoch >= steps:
        raise ResumeMismatch(f"{path / CHECKPOINT_STATE}: position epoch {state.epoch}, step {state.step_in_epoch} "
                             f"of the epoch, step {state.step} overall does not fit {steps} steps per epoch")
    where = str(path / CHECKPOINT_TENSORS)
    if CHECKPOINT_TENSORS not in files:
        raise ValueError(f"{path / CHECKPOINT_STATE} lists no {CHECKPOINT_TENSORS}")
    raw = files[CHECKPOINT_TENSORS]
    want = {f"model/{k}": (tuple(v.shape), v.dtype) for k, v in full.state_dict().items()}
    k_full = full.members
    for i, p in enumerate(params):  # momenta: the whole stack's shape
        shape = (k_full, *p.shape[1:]) if ids is not None else tuple(p.shape)
        want[f"optim/{i}/momentum_buffer"] = (shape, p.dtype)
    have = header_shapes(raw, where)
    missing = sorted(k for k in want if k.startswith("model/") and k not in have)
    extra = sorted(set(have) - set(want))
    bad = [f"{k} {have[k]} (expected {want[k]})" for k in have if k in want and have[k] != want[k]]
    if missing or extra or bad:
        raise ValueError(f"{where} does not hold this model's state: missing {missing[:3]}, unexpected {extra[:3]}, "
                         f"wrong shape or dtype {bad[:3]}")
    tensors, _ = tensors_from_bytes(raw, where)
    model_state = {}
    for k, v in tensors.items():
        if k.startswith("model/"):
            k = k[len("model/"):]
            model_state[k] = v[ids] if ids is not None and k.startswith(("slices.", "member_stats.")) else v
    local.load_state_dict(model_state)
    for i, p in enumerate(params):
        m = tensors.get(f"optim/{i}/momentum_buffer")
        if m is not None:
            opt.state[p]["momentum_buffer"] = (m[ids] if ids is not None else m).to(p.device).clone()
    return state
