"""Generic per-example statistics for any JAX loss: chunked ``vmap`` of ``jvp(grad)``.

Works for every differentiable ``per_example_loss``, at the price of
materialising ``chunk_size`` per-example gradients (and HVPs) at a time, i.e.
``O(chunk_size * P)`` memory and roughly ``chunk_size`` times less
vectorisation-friendly arithmetic than one gradient.  Chunks are reduced
with a ``lax.scan`` and merged with Chan's formula (see ``_moments``).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from ._moments import Moments, chunk_moments, merge_moments


def batch_size_of(batch: Any) -> int:
    """The common leading-axis size of all leaves of ``batch``."""
    leaves = jax.tree_util.tree_leaves(batch)
    sizes = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in leaves}
    if not leaves or None in sizes or len(sizes) != 1:
        raise ValueError(
            "`batch` must be a pytree whose leaves all share a leading batch axis; "
            f"got leading sizes {sorted(str(s) for s in sizes)}."
        )
    return sizes.pop()


def check_per_example_loss(per_example_loss: Callable, params: Any, batch: Any) -> int:
    """Check that ``per_example_loss(params, batch)`` returns shape ``(n,)``; return ``n``.

    **Arguments:**

    - `per_example_loss`: ``per_example_loss(params, batch) -> losses``.
    - `params`: the parameters (pytree).
    - `batch`: pytree of arrays with a common leading batch axis of size ``n``.

    **Raises:** ``ValueError`` naming the offending argument when the batch
    leaves disagree on their leading size or the loss is not one value per
    example (e.g. a scalar mean loss).
    """
    if not callable(per_example_loss):
        raise TypeError(f"`per_example_loss` must be callable; got {type(per_example_loss).__name__}.")
    n = batch_size_of(batch)
    out = jax.eval_shape(per_example_loss, params, batch)
    if getattr(out, "shape", None) != (n,):
        raise ValueError(
            "`per_example_loss(params, batch)` must return one loss per example, "
            f"shape ({n},); got shape {getattr(out, 'shape', type(out))}. "
            "Do not average over the batch: probopt needs the individual losses."
        )
    return n


def _per_example_fn(
    per_example_loss: Callable,
    leaves: list,
    treedef: Any,
    select: Sequence[int],
    direction_leaves: list | None,
):
    """Function of one example returning (loss, grads of selected leaves, their HVP rows)."""

    def loss_of_leaves(full, example):
        one = jax.tree_util.tree_map(lambda x: x[None], example)
        return per_example_loss(jax.tree_util.tree_unflatten(treedef, full), one)[0]

    def value_and_selected_grad(full, example):
        def of_selected(selected):
            merged = list(full)
            for j, value in zip(select, selected):
                merged[j] = value
            return loss_of_leaves(merged, example)

        return jax.value_and_grad(of_selected)([full[j] for j in select])

    def one(example):
        if direction_leaves is None:
            loss, grads = value_and_selected_grad(leaves, example)
            return loss, grads, None
        # Forward-over-reverse along the *full* direction: row j of H delta
        # involves every coordinate of delta, not only the selected leaves.
        (loss, grads), (_, hvps) = jax.jvp(
            lambda full: value_and_selected_grad(full, example), (leaves,), (direction_leaves,)
        )
        return loss, grads, hvps

    return one


def generic_moments(
    per_example_loss: Callable,
    params: Any,
    batch: Any,
    n: int,
    *,
    direction: Any = None,
    chunk_size: int | None = None,
    per_parameter: bool = True,
    select: Sequence[int] | None = None,
    reproducible: bool = False,
) -> tuple[Moments, Moments, Moments | None]:
    """Moments of per-example losses, gradients and HVP rows of the selected leaves.

    Returns ``(loss_moments, grad_moments, hvp_moments)``; gradient and HVP
    moments hold one entry per selected leaf of ``params`` (all leaves by
    default), ``hvp_moments`` is ``None`` without ``direction``.  With
    ``reproducible`` the batch-axis sums inside each chunk are order-independent
    (see ``_reproducible_sum``); the merge across chunks is a fixed sequence.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    select = list(range(len(leaves))) if select is None else list(select)
    direction_leaves = None if direction is None else jax.tree_util.tree_leaves(direction)
    one = _per_example_fn(per_example_loss, leaves, treedef, select, direction_leaves)

    def chunk_stats(chunk):
        losses, grads, hvps = jax.vmap(one)(chunk)
        loss_m = chunk_moments([losses], True, reproducible)
        grad_m = chunk_moments(grads, per_parameter, reproducible)
        hvp_m = None if hvps is None else chunk_moments(hvps, per_parameter, reproducible)
        return loss_m, grad_m, hvp_m

    chunk = n if chunk_size is None else min(int(chunk_size), n)
    num_full, remainder = divmod(n, chunk)
    if num_full == 1 and remainder == 0:
        return chunk_stats(batch)

    def take(start, size):
        return jax.tree_util.tree_map(lambda x: x[start : start + size], batch)

    full = jax.tree_util.tree_map(
        lambda x: x[: num_full * chunk].reshape((num_full, chunk) + x.shape[1:]), batch
    )
    shapes = jax.eval_shape(chunk_stats, take(0, chunk))
    # Zero count is the identity of the merge, so the scan starts from zeros.
    acc = jax.tree_util.tree_map(
        lambda s: jnp.zeros(s.shape, s.dtype), shapes, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct)
    )

    def merge_all(acc, new):
        return tuple(None if a is None else merge_moments(a, b) for a, b in zip(acc, new))

    def body(acc, chunk_batch):
        return merge_all(acc, chunk_stats(chunk_batch)), None

    acc, _ = jax.lax.scan(body, acc, full)
    if remainder:
        acc = merge_all(acc, chunk_stats(take(num_full * chunk, remainder)))
    return acc
