"""probopt: self-tuning stochastic optimizers whose state is a probabilistic model."""

from . import filters as filters
from . import problems as problems
from . import stats as stats
from .stats import BatchStats as BatchStats
from .stats import batch_stats as batch_stats

__version__ = "0.1.0"
