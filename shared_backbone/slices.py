"""Slice specs: which part of the frozen backbone a member or task learns.

Specs compose with ``+``: ``Filters(0.1) + BatchNorm() + Head()``. Resolving a spec against a
backbone gives a :class:`SliceLayout`: for each learned parameter, either the whole tensor or
the first ``n`` indices along one dimension (the partial-learning paper's rule).
"""
from __future__ import annotations

import ast
import json
import math
import re
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ._norms import is_batch_norm

__all__ = [
    "SliceSpec", "Filters", "BatchNorm", "Blocks", "Pointwise", "Head", "Full",
    "ParamSlice", "SliceLayout", "resolve", "parse_spec", "SLICE_KINDS",
]

_STAGE_ALIASES = {"conv1": "stem", "fc": "head"}


def _check_stage_names(stages) -> tuple[str, ...] | None:
    """``None`` (every stage) or a non-empty tuple of stage names, checked for type only."""
    if stages is None:
        return None
    if isinstance(stages, str):
        stages = (stages,)
    stages = tuple(stages)
    if not stages or not all(isinstance(s, str) and s for s in stages):
        raise ValueError(f"stages must be None (every stage) or stage names such as ('block3',), got {stages!r}")
    return stages


def _stage_filter(spec: "SliceSpec", backbone: nn.Module, stages: tuple[str, ...] | None):
    """A predicate on module names: inside one of ``stages`` (every module when ``None``)."""
    if stages is None:
        return lambda mname: True
    known = list(backbone.stages.keys())
    names = [_STAGE_ALIASES.get(s, s) for s in stages]
    bad = [s for s, n in zip(stages, names) if n not in known]
    if bad:
        raise ValueError(f"{spec!r}: unknown stage {bad[0]!r} for {getattr(backbone, 'arch', 'this backbone')}; "
                         f"stages: {', '.join(known)} (aliases: conv1=stem, fc=head)")
    prefixes = tuple(f"stages.{n}." for n in names)
    return lambda mname: f"{mname}.".startswith(prefixes)


@dataclass(frozen=True)
class ParamSlice:
    """What a member learns of one parameter: all of it (``dim is None``) or its first ``n`` along ``dim``."""

    dim: int | None = None
    n: int = 0
    fixed: str = "random"  # what the rest holds: the frozen values ("random") or zeros ("zero")

    @property
    def whole(self) -> bool:
        return self.dim is None

    def learned_shape(self, shape: torch.Size) -> tuple[int, ...]:
        if self.whole:
            return tuple(shape)
        out = list(shape)
        out[self.dim] = self.n
        return tuple(out)

    def merge(self, other: "ParamSlice", name: str) -> "ParamSlice":
        if self.whole or other.whole:
            return ParamSlice()
        if self.dim != other.dim:
            raise ValueError(f"{name}: two specs slice it along different dims ({self.dim} and {other.dim})")
        if self.fixed != other.fixed:
            raise ValueError(f"{name}: two specs disagree on fixed ({self.fixed!r} vs {other.fixed!r})")
        return ParamSlice(self.dim, max(self.n, other.n), self.fixed)


class SliceLayout(dict):
    """``{parameter name: ParamSlice}`` in the backbone's parameter order."""

    def learned_shapes(self, backbone: nn.Module) -> dict[str, tuple[int, ...]]:
        params = dict(backbone.named_parameters())
        return {n: s.learned_shape(params[n].shape) for n, s in self.items()}

    def numel(self, backbone: nn.Module) -> int:
        return sum(math.prod(s) for s in self.learned_shapes(backbone).values())

    def partial(self) -> dict[str, ParamSlice]:
        return {n: s for n, s in self.items() if not s.whole}


class SliceSpec:
    """Base of every slice kind. Subclasses implement :meth:`select`."""

    kind: str = ""

    def select(self, backbone: nn.Module) -> dict[str, ParamSlice]:
        raise NotImplementedError

    def parts(self) -> list["SliceSpec"]:
        return [self]

    def __add__(self, other: "SliceSpec") -> "SliceSpec":
        if not isinstance(other, SliceSpec):
            return NotImplemented
        return _Sum(self.parts() + other.parts())

    def to_dict(self) -> list[dict]:
        return [{"kind": p.kind, **p._args()} for p in self.parts()]

    def _args(self) -> dict:
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._args().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SliceSpec) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True, default=float))


class _Sum(SliceSpec):
    kind = "sum"

    def __init__(self, parts: list[SliceSpec]):
        self._parts = parts

    def parts(self) -> list[SliceSpec]:
        return list(self._parts)

    def __repr__(self) -> str:
        return " + ".join(repr(p) for p in self._parts)


