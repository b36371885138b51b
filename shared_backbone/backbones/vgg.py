"""VGG-19 for CIFAR-sized inputs (Simonyan & Zisserman, 2015), with or without BatchNorm.

Channels ``[w, w, M, 2w, 2w, M, 4w x4, M, 8w x4, M, 8w x4, M]``; pools use ``ceil_mode`` so 28 px
inputs shrink 28 -> 14 -> 7 -> 4 -> 2 -> 1. The stem is the first conv; each later stage ends at a pool.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

from torch import nn

from ._base import Backbone, GlobalAvgPool, check_kernel_size, check_positive
from ._registry import register_backbone

__all__ = ["vgg19", "vgg19_bn"]

NormLayer = Callable[[int], nn.Module]

# channel multiples of ``width``; "M" is a 2x2 max pool
CFG_19: list[Union[int, str]] = [1, 1, "M", 2, 2, "M", 4, 4, 4, 4, "M", 8, 8, 8, 8, "M", 8, 8, 8, 8, "M"]


def conv_norm_relu(c_in: int, c_out: int, kernel_size: int, norm_layer: Optional[NormLayer]) -> list[nn.Module]:
    """k×k conv with bias, optional norm, ReLU."""
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel_size, padding=kernel_size // 2)]
    if norm_layer is not None:
        layers.append(norm_layer(c_out))
    layers.append(nn.ReLU(inplace=True))
    return layers


def _vgg(
    cfg: list[Union[int, str]],
    *,
    in_channels: int,
    num_classes: int,
    width: int,
    kernel_size: int,
    norm_layer: Optional[NormLayer],
) -> Backbone:
    """Build a VGG from ``cfg`` with stages ``stem, block1..5, head``."""
    check_positive(in_channels=in_channels, num_classes=num_classes, width=width)
    check_kernel_size(kernel_size)
    first, rest = cfg[0], cfg[1:]
    c = first * width
    stem = nn.Sequential(*conv_norm_relu(in_channels, c, kernel_size, norm_layer))
    stages: list[tuple[str, nn.Module]] = [("stem", stem)]
    layers: list[nn.Module] = []
    for v in rest:
        if v == "M":
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
            stages.append((f"block{len(stages)}", nn.Sequential(*layers)))
            layers = []
        else:
            layers += conv_norm_relu(c, v * width, kernel_size, norm_layer)
            c = v * width
    stages.append(("head", nn.Sequential(GlobalAvgPool(), nn.Linear(c, num_classes))))
    return Backbone(stages, in_channels, num_classes)


@register_backbone("vgg19")
def vgg19(*, in_channels: int = 3, num_classes: int = 10, width: int = 64, kernel_size: int = 3) -> Backbone:
    """VGG-19 without normalisation."""
    return _vgg(
        CFG_19, in_channels=in_channels, num_classes=num_classes, width=width, kernel_size=kernel_size, norm_layer=None
    )


@register_backbone("vgg19_bn")
def vgg19_bn(*, in_channels: int = 3, num_classes: int = 10, width: int = 64, kernel_size: int = 3) -> Backbone:
    """VGG-19 with BatchNorm after every conv."""
    return _vgg(
        CFG_19, in_channels=in_channels, num_classes=num_classes, width=width, kernel_size=kernel_size,
        norm_layer=nn.BatchNorm2d,
    )
