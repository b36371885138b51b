"""Loss terms that training adds to the data loss: callables ``model -> scalar``, summed over members.

``fit(..., regularizers=[...])`` adds any such term; :func:`from_config` builds the ones a
:class:`~shared_backbone.train.TrainConfig` asks for (the LC paper's L1 on 1x1 weights), so the
training loop itself knows no paper.
"""
from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Callable

import torch

from .lc_sparsity import l1_penalty, pointwise_weights

if TYPE_CHECKING:  # for annotations only: train imports this module
    from .train import TrainConfig

__all__ = ["Regularizer", "l1_pointwise", "from_config"]

Regularizer = Callable[[torch.nn.Module], torch.Tensor]


def l1_pointwise(lam: float) -> Regularizer:
    """The LC paper's Eq. 5: ``lam * sum |w|`` over every learned 1x1 conv weight, each member its own."""
    return partial(l1_penalty, lam=lam)


def from_config(cfg: "TrainConfig", model: torch.nn.Module) -> list[Regularizer]:
    """The regularisers ``cfg`` asks for, checked against ``model`` (the stack or the process's members)."""
    if not cfg.l1_pointwise:
        return []
    if not pointwise_weights(model):
        raise ValueError(f"l1_pointwise={cfg.l1_pointwise} but the slice learns no 1x1 conv weight; "
                         "learn Pointwise() (or set l1_pointwise=0)")
    return [l1_pointwise(cfg.l1_pointwise)]
