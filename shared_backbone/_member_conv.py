"""Kept for ``ensemble.py`` and ``_split.py``, which import the member ops from here; they live in
:mod:`shared_backbone.layers` (one op per file). New code imports from there."""
from .layers.execution import CONV_EXECUTIONS, conv_execution, get_conv_execution, set_conv_execution
from .layers.member_bn import member_batch_norm
from .layers.member_conv import member_conv2d
from .layers.split_conv import split_conv2d

__all__ = ["member_conv2d", "split_conv2d", "member_batch_norm", "CONV_EXECUTIONS", "conv_execution",
           "get_conv_execution", "set_conv_execution"]
