"""The ``on_nonfinite`` policy shared by every optimizer: skip or raise on a non-finite update."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

NONFINITE_POLICIES = ("skip", "raise")


def all_finite(*trees: Any) -> jax.Array:
    """``True`` (shape ``()``) when every inexact leaf of every tree is finite."""
    flags = [
        jnp.all(jnp.isfinite(leaf))
        for tree in trees
        for leaf in jax.tree_util.tree_leaves(tree)
        if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.inexact)
    ]
    return jnp.stack(flags).all() if flags else jnp.asarray(True)


def check_on_nonfinite(on_nonfinite: Any) -> None:
    if on_nonfinite not in NONFINITE_POLICIES:
        raise ValueError(
            f"`on_nonfinite` must be one of {NONFINITE_POLICIES}; got {on_nonfinite!r}."
        )


def apply_nonfinite_policy(
    on_nonfinite: str, finite: jax.Array, updates: Any, new_state: Any, state: Any, name: str
) -> tuple[Any, Any]:
    """Meka's ``on_nonfinite`` policy for a state with a ``skipped_updates`` counter.

    ``"skip"``: where ``finite`` is false return zero updates and ``state``
    unchanged except ``skipped_updates``, incremented.  ``"raise"``: raise at run
    time through ``equinox.error_if`` (an ``EquinoxRuntimeError`` naming ``name``).
    """
    if on_nonfinite == "raise":
        updates = eqx.error_if(
            updates,
            ~finite,
            f"{name} update: non-finite gradient or step (on_nonfinite='raise'); "
            "use on_nonfinite='skip' to skip such updates.",
        )
        return updates, new_state
    skipped = state._replace(skipped_updates=optax.safe_increment(state.skipped_updates))
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, skipped)
    updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), updates)
    return updates, new_state