class Filters(SliceSpec):
    """The first ``floor(p * size)`` (or first ``k``) filters of every conv layer along ``dim``.

    ``dim=0`` slices output filters (bias too), ``dim=1`` inputs, ``dim=2, 3`` kernel rows/columns
    (the paper's Figure 2). The fixed rest keeps its frozen random values (``fixed="random"``)
    or is zero (``fixed="zero"``). Shortcut 1x1 convs are included; fc layers are not.
    ``stages=("block3",)`` restricts it to the convs of those stages (default: every stage), so
    that the stages before them run once for all members.
    """

    kind = "filters"

    def __init__(self, p: float | None = None, *, k: int | None = None, dim: int = 0, fixed: str = "random",
                 stages: tuple[str, ...] | list[str] | None = None):
        if (p is None) == (k is None):
            raise ValueError(f"Filters takes exactly one of p (a fraction) or k (a count), got p={p!r}, k={k!r}")
        if p is not None and not (isinstance(p, (int, float)) and 0 < p <= 1):
            raise ValueError(f"Filters fraction p must be in (0, 1], got {p!r}")
        if k is not None and not (isinstance(k, int) and k >= 1):
            raise ValueError(f"Filters count k must be a positive integer, got {k!r}")
        if dim not in (0, 1, 2, 3):
            raise ValueError(f"Filters dim must be 0 (outputs), 1 (inputs), 2 or 3 (kernel), got {dim!r}")
        if fixed not in ("random", "zero"):
            raise ValueError(f"Filters fixed must be 'random' or 'zero', got {fixed!r}")
        self.p, self.k, self.dim, self.fixed = (None if p is None else float(p)), k, dim, fixed
        self.stages = _check_stage_names(stages)

    def _args(self) -> dict:
        out = {"p": self.p} if self.p is not None else {"k": self.k}
        if self.dim:
            out["dim"] = self.dim
        if self.fixed != "random":
            out["fixed"] = self.fixed
        if self.stages is not None:
            out["stages"] = list(self.stages)
        return out

    def __repr__(self) -> str:
        a = self._args()
        head = repr(a.pop("p")) if "p" in a else f"k={a.pop('k')}"
        rest = "".join(f", {k}={v!r}" for k, v in a.items())
        return f"Filters({head}{rest})"

    def select(self, backbone: nn.Module) -> dict[str, ParamSlice]:
        out: dict[str, ParamSlice] = {}
        empty = []
        inside = _stage_filter(self, backbone, self.stages)
        for mname, m in backbone.named_modules():
            if not isinstance(m, nn.Conv2d) or not inside(mname):
                continue
            size = m.weight.shape[self.dim]
            if self.k is not None:
                if self.k > size:
                    raise ValueError(
                        f"{self!r}: k={self.k} is larger than layer {mname!r}, which has {size} "
                        f"along dim {self.dim}; use k <= {size} or a fraction p"
                    )
                n = self.k
            else:
                n = math.floor(self.p * size + 1e-9)
            if n == 0:
                empty.append(mname)
                continue
            sl = ParamSlice() if n == size and self.fixed == "random" else ParamSlice(self.dim, n, self.fixed)
            out[f"{mname}.weight"] = sl
            if m.bias is not None and self.dim == 0:
                out[f"{mname}.bias"] = sl
        if empty:
            warnings.warn(
                f"{self!r} leaves {len(empty)} conv layer(s) with no learned filter; they stay fully "
                f"fixed: {', '.join(empty[:6])}{' ...' if len(empty) > 6 else ''}",
                stacklevel=3,
            )
        return out


class BatchNorm(SliceSpec):
    """Every BatchNorm's affine gamma and beta (``stages=("block3",)``: only those stages')."""

    kind = "batchnorm"

    def __init__(self, *, stages: tuple[str, ...] | list[str] | None = None):
        self.stages = _check_stage_names(stages)

    def _args(self) -> dict:
        return {} if self.stages is None else {"stages": list(self.stages)}

    def select(self, backbone: nn.Module) -> dict[str, ParamSlice]:
        inside = _stage_filter(self, backbone, self.stages)
        return {
            f"{mname}.{pname}": ParamSlice()
            for mname, m in backbone.named_modules()
            if is_batch_norm(m) and inside(mname)
            for pname, _ in m.named_parameters(recurse=False)
        }


