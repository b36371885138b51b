"""Saving ensembles: the backbone config once, one small safetensors file per member.

Layout of an ensemble directory::

    ensemble.json            # the manifest, written last: format version, K, spec, data mode, backbone
                             # config + fingerprint, and every file below with its size and sha256
    backbone.safetensors     # only when the backbone cannot be regenerated (a trained checkpoint)
    shared.safetensors       # BatchNorm statistics of the stages every member shares (if any)
    member_000.safetensors   # member 0's slice and its own statistics; header: fingerprint, spec

A save writes only these names inside the directory (anything else there is left alone) and
commits at one point, the rename of ``ensemble.json`` (see :mod:`shared_backbone.io`): a reader
sees the old ensemble or the new one, whole. Loading checks every tensor: names, shapes, dtypes,
no extras, every statistic present.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .ensemble import Ensemble
from .frozen import FrozenBackbone
from .io import read_artifact, read_config, tensors_from_bytes, tensors_to_bytes, write_artifact
from .schema import FORMAT_VERSION, BackboneConfig, EnsembleConfig
from .slices import spec_from_dict

__all__ = ["save_ensemble", "load_ensemble", "save_backbone", "load_backbone", "backbone_files"]

BACKBONE_TENSORS = "backbone.safetensors"


def backbone_files(frozen: FrozenBackbone) -> dict[str, bytes]:
    """The files a trained backbone needs beside its config (none for a regenerable one)."""
    if frozen.regenerable:
        return {}
    return {BACKBONE_TENSORS: tensors_to_bytes(frozen.tensors(), {"fingerprint": frozen.fingerprint},
                                               finite="a backbone")}


def save_backbone(frozen: FrozenBackbone, directory: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``backbone.json`` (the backbone config, the manifest) and, for a trained backbone, ``backbone.safetensors``.

    A ``backbone.json`` of another backbone already there is refused unless ``overwrite``.
    """
    write_artifact(directory, "backbone.json", {**frozen.config, "kind": "backbone"}, backbone_files(frozen),
                   overwrite=overwrite, same_fingerprint=True)
    return Path(directory)


def _frozen_from(config: BackboneConfig, raw: dict, files: dict[str, bytes], where: Path) -> FrozenBackbone:
    tensors = None
    if config.source != "random":
        if BACKBONE_TENSORS not in files:
            raise FileNotFoundError(f"{where} lists no {BACKBONE_TENSORS}: this backbone was frozen from a "
                                    "checkpoint and needs its tensors")
        tensors, header = tensors_from_bytes(files[BACKBONE_TENSORS], str(where.parent / BACKBONE_TENSORS))
    return FrozenBackbone.from_config(raw, tensors)


def load_backbone(directory: str | Path) -> FrozenBackbone:
    """Rebuild the backbone saved by :func:`save_backbone` (or inside an ensemble directory)."""
    directory = Path(directory)
    if (directory / "backbone.json").is_file():
        config, files = read_artifact(directory, "backbone.json", BackboneConfig.from_dict)
        return _frozen_from(config, read_config(directory / "backbone.json"), files, directory / "backbone.json")
    meta, files = read_artifact(directory, "ensemble.json", EnsembleConfig.from_dict)
    raw = read_config(directory / "ensemble.json")["backbone"]
    return _frozen_from(meta.backbone, raw, files, directory / "ensemble.json")


def _member_name(i: int) -> str:
    return f"member_{i:03d}.safetensors"


