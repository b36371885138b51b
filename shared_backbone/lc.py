"""LC-Blocks: frozen (random) k×k filters recombined by a learnable 1×1 conv.

An LC-Block (the LC paper) is a spatial conv with ``c_out·E`` frozen filters ``W`` followed, with
nothing in between, by a learnable 1×1 conv ``P`` down to ``c_out``. Because nothing sits between
them the pair folds into one conv: ``conv(conv(x, W), P) == conv(x, P·W)``. :class:`LCConv2d`
runs that fused conv (E× fewer MACs, no ``c_out·E``-channel activation to keep for backward);
autograd gives ``P`` its gradient through the product and ``W`` gets none.

Weight sharing (:class:`SharedSpatial`): one random tensor ``W_s ~ U[-1, 1]`` serves every
spatial conv of a model, each layer using a reshaped view of its leading elements scaled by
``1/sqrt(c_in·k²)`` ("global"), or a ``W_s`` shrunk to a fraction of that and tiled ("recycled").

Also here: :func:`freeze_spatial` for ordinary (e.g. torchvision) models, :func:`export_fused`,
the L1 penalty and magnitude pruning of 1×1 weights, and sparse checkpoints.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._member_conv import member_conv2d

__all__ = [
    "LCConv2d", "SharedSpatial", "SHARING_MODES", "lc_layers", "set_fused",
    "freeze_spatial", "followed_by_pointwise", "export_fused",
    "pointwise_weights", "l1_penalty", "prune_pointwise", "pointwise_sparsity",
    "save_sparse", "load_sparse",
]

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


def set_fused(model: nn.Module, fused: bool = True) -> nn.Module:
    """Switch every LC-Block between the fused conv and the reference pair (same outputs)."""
    for m in lc_layers(model).values():
        m.fused = fused
    return model


# -- frozen spatial filters in ordinary models ------------------------------------------------------
def _is_spatial_conv(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.conv._ConvNd) and math.prod(m.kernel_size) > 1


def freeze_spatial(model: nn.Module) -> list[dict]:
    """Freeze every conv with kernel area > 1 (no gradient); return optimizer param groups without them.

    For plain training of any model (e.g. a torchvision ResNet-50): the frozen filters are in no
    group, so they get no weight decay either. Pass the result to ``torch.optim.SGD(groups, ...)``.
    """
    frozen = 0
    for m in model.modules():
        if _is_spatial_conv(m):
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)
                frozen += 1
        if isinstance(m, SharedSpatial) and m.weight is not None:
            m.weight.requires_grad_(False)
            frozen += 1
    if not frozen:
        raise ValueError(f"{type(model).__name__} has no conv with a kernel larger than 1x1 to freeze")
    return [{"params": [p for p in model.parameters() if p.requires_grad]}]


_PASS_THROUGH = (nn.modules.batchnorm._NormBase, nn.Identity, nn.Dropout, nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU,
                 nn.Hardswish, nn.LeakyReLU)
_LINEAR_PASS = (nn.modules.batchnorm._NormBase, nn.Identity, nn.Dropout)


def followed_by_pointwise(model: nn.Module) -> dict[str, dict]:
    """For every k×k conv: the 1×1 conv its output feeds (through norms/activations only), if any.

    Traced with ``torch.fx``. The paper's Figure 3: a frozen spatial conv helps only where a 1×1
    after it can learn linear combinations of its filters. ``{"pointwise": name or None,
    "through": [module types passed], "linear": True if nothing nonlinear sits in between}``.
    """
    stages = getattr(model, "stages", None)
    if isinstance(stages, nn.ModuleDict):  # a Backbone: its forward checks shapes, so trace stage by stage
        return {f"stages.{s}.{k}": {**v, "pointwise": v["pointwise"] and f"stages.{s}.{v['pointwise']}"}
                for s, stage in stages.items() for k, v in followed_by_pointwise(stage).items()}
    gm = torch.fx.symbolic_trace(model)
    modules = dict(gm.named_modules())
    out = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not _is_spatial_conv(modules[node.target]):
            continue
        found, through, linear, cur = None, [], True, node
        while len(cur.users) == 1:
            (nxt,) = cur.users
            mod = modules.get(nxt.target) if nxt.op == "call_module" else None
            if isinstance(mod, nn.modules.conv._ConvNd):
                if math.prod(mod.kernel_size) == 1:
                    found = nxt.target
                break
            if isinstance(mod, _PASS_THROUGH):
                through.append(type(mod).__name__)
                linear = linear and isinstance(mod, _LINEAR_PASS)
            elif nxt.op == "call_function" and getattr(nxt.target, "__name__", "") in ("relu", "relu_"):
                through.append("relu")
                linear = False
            else:
                break
            cur = nxt
        linear = found is not None and linear
        out[node.target] = {"pointwise": found, "through": through if found else [], "linear": linear}
    return out


def export_fused(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every LC-Block folded into one plain k×k ``nn.Conv2d`` (E× fewer MACs).

    For an LCResNet the result is the plain CIFAR ResNet of the registry (``resnet{D}``, same width
    and kernel): its state dict loads into ``build_backbone(f"resnet{D}", ...)``.
    """
    layers = lc_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LC-Block (LCConv2d) to fuse")
    bad = [n for n, m in layers.items() if not m.fusable]
    if bad:
        raise ValueError(
            f"cannot fuse {len(bad)} LC-Block(s) ({', '.join(bad[:4])}): their 1x1 follows "
            f"{type(layers[bad[0]].mid).__name__}, not the spatial conv directly; a 1x1 after a "
            "nonlinearity or norm cannot be folded into the spatial weight"
        )
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, m in lc_layers(out).items():
            conv = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, bias=False,
                             device=m.pointwise.weight.device, dtype=m.pointwise.weight.dtype)
            conv.weight.copy_(m.fused_weight())
            parent_name, _, child = name.rpartition(".")
            setattr(out.get_submodule(parent_name) if parent_name else out, child, conv)
    for name, m in list(out.named_modules()):
        for cname, c in list(m.named_children()):
            if isinstance(c, SharedSpatial):
                delattr(m, cname)
    arch = getattr(model, "arch", "")
    if arch.startswith("lcresnet"):
        cfg = dict(getattr(model, "config", {}))
        depth = cfg.pop("depth", None) or int(arch[len("lcresnet"):])
        out.arch = f"resnet{depth}"
        out.config = {k: cfg[k] for k in ("in_channels", "num_classes", "width", "kernel_size", "shortcut") if k in cfg}
    for p in out.parameters():
        p.requires_grad_(True)
    return out


