"""Turn a recorded optimizer run into ArviZ ``InferenceData``.

A *trace* is any optimizer state stacked over steps, e.g. the second output of
``jax.lax.scan`` whose body returns the state, or a list of states stacked with
``jax.tree.map(lambda *x: jnp.stack(x), *states)``.  Every array leaf carries a
leading ``step`` axis (after an optional leading ``chain`` axis for runs that
were ``vmap``-ed over seeds).

The state layout is found generically, by walking the pytree: NamedTuple
fields, Equinox module fields, dict keys and tuple positions name the
variables (joined with ``.``), and every
`GaussianBelief` found on the way contributes
its mean and variance (and, on request, draws from its NumPyro distribution).
Nothing here depends on a particular optimizer's field names.

The groups are built as plain ``xarray.Dataset``s with explicit dimensions and
wrapped per ArviZ version: ``arviz.InferenceData`` on arviz 0.x (Python 3.11),
``xarray.DataTree`` on arviz 1.x (Python >= 3.12).  Raw ``(T, D)`` arrays are
never handed to ``az.from_dict``, which would read them as ``(chain, draw)``.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any, Mapping, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr

from ..filters import GaussianBelief

__all__ = [
    "to_inference_data",
    "save_inference_data",
    "load_inference_data",
    "find_beliefs",
    "arviz_major_version",
]

_NETCDF_ENGINE = "h5netcdf"


# ---------------------------------------------------------------------------
# walking the state pytree
# ---------------------------------------------------------------------------
def _is_namedtuple(node: Any) -> bool:
    return isinstance(node, tuple) and hasattr(node, "_fields")


def _is_array(node: Any) -> bool:
    return isinstance(node, (jax.Array, np.ndarray, np.generic))


def _is_key_array(node: Any) -> bool:
    return isinstance(node, jax.Array) and jnp.issubdtype(node.dtype, jax.dtypes.prng_key)


def _children(node: Any) -> list[tuple[str, Any]] | None:
    """Named children of a container node, or ``None`` for leaves and unknowns."""
    if _is_namedtuple(node):
        return [(f, getattr(node, f)) for f in node._fields]
    if isinstance(node, eqx.Module):
        # Static fields are configuration, not part of the recorded trace.
        return [
            (f.name, getattr(node, f.name))
            for f in dataclasses.fields(node)
            if not f.metadata.get("static", False)
        ]
    if isinstance(node, Mapping):
        return [(str(k), node[k]) for k in sorted(node, key=str)]
    if isinstance(node, (list, tuple)):
        return [(str(i), child) for i, child in enumerate(node)]
    return None


def _walk(
    node: Any, path: tuple[str, ...], beliefs: list, arrays: list, layout: "_Layout | None" = None
) -> None:
    """Collect ``(path, belief)`` and ``(path, array)`` pairs from a state.

    With a ``layout``, containers shaped like the parameters are kept whole (so
    they can be flattened onto the ``param`` dim) instead of being descended.
    """
    if node is None or _is_key_array(node):
        return
    if isinstance(node, GaussianBelief):
        beliefs.append((path, node))
        return
    if _is_array(node):
        arrays.append((path, node))
        return
    if layout is not None and path and layout.is_param_like(node):
        arrays.append((path, node))
        return
    children = _children(node)
    if children is None:  # static data, functions, ...: not part of a trace
        return
    for name, child in children:
        _walk(child, path + (name,), beliefs, arrays, layout)


def find_beliefs(trace: Any) -> dict[str, GaussianBelief]:
    """All ``GaussianBelief`` modules in a (stacked) state, keyed by their path.

    **Arguments:**

    - ``trace``: any pytree (an optimizer state, or one stacked over steps).

    **Returns:** a dict from the dotted path of each belief (e.g.
    ``"grad_belief"`` or ``"inner.value_belief"``) to the belief.
    """
    beliefs: list = []
    _walk(trace, (), beliefs, [])
    return {_name(path): belief for path, belief in beliefs}


def _name(path: tuple[str, ...]) -> str:
    return ".".join(path) if path else "state"


# ---------------------------------------------------------------------------
# building datasets
# ---------------------------------------------------------------------------
class _Layout:
    """Leading dims, their sizes, and the parameter template (per-step shapes)."""

    def __init__(self, lead: tuple[str, ...], lead_shape: tuple[int, ...], template: Any):
        self.lead = lead
        self.lead_shape = lead_shape
        self.nlead = len(lead)
        if template is None:
            self.treedef, self.shapes, self.dim = None, None, 0
        else:
            leaves, self.treedef = jax.tree_util.tree_flatten(template)
            self.shapes = [tuple(np.shape(leaf)) for leaf in leaves]
            self.dim = int(sum(int(np.prod(s)) for s in self.shapes))

    def is_param_like(self, node: Any) -> bool:
        """Whether ``node`` (with leading dims) is shaped like the parameters."""
        if self.treedef is None or self.dim <= 1:
            return False
        leaves, treedef = jax.tree_util.tree_flatten(node)
        if treedef != self.treedef:
            return False
        return all(
            tuple(np.shape(leaf)[self.nlead :]) == shape and tuple(np.shape(leaf)[: self.nlead]) == self.lead_shape
            for leaf, shape in zip(leaves, self.shapes)
        )

    def flatten(self, node: Any) -> np.ndarray:
        """Concatenate a param-shaped node to ``lead_shape + (D,)``."""
        leaves = jax.tree_util.tree_leaves(node)
        return np.concatenate(
            [np.reshape(np.asarray(leaf), self.lead_shape + (-1,)) for leaf in leaves], axis=-1
        )


def _to_numpy(value: Any) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype == bool:  # netCDF has no portable boolean type
        array = array.astype(np.int8)
    return array


def _check_lead(name: str, array: np.ndarray, layout: _Layout) -> None:
    if tuple(array.shape[: layout.nlead]) != layout.lead_shape:
        raise ValueError(
            f"`trace` leaf {name!r} has shape {array.shape}, but every leaf must start with the "
            f"leading dims {layout.lead} = {layout.lead_shape} (stack states over steps first)."
        )


def _variable(name: str, value: Any, layout: _Layout) -> tuple[tuple[str, ...], np.ndarray]:
    """Dims and data of one variable with leading dims, flattening param-like values."""
    if layout.is_param_like(value):
        return layout.lead + ("param",), layout.flatten(value)
    leaves = jax.tree_util.tree_leaves(value)
    if len(leaves) != 1:
        raise ValueError(f"internal: variable {name!r} is not a single array")
    array = _to_numpy(leaves[0])
    _check_lead(name, array, layout)
    rest = array.shape[layout.nlead :]
    if len(rest) == 1 and layout.dim > 1 and rest[0] == layout.dim and layout.treedef is not None and len(layout.shapes) == 1:
        return layout.lead + ("param",), array
    dims = layout.lead + tuple(f"{name}_dim_{i}" for i in range(len(rest)))
    return dims, array


def _belief_variables(name: str, belief: GaussianBelief, layout: _Layout) -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    if not jax.tree_util.tree_leaves(belief.mean):
        # A belief recorded without its mean (too large to keep): variance only.
        if belief.structure == "scalar" and belief.variance is not None:
            variance = _to_numpy(belief.variance)
            _check_lead(f"{name}.variance", variance, layout)
            out[f"{name}.variance"] = (layout.lead, variance)
        return out
    mean_dims, mean = _belief_flat_mean(name, belief, layout)
    out[f"{name}.mean"] = (mean_dims, mean)
    if belief.structure == "scalar":
        variance = _to_numpy(belief.variance)
        _check_lead(f"{name}.variance", variance, layout)
        out[f"{name}.variance"] = (layout.lead, variance)
    elif belief.structure == "diagonal":
        _, variance = _belief_flat_mean(name, GaussianBelief(belief.variance, None, "diagonal"), layout)
        out[f"{name}.variance"] = (mean_dims, variance)
    else:
        variance = _to_numpy(belief.variance)
        second = mean_dims[-1] + "_bis"
        out[f"{name}.covariance"] = (mean_dims + (second,), variance)
    return out


def _belief_flat_mean(name: str, belief: GaussianBelief, layout: _Layout) -> tuple[tuple[str, ...], np.ndarray]:
    if layout.is_param_like(belief.mean):
        return layout.lead + ("param",), layout.flatten(belief.mean)
    leaves = [_to_numpy(leaf) for leaf in jax.tree_util.tree_leaves(belief.mean)]
    for leaf in leaves:
        _check_lead(f"{name}.mean", leaf, layout)
    if len(leaves) == 1 and leaves[0].ndim == layout.nlead:
        return layout.lead, leaves[0]
    flat = np.concatenate([leaf.reshape(layout.lead_shape + (-1,)) for leaf in leaves], axis=-1)
    return layout.lead + (f"{name}_dim",), flat


def _choose_template(beliefs: list, nlead: int) -> Any:
    """The per-step mean of the largest belief: the parameters' shape."""
    best, best_size = None, 1
    for _, belief in beliefs:
        leaves = jax.tree_util.tree_leaves(belief.mean)
        size = sum(int(np.prod(np.shape(leaf)[nlead:])) for leaf in leaves)
        if size > best_size:
            best_size = size
            best = jax.tree_util.tree_map(lambda x: np.zeros(np.shape(x)[nlead:]), belief.mean)
    return best


