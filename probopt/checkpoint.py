"""Checkpoint and resume any probopt (or optax) state with Equinox serialisation.

The whole training state — parameters, optimizer state with its beliefs,
EMAs, LODO's preconditioner and meta-optimizer state, and PRNG keys — is a
pytree.  [`save`][probopt.checkpoint.save] writes its array leaves with
`equinox.tree_serialise_leaves` (NumPy's ``.npy`` format, one after another,
after a header holding the payload's length and SHA-256);
[`load`][probopt.checkpoint.load] reads them back into a template of the same
structure, which is how Equinox's format works: the structure comes from code,
the numbers from disk.  Typed PRNG keys are stored through their raw key data
and re-wrapped on load, so a resumed run draws the same random numbers.

Floats round-trip bit for bit, so a run interrupted at step ``k`` and resumed
reproduces the uninterrupted run exactly.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np


# File layout: header (magic, payload length, SHA-256 of the payload), then the
# Equinox ``.npy`` records.  Files without the header (older probopt) still load.
_MAGIC = b"\x89probopt-ckpt1\n"
_HEADER = struct.Struct(f"<{len(_MAGIC)}sQ32s")
_NPY_MAGIC = b"\x93NUMPY"


def _is_typed_key(leaf: Any) -> bool:
    return isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _to_storable(tree: Any) -> Any:
    return jax.tree_util.tree_map(
        lambda leaf: jax.random.key_data(leaf) if _is_typed_key(leaf) else leaf, tree
    )


def _check_path(path: str | os.PathLike) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`path` must be a str or os.PathLike, got {type(path).__name__}.")
    path = os.fspath(path)
    if not isinstance(path, str):  # bytes paths
        raise TypeError(f"`path` must be a str or os.PathLike of str, got {path!r}.")
    if path == "":
        raise ValueError("`path` must name a file, got the empty string ''.")
    if os.path.isdir(path):
        raise ValueError(f"`path` {path!r} is a directory; pass a file name inside it.")
    return path


def _find_tracer(tree: Any) -> str | None:
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    for keypath, leaf in leaves:
        if isinstance(leaf, jax.core.Tracer):
            return jax.tree_util.keystr(keypath) or "<root>"
    return None


class _HashingWriter:
    """File wrapper that feeds everything written through SHA-256."""

    def __init__(self, file: Any) -> None:
        self.file = file
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: Any) -> int:
        data = bytes(memoryview(data))
        self.digest.update(data)
        self.size += len(data)
        return self.file.write(data)


def save(path: str | os.PathLike, tree: Any) -> None:
    """Write every array leaf of ``tree`` to ``path``.

    **Arguments:**

    - ``path``: file to write, used exactly as given (no suffix is added, so
      ``"run"`` and ``"run.eqx"`` are different files); parent folders are
      created.  The file is written as ``path + ".partial"`` and then
      renamed, so an interrupted save leaves any previous checkpoint at
      ``path`` intact; a failed save removes its ``.partial`` file and a stale
      one left by a killed process is overwritten.
    - ``tree``: any pytree of arrays, Python scalars and static data, e.g.
      ``(params, opt_state, key, step)``.  Must hold concrete values: ``save``
      cannot run inside ``jax.jit`` or another transformation.

    The file is a small header (magic, payload length and the SHA-256 of the
    payload) followed by the Equinox ``.npy`` records, so
    [`load`][probopt.checkpoint.load] detects truncation and corruption.

    **Raises:** ``ValueError`` for an empty path, a path that is a directory
    or whose parent is not a directory; ``TypeError`` if ``tree`` holds a
    tracer (``save`` called under a JAX transformation).
    """
    path = _check_path(path)
    tracer_at = _find_tracer(tree)
    if tracer_at is not None:
        raise TypeError(
            f"cannot save checkpoint {path!r}: leaf {tracer_at} of `tree` is a JAX tracer, "
            "i.e. `save` was called inside `jax.jit`/`vmap`/`grad`.  Call it outside the "
            "transformed function, on concrete arrays."
        )
    parent = os.path.dirname(path)
    if parent:
        try:
            os.makedirs(parent, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as error:
            raise ValueError(
                f"cannot save checkpoint {path!r}: a part of its parent {parent!r} "
                "is a file, not a directory."
            ) from error
    # Write next to the target and rename: an interrupted save never leaves a
    # truncated file where the previous checkpoint was.
    partial = f"{path}.partial"
    storable = _to_storable(tree)
    renamed = False
    try:
        with open(partial, "wb") as file:  # "wb" truncates a stale .partial
            file.write(_HEADER.pack(_MAGIC, 0, bytes(32)))  # placeholder
            writer = _HashingWriter(file)
            eqx.tree_serialise_leaves(writer, storable)
            file.seek(0)
            file.write(_HEADER.pack(_MAGIC, writer.size, writer.digest.digest()))
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
        renamed = True
    finally:
        if not renamed:
            with contextlib.suppress(FileNotFoundError):
                os.remove(partial)


def _read_header(path: str, file: Any, file_size: int) -> int | None:
    """Check the header and checksum; returns the payload size, or ``None`` for a
    legacy headerless file (plain Equinox records)."""
    start = file.read(_HEADER.size)
    if start == b"" or start.startswith(_NPY_MAGIC):
        file.seek(0)
        return None  # written by an older probopt: no checksum to verify
    if not (start.startswith(_MAGIC) or _MAGIC.startswith(start)):
        raise ValueError(
            f"checkpoint {path!r} is not a probopt checkpoint: its first bytes "
            f"{start[: len(_MAGIC)]!r} differ from the header {_MAGIC!r}."
        )
    if len(start) < _HEADER.size:
        raise ValueError(
            f"checkpoint {path!r} is truncated: {file_size} bytes, shorter than its "
            f"{_HEADER.size}-byte header."
        )
    _, size, expected = _HEADER.unpack(start)
    actual_size = file_size - _HEADER.size
    if actual_size != size:
        raise ValueError(
            f"checkpoint {path!r} is {'truncated' if actual_size < size else 'too long'}: "
            f"the header records a {size}-byte payload, the file holds {actual_size} bytes."
        )
    digest = hashlib.sha256()
    for chunk in iter(lambda: file.read(1 << 20), b""):
        digest.update(chunk)
    if digest.digest() != expected:
        raise ValueError(
            f"checkpoint {path!r} is corrupted: the SHA-256 of its payload is "
            f"{digest.hexdigest()}, the header records {expected.hex()}."
        )
    file.seek(_HEADER.size)
    return size


def load(path: str | os.PathLike, like: Any) -> Any:
    """Read a checkpoint written by [`save`][probopt.checkpoint.save].

    **Arguments:**

    - ``path``: the file written by ``save``, used exactly as given (no
      suffix is added).
    - ``like``: a pytree with the same structure, shapes and dtypes as the
      saved one (for example the freshly initialised state); its values are
      ignored.

    **Returns:** a pytree like ``like`` holding the saved values.

    **Raises:** ``ValueError`` naming the file if it does not exist, is
    truncated or corrupted (its SHA-256 differs from the one recorded at save
    time), or does not match ``like`` — including a ``like`` with fewer
    leaves than were saved (e.g. ``params`` for a saved
    ``(params, opt_state, key)``).
    """
    path = _check_path(path)
    if not os.path.exists(path):
        hint = ""
        if os.path.splitext(path)[1] == "" and os.path.exists(path + ".eqx"):
            hint = f" ({path + '.eqx'!r} exists; pass that path to load it)"
        raise ValueError(f"`path` {path!r} does not exist{hint}.")
    key_impls = jax.tree_util.tree_map(
        lambda leaf: jax.random.key_impl(leaf) if _is_typed_key(leaf) else None, like
    )
    template = _to_storable(like)
    with open(path, "rb") as file:
        file_size = os.fstat(file.fileno()).st_size
        _read_header(path, file, file_size)
        try:
            restored = eqx.tree_deserialise_leaves(file, template)
        except Exception as error:  # Equinox raises RuntimeError/ValueError on mismatch
            raise ValueError(
                f"checkpoint {path!r} does not match the structure of `like`: {error}"
            ) from error
        unread = file_size - file.tell()
    if unread != 0:
        raise ValueError(
            f"checkpoint {path!r} does not match the structure of `like`: {unread} bytes "
            "remain after reading every leaf of `like`, so `like` has fewer leaves than "
            "were saved (e.g. only a prefix of the saved tree)."
        )
    return jax.tree_util.tree_map(
        lambda leaf, impl, original: jax.random.wrap_key_data(leaf, impl=impl)
        if impl is not None
        else leaf,
        restored,
        key_impls,
        like,
        is_leaf=lambda x: x is None,
    )
