r"""Acquisition functions and step-size solvers for probabilistic step sizes.

A [`ValueChangeModel`][probopt.acquisition.ValueChangeModel] gives the
predictive distribution of the change in objective $\Delta f(\alpha)$ for a
step of length $\alpha$; acquisition functions score it, and the solvers find
the maximising $\alpha$ inside ``jit`` (Chen et al., 2020, Sec. 3).
"""

from ._functions import expected_decrease as expected_decrease
from ._functions import expected_improvement as expected_improvement
from ._functions import probability_of_improvement as probability_of_improvement
from ._predictive import ValueChangeModel as ValueChangeModel
from ._solvers import ACQUISITIONS as ACQUISITIONS
from ._solvers import StepSolution as StepSolution
from ._solvers import ei_step_size as ei_step_size
from ._solvers import pi_stationarity as pi_stationarity
from ._solvers import pi_step_size as pi_step_size
from ._solvers import quadratic_step_size as quadratic_step_size
from ._solvers import solve_step_size as solve_step_size

__all__ = [
    "ACQUISITIONS",
    "StepSolution",
    "ValueChangeModel",
    "ei_step_size",
    "expected_decrease",
    "expected_improvement",
    "pi_stationarity",
    "pi_step_size",
    "probability_of_improvement",
    "quadratic_step_size",
    "solve_step_size",
]
