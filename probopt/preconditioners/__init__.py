r"""Learned preconditioners $G(\theta)$ for LODO and its ablations."""

from ._ablations import DensePreconditioner as DensePreconditioner
from ._ablations import DiagonalPreconditioner as DiagonalPreconditioner
from ._ablations import ResidualPreconditioner as ResidualPreconditioner
from ._ablations import ScalarPreconditioner as ScalarPreconditioner
from ._base import Preconditioner as Preconditioner
from ._base import partition_trainable as partition_trainable
from ._inspect import SpectrumComparison as SpectrumComparison
from ._inspect import compare_spectra as compare_spectra
from ._inspect import exact_inverse_hessian_error as exact_inverse_hessian_error
from ._inspect import inverse_hessian_error as inverse_hessian_error
from ._lodo import LodoPreconditioner as LodoPreconditioner
from ._lodo import default_hidden_dim as default_hidden_dim
