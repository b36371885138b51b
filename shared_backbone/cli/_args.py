"""Flags every job shares, generated from one place each.

* Training flags come from :class:`~shared_backbone.train.TrainConfig`'s fields, their types,
  defaults and ``metadata["help"]``: ``--batch-size``, ``--lr``, ``--augment/--no-augment``, ...
  A job may change a default (``defaults={"epochs": 3}``); the flag, its type and help stay the field's.
* Backbone flags come from the registry: ``--backbone NAME``, ``--width`` and repeatable
  ``--backbone-opt KEY=VALUE``, checked against what :func:`~shared_backbone.backbones.backbone_config`
  says the chosen backbone takes. An option it does not take is an error naming the accepted ones.
"""
from __future__ import annotations

import argparse
import ast
import os
import typing
from dataclasses import MISSING, fields

import torch

from ..backbones import backbone_config, list_backbones
from ..train import TrainConfig

__all__ = ["add_train_config", "train_config", "add_backbone", "backbone_options", "add_runtime", "flag"]

FROM_TASK = ("in_channels", "num_classes")  # set from the task card, never by a flag


def flag(name: str) -> str:
    """``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def _field_type(tp) -> tuple[type, bool]:
    """``(int, False)`` for ``int``, ``(int, True)`` for ``int | None``."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if args and len(args) < len(typing.get_args(tp)):
        return args[0], True
    return tp, False


def add_train_config(ap: argparse.ArgumentParser, *, defaults: dict | None = None,
                     aliases: dict[str, tuple[str, ...]] | None = None) -> argparse._ArgumentGroup:
    """Add one flag per :class:`TrainConfig` field; ``defaults`` overrides some fields' defaults for this job."""
    defaults, aliases = dict(defaults or {}), dict(aliases or {})
    hints = typing.get_type_hints(TrainConfig)
    names = [f.name for f in fields(TrainConfig)]
    unknown = sorted(set(defaults) - set(names)) + sorted(set(aliases) - set(names))
    if unknown:
        raise ValueError(f"not TrainConfig fields: {unknown}; fields: {names}")
    group = ap.add_argument_group("training (TrainConfig)")
    for f in fields(TrainConfig):
        default = defaults.get(f.name, f.default if f.default is not MISSING else None)
        tp, optional = _field_type(hints[f.name])
        help_ = f.metadata.get("help", "")
        opts = [flag(f.name), *aliases.get(f.name, ())]
        if tp is bool:
            group.add_argument(*opts, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                               help=f"{help_} (default: {'on' if default else 'off'})")
        else:
            shown = f.metadata.get("unset", "off") if optional and default is None else "%(default)s"
            group.add_argument(*opts, dest=f.name, type=tp, default=default, metavar=f.name.upper(),
                               help=f"{help_} (default: {shown})")
    return group


def train_config(ap: argparse.ArgumentParser, args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` the flags describe; a value it refuses is a usage error naming the flag."""
    try:
        return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    except (TypeError, ValueError) as err:
        ap.error(f"bad training flag: {err}")


def add_backbone(ap: argparse.ArgumentParser, default: str = "resnet20", *,
                 choices: list[str] | None = None) -> argparse._ArgumentGroup:
    """``--backbone``, ``--width`` and ``--backbone-opt KEY=VALUE`` (repeatable)."""
    group = ap.add_argument_group("backbone (options from the registry: `shared-backbone backbones` lists them)")
    names = choices or list_backbones()
    group.add_argument("--backbone", default=default, choices=names, metavar="NAME",
                       help=f"a registered backbone (default: %(default)s); one of: {', '.join(names)}")
    group.add_argument("--width", type=int, default=None,
                       help="the backbone's width, for the backbones that take one (default: the backbone's own)")
    group.add_argument("--backbone-opt", action="append", default=[], metavar="KEY=VALUE",
                       help="any option of the backbone's builder, e.g. kernel_size=5 (repeatable)")
    return group


def _parse_value(name: str, key: str, text: str, default):
    """``text`` read as the type of the registry default of ``key``."""
    try:
        if isinstance(default, bool):
            low = text.strip().lower()
            if low not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise ValueError(text)
            return low in ("true", "1", "yes", "on")
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        if isinstance(default, str):
            return text
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        kind = type(default).__name__ if default is not None else "a Python literal"
        raise ValueError(f"backbone {name!r} option {key}={text!r}: expected {kind} "
                         f"(its default is {default!r})") from None


def backbone_options(args: argparse.Namespace, *, name: str | None = None) -> dict:
    """The options ``--width`` and ``--backbone-opt`` give, typed and checked against the backbone's builder.

    Raises ``ValueError`` naming the accepted options for one the backbone does not take.
    """
    name = name or args.backbone
    accepted = {k: v for k, v in backbone_config(name).items() if k not in FROM_TASK}
    listing = ", ".join(f"{k}={v!r}" for k, v in accepted.items()) or "none"
    given: dict[str, str] = {}
    if getattr(args, "width", None) is not None:
        given["width"] = str(args.width)
    for item in getattr(args, "backbone_opt", None) or []:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ValueError(f"--backbone-opt takes KEY=VALUE, got {item!r}; backbone {name!r} takes: {listing}")
        if key in given:
            raise ValueError(f"backbone option {key!r} is given twice (--width and --backbone-opt, or a repeat)")
        given[key] = value
    opts = {}
    for key, value in given.items():
        if key in FROM_TASK:
            raise ValueError(f"backbone option {key!r} comes from the task card; backbone {name!r} takes: {listing}")
        if key not in accepted:
            what = "--width" if key == "width" and getattr(args, "width", None) is not None else repr(key)
            raise ValueError(f"backbone {name!r} does not take {what}; accepted options: {listing}")
        opts[key] = _parse_value(name, key, value, accepted[key])
    return opts


def add_runtime(ap: argparse.ArgumentParser) -> None:
    """``--threads`` and ``--no-progress``."""
    ap.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 4), help="torch CPU threads")
    ap.add_argument("--no-progress", action="store_true",
                    help="no progress bars (they also turn themselves off when the output is not a terminal)")


def parse_job(ap: argparse.ArgumentParser, argv=None) -> tuple[argparse.Namespace, TrainConfig, dict]:
    """Parse a job's flags: ``(args, TrainConfig, backbone options)``, torch threads set.

    For jobs that declare :func:`add_runtime`, :func:`add_backbone` and :func:`add_train_config`;
    a bad training value or backbone option is a usage error naming it.
    """
    args = ap.parse_args(argv)
    config = train_config(ap, args)
    try:
        backbone_cfg = backbone_options(args)
    except ValueError as err:
        ap.error(str(err))
    torch.set_num_threads(args.threads)
    return args, config, backbone_cfg
