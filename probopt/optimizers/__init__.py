"""Optimizers whose state is a probabilistic model, as optax transformations."""

from ._lodo import LodoState as LodoState
from ._lodo import lodo as lodo
from ._lodo import lodo_diagonal as lodo_diagonal
from ._lodo import lodo_global as lodo_global
from ._lodo import lodo_hypergradient as lodo_hypergradient
from ._lodo import lodo_no_momentum as lodo_no_momentum
from ._lodo import lodo_residuals as lodo_residuals
from ._lodo import lodo_sgd as lodo_sgd
from ._lodo import meta_learned_preconditioner as meta_learned_preconditioner
from ._running_average import ConjugateHyperparameters as ConjugateHyperparameters
from ._running_average import MomentumHyperparameters as MomentumHyperparameters
from ._running_average import RunningAverageState as RunningAverageState
from ._running_average import SimplifiedAdamState as SimplifiedAdamState
from ._running_average import conjugate_to_momentum as conjugate_to_momentum
from ._running_average import momentum_to_conjugate as momentum_to_conjugate
from ._running_average import rescale_for_batch_size as rescale_for_batch_size
from ._running_average import running_average as running_average
from ._running_average import running_average_rate as running_average_rate
from ._running_average import scale_by_simplified_adam as scale_by_simplified_adam
from ._running_average import simplified_adam as simplified_adam
from ._running_average import update_running_average as update_running_average
from ._snr import SNRState as SNRState
from ._snr import scale_by_snr as scale_by_snr
from ._snr import snr_sgd as snr_sgd
from ._meka import MekaState as MekaState
from ._meka import adameka as adameka
from ._meka import hvp_direction as hvp_direction
from ._meka import make_step as make_step
from ._meka import meka as meka
from ._probabilistic_step import MovingAverage as MovingAverage
from ._probabilistic_step import ProbabilisticStepSize as ProbabilisticStepSize
from ._probabilistic_step import ProbabilisticStepSizeState as ProbabilisticStepSizeState
from ._step_size import ConstantStepSize as ConstantStepSize
from ._step_size import StepSizeContext as StepSizeContext
from ._step_size import StepSizeRule as StepSizeRule

__all__ = [
    "LodoState",
    "lodo",
    "lodo_diagonal",
    "lodo_global",
    "lodo_hypergradient",
    "lodo_no_momentum",
    "lodo_residuals",
    "lodo_sgd",
    "meta_learned_preconditioner",
    "ConjugateHyperparameters",
    "MomentumHyperparameters",
    "RunningAverageState",
    "SimplifiedAdamState",
    "conjugate_to_momentum",
    "momentum_to_conjugate",
    "rescale_for_batch_size",
    "running_average",
    "running_average_rate",
    "scale_by_simplified_adam",
    "simplified_adam",
    "update_running_average",
    "SNRState",
    "scale_by_snr",
    "snr_sgd",
    "ConstantStepSize",
    "MekaState",
    "MovingAverage",
    "ProbabilisticStepSize",
    "ProbabilisticStepSizeState",
    "StepSizeContext",
    "StepSizeRule",
    "adameka",
    "hvp_direction",
    "make_step",
    "meka",
]
