"""K members over one frozen backbone, run in one vmapped call."""
from __future__ import annotations

import copy
import itertools
from typing import Protocol, Sequence

import torch
from torch import nn
from torch.func import functional_call, vmap

from ._norms import is_batch_norm
from .frozen import FrozenBackbone, init_module
from .metrics import ensemble_probs
from .schema import LIMITS
from .slices import SliceLayout, SliceSpec, resolve
from .layers import CONV_EXECUTIONS, conv_execution
from ._template import build_template, merge_param, template_key

__all__ = ["Ensemble", "MemberStack", "FrozenSource", "CONV_EXECUTIONS", "conv_execution"]

_DATA_MODES = ("shared", "own")


def _esc(name: str) -> str:
    return name.replace(".", "::")


def _unesc(name: str) -> str:
    return name.replace("::", ".")


class _Tensors(nn.Module):
    """Named tensors (dotted names allowed) registered as buffers so they follow ``.to()``."""

    def __init__(self, tensors: dict[str, torch.Tensor], persistent: bool):
        super().__init__()
        for name, t in tensors.items():
            self.register_buffer(_esc(name), t, persistent=persistent)

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {_unesc(n): b for n, b in self.named_buffers(recurse=False)}


def _stage_of(name: str) -> str:
    parts = name.split(".")
    if parts[0] != "stages":
        raise ValueError(f"parameter {name!r} is outside the backbone's stages")
    return parts[1]


class FrozenSource(Protocol):
    """What a stack reads of its frozen side: the backbone (tensors shared, never trained) and its fingerprint.

    A :class:`FrozenBackbone`, or a view of one (an adapter's backbone with a head of its own size).
    """

    @property
    def backbone(self) -> nn.Module: ...

    @property
    def fingerprint(self) -> str: ...


class _StageRunner(nn.Module):
    """Stages ``names`` of the member template (on ``meta``, no data), run in order.

    It holds those stages and the template's root tensors and other root modules (the spatial weight
    that every LC-Block slices) under the template's own names, so one public ``functional_call``
    swaps in every tensor a run reads; :meth:`run` picks those out of the dicts it is given.
    """

    def __init__(self, template: nn.Module, names: Sequence[str]):
        super().__init__()
        self.names = tuple(names)
        self.stages = nn.ModuleDict({s: template.stages[s] for s in self.names})
        for name, child in template.named_children():
            if name != "stages":
                self.add_module(name, child)
        for name, p in template.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in template.named_buffers(recurse=False):
            self.register_buffer(name, b)
        self.keys = frozenset(n for n, _ in itertools.chain(self.named_parameters(), self.named_buffers()))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for s in self.names:
            h = self.stages[s](h)
        return h

    def run(self, tensors: Sequence[dict[str, torch.Tensor]], h: torch.Tensor) -> torch.Tensor:
        """These stages on ``h`` with the tensors they read taken from ``tensors`` (every other one left out)."""
        mine = tuple({k: t for k, t in d.items() if k in self.keys} for d in tensors)
        return functional_call(self, mine, (h,))


