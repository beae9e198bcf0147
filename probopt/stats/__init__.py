"""Per-example statistics: losses, gradients and Hessian-vector products, reduced."""

from ._generic import batch_stats_generic as batch_stats_generic
from ._generic import check_per_example_loss as check_per_example_loss
from ._types import BatchStats as BatchStats

batch_stats = batch_stats_generic

__all__ = ["BatchStats", "batch_stats", "batch_stats_generic", "check_per_example_loss"]
