"""The common shape of every backbone: an ordered list of named stages."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["Backbone", "GlobalAvgPool", "check_positive", "check_kernel_size"]


class Backbone(nn.Module):
    """A classifier built from ordered, named stages (``stem``, ``block1`` .. ``blockN``, ``head``).

    The stage boundaries tell the library where ensemble members start to differ: stages that
    no member owns run once, unbatched.

    Shape:
        input ``(N, in_channels, H, W)`` -> logits ``(N, num_classes)``.
    """

    def __init__(self, stages: list[tuple[str, nn.Module]], in_channels: int, num_classes: int):
        super().__init__()
        names = [n for n, _ in stages]
        if names[0] != "stem" or names[-1] != "head":
            raise ValueError(f"stages must run from 'stem' to 'head', got {names}")
        self.stages = nn.ModuleDict(stages)
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.arch = type(self).__name__.lower()
        self.config: dict = {}

    @property
    def stage_names(self) -> list[str]:
        return list(self.stages.keys())

    def check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{self.arch} expects input of shape (N, {self.in_channels}, H, W), "
                f"got {tuple(x.shape)}; set in_channels={x.shape[1] if x.dim() == 4 else '?'} "
                "when building the backbone or convert the data"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, classes)
        self.check_input(x)
        for stage in self.stages.values():
            x = stage(x)
        return x


def check_positive(**values: int) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")


def check_kernel_size(kernel_size: int, allowed: tuple[int, ...] = (1, 3, 5, 7, 9, 11)) -> None:
    if kernel_size not in allowed:
        raise ValueError(f"kernel_size must be an odd size in {allowed}, got {kernel_size!r}")


class GlobalAvgPool(nn.Module):
    """Mean over the spatial dims (``AdaptiveAvgPool2d(1)`` + ``Flatten``, with a vmap batching rule).

    Shape: ``(N, C, H, W) -> (N, C)``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(-2, -1))
