"""Gaussian beliefs, the Kalman kernels, and the filters built on them.

``predict`` and ``condition`` in ``_kernels.py`` are the only Kalman code in
probopt; the gradient filter (Meka) and the value filter (probabilistic step
sizes) both call them.
"""

from ._belief import GaussianBelief as GaussianBelief
from ._gradient import GradientFilter as GradientFilter
from ._gradient import GradientFilterInfo as GradientFilterInfo
from ._gradient import GradientFilterTrace as GradientFilterTrace
from ._gradient import NoiseEstimate as NoiseEstimate
from ._gradient import run_gradient_filter as run_gradient_filter
from ._kernels import ConditionInfo as ConditionInfo
from ._kernels import condition as condition
from ._kernels import predict as predict
from ._value import ValueFilter as ValueFilter
from ._value import ValueFilterInfo as ValueFilterInfo
from ._value import fit_model_correction as fit_model_correction
from ._value import quadratic_form as quadratic_form
from ._value import taylor_dynamics as taylor_dynamics

__all__ = [
    "ConditionInfo",
    "GaussianBelief",
    "GradientFilter",
    "GradientFilterInfo",
    "GradientFilterTrace",
    "NoiseEstimate",
    "condition",
    "predict",
    "run_gradient_filter",
    "ValueFilter",
    "ValueFilterInfo",
    "fit_model_correction",
    "quadratic_form",
    "taylor_dynamics",
]
