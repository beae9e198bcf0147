"""Per-example statistics: losses, gradients and Hessian-vector products, reduced.

[`batch_stats`][probopt.stats.batch_stats] computes them in one pass, with a
fast path for models built from the instrumented layers defined here
([`Linear`][probopt.stats.Linear], [`Conv2d`][probopt.stats.Conv2d], ...,
or any Equinox model passed through [`instrument`][probopt.stats.instrument])
and a generic, chunked path for everything else.
"""

from ._batch_stats import batch_stats as batch_stats
from ._generic import check_per_example_loss as check_per_example_loss
from ._layers import Conv1d as Conv1d
from ._layers import Conv2d as Conv2d
from ._layers import Embedding as Embedding
from ._layers import GroupNorm as GroupNorm
from ._layers import LayerNorm as LayerNorm
from ._layers import Linear as Linear
from ._layers import instrument as instrument
from ._types import BatchStats as BatchStats

__all__ = [
    "BatchStats",
    "Conv1d",
    "Conv2d",
    "Embedding",
    "GroupNorm",
    "LayerNorm",
    "Linear",
    "batch_stats",
    "check_per_example_loss",
    "instrument",
]
