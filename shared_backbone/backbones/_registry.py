"""A tiny registry: ``build_backbone(name, **cfg)`` and ``list_backbones()``."""
from __future__ import annotations

import inspect
import itertools
from typing import Callable

import torch

from ..schema import LIMITS
from ._base import Backbone

__all__ = ["register_backbone", "build_backbone", "list_backbones", "backbone_config", "estimate_parameters"]

_BUILDERS: dict[str, Callable[..., Backbone]] = {}


def register_backbone(name: str) -> Callable[[Callable[..., Backbone]], Callable[..., Backbone]]:
    """Register ``fn`` as the builder of ``name``; refuses duplicate names."""

    def wrap(fn: Callable[..., Backbone]) -> Callable[..., Backbone]:
        if name in _BUILDERS:
            raise ValueError(f"backbone {name!r} is already registered")
        _BUILDERS[name] = fn
        return fn

    return wrap


def list_backbones() -> list[str]:
    """Names accepted by :func:`build_backbone`, sorted."""
    return sorted(_BUILDERS)


def backbone_config(name: str) -> dict:
    """The default configuration of ``name`` (keyword -> default)."""
    fn = _get(name)
    return {
        k: p.default
        for k, p in inspect.signature(fn).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def _get(name: str) -> Callable[..., Backbone]:
    if name not in _BUILDERS:
        raise ValueError(f"unknown backbone {name!r}; available: {', '.join(list_backbones())}")
    return _BUILDERS[name]


def build_backbone(name: str, **cfg) -> Backbone:
    """Build the registered backbone ``name`` with ``cfg`` overriding its defaults.

    The returned module remembers ``name`` and the full config (``.arch``, ``.config``) so a
    :class:`~shared_backbone.FrozenBackbone` can record the recipe that rebuilds it.
    """
    fn = _get(name)
    accepted = backbone_config(name)
    unknown = sorted(set(cfg) - set(accepted))
    if unknown:
        raise ValueError(
            f"backbone {name!r} does not take {', '.join(map(repr, unknown))}; "
            f"accepted options: {', '.join(f'{k}={v!r}' for k, v in accepted.items())}"
        )
    full = {**accepted, **cfg}
    _check_size(name, full)
    model = fn(**full)
    model.arch = name
    model.config = full
    return model


def _bound_options(name: str, cfg: dict) -> None:
    for key, v in cfg.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        hi = LIMITS.max_classes if key == "num_classes" else LIMITS.max_depth if key == "depth" else \
            LIMITS.max_int_option
        if not v <= hi:
            raise ValueError(f"backbone {name!r}: {key}={v!r} is beyond the limit {hi:,} "
                             f"(shared_backbone.schema.LIMITS; raise it to build such a model on purpose)")


def estimate_parameters(name: str, **cfg) -> int:
    """Parameters and buffers of ``build_backbone(name, **cfg)``, counted on the ``meta`` device (no memory)."""
    fn = _get(name)
    full = {**backbone_config(name), **cfg}
    _bound_options(name, full)
    with torch.device("meta"):
        model = fn(**full)
    seen, total = set(), 0
    for t in itertools.chain(model.parameters(), model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel()
    return total


def _check_size(name: str, cfg: dict) -> None:
    """Refuse a model whose estimated size is past ``LIMITS.max_parameters``, before allocating it."""
    _bound_options(name, cfg)
    if torch.get_default_device().type == "meta":
        return
    n = estimate_parameters(name, **cfg)
    if n > LIMITS.max_parameters:
        raise ValueError(f"backbone {name!r} with {cfg} would hold about {n:,} parameters, past the limit "
                         f"{LIMITS.max_parameters:,}; set shared_backbone.schema.LIMITS.max_parameters higher "
                         "to build it on purpose")
