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


def check_bool(value: Any, name: str) -> bool:
    """Return ``value`` if it is a real ``bool`` (or ``numpy.bool_``); raise ``TypeError`` otherwise.

    Truthy stand-ins such as ``"no"`` or ``1`` are rejected: ``bool("no")`` is
    ``True``, which silently inverts what the caller meant.
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if (
        is_concrete(value)
        and getattr(value, "dtype", None) == np.bool_
        and jnp.shape(value) == ()
    ):
        return bool(value)  # a 0-d bool array, e.g. from optax.inject_hyperparams
    raise TypeError(f"`{name}` must be a bool (True or False); got {value!r}.")


def check_positive_int(value: Any, name: str) -> int:
    """Return ``value`` as an ``int`` if it is a positive integer (Python or NumPy); raise otherwise.

    Bools and floats (even integral ones such as ``4.0``) are rejected with
    ``TypeError``; integers below 1 with ``ValueError``.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be a positive int; got {value!r} ({type(value).__name__}).")
    if value < 1:
        raise ValueError(f"`{name}` must be a positive int; got {value!r}.")
    return int(value)


def check_real_scalar(value: Any, name: str, *, minimum: float | None = None) -> None:
    """Check a numeric hyperparameter: a real scalar, finite and ``>= minimum`` when concrete.

    ``None``, bools, strings, complex numbers and non-scalars raise
    ``TypeError``/``ValueError`` naming ``name``.  A traced value (e.g. one
    injected by ``optax.inject_hyperparams`` inside ``jit``) is checked for
    shape and dtype only; its value is unknown at trace time.
    """
    if value is None:
        raise TypeError(f"`{name}` must be a real number; got None.")
    if isinstance(value, (bool, np.bool_, str, bytes)):
        raise TypeError(f"`{name}` must be a real number; got {value!r}.")
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        if not isinstance(value, (int, float, np.number)):
            raise TypeError(f"`{name}` must be a real number; got {type(value).__name__}.")
        dtype = np.asarray(value).dtype
    if jnp.issubdtype(dtype, jnp.complexfloating):
        raise TypeError(f"`{name}` must be a real number; got the complex {value!r}.")
    if jnp.issubdtype(dtype, jnp.bool_) or not jnp.issubdtype(dtype, jnp.number):
        raise TypeError(f"`{name}` must be a real number; got dtype {dtype}.")
    if jnp.shape(value) != ():
        raise ValueError(f"`{name}` must be a scalar; got shape {jnp.shape(value)}.")
    if is_concrete(value):
        number = float(np.asarray(value))
        if not np.isfinite(number):
            raise ValueError(f"`{name}` must be finite; got {number!r}.")
        if minimum is not None and not number >= minimum:
            raise ValueError(f"`{name}` must be >= {minimum}; got {number!r}.")