# -- sparsity of the 1×1 weights --------------------------------------------------------------------
def _is_pointwise_weight(name: str, t: torch.Tensor) -> bool:
    # (c_out, c_in, 1, 1), or (K, c_out, c_in, 1, 1) stacked over members
    return name.endswith("weight") and t.dim() in (4, 5) and tuple(t.shape[-2:]) == (1, 1)


def pointwise_weights(model_or_slices) -> dict[str, torch.Tensor]:
    """Every 1×1 conv weight: of a module (shortcut 1×1s included), of an ensemble's stacked slices,
    or of a ``{name: tensor}`` slice dict."""
    if isinstance(model_or_slices, nn.Module):
        slices = getattr(model_or_slices, "slices", None)
        if isinstance(slices, nn.ParameterDict):  # an Ensemble / MemberStack: (K, ...) slices
            return {n.replace("::", "."): p for n, p in slices.items() if _is_pointwise_weight(n, p)}
        return {f"{n}.weight": m.weight for n, m in model_or_slices.named_modules()
                if isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (1, 1)}
    if isinstance(model_or_slices, Mapping):
        return {n: t for n, t in model_or_slices.items() if _is_pointwise_weight(n, t)}
    raise TypeError(f"expected an nn.Module, an Ensemble or a dict of tensors, got {type(model_or_slices).__name__}")


def l1_penalty(model_or_slices, lam: float) -> torch.Tensor:
    """``lam · Σ |w|`` over every 1×1 conv weight (the paper's Eq. 5); add it to the loss."""
    if not (isinstance(lam, (int, float)) and lam >= 0 and math.isfinite(lam)):
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    ws = list(pointwise_weights(model_or_slices).values())
    if not ws:
        raise ValueError("no 1x1 conv weight found to regularise")
    return lam * sum(w.abs().sum() for w in ws)


@torch.no_grad()
def prune_pointwise(model: nn.Module, ratio: float) -> dict[str, torch.Tensor]:
    """Global magnitude pruning: zero the ``ratio`` smallest-|w| of all 1×1 weights, in place.

    Returns the keep masks by weight name.
    """
    if not (isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and 0 <= ratio < 1):
        raise ValueError(f"pruning ratio must be in [0, 1) (the fraction of 1x1 weights set to zero), got {ratio!r}")
    ws = pointwise_weights(model)
    if not ws:
        raise ValueError(f"{type(model).__name__} has no 1x1 conv weight to prune")
    flat = torch.cat([w.detach().abs().flatten().float() for w in ws.values()])
    n_prune = int(round(ratio * flat.numel()))
    masks = {}
    if n_prune == 0:
        return {n: torch.ones_like(w, dtype=torch.bool) for n, w in ws.items()}
    threshold = flat.kthvalue(n_prune).values
    # ties at the threshold: prune exactly n_prune, in order
    below = {n: w.abs() < threshold for n, w in ws.items()}
    left = n_prune - sum(int(b.sum()) for b in below.values())
    for n, w in ws.items():
        prune = below[n]
        if left > 0:
            ties = (w.abs() == threshold) & ~prune
            idx = ties.flatten().nonzero().flatten()[:left]
            prune = prune.flatten().clone()
            prune[idx] = True
            prune = prune.view_as(w)
            left -= idx.numel()
        w.masked_fill_(prune, 0.0)
        masks[n] = ~prune
    return masks


