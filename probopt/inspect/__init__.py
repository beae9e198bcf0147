"""ArviZ views of recorded optimizer runs (beliefs, gains, step sizes).

ArviZ itself is imported lazily, inside the functions that need it, because
arviz 0.x emits a FutureWarning at import.
"""

from ._arviz import arviz_major_version as arviz_major_version
from ._arviz import find_beliefs as find_beliefs
from ._arviz import load_inference_data as load_inference_data
from ._arviz import save_inference_data as save_inference_data
from ._arviz import to_inference_data as to_inference_data
from ._plots import DIAGNOSTICS as DIAGNOSTICS
from ._plots import find_diagnostics as find_diagnostics
from ._plots import plot_diagnostics as plot_diagnostics

__all__ = [
    "to_inference_data",
    "save_inference_data",
    "load_inference_data",
    "find_beliefs",
    "arviz_major_version",
    "DIAGNOSTICS",
    "find_diagnostics",
    "plot_diagnostics",
]