def _coords(dataset_vars: dict, layout: _Layout, steps: Any, param_names: Sequence[str] | None) -> dict:
    coords: dict[str, Any] = {}
    for dims, data in dataset_vars.values():
        for dim, size in zip(dims, np.shape(data)):
            if dim in coords:
                continue
            if dim == "step" and steps is not None:
                coords[dim] = np.asarray(steps)
            elif dim in ("param", "param_bis") and param_names is not None:
                coords[dim] = np.asarray(list(param_names))
            else:
                coords[dim] = np.arange(size)
    return coords


def _dataset(variables: dict, layout: _Layout, steps: Any, param_names: Any) -> xr.Dataset:
    coords = _coords(variables, layout, steps, param_names)
    return xr.Dataset({k: (dims, data) for k, (dims, data) in variables.items()}, coords=coords)


@eqx.filter_jit
def _sample_cells(belief: GaussianBelief, keys: jax.Array, draws: int) -> Any:
    """``draws`` samples from each of a batch of beliefs (leading axis of the leaves)."""
    return jax.vmap(lambda b, k: b.sample(k, (draws,)))(belief, keys)


def _posterior_draws(
    beliefs: list, layout: _Layout, draws: int, key: jax.Array
) -> dict[str, tuple]:
    """Draws ``(chain, draw, step, ...)`` from every belief's NumPyro distribution."""
    out: dict[str, tuple] = {}
    beliefs = [(p, b) for p, b in beliefs if jax.tree_util.tree_leaves(b.mean)]
    keys = jax.random.split(key, max(len(beliefs), 1))
    for (path, belief), belief_key in zip(beliefs, keys):
        name = _name(path)
        n_cells = int(np.prod(layout.lead_shape))
        flat_belief = jax.tree_util.tree_map(
            lambda x: jnp.reshape(x, (n_cells,) + jnp.shape(x)[layout.nlead :]), belief
        )
        cell_keys = jax.random.split(belief_key, n_cells)
        samples = _sample_cells(flat_belief, cell_keys, draws)
        # (cells, draws, ...) -> lead + (draws, ...)
        samples = jax.tree_util.tree_map(
            lambda s: np.asarray(s).reshape(layout.lead_shape + np.shape(s)[1:]), samples
        )
        # Treat the draw axis as one more leading axis to reuse the flattening.
        draw_layout = _Layout(layout.lead + ("draw",), layout.lead_shape + (draws,), None)
        draw_layout.treedef, draw_layout.shapes, draw_layout.dim = layout.treedef, layout.shapes, layout.dim
        fake = GaussianBelief(samples, None, "diagonal")
        dims, data = _belief_flat_mean(name, fake, draw_layout)
        # Reorder to ArviZ's (chain, draw, step, ...) convention.
        if "chain" not in dims:
            data = data[None]
            dims = ("chain",) + dims
        order = [dims.index("chain"), dims.index("draw"), dims.index("step")]
        order += [i for i in range(len(dims)) if i not in order]
        out[name] = (tuple(dims[i] for i in order), np.transpose(data, order))
    return out