def pointwise_sparsity(model_or_slices) -> float:
    """Fraction of exactly-zero entries over all 1×1 weights."""
    ws = list(pointwise_weights(model_or_slices).values())
    total = sum(w.numel() for w in ws)
    return sum(int((w == 0).sum()) for w in ws) / max(total, 1)


# -- sparse checkpoints -----------------------------------------------------------------------------
_MASK, _VALUES = "::mask", "::values"


def save_sparse(path: str | Path, tensors: Mapping[str, torch.Tensor] | nn.Module, meta: Mapping | None = None,
                *, min_zero_fraction: float = 0.1) -> Path:
    """Write a state dict to safetensors, atomically; a tensor with at least ``min_zero_fraction``
    zeros is stored as a packed bitmask (1 bit per entry) plus its non-zero values.

    Load with :func:`load_sparse`. A module's state dict has a shared tensor (``W_s``) once.
    """
    from .io import save_tensors

    state = tensors.state_dict() if isinstance(tensors, nn.Module) else dict(tensors)
    out, shapes = {}, {}
    for name, t in state.items():
        t = t.detach().cpu()
        zeros = int((t == 0).sum()) if t.is_floating_point() and t.numel() else 0
        if t.numel() >= 64 and zeros >= min_zero_fraction * t.numel():
            mask = (t != 0).flatten()
            out[name + _MASK] = torch.from_numpy(np.packbits(mask.numpy()))
            out[name + _VALUES] = t.flatten()[mask].clone()
            shapes[name] = list(t.shape)
        else:
            out[name] = t
    return save_tensors(path, out, {**dict(meta or {}), "sparse_shapes": shapes})


def load_sparse(path: str | Path, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Read a file of :func:`save_sparse`: ``(dense state dict, meta)``.

    Every recorded shape is checked against its mask and values on disk before a dense tensor is
    allocated: a header cannot make this allocate more than the file's own bits describe.
    """
    from .io import load_tensors
    from .schema import safe_text

    raw, meta = load_tensors(path)
    shapes = meta.pop("sparse_shapes", {})
    if not isinstance(shapes, dict):
        raise ValueError(f"{path}: sparse_shapes must be an object of name -> shape, got {type(shapes).__name__}")
    state = {n: t for n, t in raw.items() if not n.endswith((_MASK, _VALUES))}
    for name, shape in shapes.items():
        if name + _MASK not in raw or name + _VALUES not in raw:
            raise ValueError(f"{path}: sparse tensor {safe_text(name)!r} lacks its mask or values")
        if not (isinstance(shape, list) and len(shape) <= 8
                and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise ValueError(f"{path}: sparse tensor {safe_text(name)!r} has shape {safe_text(shape)}; "
                             "accepted: a list of at most 8 integers >= 0")
        n = math.prod(shape)
        packed, values = raw[name + _MASK], raw[name + _VALUES]
        if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (n + 7) // 8:
            raise ValueError(f"{path}: sparse tensor {safe_text(name)!r} has shape {shape} ({n:,} entries) but its "
                             f"mask holds {packed.numel() * 8:,} bits; the file is corrupt")
        mask = torch.from_numpy(np.unpackbits(packed.numpy(), count=n).astype(bool))
        if int(mask.sum()) != values.numel() or values.dim() != 1:
            raise ValueError(f"{path}: sparse tensor {safe_text(name)!r} has {int(mask.sum())} set bits but "
                             f"{values.numel()} values")
        dense = torch.zeros(n, dtype=values.dtype)
        dense[mask] = values
        state[name] = dense.view(shape)
    return {n: t.to(device) for n, t in state.items()}, meta


def spatial_numel(model: nn.Module) -> int:
    """Elements of the frozen spatial weights as stored (a shared tensor counted once)."""
    seen, total = set(), 0
    for m in model.modules():
        ts: Iterable[torch.Tensor] = ()
        if isinstance(m, SharedSpatial) and m.weight is not None:
            ts = (m.weight,)
        elif _is_spatial_conv(m):
            ts = (m.weight,)
        for t in ts:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel()
    return total
