"""Tables, plots and NetCDF traces of a comparison."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ._compare import CompareResult, steps_to_target

__all__ = ["results_table", "plot_comparison", "save_traces", "trace_to_inference_data"]


def _fmt(value: float) -> str:
    if not np.isfinite(value):
        return "—" if np.isinf(value) else "nan"
    return f"{value:.3g}"


def results_table(result: CompareResult) -> str:
    """A Markdown table: final and best objective, steps to target, time per step.

    Losses are medians over seeds; "steps to target" is the median first step
    at which the objective reached ``result.target`` (with the number of seeds
    that reached it); time per step excludes compilation and is also given as
    a ratio to SGD measured in the same run.
    """
    seeds = result.runs[0].objective.shape[0] if result.runs else 0
    header = (
        f"| optimizer | final {result.workload.objective_name} | best | "
        f"steps to ≤ {result.target:.3g} | ms / step | × SGD |"
    )
    lines = [header, "|---|---|---|---|---|---|"]
    for run in result.runs:
        final = float(np.median(run.objective[:, -1]))
        best = float(np.median(np.min(run.objective, axis=1)))
        hits = steps_to_target(run.objective, result.target)
        reached = int(np.isfinite(hits).sum())
        median_hit = float(np.median(hits))
        hit_text = f"{_fmt(median_hit)} ({reached}/{seeds})"
        ratio = run.seconds_per_step / result.sgd_seconds_per_step
        lines.append(
            f"| {run.name} | {_fmt(final)} | {_fmt(best)} | {hit_text} | "
            f"{1e3 * run.seconds_per_step:.3g} | {ratio:.2f} |"
        )
    return "\n".join(lines)


def plot_comparison(result: CompareResult, path: str | os.PathLike) -> None:
    """Save a PNG: objective against steps and against wall time (median, min-max band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for run in result.runs:
        steps = np.arange(run.objective.shape[1])
        median = np.median(run.objective, axis=0)
        low, high = np.min(run.objective, axis=0), np.max(run.objective, axis=0)
        for ax, x in ((axes[0], steps), (axes[1], steps * run.seconds_per_step)):
            (line,) = ax.plot(x, median, label=run.name, lw=1.5)
            ax.fill_between(x, low, high, color=line.get_color(), alpha=0.15, lw=0)
    positive = all(np.all(run.objective > 0) for run in result.runs)
    for ax, xlabel in ((axes[0], "step"), (axes[1], "wall time (s, all seeds)")):
        if positive:
            ax.set_yscale("log")
        if np.isfinite(result.target) and (result.target > 0 or not positive):
            ax.axhline(result.target, color="k", ls=":", lw=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(result.workload.objective_name)
    axes[0].legend(fontsize=8)
    seeds = result.runs[0].objective.shape[0] if result.runs else 0
    fig.suptitle(f"{result.workload.name}: median and range over {seeds} seeds")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def trace_to_inference_data(run: Any, *, draws: int = 0, key: Any = None) -> Any:
    """ArviZ view of one `RunResult`: the state trace plus the objective and batch losses.

    Seeds become the ``chain`` dim; ``step`` runs from 1 to ``T`` (the state
    after each update).  The objective at the start (step 0) is stored as the
    attribute ``objective_at_start`` of ``observed_data``.
    """
    from ..inspect import to_inference_data

    steps = np.arange(1, run.batch_loss.shape[1] + 1)
    idata = to_inference_data(
        run.trace,
        observations={"objective": run.objective[:, 1:], "batch_loss": run.batch_loss},
        chain_axis=True,
        steps=steps,
        draws=draws,
        key=key,
    )
    observed = idata["observed_data"] if not hasattr(idata, "observed_data") else idata.observed_data
    observed.attrs["objective_at_start"] = np.asarray(run.objective[:, 0]).tolist()
    observed.attrs["optimizer"] = run.name
    observed.attrs["seconds_per_step"] = float(run.seconds_per_step)
    return idata


def save_traces(result: CompareResult, directory: str | os.PathLike) -> list[str]:
    """Write one NetCDF file per optimizer, ``<directory>/<name>.nc``; return the paths."""
    from ..inspect import save_inference_data

    paths = []
    for run in result.runs:
        path = os.path.join(os.fspath(directory), f"{run.name}.nc")
        save_inference_data(trace_to_inference_data(run), path)
        paths.append(path)
    return paths


def format_skipped(result: CompareResult) -> str:
    """One line per optimizer that could not be run."""
    return "\n".join(f"skipped {name}: {reason}" for name, reason in result.skipped)

