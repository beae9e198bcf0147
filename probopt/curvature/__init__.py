"""Curvature-based preconditioning: Newton, Hessian-free, natural gradient, K-FAC, spectra."""

from ._fisher import FisherKind as FisherKind
from ._fisher import NaturalGradientState as NaturalGradientState
from ._fisher import fisher_matrix as fisher_matrix
from ._fisher import natural_gradient as natural_gradient
from ._fisher import natural_gradient_direction as natural_gradient_direction
from ._fisher import negative_log_likelihood as negative_log_likelihood
from ._fisher import scale_by_natural_gradient as scale_by_natural_gradient
from ._kfac import KfacState as KfacState
from ._kfac import kfac as kfac
from ._kfac import scale_by_kfac as scale_by_kfac
from ._lanczos import HessianExtremes as HessianExtremes
from ._lanczos import LanczosResult as LanczosResult
from ._lanczos import condition_number as condition_number
from ._lanczos import hessian_extreme_eigenvalues as hessian_extreme_eigenvalues
from ._lanczos import lanczos as lanczos
from ._newton import NewtonState as NewtonState
from ._newton import damped_newton_solve as damped_newton_solve
from ._newton import hessian_free_direction as hessian_free_direction
from ._newton import hessian_free_newton as hessian_free_newton
from ._newton import hessian_matrix as hessian_matrix
from ._newton import hessian_vector_product as hessian_vector_product
from ._newton import newton as newton
from ._newton import newton_direction as newton_direction
from ._newton import scale_by_hessian_free as scale_by_hessian_free
from ._newton import scale_by_newton as scale_by_newton

__all__ = [
    "FisherKind",
    "HessianExtremes",
    "KfacState",
    "LanczosResult",
    "NaturalGradientState",
    "NewtonState",
    "condition_number",
    "damped_newton_solve",
    "fisher_matrix",
    "hessian_extreme_eigenvalues",
    "hessian_free_direction",
    "hessian_free_newton",
    "hessian_matrix",
    "hessian_vector_product",
    "kfac",
    "lanczos",
    "natural_gradient",
    "natural_gradient_direction",
    "negative_log_likelihood",
    "newton",
    "newton_direction",
    "scale_by_hessian_free",
    "scale_by_kfac",
    "scale_by_natural_gradient",
    "scale_by_newton",
]
