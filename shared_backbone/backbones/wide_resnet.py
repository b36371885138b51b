"""Wide ResNets for CIFAR (Zagoruyko & Komodakis, 2016): pre-activation blocks, widths 16k, 32k, 64k.

Layout of the authors' PyTorch reference: a 3×3 stem conv to 16 channels, ``(d - 4) / 6`` blocks per
group, a 1×1 conv shortcut where the shape changes, and BN + ReLU + global pooling + Linear as head.
All convs are bias-free.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ._base import Backbone, GlobalAvgPool, check_kernel_size, check_positive
from ._registry import register_backbone

__all__ = ["WideBasicBlock", "wrn16_4", "wrn28"]

NormLayer = Callable[[int], nn.Module]


class WideBasicBlock(nn.Module):
    """Pre-activation block: ``conv2(drop(relu(bn2(conv1(relu(bn1(x))))))) + shortcut(x)``.

    Where the shape changes the 1×1 shortcut sees the pre-activated input, as in the reference code.

    Shape:
        ``(N, c_in, H, W)`` -> ``(N, c_out, H / stride, W / stride)``.
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        stride: int = 1,
        kernel_size: int = 3,
        dropout: float = 0.0,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ):
        super().__init__()
        pad = kernel_size // 2
        self.bn1 = norm_layer(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=pad, bias=False)
        self.bn2 = norm_layer(c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, kernel_size, padding=pad, bias=False)
        self.equal_shape = stride == 1 and c_in == c_out
        self.shortcut = nn.Identity() if self.equal_shape else nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        out = self.conv1(act)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        return out + self.shortcut(x if self.equal_shape else act)


def _wide_resnet(
    depth: int,
    *,
    in_channels: int,
    num_classes: int,
    widen_factor: int,
    kernel_size: int,
    dropout: float,
    norm_layer: NormLayer = nn.BatchNorm2d,
) -> Backbone:
    """Build WRN-``depth``-``widen_factor`` with stages ``stem, block1..3, head``."""
    if not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
        raise ValueError(f"Wide-ResNet depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth!r}")
    check_positive(in_channels=in_channels, num_classes=num_classes, widen_factor=widen_factor)
    check_kernel_size(kernel_size)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
    n = (depth - 4) // 6
    pad = kernel_size // 2

    stages: list[tuple[str, nn.Module]] = [
        ("stem", nn.Conv2d(in_channels, 16, kernel_size, padding=pad, bias=False))
    ]
    c_in = 16
    for i, c_out in enumerate((16 * widen_factor, 32 * widen_factor, 64 * widen_factor)):
        blocks = []
        for j in range(n):
            stride = 2 if (i > 0 and j == 0) else 1
            blocks.append(WideBasicBlock(c_in, c_out, stride, kernel_size, dropout, norm_layer))
            c_in = c_out
        stages.append((f"block{i + 1}", nn.Sequential(*blocks)))
    head = nn.Sequential(
        norm_layer(c_in), nn.ReLU(inplace=True), GlobalAvgPool(), nn.Linear(c_in, num_classes)
    )
    stages.append(("head", head))
    return Backbone(stages, in_channels, num_classes)


@register_backbone("wrn16_4")
def wrn16_4(
    *, in_channels: int = 3, num_classes: int = 10, widen_factor: int = 4, kernel_size: int = 3, dropout: float = 0.0
) -> Backbone:
    """WRN-16-4 (2 blocks per group)."""
    return _wide_resnet(
        16, in_channels=in_channels, num_classes=num_classes, widen_factor=widen_factor,
        kernel_size=kernel_size, dropout=dropout,
    )


@register_backbone("wrn28")
def wrn28(
    *, in_channels: int = 3, num_classes: int = 10, widen_factor: int = 10, kernel_size: int = 3, dropout: float = 0.0
) -> Backbone:
    """WRN-28-k (4 blocks per group); WRN-28-10 by default, ``widen_factor=4`` gives WRN-28-4."""
    return _wide_resnet(
        28, in_channels=in_channels, num_classes=num_classes, widen_factor=widen_factor,
        kernel_size=kernel_size, dropout=dropout,
    )
