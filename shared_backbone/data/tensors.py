"""In-memory data: ``TensorData`` (normalised images and labels as tensors) and batched augmentation.

Augmentation runs on whole batches of tensors, never per item.
"""
from __future__ import annotations

import os
from typing import Iterator, Sequence

import torch
from torch import Tensor

from . import sources
from .cards import TaskCard
from .sources import Source

__all__ = ["TensorData", "random_crop", "random_hflip", "augment_batch"]


# --------------------------------------------------------------------------- batched augmentation
def _draw_device(generator: torch.Generator | None, x: Tensor) -> torch.device:
    return generator.device if generator is not None else x.device


def random_crop(x: Tensor, padding: int, generator: torch.Generator | None = None,
                fill: float | Sequence[float] | Tensor = 0.0, offsets: Tensor | None = None) -> Tensor:
    """Random crop of every image after padding each side with ``fill`` (one value or one per channel).

    ``offsets`` ``(B, 2)`` holds each crop's top-left (row, col) in the padded image, in ``[0, 2·padding]``;
    drawn from ``generator`` when not given. Output pixel ``(i, j)`` is padded pixel ``(i + dy, j + dx)``.
    Shape: ``(B, C, H, W)`` → ``(B, C, H, W)``.
    """
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if padding == 0 and offsets is None:
        return x
    b, c, h, w = x.shape
    if offsets is None:
        offsets = torch.randint(0, 2 * padding + 1, (b, 2), generator=generator, device=_draw_device(generator, x))
    offsets = offsets.to(x.device)
    fill_t = torch.as_tensor(fill, dtype=x.dtype, device=x.device).reshape(-1, 1, 1)  # (1 or C, 1, 1)
    padded = fill_t.expand(b, c, h + 2 * padding, w + 2 * padding).clone()  # (B, C, H+2p, W+2p)
    padded[..., padding : padding + h, padding : padding + w] = x
    rows = offsets[:, 0, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = offsets[:, 1, None] + torch.arange(w, device=x.device)  # (B, W)
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


def random_hflip(x: Tensor, generator: torch.Generator | None = None, p: float = 0.5,
                 mask: Tensor | None = None) -> Tensor:
    """Flip each image left-right with probability ``p`` (or where the boolean ``mask`` is true).

    Shape: ``(B, C, H, W)`` → ``(B, C, H, W)``; ``mask`` ``(B,)``.
    """
    if mask is None:
        mask = torch.rand(x.shape[0], generator=generator, device=_draw_device(generator, x)) < p
    return torch.where(mask.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)


def augment_batch(x: Tensor, crop_padding: int = 0, hflip: bool = False, generator: torch.Generator | None = None,
                  fill: float | Sequence[float] | Tensor = 0.0) -> Tensor:
    """Random crop (zero-padded in pixel space via ``fill``) then random horizontal flip, for a whole batch.

    Shape: ``(B, C, H, W)`` → ``(B, C, H, W)``.
    """
    if crop_padding:
        x = random_crop(x, crop_padding, generator, fill)
    if hflip:
        x = random_hflip(x, generator)
    return x


# --------------------------------------------------------------------------- in-memory data
class TensorData:
    """Normalised images and labels held as tensors, with batched augmentation.

    Crops pad with black pixels (0 before normalisation, i.e. ``-mean/std`` after), like torchvision's
    ``RandomCrop(padding)`` applied before ``Normalize``.
    Shape: ``x`` float ``(N, C, H, W)``, ``y`` int64 ``(N,)``.
    """

    def __init__(self, x: Tensor, y: Tensor, mean: Sequence[float], std: Sequence[float],
                 crop_padding: int = 0, hflip: bool = False) -> None:
        if x.ndim != 4 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"need x (N, C, H, W) and y (N,) of equal N, got {tuple(x.shape)} and {tuple(y.shape)}")
        if not len(mean) == len(std) == x.shape[1]:
            raise ValueError(f"mean {list(mean)} / std {list(std)} need one value per channel (C={x.shape[1]})")
        if crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
        self.x, self.y = x, y
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.crop_padding, self.hflip = int(crop_padding), bool(hflip)

    @classmethod
    def from_uint8(cls, images: Tensor, labels: Tensor, mean: Sequence[float], std: Sequence[float],
                   crop_padding: int = 0, hflip: bool = False, dtype: torch.dtype = torch.float32) -> "TensorData":
        """Scale uint8 images to [0, 1] and normalise with per-channel ``mean``/``std``."""
        m = torch.tensor(mean, dtype=dtype, device=images.device).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=dtype, device=images.device).view(1, -1, 1, 1)
        x = (images.to(dtype) / 255.0 - m) / s
        return cls(x, labels.to(torch.int64), mean, std, crop_padding, hflip)

    @classmethod
    def from_card(cls, card: TaskCard, split: str, source: Source = "auto",
                  data_dir: str | os.PathLike[str] | None = None, device: torch.device | str | None = None,
                  dtype: torch.dtype = torch.float32) -> "TensorData":
        """Load a split of a task card (see :func:`~shared_backbone.data.load_arrays`), normalised with the
        card's mean/std."""
        images, labels = sources.load_arrays(card, split, source, data_dir)
        if device is not None:
            images, labels = images.to(device), labels.to(device)
        return cls.from_uint8(images, labels, card.mean, card.std, card.crop_padding, card.hflip, dtype)

    def __len__(self) -> int:
        return len(self.y)

    @property
    def fill(self) -> Tensor:
        """Normalised value of a black pixel, per channel. Shape: ``(C,)``."""
        return -torch.tensor(self.mean, dtype=self.x.dtype, device=self.x.device) / torch.tensor(
            self.std, dtype=self.x.dtype, device=self.x.device)

    def _like(self, x: Tensor, y: Tensor) -> "TensorData":
        return TensorData(x, y, self.mean, self.std, self.crop_padding, self.hflip)

    def batches(self, batch_size: int, shuffle: bool = True, generator: torch.Generator | None = None,
                augment: bool = False, drop_last: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield ``(x, y)`` batches; ``augment`` applies the random crop / flip to each batch at once.

        Shape: x ``(B, C, H, W)``, y ``(B,)``.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = len(self)
        if shuffle:
            dev = generator.device if generator is not None else torch.device("cpu")
            order = torch.randperm(n, generator=generator, device=dev).to(self.x.device)
        else:
            order = torch.arange(n, device=self.x.device)
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            idx = order[start : start + batch_size]
            x = self.x[idx]
            if augment:
                x = augment_batch(x, self.crop_padding, self.hflip, generator, self.fill)
            yield x, self.y[idx]

    def subset(self, n: int, seed: int = 0) -> "TensorData":
        """``n`` distinct samples chosen by a seeded permutation."""
        if not 0 < n <= len(self):
            raise ValueError(f"subset size must be in 1..{len(self)}, got {n}")
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n].to(self.x.device)
        return self._like(self.x[idx], self.y[idx])

    def bootstrap(self, generator: torch.Generator | None = None) -> "TensorData":
        """A same-size resample with replacement (one ensemble member's training set)."""
        dev = generator.device if generator is not None else torch.device("cpu")
        idx = torch.randint(0, len(self), (len(self),), generator=generator, device=dev).to(self.x.device)
        return self._like(self.x[idx], self.y[idx])

    def to(self, device: torch.device | str) -> "TensorData":
        """The same data on ``device``."""
        return self._like(self.x.to(device), self.y.to(device))

    def __repr__(self) -> str:
        return (f"TensorData(n={len(self)}, shape={tuple(self.x.shape[1:])}, device={self.x.device}, "
                f"crop_padding={self.crop_padding}, hflip={self.hflip})")
