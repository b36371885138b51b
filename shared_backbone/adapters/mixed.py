"""Mixed batches: one sample per task name, served by one vmapped call over the tasks present.

Samples are gathered per task into a padded ``(T, n_max, ...)`` batch; the frozen tensors stay
unbatched (one dense conv over all samples); each task's slice, head and statistics are stacked on
the leading axis and passed to :meth:`~shared_backbone.ensemble.MemberStack.forward_members`.
Tasks with different specs run on the union of their specs, each carrying the frozen values where
it learns nothing; heads are zero-padded to the largest class count, the padded logits are ``-inf``.

Only structure is kept between calls (the union layout, the resized head, the template), for as
long as the bank holds the same task objects; every task's tensors are read at every call, so
training, ``set_member`` or an in-place edit shows in the next batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..ensemble import MemberStack
from ..frozen import FrozenBackbone
from ..slices import SliceLayout, resolve
from .task import HeadView, TaskAdapter

__all__ = ["MixedBatches"]


@dataclass(frozen=True)
class _Part:
    """Where one task's tensor of the union layout comes from: its own learned tensor (``key`` in its
    slices, ``None`` when it learns nothing there) followed along ``dim`` by the constant rows ``tail``
    (frozen or zero rows it does not learn, a head's zero rows up to ``C_max``), or ``tail`` alone."""

    key: str | None
    tail: torch.Tensor | None
    dim: int = 0

    def tensor(self, a: TaskAdapter) -> torch.Tensor:
        if self.key is None:
            return self.tail
        t = a.slices[self.key][0]
        return t if self.tail is None else torch.cat([t, self.tail], dim=self.dim)


@dataclass
class _Plan:
    """The structure shared by every mixed batch over ``tasks`` on ``device``."""

    tasks: tuple[TaskAdapter, ...]
    device: torch.device
    view: HeadView
    layout: SliceLayout
    widths: torch.Tensor  # (T,) each task's class count
    parts: list[dict[str, _Part]]  # per task, per union tensor
    stacks: dict[str, MemberStack] = field(default_factory=dict)  # by data mode, built when first needed

    def serves(self, tasks: Sequence[TaskAdapter], device: torch.device) -> bool:
        return self.device == device and len(self.tasks) == len(tasks) and all(a is b for a, b in zip(self.tasks, tasks))

    def stack(self, stats: Sequence[dict[str, torch.Tensor]]) -> MemberStack:
        """The stack a batch runs on: the leading stages no task learns run once for the whole batch
        (``data="shared"``) while every task normalises them with the frozen statistics, else each task
        runs them itself (``"own"``; after training on its own data they differ). Its own slot of slices
        stays unused: the tasks' tensors are passed in."""
        shared = self._built("shared")
        prefix_stats = shared.shared_stats.as_dict()
        agree = all(torch.equal(st[n], t) for st in stats for n, t in prefix_stats.items())
        return shared if agree else self._built("own")

    def _built(self, data: str) -> MemberStack:
        if data not in self.stacks:
            self.stacks[data] = MemberStack(self.view, self.layout, 1, data=data).to(self.device).eval()
        return self.stacks[data]


class MixedBatches:
    """Serves batches that mix a bank's tasks (``bank(x, tasks=[...])``)."""

    def __init__(self, frozen: FrozenBackbone):
        self.frozen = frozen
        self._plan: _Plan | None = None

    def forget(self) -> None:
        """Drop the kept structure (the bank's tasks changed)."""
        self._plan = None

    def stack(self, tasks: Sequence[TaskAdapter], device: torch.device) -> MemberStack:
        """The stack a mixed batch of ``tasks`` on ``device`` runs on now (see ``_Plan.stack``)."""
        return self._plan_for(tasks, device).stack([a.stats_of(0) for a in tasks])

    @torch.no_grad()
    def __call__(self, tasks: Sequence[TaskAdapter], x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Each sample's logits under its own task. Shape: ``x (N, C, H, W), ids (N,) -> (N, C_max)``."""
        plan = self._plan_for(tasks, x.device)
        stats = [a.stats_of(0) for a in tasks]
        stack = plan.stack(stats)
        stack.check_input(x)
        x = stack.prefix(x)  # the stages no task owns, once over the whole batch (none when prefixes differ)
        present = torch.unique(ids)  # sorted task indices in this batch
        lid, rank, n_max = _positions(ids, present, len(tasks))
        h = x.new_zeros((len(present), n_max, *x.shape[1:]))  # (T, n_max, C, H, W)
        h[lid, rank] = x
        chosen = present.tolist()
        slices, stats = stack.stack_members([{n: p.tensor(tasks[i]) for n, p in plan.parts[i].items()} for i in chosen],
                                            [stats[i] for i in chosen])
        out = stack.forward_members(h, per_member=True, vectorized=True, slices=slices, stats=stats)  # (T, n_max, C_max)
        logits = out[lid, rank]  # (N, C_max)
        pad = torch.arange(logits.shape[1], device=x.device)[None, :] >= plan.widths.to(x.device)[ids][:, None]
        return logits.masked_fill(pad, float("-inf"))

    def _plan_for(self, tasks: Sequence[TaskAdapter], device: torch.device) -> _Plan:
        if not tasks:
            raise ValueError("the bank has no task; add_task() or load_adapter() first")
        if self._plan is not None and self._plan.serves(tasks, device):
            return self._plan
        c_max = max(a.num_classes for a in tasks)
        view = HeadView.of(self.frozen, c_max)
        spec = tasks[0].spec
        for a in tasks[1:]:
            spec = spec + a.spec
        try:
            layout = resolve(spec, view.backbone)
        except ValueError as err:
            raise ValueError(f"these tasks' slices cannot run in one mixed batch: {err}") from err
        parts = [_union_parts(a, layout, view, device) for a in tasks]
        widths = torch.tensor([a.num_classes for a in tasks])
        self._plan = _Plan(tuple(tasks), device, view, layout, widths, parts)
        return self._plan


def _positions(ids: torch.Tensor, present: torch.Tensor, n_tasks: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Each sample's index among the tasks ``present`` and its position among its task's samples; the
    most samples of one task. Shapes: ``(N,), (N,), int``."""
    local = torch.full((n_tasks,), -1, dtype=torch.int64, device=ids.device)
    local[present] = torch.arange(len(present), device=ids.device)
    lid = local[ids]  # (N,) index among the present tasks
    counts = torch.bincount(lid, minlength=len(present))
    order = torch.argsort(lid, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(lid)
    rank[order] = torch.arange(len(lid), device=ids.device) - starts[lid[order]]  # position within its task
    return lid, rank, int(counts.max())


@torch.no_grad()
def _union_parts(a: TaskAdapter, layout: SliceLayout, view: HeadView, device: torch.device) -> dict[str, _Part]:
    """Task ``a``'s tensors for the union ``layout``: its own where it learns, frozen values elsewhere,
    its head's rows zero-padded to ``C_max``. Refused when the union would drop values of ``a`` (the
    rows beyond a partial union slice must be what the union fixes there)."""
    full = a.full_parameters()  # what ``a`` computes with; the rows it does not learn never change
    frozen = dict(view.backbone.named_parameters())
    out = {}
    for n, sl in layout.items():
        u = full[n]
        if not sl.whole:
            rest = u.narrow(sl.dim, sl.n, u.shape[sl.dim] - sl.n)
            expect = frozen[n].narrow(sl.dim, sl.n, u.shape[sl.dim] - sl.n)
            if not torch.equal(rest, torch.zeros_like(expect) if sl.fixed == "zero" else expect):
                raise ValueError(f"task {a.name!r} ({a.spec!r}) cannot share one mixed batch with the other tasks: "
                                 f"{n} would lose its own values beyond the union's first {sl.n} rows")
            u = u.narrow(sl.dim, 0, sl.n)
        if n.startswith(view.head + "."):  # (C_t, d) -> (C_max, d), zero rows
            u = torch.cat([u, u.new_zeros((frozen[n].shape[0] - u.shape[0], *u.shape[1:]))])
        own = a.layout.get(n)
        if own is None:
            out[n] = _Part(None, u.detach().to(device, copy=True))
            continue
        dim, rows = (0, a.slices[a.slice_key(n)].shape[1]) if own.whole else (own.dim, own.n)
        tail = u.narrow(dim, rows, u.shape[dim] - rows).detach().to(device, copy=True) if u.shape[dim] > rows else None
        out[n] = _Part(a.slice_key(n), tail, dim)
    return out
