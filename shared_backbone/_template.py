"""Member templates: the backbone with every partly learned conv split into learned and fixed rows.

Under ``vmap`` the learned rows are batched over members and the fixed rows are not, so the
fixed part runs as one dense conv (over K*N samples, or once when the input is shared) instead
of a grouped conv with the fixed rows copied into every member's weight. The fixed rows need no
weight gradient at all.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .layers import member_batch_norm, member_conv2d, split_conv2d
from .slices import ParamSlice, SliceLayout

__all__ = ["SplitConv2d", "MemberConv2d", "MemberBatchNorm2d", "build_template", "merge_param", "template_key"]


class SplitConv2d(nn.Module):
    """A conv whose first ``n`` entries along ``dim`` are learned and the rest fixed.

    Tensors (supplied through ``functional_call``): ``weight_learned``, ``weight_fixed`` and,
    when the conv has a bias, ``bias`` (fixed, ``dim != 0``) or ``bias_learned``/``bias_fixed``.

    Shape:
        ``(N, c_in, H, W) -> (N, c_out, H', W')``, equal to the plain conv with the merged weight.
    """

    def __init__(self, conv: nn.Conv2d, sl: ParamSlice):
        super().__init__()
        self.dim, self.n, self.zero = sl.dim, sl.n, sl.fixed == "zero"
        self.out_channels = conv.out_channels
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        if conv.padding_mode != "zeros":
            raise ValueError(f"Filters slices support zero-padded convs only, got padding_mode={conv.padding_mode!r}")
        w = conv.weight
        self.register_parameter("weight_learned", nn.Parameter(_rows_between(w, self.dim, 0, self.n)))
        self.register_buffer("weight_fixed", _rows_between(w, self.dim, self.n, w.shape[self.dim]))
        self.has_bias = conv.bias is not None
        if self.has_bias and self.dim == 0:
            self.register_parameter("bias_learned", nn.Parameter(conv.bias[: self.n]))
            self.register_buffer("bias_fixed", conv.bias[self.n :])
        elif self.has_bias:
            self.register_buffer("bias", conv.bias)

    def _conv(self, x, w, b=None):
        if self.groups == 1 and not isinstance(self.padding, str):
            return member_conv2d(x, w, b, self.stride, self.padding, self.dilation)
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wl, wf = self.weight_learned, self.weight_fixed
        if self.zero:
            wf = torch.zeros_like(wf)
        if self.dim == 0 and self.groups == 1 and not self.zero and not isinstance(self.padding, str):
            out = split_conv2d(x, wl, wf, self.stride, self.padding, self.dilation)  # (N, c_out, H', W')
            if self.has_bias:
                out = out + torch.cat([self.bias_learned, self.bias_fixed]).view(-1, 1, 1)
            return out
        if self.dim == 0 and self.groups == 1:
            bl = self.bias_learned if self.has_bias else None
            out = self._conv(x, wl, bl)  # (N, n, H', W')
            if self.zero:
                return F.pad(out, (0, 0, 0, 0, 0, self.out_channels - self.n))
            bf = self.bias_fixed if self.has_bias else None
            return torch.cat([out, self._conv(x, wf, bf)], dim=1)
        if self.dim == 1 and self.groups == 1:
            b = self.bias if self.has_bias else None
            out = self._conv(x[:, : self.n], wl, b)
            return out if self.zero else out + self._conv(x[:, self.n :], wf)
        # kernel rows/columns, or a grouped conv: one conv with the merged weight
        w = torch.cat([wl, wf], dim=self.dim)
        if self.has_bias and self.dim == 0:
            b = torch.cat([self.bias_learned, torch.zeros_like(self.bias_fixed) if self.zero else self.bias_fixed])
        else:
            b = self.bias if self.has_bias else None
        return self._conv(x, w, b)


class MemberConv2d(nn.Conv2d):
    """A wholly learned conv that runs through :func:`member_conv2d` (fast under ``vmap``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return member_conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)


class MemberBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` through :func:`member_batch_norm` (one kernel over every member under ``vmap``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None or self.momentum is None:  # no affine part, or a cumulative average
            return super().forward(x)
        self._check_input_dim(x)
        if self.training and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        batch_stats = self.training or self.running_mean is None
        track = not self.training or self.track_running_stats
        return member_batch_norm(x, self.weight, self.bias, self.running_mean if track else None,
                                 self.running_var if track else None, batch_stats, self.momentum, self.eps)


def _fast_conv(conv: nn.Conv2d) -> bool:
    return (type(conv) is nn.Conv2d and conv.groups == 1 and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str))


def _rows_between(t: torch.Tensor, dim: int, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of ``t`` along ``dim``, detached (a view, no copy)."""
    return t.detach().narrow(dim, start, stop - start)


def template_key(name: str, sl: ParamSlice, part: str) -> str:
    """The template's tensor name for the ``part`` ("learned"/"fixed") of backbone parameter ``name``."""
    return name if sl.whole else f"{name}_{part}"


def build_template(backbone: nn.Module, layout: SliceLayout) -> nn.Module:
    """A structural copy of ``backbone`` on the meta device, partly learned convs split.

    It holds no data: every tensor comes in through ``functional_call``.
    """
    template = copy.deepcopy(backbone).to("meta")
    convs = {name.rsplit(".", 1)[0]: sl for name, sl in layout.partial().items() if name.endswith(".weight")}
    for mname, sl in convs.items():
        parent_name, _, child = mname.rpartition(".")
        parent = template.get_submodule(parent_name) if parent_name else template
        conv = getattr(parent, child)
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"partial slices apply to Conv2d layers only, {mname!r} is {type(conv).__name__}")
        setattr(parent, child, SplitConv2d(conv, sl))
    whole = {name.rsplit(".", 1)[0] for name, sl in layout.items() if sl.whole and name.endswith(".weight")}
    for mname, m in list(template.named_modules()):
        if mname in whole and _fast_conv(m):
            m.__class__ = MemberConv2d
        elif type(m) is nn.BatchNorm2d:
            m.__class__ = MemberBatchNorm2d
    for p in template.parameters():
        p.requires_grad_(False)
    return template


def merge_param(frozen: torch.Tensor, learned: torch.Tensor, sl: ParamSlice) -> torch.Tensor:
    """The full parameter a member uses: its learned part joined to the fixed rest."""
    if sl.whole:
        return learned
    rest = _rows_between(frozen, sl.dim, sl.n, frozen.shape[sl.dim])
    if sl.fixed == "zero":
        rest = torch.zeros_like(rest)
    return torch.cat([learned, rest.to(learned.dtype)], dim=sl.dim)
