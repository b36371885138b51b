"""shared_backbone: cheap ensembles and multi-task adapters on one shared, frozen backbone."""
from ._version import __version__

from .backbones import Backbone, backbone_config, build_backbone, list_backbones, register_backbone
from .frozen import INIT_SCHEMES, FingerprintMismatch, FrozenBackbone
from .slices import BatchNorm, Blocks, Filters, Full, Head, Pointwise, SliceSpec, parse_spec, resolve
from .ensemble import Ensemble
from .describe import describe
from .lc import LCConv2d, SharedSpatial, export_fused, freeze_spatial, l1_penalty, prune_pointwise
from .adapters import AdapterBank, TaskAdapter
from . import flops  # noqa: F401,E402  (registers FLOP formulas for the library's own ops)

__all__ = [
    "__version__", "Backbone", "build_backbone", "list_backbones", "register_backbone", "backbone_config",
    "FrozenBackbone", "FingerprintMismatch", "INIT_SCHEMES",
    "SliceSpec", "Filters", "BatchNorm", "Blocks", "Pointwise", "Head", "Full", "parse_spec", "resolve",
    "Ensemble", "describe", "AdapterBank", "TaskAdapter",
    "LCConv2d", "SharedSpatial", "freeze_spatial", "export_fused", "l1_penalty", "prune_pointwise",
]
