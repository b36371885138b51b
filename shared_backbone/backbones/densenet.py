"""DenseNet-BC for CIFAR (Huang et al., 2017): bottleneck layers and compressing transitions.

Three dense blocks of ``(depth - 4) / 6`` bottleneck layers each; stage ``block1`` is dense block 1
followed by transition 1, ``block2`` likewise, ``block3`` the last dense block alone.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from ._base import Backbone, GlobalAvgPool, check_positive
from ._registry import register_backbone

__all__ = ["Bottleneck", "DenseBlock", "Transition", "densenet_bc100"]

NormLayer = Callable[[int], nn.Module]


class Bottleneck(nn.Module):
    """``cat(x, conv3x3(relu(bn(conv1x1(relu(bn(x)))))))``: adds ``growth_rate`` channels.

    Shape:
        ``(N, c_in, H, W)`` -> ``(N, c_in + growth_rate, H, W)``.
    """

    def __init__(self, c_in: int, growth_rate: int, norm_layer: NormLayer = nn.BatchNorm2d):
        super().__init__()
        inner = 4 * growth_rate
        self.layers = nn.Sequential(
            norm_layer(c_in),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_in, inner, 1, bias=False),
            norm_layer(inner),
            nn.ReLU(inplace=True),
            nn.Conv2d(inner, growth_rate, 3, padding=1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.layers(x)], dim=1)


class DenseBlock(nn.Sequential):
    """``num_layers`` bottlenecks in a row; output has ``c_in + num_layers * growth_rate`` channels."""

    def __init__(self, c_in: int, num_layers: int, growth_rate: int, norm_layer: NormLayer = nn.BatchNorm2d):
        super().__init__(*(Bottleneck(c_in + i * growth_rate, growth_rate, norm_layer) for i in range(num_layers)))
        self.out_channels = c_in + num_layers * growth_rate


class Transition(nn.Sequential):
    """BN, ReLU, 1×1 conv to ``c_out``, 2×2 average pool.

    Shape:
        ``(N, c_in, H, W)`` -> ``(N, c_out, H / 2, W / 2)``.
    """

    def __init__(self, c_in: int, c_out: int, norm_layer: NormLayer = nn.BatchNorm2d):
        super().__init__(
            norm_layer(c_in), nn.ReLU(inplace=True), nn.Conv2d(c_in, c_out, 1, bias=False), nn.AvgPool2d(2)
        )


def _densenet_bc(
    *,
    depth: int,
    in_channels: int,
    num_classes: int,
    growth_rate: int,
    compression: float,
    norm_layer: NormLayer = nn.BatchNorm2d,
) -> Backbone:
    """Build DenseNet-BC-``depth`` with stages ``stem, block1..3, head``."""
    if not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
        raise ValueError(f"DenseNet-BC depth must be 6n+4 with n >= 1 (40, 100, 190, ...), got {depth!r}")
    check_positive(in_channels=in_channels, num_classes=num_classes, growth_rate=growth_rate)
    if not 0.0 < compression <= 1.0:
        raise ValueError(f"compression must be in (0, 1], got {compression!r}")
    n = (depth - 4) // 6

    c = 2 * growth_rate
    stages: list[tuple[str, nn.Module]] = [("stem", nn.Conv2d(in_channels, c, 3, padding=1, bias=False))]
    for i in range(3):
        dense = DenseBlock(c, n, growth_rate, norm_layer)
        c = dense.out_channels
        if i < 2:
            c_out = max(1, math.floor(c * compression))
            stages.append((f"block{i + 1}", nn.Sequential(dense, Transition(c, c_out, norm_layer))))
            c = c_out
        else:
            stages.append((f"block{i + 1}", dense))
    head = nn.Sequential(
        norm_layer(c), nn.ReLU(inplace=True), GlobalAvgPool(), nn.Linear(c, num_classes)
    )
    stages.append(("head", head))
    return Backbone(stages, in_channels, num_classes)


@register_backbone("densenet_bc100")
def densenet_bc100(
    *, in_channels: int = 3, num_classes: int = 10, growth_rate: int = 12, depth: int = 100, compression: float = 0.5
) -> Backbone:
    """DenseNet-BC (L=100, k=12) by default."""
    return _densenet_bc(
        depth=depth, in_channels=in_channels, num_classes=num_classes, growth_rate=growth_rate, compression=compression
    )
