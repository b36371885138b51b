"""Backbone registry: one architecture family per file."""
from ._base import Backbone
from ._registry import backbone_config, build_backbone, estimate_parameters, list_backbones, register_backbone

# importing the family modules registers their builders
from . import cifar_resnet, wide_resnet, densenet, vgg, torchvision_models  # noqa: F401,E402
from . import lcresnet  # noqa: F401,E402

__all__ = ["Backbone", "build_backbone", "list_backbones", "register_backbone", "backbone_config", "estimate_parameters"]