class Blocks(SliceSpec):
    """Whole stages by name (``"stem"``/``"conv1"``, ``"block1"`` .., ``"head"``/``"fc"``)."""

    kind = "blocks"

    def __init__(self, *names: str):
        if not names or not all(isinstance(n, str) for n in names):
            raise ValueError(f"Blocks needs one or more stage names, got {names!r}")
        self.names = tuple(names)

    def _args(self) -> dict:
        return {"names": list(self.names)}

    def __repr__(self) -> str:
        return f"Blocks({', '.join(map(repr, self.names))})"

    def select(self, backbone: nn.Module) -> dict[str, ParamSlice]:
        stages = list(backbone.stages.keys())
        out = {}
        for raw in self.names:
            name = _STAGE_ALIASES.get(raw, raw)
            if name not in stages:
                raise ValueError(
                    f"unknown block {raw!r} for {getattr(backbone, 'arch', 'this backbone')}; "
                    f"stages: {', '.join(stages)} (aliases: conv1=stem, fc=head)"
                )
            for pname, _ in backbone.stages[name].named_parameters():
                out[f"stages.{name}.{pname}"] = ParamSlice()
        return out


class Head(Blocks):
    """The classifier head stage."""

    kind = "head"

    def __init__(self):
        super().__init__("head")

    def _args(self) -> dict:
        return {}

    def __repr__(self) -> str:
        return "Head()"


class Pointwise(SliceSpec):
    """Every 1x1 conv (LC-Block 1x1s and shortcut 1x1s included)."""

    kind = "pointwise"

    def select(self, backbone: nn.Module) -> dict[str, ParamSlice]:
        out = {}
        for mname, m in backbone.named_modules():
            if isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (1, 1):
                for pname, _ in m.named_parameters(recurse=False):
                    out[f"{mname}.{pname}"] = ParamSlice()
        return out


class Full(SliceSpec):
    """Every parameter: a fully trained model."""

    kind = "full"

    def select(self, backbone: nn.Module) -> dict[str, ParamSlice]:
        return {n: ParamSlice() for n, _ in backbone.named_parameters()}


SLICE_KINDS: dict[str, type[SliceSpec]] = {
    "Filters": Filters, "BatchNorm": BatchNorm, "Blocks": Blocks, "Pointwise": Pointwise,
    "Head": Head, "Full": Full,
}
_KIND_TO_CLASS = {cls.kind: cls for cls in SLICE_KINDS.values()}


def resolve(spec: SliceSpec, backbone: nn.Module) -> SliceLayout:
    """The layout ``spec`` learns on ``backbone``; errors if it learns nothing."""
    if not isinstance(spec, SliceSpec):
        raise TypeError(f"spec must be a SliceSpec such as Filters(0.1) + Head(), got {spec!r}")
    chosen: dict[str, ParamSlice] = {}
    for part in spec.parts():
        for name, sl in part.select(backbone).items():
            chosen[name] = chosen[name].merge(sl, name) if name in chosen else sl
    if not chosen:
        raise ValueError(f"{spec!r} learns no parameter of {getattr(backbone, 'arch', 'this backbone')}")
    order = [n for n, _ in backbone.named_parameters()]
    return SliceLayout((n, chosen[n]) for n in order if n in chosen)


def spec_from_dict(parts: list[dict]) -> SliceSpec:
    """Inverse of :meth:`SliceSpec.to_dict`."""
    specs = []
    for d in parts:
        d = dict(d)
        kind = d.pop("kind", None)
        if kind not in _KIND_TO_CLASS:
            raise ValueError(f"unknown slice kind {kind!r}; known: {', '.join(_KIND_TO_CLASS)}")
        cls = _KIND_TO_CLASS[kind]
        specs.append(cls(*d.pop("names")) if cls is Blocks else cls(**d))
    out = specs[0]
    for s in specs[1:]:
        out = out + s
    return out


_TERM = re.compile(r"^\s*([A-Za-z]+)\s*\((.*)\)\s*$")


def parse_spec(text: str) -> SliceSpec:
    """Parse ``"Filters(0.1)+BatchNorm()+Head()"`` (the repr of a spec) without ``eval``."""
    terms = _split_plus(text)
    specs = []
    for term in terms:
        m = _TERM.match(term)
        if not m or m.group(1) not in SLICE_KINDS:
            raise ValueError(
                f"cannot read slice {term.strip()!r} in {text!r}; write terms like "
                f"{', '.join(k + '(...)' for k in SLICE_KINDS)} joined by '+'"
            )
        call = ast.parse(f"f({m.group(2)})", mode="eval").body
        args = [ast.literal_eval(a) for a in call.args]
        kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
        specs.append(SLICE_KINDS[m.group(1)](*args, **kwargs))
    out = specs[0]
    for s in specs[1:]:
        out = out + s
    return out


def _split_plus(text: str) -> list[str]:
    depth, cur, out = 0, "", []
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "+" and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    if not text.strip() or any(not t.strip() for t in out):
        raise ValueError(f"empty slice term in {text!r}")
    return out
