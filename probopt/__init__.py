"""probopt: self-tuning stochastic optimizers whose state is a probabilistic model.

The subpackages hold one concept each (``filters``, ``stats``, ``optimizers``,
``acquisition``, ``preconditioners``, ``curvature``, ``problems``,
``inspect``, ``checkpoint``, ``benchmark``); the names users need most are
re-exported here.
"""

from . import acquisition as acquisition
from . import checkpoint as checkpoint
from . import curvature as curvature
from . import filters as filters
from . import inspect as inspect
from . import optimizers as optimizers
from . import preconditioners as preconditioners
from . import problems as problems
from . import stats as stats
from .filters import GaussianBelief as GaussianBelief
from .filters import GradientFilter as GradientFilter
from .filters import ValueFilter as ValueFilter
from .filters import condition as condition
from .filters import predict as predict
from .inspect import to_inference_data as to_inference_data
from .optimizers import LodoState as LodoState
from .optimizers import MekaState as MekaState
from .optimizers import ProbabilisticStepSize as ProbabilisticStepSize
from .optimizers import adameka as adameka
from .optimizers import hvp_direction as hvp_direction
from .optimizers import lodo as lodo
from .optimizers import lodo_diagonal as lodo_diagonal
from .optimizers import lodo_global as lodo_global
from .optimizers import lodo_no_momentum as lodo_no_momentum
from .optimizers import lodo_residuals as lodo_residuals
from .optimizers import lodo_sgd as lodo_sgd
from .optimizers import make_step as make_step
from .optimizers import meka as meka
from .optimizers import rescale_for_batch_size as rescale_for_batch_size
from .optimizers import simplified_adam as simplified_adam
from .optimizers import snr_sgd as snr_sgd
from .preconditioners import LodoPreconditioner as LodoPreconditioner
from .stats import BatchStats as BatchStats
from .stats import batch_stats as batch_stats
from .stats import instrument as instrument

__version__ = "0.1.0"