class MemberStack(nn.Module):
    """The machinery shared by ensembles and adapter banks: K slices of one layout, vmapped.

    Holds the frozen tensors (unbatched, never trained), the K stacked slices (``nn.Parameter``
    of shape ``(K, *learned_shape)``) and the BatchNorm statistics: one copy for stages every
    member sees the same input in, one per member after that. The template module that
    ``functional_call`` runs is kept on the meta device and is not registered.
    """

    def __init__(self, frozen: FrozenSource, layout: SliceLayout, members: int, *, data: str = "shared",
                 vectorized: bool = True):
        super().__init__()
        self.vectorized = vectorized  # default execution: one vmapped call (True) or a loop over members
        if not isinstance(members, int) or members < 1:
            raise ValueError(f"members must be a positive integer (K >= 1), got {members!r}")
        if data not in _DATA_MODES:
            raise ValueError(f"data must be one of {_DATA_MODES}, got {data!r}")
        bb = frozen.backbone
        self.frozen_ref = frozen.fingerprint
        self.members, self.layout, self.data = members, layout, data
        self.member_ids = list(range(members))  # global indices (member-parallel stacks hold a run of them)
        self.in_channels = getattr(bb, "in_channels", None)
        stages = list(bb.stages.keys())
        owned = {_stage_of(n) for n in layout}
        first = 0 if data == "own" else min(stages.index(s) for s in owned)
        self.prefix_stages, self.member_stages = stages[:first], stages[first:]
        template = build_template(bb, layout)
        object.__setattr__(self, "_template", template)  # not registered: it holds no data
        object.__setattr__(self, "_prefix_run", _StageRunner(template, self.prefix_stages))
        object.__setattr__(self, "_member_run", _StageRunner(template, self.member_stages))
        self._has_dropout = any(isinstance(m, nn.Dropout) and m.p > 0 for m in bb.modules())

        params = dict(bb.named_parameters())
        bn_buffers = {
            f"{mn}.{bn}": b
            for mn, m in bb.named_modules() if is_batch_norm(m)
            for bn, b in m.named_buffers(recurse=False)
        }
        member_region = tuple(f"stages.{s}." for s in self.member_stages)
        fixed, shared_stats, member_stats = {}, {}, {}
        for name, t in {**params, **dict(bb.named_buffers())}.items():
            if name in bn_buffers:
                target = member_stats if name.startswith(member_region) else shared_stats
                target[name] = t.detach().clone()
            elif name not in layout:
                fixed[name] = t.detach()
            elif not layout[name].whole:
                sl = layout[name]
                fixed[template_key(name, sl, "fixed")] = t.detach().narrow(sl.dim, sl.n, t.shape[sl.dim] - sl.n)
        self.fixed = _Tensors(fixed, persistent=False)
        self.shared_stats = _Tensors(shared_stats, persistent=True)
        _check_stack_size(members, [_learned_part(params[n], sl) for n, sl in layout.items()], list(member_stats.values()))
        self.member_stats = _Tensors(
            {n: t.unsqueeze(0).repeat(members, *[1] * t.dim()) for n, t in member_stats.items()}, persistent=True
        )
        self.slices = nn.ParameterDict(
            {_esc(n): nn.Parameter(_learned_part(params[n], sl).unsqueeze(0).repeat(members, *[1] * params[n].dim()).clone())
             for n, sl in layout.items()}
        )
        self._learned_keys = {_esc(n): template_key(n, sl, "learned") for n, sl in layout.items()}

    # -- state --------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "MemberStack":
        super().train(mode)
        self._template.train(mode)
        return self

    @staticmethod
    def slice_key(name: str) -> str:
        """The key of backbone parameter ``name`` in :attr:`slices` (``ParameterDict`` keys hold no dots)."""
        return _esc(name)

    def slice_of(self, i: int) -> dict[str, torch.Tensor]:
        """Member ``i``'s learned tensors by backbone parameter name."""
        self._check_member(i)
        return {_unesc(n): p[i] for n, p in self.slices.items()}

    def stats_of(self, i: int) -> dict[str, torch.Tensor]:
        """Member ``i``'s BatchNorm statistics (its own, then the shared ones)."""
        self._check_member(i)
        out = {n: b[i] for n, b in self.member_stats.as_dict().items()}
        out.update(self.shared_stats.as_dict())
        return out

    @torch.no_grad()
    def set_member(self, i: int, slice_: dict[str, torch.Tensor], stats: dict[str, torch.Tensor] | None = None) -> None:
        """Write member ``i``'s slice (and statistics) in place."""
        self._check_member(i)
        self._check_slice_names(slice_)
        for n, t in slice_.items():
            dst = self.slices[_esc(n)][i]
            if dst.shape != t.shape:
                raise ValueError(f"slice tensor {n!r} has shape {tuple(t.shape)}, expected {tuple(dst.shape)}")
            dst.copy_(t)
        mine, shared = self.member_stats.as_dict(), self.shared_stats.as_dict()
        for n, t in (stats or {}).items():
            if n in mine:
                mine[n][i].copy_(t)
            elif n in shared:
                shared[n].copy_(t)

    def stack_members(self, slices: Sequence[dict[str, torch.Tensor]], stats: Sequence[dict[str, torch.Tensor]]
                      ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Members' slices and statistics by backbone name (as :meth:`slice_of`/:meth:`stats_of` give them)
        stacked on a leading member axis, as :meth:`forward_members` takes them. Statistics this stack
        shares over members are left out (its own are used). Shape: ``K x (...) -> (K, ...)``."""
        for s in slices:
            self._check_slice_names(s)
        stacked = {self.slice_key(n): torch.stack([s[n] for s in slices]) for n in self.layout}
        mine = self.member_stats.as_dict()
        return stacked, {n: torch.stack([st[n] for st in stats]) for n in mine}

    def select(self, ids: list[int]) -> "MemberStack":
        """A stack of members ``ids`` only, sharing this one's frozen tensors (member-parallel training).

        Its slices and statistics are copies; ``member_ids`` keeps the global indices, which seed
        each member's own data order.
        """
        for i in ids:
            self._check_member(i)
        if not ids:
            raise ValueError("select needs at least one member index")
        sub = copy.copy(self)
        sub._modules = dict(self._modules)
        sub.slices = nn.ParameterDict({n: nn.Parameter(p.detach()[ids].clone(), requires_grad=p.requires_grad)
                                       for n, p in self.slices.items()})
        sub.member_stats = _Tensors({n: b[ids].clone() for n, b in self.member_stats.as_dict().items()},
                                    persistent=True)
        sub.members, sub.member_ids = len(ids), [self.member_ids[i] for i in ids]
        return sub

    def _check_slice_names(self, slice_: dict[str, torch.Tensor]) -> None:
        want = set(self.layout)
        if set(slice_) != want:
            raise ValueError(f"slice does not match the spec: missing {sorted(want - set(slice_))[:4]}, "
                             f"unexpected {sorted(set(slice_) - want)[:4]}")

    def _check_member(self, i: int) -> None:
        if not (isinstance(i, int) and 0 <= i < self.members):
            raise IndexError(f"member index must be in [0, {self.members}), got {i!r}")

    # -- forward ------------------------------------------------------------------------------
    def member_forward(self, fixed: dict[str, torch.Tensor], slices: dict[str, torch.Tensor],
                       stats: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
        """One member, unbatched: its stages with every tensor they read passed in.

        ``fixed``: the frozen tensors (:attr:`fixed`); ``slices``: the member's learned tensors, keyed as
        :attr:`slices`; ``stats``: its BatchNorm statistics (updated in place in train mode).
        Shape: ``h (N, ...) -> (N, classes)``.
        """
        learned = {self._learned_keys[n]: t for n, t in slices.items()}
        return self._member_run.run((fixed, stats, learned), h)

    def prefix(self, x: torch.Tensor) -> torch.Tensor:
        """The stages no member owns, run once. Shape: ``(N, C, H, W) -> features``."""
        if not self.prefix_stages:
            return x
        return self._prefix_run.run((self.fixed.as_dict(), self.shared_stats.as_dict()), x)

    def forward_members(self, h: torch.Tensor, *, vectorized: bool | None = None, per_member: bool | None = None,
                        slices: dict[str, torch.Tensor] | None = None,
                        stats: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Members' stages on features ``h``: shared ``(N, ...)`` or, with ``per_member``, ``(K, N, ...)``.

        The one place members are batched: :meth:`member_forward` under ``vmap`` over the leading
        member axis of ``slices`` and ``stats`` (default: this stack's own; the adapter bank passes a
        mixed batch's tasks), or in a loop over it (``vectorized=False``; the same function).
        Shape: -> ``(K, N, C)``.
        """
        slices = dict(self.slices.items()) if slices is None else slices
        stats = self.member_stats.as_dict() if stats is None else stats
        k = len(next(iter(slices.values())))
        # K=1 gains nothing from vmap, and torch 2.14's CPU conv backward under a size-1 vmap can
        # corrupt the heap (tests/test_ensemble.py::test_single_member_backward_does_not_crash)
        vectorized = (self.vectorized if vectorized is None else vectorized) and k > 1
        per_member = self.data == "own" if per_member is None else per_member
        fixed = self.fixed.as_dict()
        if vectorized:
            fn = vmap(self.member_forward, in_dims=(None, 0, 0, 0 if per_member else None),
                      chunk_size=_vmap_chunk(k, h), randomness="different" if self._has_dropout else "error")
            return fn(fixed, slices, stats, h)
        return torch.stack([self.member_forward(fixed, _member(slices, i), _member(stats, i), h[i] if per_member else h)
                            for i in range(k)])

    def check_input(self, x: torch.Tensor) -> None:
        """Shared input ``(N, C, H, W)``; with ``data="own"`` also one batch per member ``(K, N, C, H, W)``."""
        ranks = (4, 5) if self.data == "own" else (4,)
        shapes = "(N, C, H, W) or (K, N, C, H, W)" if self.data == "own" else "(N, C, H, W)"
        if x.dim() not in ranks or (self.in_channels and x.shape[-3] != self.in_channels):
            raise ValueError(f"expected input of shape {shapes} with C={self.in_channels}, got {tuple(x.shape)}")
        if x.dim() == 5 and x.shape[0] != self.members:
            raise ValueError(f"one batch per member needs a leading dim of K={self.members}, got {x.shape[0]}")

    def forward(self, x: torch.Tensor, *, vectorized: bool | None = None) -> torch.Tensor:
        """Shape: ``(N, C, H, W)`` (or ``(K, N, C, H, W)`` with ``data="own"``) -> ``(K, N, classes)``.

        With ``data="own"`` a 4-d input is given to every member (evaluation).
        """
        self.check_input(x)
        per_member = x.dim() == 5
        h = x if per_member else self.prefix(x)
        return self.forward_members(h, vectorized=vectorized, per_member=per_member)


def _check_stack_size(members: int, slices: list[torch.Tensor], stats: list[torch.Tensor]) -> None:
    """Refuse K members whose slices and statistics would pass ``LIMITS`` before allocating them."""
    per_member = sum(t.numel() for t in slices) + sum(t.numel() for t in stats)
    if members > LIMITS.max_members or members * per_member > LIMITS.max_parameters:
        raise ValueError(f"members={members:,} x {per_member:,} learned values and statistics each is past the "
                         f"limits (K <= {LIMITS.max_members:,}, K x slice <= {LIMITS.max_parameters:,}); raise "
                         "shared_backbone.schema.LIMITS to build it on purpose")


CPU_VMAP_CHUNK = 4  # members per vmapped chunk on CPU


def _vmap_chunk(k: int, h: torch.Tensor) -> int | None:
    """Members per ``vmap`` chunk: on CPU about ``CPU_VMAP_CHUNK``, so a layer's K-member activations
    stay small enough for the cache (the element-wise ops over all K members' activations are what
    makes an unchunked vmap slower than the member loop there); never a chunk of one member (a
    size-1 vmap's conv backward once corrupted the heap). ``None`` (one call) elsewhere."""
    if h.device.type != "cpu" or k <= CPU_VMAP_CHUNK:
        return None
    chunk = -(-k // -(-k // CPU_VMAP_CHUNK))  # chunks as even as they can be
    while k % chunk == 1:
        chunk += 1
    return chunk


def _member(stacked: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    return {n: t[i] for n, t in stacked.items()}


def _learned_part(t: torch.Tensor, sl) -> torch.Tensor:
    return t.detach() if sl.whole else t.detach().narrow(sl.dim, 0, sl.n)


class Ensemble(MemberStack):
    """K cheap ensemble members sharing one frozen backbone, each learning ``spec``.

    Args:
        frozen: the shared :class:`FrozenBackbone`.
        spec: what every member learns, e.g. ``Filters(0.1) + BatchNorm() + Head()``.
        members: K.
        member_init: ``"random"`` (each member's slice drawn afresh with the backbone's init
            scheme, seeded by ``seed`` and its index) or ``"backbone"`` (start from the frozen
            values, e.g. after a warm start; members then differ through their data order).
        data: ``"shared"`` (every member sees the same batch, shared prefix runs once) or
            ``"own"`` (input ``(K, N, ...)``: own shuffles or bootstrap samples).
        vectorized: run members in one ``vmap`` call (default) or in a Python loop over the
            same per-member function (same results; on small CPUs the loop can be faster).

    Shape:
        ``ens(x)``: ``(N, C, H, W) -> (K, N, classes)``.
    """

    def __init__(self, frozen: FrozenBackbone, spec: SliceSpec, members: int = 8, *,
                 member_init: str = "random", seed: int = 0, data: str = "shared", vectorized: bool = True):
        layout = resolve(spec, frozen.backbone)
        super().__init__(frozen, layout, members, data=data, vectorized=vectorized)
        self.spec, self.frozen, self.seed = spec, frozen, seed
        self.member_init = member_init
        if member_init == "random":
            self._init_members(frozen, seed)
        elif member_init != "backbone":
            raise ValueError(f"member_init must be 'random' or 'backbone', got {member_init!r}")

    @torch.no_grad()
    def _init_members(self, frozen: FrozenBackbone, seed: int) -> None:
        scheme = frozen.init if frozen.regenerable else "default"
        for i in range(self.members):
            fresh = init_module(copy.deepcopy(frozen.backbone), scheme, seed=1_000_003 * (seed + 1) + i)
            params = dict(fresh.named_parameters())
            for n, sl in self.layout.items():
                self.slices[_esc(n)][i].copy_(_learned_part(params[n], sl))

    def member(self, i: int) -> nn.Module:
        """A plain ``nn.Module`` (the backbone's own class) with member ``i``'s merged weights."""
        model = copy.deepcopy(self.frozen.backbone).to(next(iter(self.slices.values())).device)
        learned = self.slice_of(i)
        state = {}
        for n, t in model.state_dict().items():
            if n in learned:
                state[n] = merge_param(t, learned[n].detach(), self.layout[n])
            else:
                state[n] = t
        state.update({n: t.detach() for n, t in self.stats_of(i).items()})
        model.load_state_dict(state)
        for p in model.parameters():
            p.requires_grad_(False)
        return model.train(self.training)

    def combine(self, logits: torch.Tensor, how: str = "mean") -> torch.Tensor:
        """Ensemble prediction from member logits. Shape: ``(K, N, C) -> (N, C)`` probabilities."""
        return ensemble_probs(logits, combine=how)

    def extra_repr(self) -> str:
        return (f"members={self.members}, spec={self.spec!r}, data={self.data!r}, "
                f"shared_prefix={self.prefix_stages}, learned_per_member={self.layout.numel(self.frozen.backbone):,}")
