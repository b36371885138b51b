"""Saving ensembles: the backbone recipe once, one small safetensors file per member.

Layout of an ensemble directory::

    ensemble.json            # format version, K, spec, data mode, backbone recipe + fingerprint
    backbone.safetensors     # only when the backbone cannot be regenerated (a trained checkpoint)
    shared.safetensors       # BatchNorm statistics of the stages every member shares (if any)
    member_000.safetensors   # member 0's slice and its own statistics; header: fingerprint, spec

The directory is built next to its final place and swapped in, so an existing ensemble is
never half-overwritten.
"""
from __future__ import annotations

from pathlib import Path

from .ensemble import Ensemble
from .frozen import FORMAT_VERSION, FrozenBackbone
from .io import atomic_dir, load_tensors, read_json, save_tensors, write_json
from .slices import spec_from_dict

__all__ = ["save_ensemble", "load_ensemble", "save_backbone", "load_backbone"]


def save_backbone(frozen: FrozenBackbone, directory: str | Path) -> Path:
    """Write ``backbone.json`` (the recipe) and, for a trained backbone, ``backbone.safetensors``."""
    directory = Path(directory)
    write_json(directory / "backbone.json", frozen.recipe)
    if not frozen.regenerable:
        save_tensors(directory / "backbone.safetensors", frozen.tensors(), {"fingerprint": frozen.fingerprint})
    return directory


def load_backbone(directory: str | Path) -> FrozenBackbone:
    """Rebuild the backbone saved by :func:`save_backbone` (or inside an ensemble directory)."""
    directory = Path(directory)
    recipe_file = directory / "backbone.json"
    recipe = read_json(recipe_file) if recipe_file.exists() else read_json(directory / "ensemble.json")["backbone"]
    tensors = None
    if recipe.get("source") != "random":
        tensors, _ = load_tensors(directory / "backbone.safetensors")
    return FrozenBackbone.from_recipe(recipe, tensors)


def save_ensemble(ens: Ensemble, directory: str | Path) -> Path:
    """Save ``ens`` to ``directory`` atomically (see the module docstring for the layout)."""
    directory = Path(directory)
    fp = ens.frozen.fingerprint
    with atomic_dir(directory) as tmp:
        write_json(tmp / "ensemble.json", {
            "format_version": FORMAT_VERSION, "kind": "ensemble", "members": ens.members,
            "spec": ens.spec.to_dict(), "spec_repr": repr(ens.spec), "data": ens.data,
            "backbone": ens.frozen.recipe,
        })
        if not ens.frozen.regenerable:
            save_tensors(tmp / "backbone.safetensors", ens.frozen.tensors(), {"fingerprint": fp})
        shared = ens.shared_stats.as_dict()
        if shared:
            save_tensors(tmp / "shared.safetensors", shared, {"fingerprint": fp})
        own = ens.member_stats.as_dict()
        for i in range(ens.members):
            tensors = {f"slice/{n}": t for n, t in ens.slice_of(i).items()}
            tensors.update({f"stats/{n}": t[i] for n, t in own.items()})
            save_tensors(tmp / f"member_{i:03d}.safetensors", tensors,
                         {"fingerprint": fp, "member": i, "spec": repr(ens.spec)})
    return directory


def load_ensemble(directory: str | Path, frozen: FrozenBackbone | None = None) -> Ensemble:
    """Load an ensemble saved by :func:`save_ensemble`, checking every file's fingerprint and spec."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no ensemble directory at {directory}")
    meta = read_json(directory / "ensemble.json")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{directory} has format_version {meta['format_version']}; this library reads up to {FORMAT_VERSION}")
    for key in ("members", "spec", "backbone"):
        if key not in meta:
            raise ValueError(f"{directory / 'ensemble.json'} is missing the field {key!r}")
    if frozen is None:
        frozen = load_backbone(directory)
    else:
        frozen.check_fingerprint(meta["backbone"]["fingerprint"], what=f"the ensemble in {directory}")
    spec = spec_from_dict(meta["spec"])
    k = int(meta["members"])
    files = sorted(directory.glob("member_*.safetensors"), key=lambda f: (len(f.stem), f.stem))
    if len(files) != k:
        raise ValueError(f"{directory / 'ensemble.json'} says K={k} members but {len(files)} member files are there")
    ens = Ensemble(frozen, spec, members=k, member_init="backbone", data=meta.get("data", "shared"))
    if (directory / "shared.safetensors").exists():
        shared, _ = load_tensors(directory / "shared.safetensors")
        for n, t in shared.items():
            ens.shared_stats.as_dict()[n].copy_(t)
    for i, f in enumerate(files):
        tensors, header = load_tensors(f)
        frozen.check_fingerprint(header.get("fingerprint", "<none>"), what=str(f))
        if header.get("member", i) != i:
            raise ValueError(f"{f} holds member {header.get('member')}, expected member {i}")
        if header.get("spec") != repr(spec):
            raise ValueError(f"{f} holds a slice for {header.get('spec')!r}, but the ensemble's spec is {spec!r}")
        ens.set_member(
            i,
            {n[6:]: t for n, t in tensors.items() if n.startswith("slice/")},
            {n[6:]: t for n, t in tensors.items() if n.startswith("stats/")},
        )
    return ens
