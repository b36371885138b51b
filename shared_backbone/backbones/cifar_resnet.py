"""CIFAR ResNets (He et al., 2016): depth 6n+2, three stages of widths W, 2W, 4W.

Layout follows the LC paper author's public CIFAR harness: a k×k stem conv + BN + ReLU, post-activation
basic blocks, a 1×1 conv + BN shortcut (option "B") or a zero-padded identity (option "A") where the
shape changes, and global average pooling + Linear as head. Every k×k conv is built by ``conv_layer``
so that a variant (e.g. LC-Blocks) can swap it in without touching the block.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ._base import Backbone, GlobalAvgPool, check_kernel_size, check_positive
from ._registry import register_backbone

__all__ = ["BasicBlock", "ZeroPadShortcut", "resnet20", "resnet32", "resnet56", "resnet110"]

ConvLayer = Callable[[int, int, int, int], nn.Module]  # (c_in, c_out, kernel_size, stride) -> module
NormLayer = Callable[[int], nn.Module]

SHORTCUTS = ("A", "B")


def conv_kxk(c_in: int, c_out: int, kernel_size: int, stride: int = 1) -> nn.Conv2d:
    """k×k convolution without bias, 'same' padding."""
    return nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=kernel_size // 2, bias=False)


class ZeroPadShortcut(nn.Module):
    """Option A shortcut: subsample by ``stride`` and zero-pad the channels to ``c_out``; no parameters.

    Shape:
        ``(N, c_in, H, W)`` -> ``(N, c_out, ceil(H / stride), ceil(W / stride))``.
    """

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        if c_out < c_in:
            raise ValueError(f"a zero-padded shortcut cannot shrink channels ({c_in} -> {c_out})")
        self.stride = stride
        self.pad = ((c_out - c_in) // 2, c_out - c_in - (c_out - c_in) // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, *self.pad))  # pads the channel dim

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad={self.pad}"


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``; ``conv1`` carries the stride.

    Shape:
        ``(N, c_in, H, W)`` -> ``(N, c_out, H / stride, W / stride)``.
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        stride: int = 1,
        kernel_size: int = 3,
        shortcut: str = "B",
        conv_layer: ConvLayer = conv_kxk,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ):
        super().__init__()
        self.conv1 = conv_layer(c_in, c_out, kernel_size, stride)
        self.bn1 = norm_layer(c_out)
        self.conv2 = conv_layer(c_out, c_out, kernel_size, 1)
        self.bn2 = norm_layer(c_out)
        if stride == 1 and c_in == c_out:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "A":
            self.shortcut = ZeroPadShortcut(c_in, c_out, stride)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), norm_layer(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def _cifar_resnet(
    depth: int,
    *,
    in_channels: int,
    num_classes: int,
    width: int,
    kernel_size: int,
    shortcut: str,
    conv_layer: Optional[ConvLayer] = None,
    norm_layer: Optional[NormLayer] = None,
) -> Backbone:
    """Build a CIFAR ResNet of ``depth = 6n + 2`` with stages ``stem, block1..3, head``."""
    if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(
            f"CIFAR ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 56, 110, ...), got {depth!r}"
        )
    check_positive(in_channels=in_channels, num_classes=num_classes, width=width)
    check_kernel_size(kernel_size)
    if shortcut not in SHORTCUTS:
        raise ValueError(
            f"shortcut must be one of {SHORTCUTS} (A: zero-padded identity, B: 1x1 conv + BN), got {shortcut!r}"
        )
    conv_layer = conv_layer or conv_kxk
    norm_layer = norm_layer or nn.BatchNorm2d
    n = (depth - 2) // 6

    stem = nn.Sequential(conv_layer(in_channels, width, kernel_size, 1), norm_layer(width), nn.ReLU(inplace=True))
    stages: list[tuple[str, nn.Module]] = [("stem", stem)]
    c_in = width
    for i, c_out in enumerate((width, 2 * width, 4 * width)):
        blocks = []
        for j in range(n):
            stride = 2 if (i > 0 and j == 0) else 1
            blocks.append(BasicBlock(c_in, c_out, stride, kernel_size, shortcut, conv_layer, norm_layer))
            c_in = c_out
        stages.append((f"block{i + 1}", nn.Sequential(*blocks)))
    stages.append(("head", nn.Sequential(GlobalAvgPool(), nn.Linear(c_in, num_classes))))
    return Backbone(stages, in_channels, num_classes)


@register_backbone("resnet20")
def resnet20(
    *, in_channels: int = 3, num_classes: int = 10, width: int = 16, kernel_size: int = 3, shortcut: str = "B"
) -> Backbone:
    """ResNet-20 for CIFAR (3 blocks per stage)."""
    return _cifar_resnet(
        20, in_channels=in_channels, num_classes=num_classes, width=width, kernel_size=kernel_size, shortcut=shortcut
    )


@register_backbone("resnet32")
def resnet32(
    *, in_channels: int = 3, num_classes: int = 10, width: int = 16, kernel_size: int = 3, shortcut: str = "B"
) -> Backbone:
    """ResNet-32 for CIFAR (5 blocks per stage)."""
    return _cifar_resnet(
        32, in_channels=in_channels, num_classes=num_classes, width=width, kernel_size=kernel_size, shortcut=shortcut
    )


@register_backbone("resnet56")
def resnet56(
    *, in_channels: int = 3, num_classes: int = 10, width: int = 16, kernel_size: int = 3, shortcut: str = "B"
) -> Backbone:
    """ResNet-56 for CIFAR (9 blocks per stage)."""
    return _cifar_resnet(
        56, in_channels=in_channels, num_classes=num_classes, width=width, kernel_size=kernel_size, shortcut=shortcut
    )


@register_backbone("resnet110")
def resnet110(
    *, in_channels: int = 3, num_classes: int = 10, width: int = 16, kernel_size: int = 3, shortcut: str = "B"
) -> Backbone:
    """ResNet-110 for CIFAR (18 blocks per stage)."""
    return _cifar_resnet(
        110, in_channels=in_channels, num_classes=num_classes, width=width, kernel_size=kernel_size, shortcut=shortcut
    )
