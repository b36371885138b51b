"""``describe(frozen, spec)``: what a spec learns and what one member costs to store."""
from __future__ import annotations

import math
import warnings

from ._norms import is_batch_norm
from .frozen import FrozenBackbone
from .slices import SliceSpec, resolve

__all__ = ["describe", "format_table", "Description"]


class Description(dict):
    """What :func:`describe` counts: a dict (``d["total"]``, ``d["stages"]``, ...) whose ``str`` is the table."""

    def __str__(self) -> str:
        return format_table(self)


def describe(frozen: FrozenBackbone, spec: SliceSpec, *, members: int = 1, verbose: bool | None = None) -> Description:
    """Count total and learnable parameters of ``spec`` on ``frozen``, per stage and in all.

    ``stored_bytes`` per member is its slice plus the BatchNorm statistics it keeps for the
    stages from its first learned parameter on (what saving one member writes, before headers).
    Nothing is printed: ``print(describe(frozen, spec))`` shows the table. ``verbose`` is accepted
    for old callers and ignored (``verbose=True`` warns that it no longer prints).
    """
    if verbose:
        warnings.warn("describe(..., verbose=True) no longer prints; print(describe(...)) shows the table",
                      FutureWarning, stacklevel=2)
    bb = frozen.backbone
    layout = resolve(spec, bb)
    shapes = layout.learned_shapes(bb)
    params = dict(bb.named_parameters())
    stages = list(bb.stages.keys())
    first = min(stages.index(n.split(".")[1]) for n in layout)
    member_stages = tuple(f"stages.{s}." for s in stages[first:])
    rows = []
    for s in stages:
        p = f"stages.{s}."
        total = sum(t.numel() for n, t in params.items() if n.startswith(p))
        learn = sum(math.prod(shape) for n, shape in shapes.items() if n.startswith(p))
        rows.append({"stage": s, "params": total, "learnable": learn})
    stat_bytes = sum(
        b.numel() * b.element_size()
        for mn, m in bb.named_modules() if is_batch_norm(m) and f"{mn}.".startswith(member_stages)
        for b in m.buffers(recurse=False)
    )
    learnable = layout.numel(bb)
    itemsize = next(iter(params.values())).element_size()
    total = frozen.num_parameters()
    return Description({
        "arch": frozen.config["arch"],
        "spec": repr(spec),
        "total": total,
        "learnable": learnable,
        "fraction": learnable / total,
        "stored_bytes": learnable * itemsize + stat_bytes,
        "stats_bytes": stat_bytes,
        "members": members,
        "ensemble_params": total + (members - 1) * learnable if members > 1 else total,
        "stages": rows,
    })


def format_table(d: dict) -> str:
    """The per-stage table of a :func:`describe` result."""
    lines = [f"{d['arch']}  spec: {d['spec']}", f"{'stage':<10}{'params':>14}{'learnable':>14}"]
    for r in d["stages"]:
        lines.append(f"{r['stage']:<10}{r['params']:>14,}{r['learnable']:>14,}")
    lines.append(f"{'total':<10}{d['total']:>14,}{d['learnable']:>14,}  ({100 * d['fraction']:.2f}% learned)")
    lines.append(f"stored per member: {d['stored_bytes']:,} bytes ({d['stats_bytes']:,} of BN statistics)")
    return "\n".join(lines)
