"""Building blocks, one per file (as timm's ``layers/``): the LC-Block and the member ops.

- :mod:`.lc_conv`: :class:`LCConv2d` (frozen k×k filters, learned 1×1 combinations) and
  :class:`SharedSpatial` (one random tensor every LC-Block slices);
- :mod:`.member_conv`, :mod:`.split_conv`, :mod:`.member_bn`: the custom ops
  (``torch.ops.shared_backbone.*``) a model's convs and batch norms run through, each with a
  ``vmap`` rule that runs K members at once;
- :mod:`.members_split_conv`, :mod:`.members_bn`: the per-member ops those rules call on
  member-major ``(K, N, C, H, W)`` input;
- :mod:`.execution`: how the rules run K members (:data:`CONV_EXECUTIONS`, :func:`conv_execution`).

Importing this package registers every ``shared_backbone::`` op.
"""
from .execution import CONV_EXECUTIONS, conv_execution, get_conv_execution, set_conv_execution
from .lc_conv import SHARING_MODES, LCConv2d, SharedSpatial, lc_layers
from .member_bn import member_batch_norm
from .member_conv import member_conv2d
from .split_conv import split_conv2d

__all__ = [
    "LCConv2d", "SharedSpatial", "SHARING_MODES", "lc_layers",
    "member_conv2d", "split_conv2d", "member_batch_norm",
    "CONV_EXECUTIONS", "conv_execution", "get_conv_execution", "set_conv_execution",
]