def _import_arviz() -> Any:
    """Import ArviZ without its once-a-day 0.x "major refactor" FutureWarning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="ArviZ is undergoing a major refactor", category=FutureWarning)
        import arviz as az
    return az


def arviz_major_version() -> int:
    """The installed ArviZ major version (0 on Python 3.11, 1 on Python >= 3.12)."""
    return int(_import_arviz().__version__.split(".")[0])


def _wrap(groups: dict[str, xr.Dataset]) -> Any:
    az = _import_arviz()

    if arviz_major_version() >= 1:
        return xr.DataTree.from_dict({f"/{name}": ds for name, ds in groups.items()})
    standard = {k: v for k, v in groups.items() if k in ("posterior", "observed_data")}
    if not standard:
        # arviz 0.x needs at least one group at construction.
        first = next(iter(groups))
        standard = {first: groups[first]}
    extra = {k: v for k, v in groups.items() if k not in standard}
    idata = az.InferenceData(**standard)
    if extra:
        idata.add_groups(**extra)
    return idata


def to_inference_data(
    trace: Any,
    *,
    observations: Mapping[str, Any] | None = None,
    draws: int = 0,
    key: jax.Array | None = None,
    params: Any = None,
    param_names: Sequence[str] | None = None,
    steps: Sequence[int] | None = None,
    chain_axis: bool = False,
) -> Any:
    r"""Convert a recorded optimizer run into ArviZ ``InferenceData``.

    **Arguments:**

    - ``trace``: the optimizer state stacked over steps (leading axis ``T``),
      or over seeds and steps (``(C, T, ...)``, with ``chain_axis=True``).
      Any pytree of NamedTuples, Equinox modules, dicts and arrays.
    - ``observations``: optional mapping from a name to an array with the same
      leading dims (e.g. the batch losses $y_t$, their variances $r_t$, the
      true objective).  They form the ``observed_data`` group.
    - ``draws``: number of posterior draws per step from every belief's
      NumPyro distribution (``belief.sample``).  ``0`` (default) adds no
      ``posterior`` group.  Draws are shaped ``(chain, draw, step, param)``.
    - ``key``: PRNG key for the draws (required when ``draws > 0``).
    - ``params``: optional one-step parameter pytree.  State entries shaped
      like it (across all its leaves) are flattened onto the ``param`` dim.
      By default the mean of the largest belief defines that shape.
    - ``param_names``: optional ``D`` coordinate labels for ``param``.
    - ``steps``: optional ``T`` coordinate values for ``step`` (default
      ``0..T-1``).
    - ``chain_axis``: whether leaves carry a leading seed axis, mapped to the
      ``chain`` dim.

    **Returns:** ``arviz.InferenceData`` (arviz 0.x) or ``xarray.DataTree``
    (arviz 1.x) with groups

    - ``filter_state``: every array of the state, dims ``([chain,] step, ...)``;
      beliefs contribute ``<path>.mean`` and ``<path>.variance`` (or
      ``<path>.covariance`` for dense ones) over ``param``;
    - ``observed_data``: the ``observations``, when given;
    - ``posterior``: belief draws, when ``draws > 0``.

    Variable names are the dotted paths of the fields in the state, so gains,
    $\lambda$, step sizes or acquisition values appear under whatever name the
    optimizer gives them.
    """
    if not isinstance(draws, (int, np.integer)) or draws < 0:
        raise ValueError(f"`draws` must be a non-negative int; got {draws!r}.")
    if draws > 0 and key is None:
        raise ValueError("`key` is required when `draws > 0`.")
    if observations is not None and not isinstance(observations, Mapping):
        raise TypeError(f"`observations` must be a mapping of name -> array; got {type(observations).__name__}.")

    nlead = 2 if chain_axis else 1
    lead = ("chain", "step") if chain_axis else ("step",)
    leaves = [leaf for leaf in jax.tree_util.tree_leaves(trace) if not _is_key_array(leaf)]
    if not leaves:
        # Stateless optimizers (SGD) have nothing to record but their observations.
        if not observations:
            raise ValueError("`trace` has no array leaves and no `observations` were given: nothing to convert.")
        leaves = [np.asarray(v) for v in observations.values()]
    shapes = {tuple(np.shape(leaf)[:nlead]) for leaf in leaves if np.ndim(leaf) >= nlead}
    if len(shapes) != 1 or any(np.ndim(leaf) < nlead for leaf in leaves):
        raise ValueError(
            f"every array leaf of `trace` must share the leading dims {lead}; found leading shapes "
            f"{sorted(shapes)} (stack the per-step states first, e.g. with `lax.scan` outputs)."
        )
    lead_shape = shapes.pop()

    beliefs_first: list = []
    _walk(trace, (), beliefs_first, [])
    template = params if params is not None else _choose_template(beliefs_first, nlead)
    layout = _Layout(lead, lead_shape, template)
    if param_names is not None and len(param_names) != layout.dim:
        raise ValueError(f"`param_names` must have {layout.dim} entries (one per parameter); got {len(param_names)}.")

    arrays: list = []
    beliefs: list = []
    _walk(trace, (), beliefs, arrays, layout)
    variables: dict[str, tuple] = {}
    for path, belief in beliefs:
        variables.update(_belief_variables(_name(path), belief, layout))
    for path, value in arrays:
        variables[_name(path)] = _variable(_name(path), value, layout)

    groups = {}
    if variables:
        groups["filter_state"] = _dataset(variables, layout, steps, param_names)
    if observations:
        obs_vars = {}
        for name, value in observations.items():
            obs_vars[str(name)] = _variable(str(name), np.asarray(value), layout)
        groups["observed_data"] = _dataset(obs_vars, layout, steps, param_names)
    if draws > 0 and beliefs:
        post_vars = _posterior_draws(beliefs, layout, int(draws), key)
        groups["posterior"] = _dataset(post_vars, layout, steps, param_names)
    return _wrap(groups)


# ---------------------------------------------------------------------------
# NetCDF round trip
# ---------------------------------------------------------------------------
def _groups_of(idata: Any) -> dict[str, xr.Dataset]:
    if isinstance(idata, xr.DataTree):
        return {node.name: node.to_dataset() for node in idata.children.values()}
    return {name: getattr(idata, name) for name in idata.groups()}


def save_inference_data(idata: Any, path: str | os.PathLike) -> None:
    """Write an ``InferenceData``/``DataTree`` from [`to_inference_data`][probopt.inspect.to_inference_data] to NetCDF.

    One NetCDF group per ArviZ group (the layout both ArviZ 0.x and 1.x read).

    **Arguments:**

    - ``idata``: the object to write.
    - ``path``: the ``.nc`` file (parent folders are created).
    """
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    tree = xr.DataTree.from_dict({f"/{name}": ds for name, ds in _groups_of(idata).items()})
    tree.to_netcdf(path, engine=_NETCDF_ENGINE)


def load_inference_data(path: str | os.PathLike) -> Any:
    """Read a file written by [`save_inference_data`][probopt.inspect.save_inference_data] fully into memory.

    **Returns:** ``arviz.InferenceData`` on arviz 0.x, ``xarray.DataTree`` on 1.x.
    """
    with xr.open_datatree(os.fspath(path), engine=_NETCDF_ENGINE) as tree:
        groups = {node.name: node.to_dataset().load() for node in tree.children.values()}
    return _wrap(groups)