def save_ensemble(ens: Ensemble, directory: str | Path, *, overwrite: bool = False) -> Path:
    """Save ``ens`` to ``directory`` (see the module docstring for the layout and the guarantees).

    Another kind of artifact in ``directory`` is refused unless ``overwrite``; NaN or infinite
    weights are refused.
    """
    directory = Path(directory)
    fp = ens.frozen.fingerprint
    files = backbone_files(ens.frozen)
    shared = ens.shared_stats.as_dict()
    if shared:
        files["shared.safetensors"] = tensors_to_bytes(shared, {"fingerprint": fp}, finite="shared statistics")
    own = ens.member_stats.as_dict()
    for i in range(ens.members):
        tensors = {f"slice/{n}": t for n, t in ens.slice_of(i).items()}
        tensors.update({f"stats/{n}": t[i] for n, t in own.items()})
        files[_member_name(i)] = tensors_to_bytes(tensors, {"fingerprint": fp, "member": i, "spec": repr(ens.spec)},
                                                  finite=f"member {i}")
    body = {"format_version": FORMAT_VERSION, "kind": "ensemble", "members": ens.members,
            "spec": ens.spec.to_dict(), "spec_repr": repr(ens.spec), "data": ens.data,
            "backbone": ens.frozen.config, "fingerprint": fp}
    write_artifact(directory, "ensemble.json", body, files, overwrite=overwrite)
    return directory


def load_ensemble(directory: str | Path, frozen: FrozenBackbone | None = None) -> Ensemble:
    """Load an ensemble saved by :func:`save_ensemble`, checking the manifest, every file's fingerprint,
    and every tensor's name, shape and dtype."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no ensemble directory at {directory}")
    manifest = directory / "ensemble.json"
    meta, files = read_artifact(directory, "ensemble.json", EnsembleConfig.from_dict)
    k = meta.members
    members = [_member_name(i) for i in range(k)]
    missing = [m for m in members if m not in files]
    if missing:
        raise ValueError(f"{manifest} says K={k} members but lists {k - len(missing)} member files "
                         f"(missing {missing[:3]})")
    known = set(members) | {"shared.safetensors", BACKBONE_TENSORS}
    extra = sorted(set(files) - known)
    if extra:
        raise ValueError(f"{manifest} lists files an ensemble does not have: {extra[:4]}")
    if frozen is None:
        frozen = _frozen_from(meta.backbone, read_config(manifest)["backbone"], files, manifest)
    else:
        frozen.check_fingerprint(meta.backbone.fingerprint, what=f"the ensemble in {directory}")
    try:
        spec = spec_from_dict(meta.spec)
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(f"{manifest} has an unreadable spec: {err}") from None
    ens = Ensemble(frozen, spec, members=k, member_init="backbone", data=meta.data)

    shared_want = ens.shared_stats.as_dict()
    if shared_want and "shared.safetensors" not in files:
        raise ValueError(f"{manifest} lists no shared.safetensors, but this spec shares the statistics of "
                         f"{len(shared_want)} tensors")
    if "shared.safetensors" in files:
        where = str(directory / "shared.safetensors")
        shared, header = tensors_from_bytes(files["shared.safetensors"], where,
                                            {n: (t.shape, t.dtype) for n, t in shared_want.items()})
        frozen.check_fingerprint(header.get("fingerprint", "<none>"), what=where)
        with torch.no_grad():
            for n, t in shared.items():
                shared_want[n].copy_(t)
    expect = {f"slice/{n}": (t.shape, t.dtype) for n, t in ens.slice_of(0).items()}
    expect.update({f"stats/{n}": (t.shape[1:], t.dtype) for n, t in ens.member_stats.as_dict().items()})
    for i, name in enumerate(members):
        where = str(directory / name)
        tensors, header = tensors_from_bytes(files[name], where, expect)
        frozen.check_fingerprint(header.get("fingerprint", "<none>"), what=where)
        if header.get("member", i) != i:
            raise ValueError(f"{where} holds member {header.get('member')!r}, expected member {i}")
        if header.get("spec") != repr(spec):
            raise ValueError(f"{where} holds a slice for another spec, but the ensemble's spec is {spec!r}")
        with torch.no_grad():
            ens.set_member(i, {n[6:]: t for n, t in tensors.items() if n.startswith("slice/")},
                           {n[6:]: t for n, t in tensors.items() if n.startswith("stats/")})
    return ens
