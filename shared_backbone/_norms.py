"""Which modules are batch-norm-like layers, by torch's public classes (no upward import: any module may use it)."""
from __future__ import annotations

from torch import nn

__all__ = ["BATCH_NORMS", "BATCH_NORMS_ONLY", "is_batch_norm"]

# Every public torch class with running statistics and (optionally) an affine gamma/beta: the batch
# norms and the instance norms, lazy ones included (torch's private ``_NormBase`` family). A subclass
# (e.g. the member-batched ``BatchNorm2d`` of the templates) counts too.
BATCH_NORMS_ONLY: tuple[type[nn.Module], ...] = (  # torch's private ``_BatchNorm`` family: no instance norms
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
    nn.LazyBatchNorm1d, nn.LazyBatchNorm2d, nn.LazyBatchNorm3d,
)
BATCH_NORMS: tuple[type[nn.Module], ...] = (
    *BATCH_NORMS_ONLY,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
    nn.LazyInstanceNorm1d, nn.LazyInstanceNorm2d, nn.LazyInstanceNorm3d,
)


def is_batch_norm(m: nn.Module) -> bool:
    """``m`` is a batch (or instance) norm layer: its buffers are running statistics, its parameters gamma/beta."""
    return isinstance(m, BATCH_NORMS)
