"""LC-Blocks (the LC paper): every public name of the LC work in one place.

An LC-Block is a frozen (random) k×k conv with ``c_out·E`` filters followed by a learnable 1×1
conv down to ``c_out``; the pair folds into one conv. Where each part lives:

- :mod:`shared_backbone.layers.lc_conv`: :class:`LCConv2d`, :class:`SharedSpatial` (one random
  tensor ``W_s`` every spatial conv of a model slices), :func:`lc_layers`;
- :mod:`shared_backbone.lc_surgery`: :func:`freeze_spatial` for ordinary (e.g. torchvision)
  models, :func:`followed_by_pointwise`, :func:`export_fused`;
- :mod:`shared_backbone.lc_sparsity`: the 1×1 weights, their L1 penalty, magnitude pruning;
- :mod:`shared_backbone._sparse_io`: sparse checkpoints (:func:`save_sparse`, :func:`load_sparse`);
- :mod:`shared_backbone.lc_analysis`: the paper's analyses and figures.
"""
from ._sparse_io import load_sparse, save_sparse
from .layers.lc_conv import SHARING_MODES, LCConv2d, SharedSpatial, lc_layers
from .lc_sparsity import l1_penalty, pointwise_sparsity, pointwise_weights, prune_pointwise
from .lc_surgery import export_fused, followed_by_pointwise, freeze_spatial

__all__ = [
    "LCConv2d", "SharedSpatial", "SHARING_MODES", "lc_layers",
    "freeze_spatial", "followed_by_pointwise", "export_fused",
    "pointwise_weights", "l1_penalty", "prune_pointwise", "pointwise_sparsity",
    "save_sparse", "load_sparse",
]
