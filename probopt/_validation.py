"""Input checks shared by the whole library.

Every public entry point validates its arguments here so that errors name the
argument and say what was expected.  Checks on *values* (negative variances,
non-finite numbers) run eagerly when the value is concrete and are skipped
under tracing, where the numerical safeguards documented on each filter take
over instead.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x: Any) -> bool:
    """True when ``x`` holds concrete values (not a tracer inside ``jit``/``vmap``)."""
    return not isinstance(x, jax.core.Tracer)


def check_same_structure(tree_a: Any, tree_b: Any, name_a: str, name_b: str) -> None:
    """Raise ``ValueError`` if two pytrees differ in structure or leaf shapes."""
    struct_a = jax.tree_util.tree_structure(tree_a)
    struct_b = jax.tree_util.tree_structure(tree_b)
    if struct_a != struct_b:
        raise ValueError(
            f"`{name_b}` must have the same pytree structure as `{name_a}`; "
            f"got {struct_b} and {struct_a}."
        )
    for path_leaf_a, leaf_b in zip(
        jax.tree_util.tree_leaves_with_path(tree_a), jax.tree_util.tree_leaves(tree_b)
    ):
        path, leaf_a = path_leaf_a
        if jnp.shape(leaf_a) != jnp.shape(leaf_b):
            raise ValueError(
                f"`{name_b}` leaf {jax.tree_util.keystr(path)} has shape "
                f"{jnp.shape(leaf_b)}, but `{name_a}` has shape {jnp.shape(leaf_a)}."
            )


def check_nonnegative(value: Any, name: str) -> None:
    """Raise ``ValueError`` if a concrete variance-like pytree has negative entries."""
    for leaf in jax.tree_util.tree_leaves(value):
        if is_concrete(leaf):
            arr = np.asarray(leaf)
            if arr.size and np.any(arr < 0):
                raise ValueError(
                    f"`{name}` must be non-negative (it is a variance); "
                    f"found minimum {arr.min()!r}."
                )


def check_finite(value: Any, name: str) -> None:
    """Raise ``ValueError`` if a concrete pytree contains NaN or infinity."""
    for leaf in jax.tree_util.tree_leaves(value):
        if is_concrete(leaf):
            arr = np.asarray(leaf)
            if arr.size and not np.all(np.isfinite(arr)):
                raise ValueError(f"`{name}` must be finite; found NaN or infinity.")


def check_shape(value: Any, shape: tuple[int, ...], name: str) -> None:
    """Raise ``ValueError`` unless ``value`` has exactly ``shape``."""
    if jnp.shape(value) != tuple(shape):
        raise ValueError(f"`{name}` must have shape {tuple(shape)}; got {jnp.shape(value)}.")
