"""Gaussian beliefs and the Kalman kernels shared by every probopt filter."""

from ._belief import GaussianBelief as GaussianBelief
from ._kernels import ConditionInfo as ConditionInfo
from ._kernels import condition as condition
from ._kernels import predict as predict

__all__ = ["GaussianBelief", "ConditionInfo", "condition", "predict"]
