"""The frozen state: every tensor that ensemble members and tasks share.

A :class:`FrozenBackbone` is regenerated exactly from a small config (architecture, builder
options, seed, init scheme) or taken from a (partially) trained checkpoint. Its fingerprint, a hash of
the frozen tensors, travels with every saved slice so a slice never lands on the wrong backbone.
"""
from __future__ import annotations

import copy
import hashlib
import warnings
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from ._norms import is_batch_norm
from ._version import __version__
from .backbones import Backbone, build_backbone
from .io import load_tensors
from .schema import FORMAT_VERSION, BackboneConfig

__all__ = ["FrozenBackbone", "INIT_SCHEMES", "init_module", "fingerprint_tensors", "FingerprintMismatch"]


class FingerprintMismatch(ValueError):
    """A slice, adapter or checkpoint was made for a different frozen backbone."""


def _init_default(m: nn.Module) -> None:
    if hasattr(m, "reset_parameters"):
        m.reset_parameters()


def _scheme(weight_fn: Callable[[torch.Tensor], None]) -> Callable[[nn.Module], None]:
    def init(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            weight_fn(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif is_batch_norm(m) or getattr(m, "keeps_own_init", False):
            m.reset_parameters()  # BN, and tensors with an init of their own (the LC paper's shared W_s)

    return init


INIT_SCHEMES: dict[str, Callable[[nn.Module], None]] = {
    # PyTorch's per-layer default: U[-a, a], a = 1/sqrt(fan_in) (the LC paper's init)
    "default": _init_default,
    "kaiming_uniform": _scheme(lambda w: nn.init.kaiming_uniform_(w, mode="fan_in", nonlinearity="relu")),
    "kaiming_normal": _scheme(lambda w: nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu")),
    "xavier_uniform": _scheme(nn.init.xavier_uniform_),
    "xavier_normal": _scheme(nn.init.xavier_normal_),
    "orthogonal": _scheme(nn.init.orthogonal_),
}


def init_module(module: nn.Module, init: str, seed: int) -> nn.Module:
    """Re-initialise every layer of ``module`` in place, deterministically from ``seed``."""
    if init not in INIT_SCHEMES:
        raise ValueError(f"unknown init {init!r}; available: {', '.join(INIT_SCHEMES)}")
    fn = INIT_SCHEMES[init]
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for m in module.modules():
            fn(m)
    return module


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def fingerprint_tensors(tensors: Mapping[str, torch.Tensor]) -> str:
    """A short sha256 over names, dtypes, shapes and bytes of ``tensors``."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()[:16]


class FrozenBackbone:
    """A backbone whose every tensor is frozen and shared.

    Args:
        backbone: a module from :func:`~shared_backbone.build_backbone`.
        seed: the seed its tensors are regenerated from.
        init: one of :data:`INIT_SCHEMES` (``"default"`` is PyTorch's layer default, the papers').

    The module is re-initialised in place; its parameters stop requiring gradients.
    """

    def __init__(self, backbone: Backbone, seed: int = 0, init: str = "default", *, _source: str = "random"):
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be an nn.Module, got {type(backbone).__name__}")
        if not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.backbone = backbone
        self.seed = seed
        self.init = init
        self.source = _source
        if _source == "random":
            init_module(backbone, init, seed)
        for p in backbone.parameters():
            p.requires_grad_(False)
        self.fingerprint = fingerprint_tensors(self.tensors())

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, backbone: Backbone, checkpoint: str | Path | Mapping[str, torch.Tensor]) -> "FrozenBackbone":
        """Freeze ``backbone`` at the weights of a (partially) trained checkpoint.

        ``checkpoint`` is a state dict or a ``.safetensors`` / ``.pt`` file of one.
        """
        state = checkpoint
        if isinstance(checkpoint, (str, Path)):
            state, _ = load_tensors(checkpoint)
        own = {**dict(backbone.named_parameters()), **dict(backbone.named_buffers())}
        for n, t in dict(state).items():
            if n in own and (tuple(t.shape) != tuple(own[n].shape) or t.dtype != own[n].dtype):
                raise ValueError(f"checkpoint tensor {n!r} is {t.dtype} {tuple(t.shape)}, but "
                                 f"{getattr(backbone, 'arch', 'the backbone')} has {own[n].dtype} "
                                 f"{tuple(own[n].shape)} (no silent casts)")
        missing, unexpected = backbone.load_state_dict(dict(state), strict=False)
        if missing or unexpected:
            raise ValueError(
                f"checkpoint does not fit {getattr(backbone, 'arch', 'the backbone')}: "
                f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
            )
        return cls(backbone, seed=-1, init="checkpoint", _source="checkpoint")

    @classmethod
    def from_module(cls, module: Backbone) -> "FrozenBackbone":
        """Freeze a (partially) trained module as it is (a deep copy of it)."""
        return cls(copy.deepcopy(module), seed=-1, init="checkpoint", _source="checkpoint")

    @classmethod
    def from_config(cls, config: Mapping, tensors: Mapping[str, torch.Tensor] | None = None) -> "FrozenBackbone":
        """Rebuild from :attr:`config` (what ``backbone.json`` holds); checkpoint-based backbones also need
        their ``tensors``.

        The config is checked against :class:`~shared_backbone.schema.BackboneConfig` (types, bounds) and
        the model's estimated size against ``LIMITS.max_parameters`` before anything is built.
        """
        c = BackboneConfig.from_dict(config, "the backbone config")
        try:
            bb = build_backbone(c.arch, **c.config)
        except TypeError as err:
            raise ValueError(f"the backbone config does not build {c.arch!r}: {err}") from None
        if c.source == "random":
            frozen = cls(bb, seed=c.seed, init=c.init)
        else:
            if tensors is None:
                raise ValueError(
                    "this backbone was frozen from a checkpoint and cannot be regenerated from its "
                    "config; load it with its saved tensors (backbone.safetensors)"
                )
            frozen = cls.from_checkpoint(bb, tensors)
        frozen.check_fingerprint(c.fingerprint, what="the backbone config")
        return frozen

    @classmethod
    def from_recipe(cls, recipe: Mapping, tensors: Mapping[str, torch.Tensor] | None = None) -> "FrozenBackbone":
        """Deprecated alias of :meth:`from_config` (the backbone's config used to be called its recipe)."""
        warnings.warn("FrozenBackbone.from_recipe is deprecated; use FrozenBackbone.from_config",
                      DeprecationWarning, stacklevel=2)
        return cls.from_config(recipe, tensors)

    # -- views ----------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """Every frozen tensor (parameters and buffers) by its name in the backbone."""
        out = {n: p.detach() for n, p in self.backbone.named_parameters()}
        out.update({n: b for n, b in self.backbone.named_buffers()})
        return out

    @property
    def regenerable(self) -> bool:
        return self.source == "random"

    @property
    def config(self) -> dict:
        """Everything that rebuilds this backbone (:meth:`from_config`): architecture, builder options,
        seed, init scheme, source, fingerprint. Saved as ``backbone.json`` and as the ``backbone`` field
        of every member, adapter and bank file."""
        return {
            "format_version": FORMAT_VERSION,
            "arch": getattr(self.backbone, "arch", type(self.backbone).__name__),
            "config": dict(getattr(self.backbone, "config", {})),  # the builder's options
            "seed": self.seed,
            "init": self.init,
            "source": self.source,
            "fingerprint": self.fingerprint,
            "library_version": __version__,
        }

    @property
    def recipe(self) -> dict:
        """Deprecated, read-only alias of :attr:`config`."""
        warnings.warn("FrozenBackbone.recipe is deprecated; use FrozenBackbone.config", DeprecationWarning,
                      stacklevel=2)
        return self.config

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.backbone.parameters())

    def check_fingerprint(self, expected: str, what: str = "this file") -> None:
        if expected != self.fingerprint:
            raise FingerprintMismatch(
                f"{what} was made for backbone fingerprint {expected!r}, but this backbone has "
                f"{self.fingerprint!r} ({self.config['arch']}, seed={self.seed}, init={self.init}); "
                "load it onto the backbone it was trained on"
            )

    def __repr__(self) -> str:
        return (
            f"FrozenBackbone({self.config['arch']}, seed={self.seed}, init={self.init!r}, "
            f"params={self.num_parameters():,}, fingerprint={self.fingerprint})"
        )


