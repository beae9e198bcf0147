"""Generic per-example statistics for any JAX loss, by ``vmap`` of ``jvp(grad)``."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from .._validation import check_same_structure
from ._types import BatchStats


def _batch_size(batch: Any) -> int:
    sizes = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in jax.tree_util.tree_leaves(batch)}
    if None in sizes or len(sizes) != 1:
        raise ValueError(
            "`batch` must be a pytree whose leaves all share a leading batch axis; "
            f"got leading sizes {sorted(str(s) for s in sizes)}."
        )
    return sizes.pop()


def check_per_example_loss(per_example_loss: Callable, params: Any, batch: Any) -> int:
    """Check that ``per_example_loss(params, batch)`` returns shape ``(n,)``; return ``n``."""
    n = _batch_size(batch)
    out = jax.eval_shape(per_example_loss, params, batch)
    if getattr(out, "shape", None) != (n,):
        raise ValueError(
            "`per_example_loss(params, batch)` must return one loss per example, "
            f"shape ({n},); got shape {getattr(out, 'shape', type(out))}. "
            "Do not average over the batch: probopt needs the individual losses."
        )
    return n


def _moments(per_example: Any, n: int) -> tuple[Any, Any, Any, jax.Array]:
    """Mean, sum of squares, sample variance (two-pass) and its mean over coordinates."""
    mean = jax.tree_util.tree_map(lambda x: jnp.mean(x, axis=0), per_example)
    sq_sum = jax.tree_util.tree_map(lambda x: jnp.sum(x**2, axis=0), per_example)
    denom = max(n - 1, 1)
    var = jax.tree_util.tree_map(
        lambda x, m: jnp.sum((x - m) ** 2, axis=0) / denom if n > 1 else jnp.zeros_like(m),
        per_example,
        mean,
    )
    flat_var, _ = ravel_pytree(var)
    return mean, sq_sum, var, jnp.mean(flat_var)


def batch_stats_generic(
    per_example_loss: Callable[[Any, Any], jax.Array],
    params: Any,
    batch: Any,
    *,
    direction: Any = None,
) -> BatchStats:
    """Per-example statistics by ``vmap`` over examples (reference path).

    Materialises ``n`` per-example gradients (and HVPs), so it costs
    ``O(n P)`` memory.  See [`batch_stats`][probopt.batch_stats] for the
    conventions of the returned fields.
    """
    n = check_per_example_loss(per_example_loss, params, batch)
    if direction is not None:
        check_same_structure(params, direction, "params", "direction")

    def single_loss(p, example):
        one = jax.tree_util.tree_map(lambda x: x[None], example)
        return per_example_loss(p, one)[0]

    if direction is None:
        losses, grads = jax.vmap(jax.value_and_grad(single_loss), in_axes=(None, 0))(params, batch)
        hvps = None
    else:

        def loss_grad_hvp(example):
            grad_fn = jax.value_and_grad(lambda p: single_loss(p, example))
            (loss, grad), (_, hvp) = jax.jvp(grad_fn, (params,), (direction,))
            return loss, grad, hvp

        losses, grads, hvps = jax.vmap(loss_grad_hvp)(batch)

    loss_mean = jnp.mean(losses)
    loss_var = jnp.sum((losses - loss_mean) ** 2) / max(n - 1, 1) if n > 1 else jnp.zeros_like(loss_mean)
    grad_mean, grad_sq_sum, grad_var, grad_var_mean = _moments(grads, n)
    stats = BatchStats(
        batch_size=jnp.asarray(n),
        loss_mean=loss_mean,
        loss_var=loss_var,
        grad_mean=grad_mean,
        grad_sq_sum=grad_sq_sum,
        grad_var=grad_var,
        grad_var_mean=grad_var_mean,
    )
    if hvps is not None:
        hvp_mean, hvp_sq_sum, hvp_var, hvp_var_mean = _moments(hvps, n)
        stats = stats._replace(
            hvp_mean=hvp_mean, hvp_sq_sum=hvp_sq_sum, hvp_var=hvp_var, hvp_var_mean=hvp_var_mean
        )
    return stats
