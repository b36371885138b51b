"""torchvision's ResNets and MobileNetV2, randomly initialised, regrouped into named stages.

The torchvision modules themselves are kept (never re-implemented); only the stem is rebuilt when
``in_channels`` differs from 3 or ``small_input=True`` (a 3×3 stride-1 stem without max pool for 32 px
inputs). Nothing is ever downloaded: every model is built with ``weights=None``.
"""
from __future__ import annotations

from typing import Callable

import torchvision
from torch import nn

from ._base import Backbone, GlobalAvgPool, check_positive
from ._registry import register_backbone

__all__ = ["resnet18", "resnet50", "wide_resnet50_2", "mobilenet_v2"]

# the ``n`` column (blocks per group) of torchvision's MobileNetV2 inverted-residual table (t, c, n, s)
_MOBILENET_V2_GROUPS = (1, 2, 3, 4, 3, 3, 1)


def _new_stem_conv(old: nn.Conv2d, in_channels: int, small_input: bool) -> nn.Conv2d:
    """A copy of ``old``'s geometry with ``in_channels`` inputs (3×3, stride 1 for small inputs)."""
    if small_input:
        conv = nn.Conv2d(in_channels, old.out_channels, 3, stride=1, padding=1, bias=False)
    else:
        conv = nn.Conv2d(
            in_channels, old.out_channels, old.kernel_size,
            stride=old.stride, padding=old.padding, bias=old.bias is not None,
        )
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")  # torchvision's init for convs
    return conv


def _torchvision_resnet(
    factory: Callable[..., torchvision.models.ResNet], *, in_channels: int, num_classes: int, small_input: bool
) -> Backbone:
    """Wrap a torchvision ResNet: stem = conv1, bn1, relu, maxpool; block1..4 = layer1..4; head = pool + fc."""
    check_positive(in_channels=in_channels, num_classes=num_classes)
    net = factory(weights=None, num_classes=num_classes)
    conv1 = net.conv1
    if small_input or in_channels != 3:
        conv1 = _new_stem_conv(net.conv1, in_channels, small_input)
    stem = [conv1, net.bn1, net.relu] + ([] if small_input else [net.maxpool])
    stages: list[tuple[str, nn.Module]] = [
        ("stem", nn.Sequential(*stem)),
        ("block1", net.layer1),
        ("block2", net.layer2),
        ("block3", net.layer3),
        ("block4", net.layer4),
        ("head", nn.Sequential(GlobalAvgPool(), net.fc)),
    ]
    return Backbone(stages, in_channels, num_classes)


@register_backbone("resnet18")
def resnet18(*, in_channels: int = 3, num_classes: int = 1000, small_input: bool = False) -> Backbone:
    """torchvision ResNet-18."""
    return _torchvision_resnet(
        torchvision.models.resnet18, in_channels=in_channels, num_classes=num_classes, small_input=small_input
    )


@register_backbone("resnet50")
def resnet50(*, in_channels: int = 3, num_classes: int = 1000, small_input: bool = False) -> Backbone:
    """torchvision ResNet-50."""
    return _torchvision_resnet(
        torchvision.models.resnet50, in_channels=in_channels, num_classes=num_classes, small_input=small_input
    )


@register_backbone("wide_resnet50_2")
def wide_resnet50_2(*, in_channels: int = 3, num_classes: int = 1000, small_input: bool = False) -> Backbone:
    """torchvision Wide ResNet-50-2."""
    return _torchvision_resnet(
        torchvision.models.wide_resnet50_2, in_channels=in_channels, num_classes=num_classes, small_input=small_input
    )


@register_backbone("mobilenet_v2")
def mobilenet_v2(
    *, in_channels: int = 3, num_classes: int = 1000, small_input: bool = False, width_mult: float = 1.0
) -> Backbone:
    """torchvision MobileNetV2: stem = features[0]; block1..7 = the inverted-residual groups;
    head = final 1×1 conv + pool + classifier."""
    check_positive(in_channels=in_channels, num_classes=num_classes)
    if not width_mult > 0:
        raise ValueError(f"width_mult must be a positive float, got {width_mult!r}")
    net = torchvision.models.mobilenet_v2(weights=None, num_classes=num_classes, width_mult=width_mult)
    features = list(net.features)
    stem = features[0]  # Conv2dNormActivation: conv, bn, relu6
    if in_channels != 3:
        stem[0] = _new_stem_conv(stem[0], in_channels, small_input=False)
    if small_input:
        stem[0].stride = (1, 1)
    blocks, last = features[1:-1], features[-1]
    assert len(blocks) == sum(_MOBILENET_V2_GROUPS), "torchvision's MobileNetV2 table changed"
    stages: list[tuple[str, nn.Module]] = [("stem", stem)]
    start = 0
    for i, n in enumerate(_MOBILENET_V2_GROUPS):
        stages.append((f"block{i + 1}", nn.Sequential(*blocks[start : start + n])))
        start += n
    stages.append(("head", nn.Sequential(last, GlobalAvgPool(), net.classifier)))
    return Backbone(stages, in_channels, num_classes)
