"""Checkpoint and resume any probopt (or optax) state with Equinox serialisation.

The whole training state — parameters, optimizer state with its beliefs,
EMAs, LODO's preconditioner and meta-optimizer state, and PRNG keys — is a
pytree.  [`save`][probopt.checkpoint.save] writes its array leaves with
`equinox.tree_serialise_leaves` (NumPy's ``.npy`` format, one after another);
[`load`][probopt.checkpoint.load] reads them back into a template of the same
structure, which is how Equinox's format works: the structure comes from code,
the numbers from disk.  Typed PRNG keys are stored through their raw key data
and re-wrapped on load, so a resumed run draws the same random numbers.

Floats round-trip bit for bit, so a run interrupted at step ``k`` and resumed
reproduces the uninterrupted run exactly.
"""

from __future__ import annotations

import os
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np


def _is_typed_key(leaf: Any) -> bool:
    return isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _to_storable(tree: Any) -> Any:
    return jax.tree_util.tree_map(
        lambda leaf: jax.random.key_data(leaf) if _is_typed_key(leaf) else leaf, tree
    )


def save(path: str | os.PathLike, tree: Any) -> None:
    """Write every array leaf of ``tree`` to ``path``.

    **Arguments:**

    - ``path``: file to write (parent folders are created).  The file is
      written as ``path + ".partial"`` and then renamed, so an interrupted
      save leaves any previous checkpoint at ``path`` intact.
    - ``tree``: any pytree of arrays, Python scalars and static data, e.g.
      ``(params, opt_state, key, step)``.
    """
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    # Write next to the target and rename: an interrupted save never leaves a
    # truncated file where the previous checkpoint was.
    partial = f"{path}.partial"
    eqx.tree_serialise_leaves(partial, _to_storable(tree))
    os.replace(partial, path)


def load(path: str | os.PathLike, like: Any) -> Any:
    """Read a checkpoint written by [`save`][probopt.checkpoint.save].

    **Arguments:**

    - ``path``: the file written by ``save``.
    - ``like``: a pytree with the same structure, shapes and dtypes as the
      saved one (for example the freshly initialised state); its values are
      ignored.

    **Returns:** a pytree like ``like`` holding the saved values.

    **Raises:** ``ValueError`` if the file does not match ``like``.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"`path` {path!r} does not exist.")
    key_impls = jax.tree_util.tree_map(
        lambda leaf: jax.random.key_impl(leaf) if _is_typed_key(leaf) else None, like
    )
    template = _to_storable(like)
    try:
        restored = eqx.tree_deserialise_leaves(path, template)
    except Exception as error:  # Equinox raises RuntimeError/ValueError on mismatch
        raise ValueError(
            f"checkpoint {path!r} does not match the structure of `like`: {error}"
        ) from error
    return jax.tree_util.tree_map(
        lambda leaf, impl, original: jax.random.wrap_key_data(leaf, impl=impl)
        if impl is not None
        else leaf,
        restored,
        key_impls,
        like,
        is_leaf=lambda x: x is None,
    )
