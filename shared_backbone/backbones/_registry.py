"""A tiny registry: ``build_backbone(name, **cfg)`` and ``list_backbones()``."""
from __future__ import annotations

import inspect
from typing import Callable

from ._base import Backbone

__all__ = ["register_backbone", "build_backbone", "list_backbones", "backbone_config"]

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
    model = fn(**full)
    model.arch = name
    model.config = full
    return model
