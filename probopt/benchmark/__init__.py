"""The comparison runner behind ``probopt compare`` and ``probopt bench``.

Workloads and optimizers are built on demand by name, so an optimizer whose
module is missing only makes that name unavailable.
"""

from ._bench import list_benchmarks as list_benchmarks
from ._bench import run_benchmark as run_benchmark
from ._compare import CompareResult as CompareResult
from ._compare import RunResult as RunResult
from ._compare import compare as compare
from ._compare import run_optimizer as run_optimizer
from ._compare import steps_to_target as steps_to_target
from ._registry import OPTIMIZERS as OPTIMIZERS
from ._registry import OptimizerSpec as OptimizerSpec
from ._registry import UnavailableError as UnavailableError
from ._registry import UnknownNameError as UnknownNameError
from ._registry import build_optimizer as build_optimizer
from ._report import plot_comparison as plot_comparison
from ._report import results_table as results_table
from ._report import save_traces as save_traces
from ._report import trace_to_inference_data as trace_to_inference_data
from ._workloads import WORKLOADS as WORKLOADS
from ._workloads import Workload as Workload
from ._workloads import make_workload as make_workload

__all__ = [
    "CompareResult",
    "OPTIMIZERS",
    "OptimizerSpec",
    "RunResult",
    "UnavailableError",
    "UnknownNameError",
    "WORKLOADS",
    "Workload",
    "build_optimizer",
    "compare",
    "list_benchmarks",
    "make_workload",
    "plot_comparison",
    "results_table",
    "run_benchmark",
    "run_optimizer",
    "save_traces",
    "steps_to_target",
    "trace_to_inference_data",
]
