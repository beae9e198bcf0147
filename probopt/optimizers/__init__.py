"""Optimizers whose state is a probabilistic model, as optax transformations."""

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
