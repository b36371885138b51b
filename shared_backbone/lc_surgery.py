"""LC-Blocks in whole models: freeze the spatial filters of any model, find the k×k convs a 1×1
follows (where LC-Blocks help), fold a model's LC-Blocks into plain convs.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ._norms import BATCH_NORMS

from .layers.lc_conv import SharedSpatial, lc_layers

__all__ = ["freeze_spatial", "followed_by_pointwise", "export_fused"]

# norms and convs found by their public classes (the Lazy norms subclass no eager one; the Lazy convs do)
_NORMS = BATCH_NORMS
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_PASS_THROUGH = (*_NORMS, nn.Identity, nn.Dropout, nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.LeakyReLU)
_LINEAR_PASS = (*_NORMS, nn.Identity, nn.Dropout)


def _is_spatial_conv(m: nn.Module) -> bool:
    return isinstance(m, _CONVS) and math.prod(m.kernel_size) > 1


def freeze_spatial(model: nn.Module) -> list[dict]:
    """Freeze every conv with kernel area > 1 (no gradient); return optimizer param groups without them.

    For plain training of any model (e.g. a torchvision ResNet-50): the frozen filters are in no
    group, so they get no weight decay either. Pass the result to ``torch.optim.SGD(groups, ...)``.
    """
    frozen = 0
    for m in model.modules():
        if _is_spatial_conv(m):
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)
                frozen += 1
        if isinstance(m, SharedSpatial) and m.weight is not None:
            m.weight.requires_grad_(False)
            frozen += 1
    if not frozen:
        raise ValueError(f"{type(model).__name__} has no conv with a kernel larger than 1x1 to freeze")
    return [{"params": [p for p in model.parameters() if p.requires_grad]}]



def followed_by_pointwise(model: nn.Module) -> dict[str, dict]:
    """For every k×k conv: the 1×1 conv its output feeds (through norms/activations only), if any.

    Traced with ``torch.fx``. The paper's Figure 3: a frozen spatial conv helps only where a 1×1
    after it can learn linear combinations of its filters. ``{"pointwise": name or None,
    "through": [module types passed], "linear": True if nothing nonlinear sits in between}``.
    """
    stages = getattr(model, "stages", None)
    if isinstance(stages, nn.ModuleDict):  # a Backbone: its forward checks shapes, so trace stage by stage
        return {f"stages.{s}.{k}": {**v, "pointwise": v["pointwise"] and f"stages.{s}.{v['pointwise']}"}
                for s, stage in stages.items() for k, v in followed_by_pointwise(stage).items()}
    gm = torch.fx.symbolic_trace(model)
    modules = dict(gm.named_modules())
    out = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not _is_spatial_conv(modules[node.target]):
            continue
        found, through, linear, cur = None, [], True, node
        while len(cur.users) == 1:
            (nxt,) = cur.users
            mod = modules.get(nxt.target) if nxt.op == "call_module" else None
            if isinstance(mod, _CONVS):
                if math.prod(mod.kernel_size) == 1:
                    found = nxt.target
                break
            if isinstance(mod, _PASS_THROUGH):
                through.append(type(mod).__name__)
                linear = linear and isinstance(mod, _LINEAR_PASS)
            elif nxt.op == "call_function" and getattr(nxt.target, "__name__", "") in ("relu", "relu_"):
                through.append("relu")
                linear = False
            else:
                break
            cur = nxt
        linear = found is not None and linear
        out[node.target] = {"pointwise": found, "through": through if found else [], "linear": linear}
    return out


def export_fused(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every LC-Block folded into one plain k×k ``nn.Conv2d`` (E× fewer MACs).

    For an LCResNet the result is the plain CIFAR ResNet of the registry (``resnet{D}``, same width
    and kernel): its state dict loads into ``build_backbone(f"resnet{D}", ...)``.
    """
    layers = lc_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LC-Block (LCConv2d) to fuse")
    bad = [n for n, m in layers.items() if not m.fusable]
    if bad:
        raise ValueError(
            f"cannot fuse {len(bad)} LC-Block(s) ({', '.join(bad[:4])}): their 1x1 follows "
            f"{type(layers[bad[0]].mid).__name__}, not the spatial conv directly; a 1x1 after a "
            "nonlinearity or norm cannot be folded into the spatial weight"
        )
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, m in lc_layers(out).items():
            conv = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, bias=False,
                             device=m.pointwise.weight.device, dtype=m.pointwise.weight.dtype)
            conv.weight.copy_(m.fused_weight())
            parent_name, _, child = name.rpartition(".")
            setattr(out.get_submodule(parent_name) if parent_name else out, child, conv)
    for name, m in list(out.named_modules()):
        for cname, c in list(m.named_children()):
            if isinstance(c, SharedSpatial):
                delattr(m, cname)
    arch = getattr(model, "arch", "")
    if arch.startswith("lcresnet"):
        cfg = dict(getattr(model, "config", {}))
        depth = cfg.pop("depth", None) or int(arch[len("lcresnet"):])
        out.arch = f"resnet{depth}"
        out.config = {k: cfg[k] for k in ("in_channels", "num_classes", "width", "kernel_size", "shortcut") if k in cfg}
    for p in out.parameters():
        p.requires_grad_(True)
    return out
