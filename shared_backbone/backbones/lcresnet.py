"""LCResNets (the LC paper): CIFAR ResNets whose every k×k conv, the stem's too, is an LC-Block.

``LCResNet-{D}-{W}x{E}`` is :func:`~shared_backbone.backbones.cifar_resnet._cifar_resnet` with
``conv_layer`` = :class:`~shared_backbone.layers.LCConv2d` of expansion E. Shortcut 1×1s stay plain.
With ``sharing="global"`` or ``"recycled"`` every spatial conv slices one tensor
``W_s ~ U[-1, 1]``, registered once as ``model.shared_spatial``.
"""
from __future__ import annotations

from ..layers.lc_conv import SHARING_MODES, LCConv2d, SharedSpatial, check_expansion, check_odd_kernel
from ._base import Backbone
from ._registry import register_backbone
from .cifar_resnet import _cifar_resnet

__all__ = ["lcresnet", "lcresnet20", "lcresnet32", "lcresnet56", "lcresnet110"]


def _lcresnet(depth: int, *, in_channels: int, num_classes: int, width: int, expansion: int, kernel_size: int,
              shortcut: str, sharing: str, share_fraction: float, fused: bool) -> Backbone:
    check_expansion(expansion)
    check_odd_kernel(kernel_size)
    if sharing not in SHARING_MODES:
        raise ValueError(f"sharing must be one of {SHARING_MODES}, got {sharing!r}")
    if sharing != "recycled" and share_fraction != 1:
        raise ValueError(f"share_fraction={share_fraction!r} applies to sharing='recycled' only (got sharing={sharing!r})")
    shared = None if sharing == "none" else SharedSpatial(sharing, share_fraction, kernel_size)

    def conv_layer(c_in: int, c_out: int, k: int, stride: int) -> LCConv2d:
        return LCConv2d(c_in, c_out, k, stride, expansion, shared=shared, fused=fused)

    model = _cifar_resnet(depth, in_channels=in_channels, num_classes=num_classes, width=width,
                          kernel_size=kernel_size, shortcut=shortcut, conv_layer=conv_layer)
    if shared is not None:
        model.shared_spatial = shared.allocate()
    return model


def _builder(depth: int):
    def build(*, in_channels: int = 3, num_classes: int = 10, width: int = 16, expansion: int = 1,
              kernel_size: int = 3, shortcut: str = "B", sharing: str = "none", share_fraction: float = 1.0,
              fused: bool = True) -> Backbone:
        return _lcresnet(depth, in_channels=in_channels, num_classes=num_classes, width=width, expansion=expansion,
                         kernel_size=kernel_size, shortcut=shortcut, sharing=sharing, share_fraction=share_fraction,
                         fused=fused)

    build.__name__ = f"lcresnet{depth}"
    build.__doc__ = (f"LCResNet-{depth}-{{width}}x{{expansion}}: ResNet-{depth} with LC-Blocks; "
                     "sharing 'none' | 'global' | 'recycled' (share_fraction of the largest spatial weight).")
    return build


lcresnet20 = register_backbone("lcresnet20")(_builder(20))
lcresnet32 = register_backbone("lcresnet32")(_builder(32))
lcresnet56 = register_backbone("lcresnet56")(_builder(56))
lcresnet110 = register_backbone("lcresnet110")(_builder(110))


@register_backbone("lcresnet")
def lcresnet(*, depth: int = 20, in_channels: int = 3, num_classes: int = 10, width: int = 16, expansion: int = 1,
             kernel_size: int = 3, shortcut: str = "B", sharing: str = "none", share_fraction: float = 1.0,
             fused: bool = True) -> Backbone:
    """LCResNet of any depth ``6n + 2``."""
    return _lcresnet(depth, in_channels=in_channels, num_classes=num_classes, width=width, expansion=expansion,
                     kernel_size=kernel_size, shortcut=shortcut, sharing=sharing, share_fraction=share_fraction,
                     fused=fused)
