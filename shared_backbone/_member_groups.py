"""Members in groups: each group's forward and backward before the next one's, so that only one
group's activations are alive at a time.

A K-member step keeps every member's activations until its backward. Members are independent
and the loss is a sum of per-member losses, so running the members in groups (forward, loss,
backward of group 1, then group 2, ...; one optimiser step at the end) gives every member the
same gradient with the peak memory of one group: a group's gradient lands in its own rows of
each stacked slice, disjoint from every other group's. A shared prefix still runs once per step.
"""
from __future__ import annotations

import copy
from typing import Iterator

import torch

from .ensemble import MemberStack, _Tensors, _vmap_chunk

__all__ = ["group_ranges", "auto_group_size", "member_group", "forward_in_groups"]


def group_ranges(members: int, size: int | None) -> list[range]:
    """``members`` split into consecutive groups of ``size`` (the last one may be smaller); ``None``: one group."""
    if size is None or size >= members:
        return [range(members)]
    return [range(lo, min(lo + size, members)) for lo in range(0, members, size)]


def auto_group_size(members: int, device: torch.device | str, vectorized: bool = True) -> int | None:
    """The group size ``TrainConfig.member_group_size`` picks when unset, following the execution.

    - member loop (``vectorized=False``): ``1``. The loop computes one member at a time anyway, so
      one member per forward + backward costs no time and keeps the peak at one member's activations.
    - vmap on CPU: the members of one vmap chunk (:data:`~shared_backbone.ensemble.CPU_VMAP_CHUNK` at
      most, groups as even as they can be, never one member alone), so every member computes as it
      would in the whole stack's chunked vmap, with the peak memory of one chunk.
    - vmap elsewhere: ``None`` (all at once), where one vmapped call over every member is the fast path.
    """
    if not vectorized:
        return 1 if members > 1 else None
    return _vmap_chunk(members, torch.empty(0, device=device))


def member_group(stack: MemberStack, members: range) -> MemberStack:
    """Members ``members`` of ``stack`` as a stack of their own whose slices and BatchNorm statistics
    are views of ``stack``'s: gradients flow into ``stack``'s parameters (their rows only) and the
    running statistics update ``stack``'s buffers in place. Frozen tensors and the template are shared.
    """
    lo, hi = members.start, members.stop
    if members.step != 1 or not 0 <= lo < hi <= stack.members:
        raise ValueError(f"a member group is a run of consecutive members in [0, {stack.members}), got {members!r}")
    sub = copy.copy(stack)  # shallow: shares the frozen tensors, the template and stack's own modules
    # instance attributes win over nn.Module's lookup of ``stack``'s registered modules, which stay untouched
    object.__setattr__(sub, "slices", {n: p[lo:hi] for n, p in stack.slices.items()})  # (G, ...) views
    object.__setattr__(sub, "member_stats", _Tensors({n: b[lo:hi] for n, b in stack.member_stats.as_dict().items()},
                                                     persistent=False))
    sub.members, sub.member_ids = hi - lo, stack.member_ids[lo:hi]
    return sub


def forward_in_groups(stack: MemberStack, x: torch.Tensor, size: int | None) -> Iterator[tuple[range, torch.Tensor]]:
    """Yield ``(members, logits)`` group by group; backpropagate each group's loss before asking for the next.

    The shared prefix (``data="shared"``) runs once, on the first request; ``data="own"`` inputs
    are sliced per group. Shape: ``(N, C, H, W)`` or ``(K, N, C, H, W)`` -> ``(G, N, classes)`` per group.
    """
    stack.check_input(x)
    per_member = x.dim() == 5
    h = x if per_member else stack.prefix(x)  # the stages no member owns: no learned tensor, run once
    for group in group_ranges(stack.members, size):
        hg = h[group.start:group.stop] if per_member else h
        yield group, member_group(stack, group).forward_members(hg, per_member=per_member)
