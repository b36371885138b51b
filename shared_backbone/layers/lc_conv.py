"""LC-Block (the LC paper): frozen (random) k×k filters recombined by a learnable 1×1 conv.

An LC-Block is a spatial conv with ``c_out·E`` frozen filters ``W`` followed, with nothing in
between, by a learnable 1×1 conv ``P`` down to ``c_out``. Because nothing sits between them the
pair folds into one conv: ``conv(conv(x, W), P) == conv(x, P·W)``. :class:`LCConv2d` runs that
fused conv (E× fewer MACs, no ``c_out·E``-channel activation to keep for backward); autograd
gives ``P`` its gradient through the product and ``W`` gets none.

Weight sharing (:class:`SharedSpatial`): one random tensor ``W_s ~ U[-1, 1]`` serves every
spatial conv of a model, each layer using a reshaped view of its leading elements scaled by
``1/sqrt(c_in·k²)`` ("global"), or a ``W_s`` shrunk to a fraction of that and tiled ("recycled").

Model surgery (freezing, folding) is in :mod:`shared_backbone.lc_surgery`, sparsity of the 1×1
weights in :mod:`shared_backbone.lc_sparsity`; :mod:`shared_backbone.lc` gathers the public names.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .member_conv import member_conv2d

__all__ = ["LCConv2d", "SharedSpatial", "SHARING_MODES", "lc_layers", "check_expansion", "check_odd_kernel"]

SHARING_MODES = ("none", "global", "recycled")


class SharedSpatial(nn.Module):
    """One random tensor ``W_s ~ U[-1, 1]`` that every spatial conv of a model slices.

    Layers announce the size they need with :meth:`request` while the model is built; then
    :meth:`allocate` makes ``weight`` (1-d) as long as the largest request ("global") or
    ``share_fraction`` of it, rounded to whole k×k kernels ("recycled"). The owner registers
    this module once (e.g. as ``model.shared_spatial``) so that the tensor is stored, counted,
    fingerprinted and swapped by ``functional_call`` exactly once.

    It keeps its U[-1, 1] init under every init scheme (``keeps_own_init``).
    """

    keeps_own_init = True

    def __init__(self, sharing: str = "global", share_fraction: float = 1.0, kernel_size: int = 3):
        super().__init__()
        if sharing not in ("global", "recycled"):
            raise ValueError(f"SharedSpatial sharing must be 'global' or 'recycled', got {sharing!r}")
        if not (isinstance(share_fraction, (int, float)) and 0 < share_fraction <= 1):
            raise ValueError(f"share_fraction must be in (0, 1], got {share_fraction!r}")
        if sharing == "global" and share_fraction != 1:
            raise ValueError(f"share_fraction={share_fraction!r} applies to sharing='recycled' only; "
                             "global sharing uses the whole largest layer (share_fraction=1)")
        self.sharing, self.share_fraction, self.kernel_size = sharing, float(share_fraction), kernel_size
        self.largest = 0
        self.register_parameter("weight", None)

    def request(self, numel: int) -> None:
        """A layer will read ``numel`` elements (before :meth:`allocate`)."""
        if self.weight is not None:
            raise RuntimeError("SharedSpatial is already allocated; request every size before allocate()")
        self.largest = max(self.largest, int(numel))

    def allocate(self, device=None, dtype=None) -> "SharedSpatial":
        k2 = self.kernel_size ** 2
        if self.sharing == "global":
            numel = self.largest
        else:
            numel = int(round(self.share_fraction * self.largest / k2)) * k2
            if numel < k2:
                raise ValueError(
                    f"share_fraction={self.share_fraction!r} of the largest spatial weight ({self.largest:,} "
                    f"elements) leaves {numel} elements, fewer than one {self.kernel_size}x{self.kernel_size} "
                    f"kernel ({k2}); use share_fraction >= {k2 / self.largest:.3g}"
                )
        self.weight = nn.Parameter(torch.empty(numel, device=device, dtype=dtype))
        if self.weight.device.type != "meta":
            self.reset_parameters()
        return self

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.uniform_(self.weight, -1.0, 1.0)

    def extra_repr(self) -> str:
        n = 0 if self.weight is None else self.weight.numel()
        return f"sharing={self.sharing!r}, share_fraction={self.share_fraction}, numel={n:,}"


class LCConv2d(nn.Module):
    """LC-Block: frozen k×k conv with ``c_out·E`` filters, then a learnable 1×1 conv to ``c_out``.

    Args:
        in_channels, out_channels, kernel_size (odd), stride: as for a k×k conv, 'same' padding.
        expansion: E >= 1, filters per output channel (the linear-combination rate).
        shared: a :class:`SharedSpatial` to slice the spatial weight from (scaled by
            ``1/sqrt(c_in·k²)``) instead of owning a ``spatial`` conv.
        fused: run one conv with the folded weight ``P·W`` (default) or the reference pair.
        mid_layer: a module factory ``(channels) -> module`` put between the two convs (e.g. the
            paper's first version had BN there). Such a block cannot be fused.

    Learnable tensor: ``pointwise.weight`` ``(c_out, c_out·E, 1, 1)`` (so ``Pointwise()`` selects
    it). Frozen tensor: ``spatial.weight`` ``(c_out·E, c_in, k, k)`` or a view of ``shared``.

    Shape:
        ``(N, c_in, H, W) -> (N, c_out, H / stride, W / stride)``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 expansion: int = 1, *, shared: SharedSpatial | None = None, fused: bool = True,
                 mid_layer: Callable[[int], nn.Module] | None = None, device=None, dtype=None):
        super().__init__()
        check_expansion(expansion)
        check_odd_kernel(kernel_size)
        self.in_channels, self.out_channels, self.expansion = in_channels, out_channels, expansion
        self.kernel_size, self.stride, self.padding = kernel_size, (stride, stride), (kernel_size // 2,) * 2
        self.fused = fused
        filters = out_channels * expansion
        self.spatial_shape = (filters, in_channels, kernel_size, kernel_size)
        if shared is None:
            self.spatial = nn.Conv2d(in_channels, filters, kernel_size, stride, kernel_size // 2, bias=False,
                                     device=device, dtype=dtype)
            self.scale = 1.0
        else:
            if shared.kernel_size != kernel_size:
                raise ValueError(f"shared tensor was made for {shared.kernel_size}x{shared.kernel_size} kernels, "
                                 f"this layer has kernel_size={kernel_size}")
            shared.request(math.prod(self.spatial_shape))
            self.spatial = None
            self.scale = 1.0 / math.sqrt(in_channels * kernel_size ** 2)
        self._shared = (shared,)  # a reference, not a child: the owner registers it once
        self.mid = mid_layer(filters) if mid_layer is not None else None
        self.pointwise = nn.Conv2d(filters, out_channels, 1, bias=False, device=device, dtype=dtype)

    @property
    def shared(self) -> SharedSpatial | None:
        return self._shared[0]

    @property
    def fusable(self) -> bool:
        return self.mid is None

    # -- weights ----------------------------------------------------------------------------------
    def _basis(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(p', B)`` with ``p' @ B == p @ W.flatten(1)``; ``B`` is a view of the frozen tensor when it can be.

        Recycled sharing whose ``W_s`` holds whole rows ``c_in·k²`` folds the tiling into ``p``
        (sums of its columns over the repeats) instead of materialising the tiled weight.
        """
        rows, length = self.spatial_shape[0], math.prod(self.spatial_shape[1:])
        if self.shared is None:
            return p, self.spatial.weight.flatten(1)
        ws = self.shared.weight
        m, n = ws.numel(), rows * length
        if n <= m:
            return p, ws[:n].view(rows, length)
        if m % length == 0:  # tile whole rows: W[j] = B[j mod R]
            r = m // length
            reps = -(-rows // r)
            p = F.pad(p, (0, reps * r - rows)).unflatten(-1, (reps, r)).sum(-2)  # (c_out, R)
            return p, ws.view(r, length)
        return p, self.spatial_weight().flatten(1)  # misaligned tiling: a copy

    def spatial_weight(self) -> torch.Tensor:
        """The frozen spatial weight ``W`` ``(c_out·E, c_in, k, k)``, unscaled.

        A view for ``sharing`` none/global (and recycled while one copy suffices); a tiled copy otherwise.
        """
        if self.shared is None:
            return self.spatial.weight
        ws = self.shared.weight
        n = math.prod(self.spatial_shape)
        if n > ws.numel():
            ws = ws.repeat(-(-n // ws.numel()))
        return ws[:n].view(self.spatial_shape)

    def fused_weight(self) -> torch.Tensor:
        """``scale · P·W`` as one k×k weight. Shape: ``(c_out, c_in, k, k)``."""
        if not self.fusable:
            raise ValueError(f"this LC-Block has {type(self.mid).__name__} between its spatial conv and its 1x1; "
                             "only a block with nothing in between folds into one conv")
        p, basis = self._basis(self.pointwise.weight.flatten(-3))  # (c_out, R), (R, c_in·k²)
        w = p @ basis
        if self.scale != 1.0:
            w = w * self.scale
        return w.unflatten(-1, self.spatial_shape[1:])

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, c_in, H, W) -> (N, c_out, H', W')
        if self.fused and self.fusable:
            return member_conv2d(x, self.fused_weight(), None, self.stride, self.padding, (1, 1))
        h = member_conv2d(x, self.spatial_weight(), None, self.stride, self.padding, (1, 1))  # (N, c_out·E, H', W')
        if self.mid is not None:
            if self.scale != 1.0:
                h = h * self.scale
            return member_conv2d(self.mid(h), self.pointwise.weight, None, (1, 1), (0, 0), (1, 1))
        p = self.pointwise.weight * self.scale if self.scale != 1.0 else self.pointwise.weight
        return member_conv2d(h, p, None, (1, 1), (0, 0), (1, 1))

    def extra_repr(self) -> str:
        sharing = "none" if self.shared is None else self.shared.sharing
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride[0]}, "
                f"expansion={self.expansion}, sharing={sharing!r}, fused={self.fused}")


def check_expansion(expansion: int) -> None:
    if not isinstance(expansion, int) or isinstance(expansion, bool) or expansion < 1:
        raise ValueError(f"expansion E must be an integer >= 1 (filters per output channel), got {expansion!r}")


def check_odd_kernel(kernel_size: int) -> None:
    if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd integer (1, 3, 5, 7, 9, ...) for 'same' "
                         f"padding, got {kernel_size!r}")


def lc_layers(model: nn.Module) -> dict[str, LCConv2d]:
    """Every :class:`LCConv2d` of ``model`` by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LCConv2d)}
