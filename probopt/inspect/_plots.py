"""Paper-style diagnostics of a recorded run: step size, λ, gain, SNR, curvature."""

from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np
import xarray as xr

__all__ = ["DIAGNOSTICS", "find_diagnostics", "plot_diagnostics"]

# Each diagnostic: a title and regular expressions matched against the *last*
# component of a variable's dotted path (or its parent, for a generic
# ``curvature.value``), case-insensitive.  State layouts
# differ between optimizers, so names are matched, not hard-coded.
DIAGNOSTICS: dict[str, tuple[str, tuple[str, ...]]] = {
    "step_size": ("step size $\\alpha_t$", (r"^(alpha|step_size|learning_rate|lr|alpha_ema)$",)),
    "lambda": ("model-mismatch $\\lambda_t$", (r"^(lambda|lam|lambda_|lambda_t|correction)$",)),
    "gain": ("Kalman gain $k_t$", (r"^(gain|kalman_gain|k)$",)),
    "snr": ("gradient SNR", (r"^(snr|grad_snr|gradient_snr)$",)),
    "curvature": ("curvature along the step", (r"^(curvature|kappa|curvature_ema)$",)),
    "acquisition": ("acquisition value", (r"^(acquisition|acquisition_value|pi|probability_of_improvement|pi_value)$",)),
}


def _filter_state(idata: Any) -> xr.Dataset:
    if isinstance(idata, xr.Dataset):
        return idata
    if isinstance(idata, xr.DataTree):
        return idata["filter_state"].to_dataset()
    return idata.filter_state


def _labels(name: str) -> list[str]:
    """The last path component, and its parent when the last is a generic ``value``/``mean``."""
    parts = name.split(".")
    labels = [parts[-1]]
    if len(parts) > 1 and parts[-1] in ("value", "mean"):
        labels.append(parts[-2])
    return labels


def _gradient_snr(ds: xr.Dataset) -> xr.DataArray | None:
    """Mean over parameters of $m^2 / \\mathrm{var}$ of the gradient belief.

    Prefers a belief whose name contains ``grad``; otherwise takes the first
    belief over the ``param`` dim.
    """
    candidates = [
        name[: -len(".mean")]
        for name in ds.data_vars
        if name.endswith(".mean") and "param" in ds[name].dims and f"{name[: -len('.mean')]}.variance" in ds
    ]
    if not candidates:
        return None
    named = [c for c in candidates if "grad" in c.lower()]
    base = (named or candidates)[0]
    mean, var = ds[f"{base}.mean"], ds[f"{base}.variance"]
    snr = (mean**2 / np.maximum(var, np.finfo(float).tiny)).mean("param")
    return snr.rename("gradient SNR")


def find_diagnostics(idata: Any) -> dict[str, xr.DataArray]:
    """Pick the diagnostics present in a trace by field name.

    **Arguments:**

    - ``idata``: output of [`to_inference_data`][probopt.inspect.to_inference_data]
      (or its ``filter_state`` dataset).

    **Returns:** a dict from diagnostic key (see ``DIAGNOSTICS``) to a
    per-step ``DataArray`` (with ``chain`` when present).  Vector-valued
    fields are averaged over their non-step dims.  The gradient SNR is
    computed from a gradient belief's mean and variance when no field holds it.
    """
    ds = _filter_state(idata)
    found: dict[str, xr.DataArray] = {}
    for key, (_, patterns) in DIAGNOSTICS.items():
        for name in ds.data_vars:
            if any(re.match(p, label, flags=re.IGNORECASE) for p in patterns for label in _labels(name)):
                array = ds[name]
                extra = [d for d in array.dims if d not in ("chain", "step")]
                found[key] = array.mean(extra) if extra else array
                break
    if "snr" not in found:
        snr = _gradient_snr(ds)
        if snr is not None:
            found["snr"] = snr
    return found


def plot_diagnostics(idata: Any, *, keys: Sequence[str] | None = None, axes: Any = None, log_scale: bool = True):
    """Plot step size, λ, gain, gradient SNR and curvature over training.

    Only the diagnostics whose fields exist in the trace are drawn (see
    [`find_diagnostics`][probopt.inspect.find_diagnostics]); each chain (seed)
    is one line.

    **Arguments:**

    - ``idata``: output of [`to_inference_data`][probopt.inspect.to_inference_data].
    - ``keys``: optional subset of ``DIAGNOSTICS`` keys to draw.
    - ``axes``: optional sequence of Matplotlib axes, one per drawn diagnostic.
    - ``log_scale``: log y-axis for strictly positive series.

    **Returns:** the Matplotlib figure.
    """
    import matplotlib.pyplot as plt

    found = find_diagnostics(idata)
    if keys is not None:
        unknown = [k for k in keys if k not in DIAGNOSTICS]
        if unknown:
            raise ValueError(f"unknown diagnostic keys {unknown}; expected some of {sorted(DIAGNOSTICS)}.")
        found = {k: v for k, v in found.items() if k in keys}
    if not found:
        raise ValueError(
            "the trace holds none of the diagnostic fields "
            f"({', '.join(sorted(DIAGNOSTICS))}); nothing to plot."
        )
    if axes is None:
        ncols = min(3, len(found))
        nrows = -(-len(found) // ncols)
        fig, grid = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 2.8 * nrows), squeeze=False)
        axes = list(grid.ravel())
        for spare in axes[len(found) :]:
            spare.remove()
        axes = axes[: len(found)]
    else:
        if len(axes) != len(found):
            raise ValueError(f"`axes` must hold {len(found)} axes, one per diagnostic found; got {len(axes)}.")
        fig = axes[0].figure
    for ax, (key, array) in zip(axes, found.items()):
        steps = array["step"].values
        values = np.asarray(array.values)
        lines = values if "chain" in array.dims else values[None]
        if "chain" in array.dims and array.dims[0] != "chain":
            lines = np.moveaxis(values, array.dims.index("chain"), 0)
        for line in lines:
            ax.plot(steps, line, lw=1)
        if log_scale and np.all(np.isfinite(values)) and np.all(values > 0):
            ax.set_yscale("log")
        ax.set_title(DIAGNOSTICS[key][0])
        ax.set_xlabel("step")
    fig.tight_layout()
    return fig
