"""Generic per-example statistics for any JAX loss: chunked ``vmap`` of ``jvp(grad)``.

Works for every differentiable ``per_example_loss``, at the price of
materialising ``chunk_size`` per-example gradients (and HVPs) at a time, i.e.
``O(chunk_size * P)`` memory and roughly ``chunk_size`` times less
vectorisation-friendly arithmetic than one gradient.  Chunks are reduced
in a ``lax.fori_loop`` and merged with Chan's formula (see ``_moments``).
``centred_square_sums`` is the second pass of a two-pass variance for when
the means are known already (the fast path's cancellation fallback).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from ._moments import Moments, chunk_moments, merge_moments
from ._reproducible_sum import reproducible_sum


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

    def merge_all(acc, new):
        return tuple(None if a is None else merge_moments(a, b) for a, b in zip(acc, new))

    return _reduce_in_chunks(chunk_stats, merge_all, batch, n, chunk_size)


def centred_square_sums(
    per_example_loss: Callable,
    params: Any,
    batch: Any,
    n: int,
    means: tuple[list, list | None],
    *,
    select: Sequence[int],
    direction: Any = None,
    chunk_size: int | None = None,
    per_parameter: bool = True,
    reproducible: bool = False,
) -> tuple[list, list | None]:
    r"""$\sum_i (x_i - \bar x)^2$ of per-example gradients (and HVP rows) about *known* means.

    The second pass of the two-pass variance, for when the means are already
    known accurately (the fast path has them): only these sums travel from chunk
    to chunk, so the memory is ``chunk_size`` per-example gradients (and HVP
    rows) plus one array per selected leaf, or one scalar per leaf when not
    ``per_parameter``.  Without cancellation: each deviation is formed before
    it is squared.

    **Arguments:** as `generic_moments`, plus ``means = (grad_means,
    hvp_means)``, one array per index in ``select`` (``hvp_means`` is ``None``
    without ``direction``).

    **Returns:** ``(grad_sums, hvp_sums)``, lists over ``select`` of arrays
    shaped like the leaves (``per_parameter``) or of scalars; ``hvp_sums`` is
    ``None`` without ``direction``.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    direction_leaves = None if direction is None else jax.tree_util.tree_leaves(direction)
    one = _per_example_fn(per_example_loss, leaves, treedef, list(select), direction_leaves)
    batch_sum = reproducible_sum if reproducible else jnp.sum

    def chunk_sums(chunk):
        _, grads, hvps = jax.vmap(one)(chunk)
        out = []
        for rows, centres in zip((grads, hvps), means):
            if rows is None:
                out.append(None)
                continue
            sums = [batch_sum((r - c) ** 2, axis=0) for r, c in zip(rows, centres)]
            out.append(sums if per_parameter else [jnp.sum(x) for x in sums])
        return tuple(out)

    def add(acc, new):
        return jax.tree_util.tree_map(jnp.add, acc, new)

    return _reduce_in_chunks(chunk_sums, add, batch, n, chunk_size)


def _reduce_in_chunks(chunk_fn: Callable, combine: Callable, batch: Any, n: int, chunk_size: int | None):
    """``chunk_fn`` on consecutive chunks of ``chunk_size`` examples, folded with ``combine``.

    The first chunk starts the fold (no zero-filled accumulator to allocate
    and copy), the other full chunks run in one ``lax.fori_loop`` that slices
    them out of ``batch`` in place (bounded memory, one compiled body, no
    reshaped copy of the batch), and a shorter last chunk is folded in after.
    """
    chunk = n if chunk_size is None else min(int(chunk_size), n)
    num_full, remainder = divmod(n, chunk)

    def take(start, size):
        return jax.tree_util.tree_map(lambda x: jax.lax.dynamic_slice_in_dim(x, start, size), batch)

    acc = chunk_fn(take(0, chunk))
    if num_full > 1:
        acc = jax.lax.fori_loop(1, num_full, lambda k, acc: combine(acc, chunk_fn(take(k * chunk, chunk))), acc)
    if remainder:
        acc = combine(acc, chunk_fn(take(num_full * chunk, remainder)))
    return acc
