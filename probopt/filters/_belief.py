"""Gaussian beliefs over pytrees with scalar, diagonal or dense covariance."""

from __future__ import annotations

from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from jax.flatten_util import ravel_pytree

from .._validation import check_nonnegative, check_same_structure, check_shape

Structure = Literal["scalar", "diagonal", "dense"]
STRUCTURES = ("scalar", "diagonal", "dense")


def _num_elements(tree: Any) -> int:
    return sum(int(jnp.size(leaf)) for leaf in jax.tree_util.tree_leaves(tree))


class GaussianBelief(eqx.Module):
    r"""A Gaussian belief $\mathcal{N}(\mu, \Sigma)$ over a pytree of arrays.

    The covariance comes in three structures, chosen when the belief is made
    and kept by every kernel:

    - ``"scalar"``: $\Sigma = v I$ with ``variance`` an array of shape ``()``.
      This is Meka's default (one variance shared by all $D$ coordinates).
    - ``"diagonal"``: $\Sigma = \operatorname{diag}(v)$ with ``variance`` a
      pytree of the same structure and shapes as ``mean``.
    - ``"dense"``: a full ``(D, D)`` matrix over ``ravel_pytree(mean)``.  Only
      meant for small states (tests, the scalar value filter, diagnostics).

    **Attributes:**

    - ``mean``: pytree of arrays, the posterior (or prior) mean.
    - ``variance``: the covariance in the structure above.
    - ``structure``: ``"scalar"``, ``"diagonal"`` or ``"dense"`` (static).

    Build beliefs with [`GaussianBelief.scalar`][probopt.filters.GaussianBelief.scalar],
    [`GaussianBelief.diagonal`][probopt.filters.GaussianBelief.diagonal] or
    [`GaussianBelief.dense`][probopt.filters.GaussianBelief.dense], which
    validate their input.
    """

    mean: Any
    variance: Any
    structure: str = eqx.field(static=True)

    # ------------------------------------------------------------------ builders
    @classmethod
    def scalar(cls, mean: Any, variance: Any) -> "GaussianBelief":
        """Belief with covariance ``variance * I``; ``variance`` has shape ``()``."""
        variance = jnp.asarray(variance, dtype=_dtype_of(mean))
        check_shape(variance, (), "variance")
        check_nonnegative(variance, "variance")
        return cls(mean=mean, variance=variance, structure="scalar")

    @classmethod
    def diagonal(cls, mean: Any, variance: Any) -> "GaussianBelief":
        """Belief with a diagonal covariance; ``variance`` is shaped like ``mean``.

        A scalar ``variance`` is broadcast to every coordinate.
        """
        leaves = jax.tree_util.tree_leaves(variance)
        if len(leaves) == 1 and jnp.ndim(leaves[0]) == 0:
            variance = jax.tree_util.tree_map(
                lambda m: jnp.full(jnp.shape(m), leaves[0], dtype=jnp.result_type(m)), mean
            )
        check_same_structure(mean, variance, "mean", "variance")
        check_nonnegative(variance, "variance")
        return cls(mean=mean, variance=variance, structure="diagonal")

    @classmethod
    def dense(cls, mean: Any, covariance: Any) -> "GaussianBelief":
        """Belief with a full ``(D, D)`` covariance over ``ravel_pytree(mean)``."""
        dim = _num_elements(mean)
        covariance = jnp.asarray(covariance, dtype=_dtype_of(mean))
        check_shape(covariance, (dim, dim), "covariance")
        check_nonnegative(jnp.diagonal(covariance), "covariance diagonal")
        return cls(mean=mean, variance=covariance, structure="dense")

    # ------------------------------------------------------------------ queries
    @property
    def dim(self) -> int:
        """Total number of scalar coordinates ``D``."""
        return _num_elements(self.mean)

    def marginal_variance(self) -> Any:
        """Per-coordinate variances, a pytree shaped like ``mean``."""
        if self.structure == "scalar":
            return jax.tree_util.tree_map(
                lambda m: jnp.broadcast_to(self.variance, jnp.shape(m)).astype(jnp.result_type(m)),
                self.mean,
            )
        if self.structure == "diagonal":
            return self.variance
        flat, unravel = ravel_pytree(self.mean)
        return unravel(jnp.diagonal(self.variance).astype(flat.dtype))

    def dense_covariance(self) -> jax.Array:
        """The covariance as a ``(D, D)`` matrix (for small ``D``: tests, plots)."""
        if self.structure == "dense":
            return self.variance
        flat_var, _ = ravel_pytree(self.marginal_variance())
        return jnp.diag(flat_var)

    def distribution(self) -> Any:
        """The belief as NumPyro distributions.

        Returns a pytree shaped like ``mean`` whose leaves are
        ``Independent(Normal(mean, sqrt(var)), ndim)`` for scalar and diagonal
        structure, or a single ``MultivariateNormal`` over the flattened mean
        for dense structure.  ``sample`` and ``log_prob`` work as usual.
        """
        if self.structure == "dense":
            flat, _ = ravel_pytree(self.mean)
            return dist.MultivariateNormal(flat, covariance_matrix=self.variance)
        return jax.tree_util.tree_map(
            lambda m, v: dist.Normal(m, jnp.sqrt(v)).to_event(jnp.ndim(m)),
            self.mean,
            self.marginal_variance(),
        )

    def sample(self, key: jax.Array, sample_shape: tuple[int, ...] = ()) -> Any:
        """Draw samples shaped ``sample_shape + leaf.shape`` for every leaf."""
        distribution = self.distribution()
        if self.structure == "dense":
            flat_mean, unravel = ravel_pytree(self.mean)
            # NumPyro draws in the default float dtype; keep the belief's dtype.
            flat = distribution.sample(key, sample_shape).astype(flat_mean.dtype)
            unravel_batched = unravel
            for _ in sample_shape:
                unravel_batched = jax.vmap(unravel_batched)
            return unravel_batched(flat)
        leaves, treedef = jax.tree_util.tree_flatten(
            distribution, is_leaf=lambda x: isinstance(x, dist.Distribution)
        )
        keys = jax.random.split(key, len(leaves))
        means = jax.tree_util.tree_leaves(self.mean)
        samples = [
            d.sample(k, sample_shape).astype(jnp.result_type(m))
            for d, k, m in zip(leaves, keys, means)
        ]
        return jax.tree_util.tree_unflatten(treedef, samples)

    def log_prob(self, value: Any) -> jax.Array:
        """Log density of ``value`` (a pytree shaped like ``mean``), summed over leaves."""
        distribution = self.distribution()
        if self.structure == "dense":
            flat, _ = ravel_pytree(value)
            return distribution.log_prob(flat)
        leaves = jax.tree_util.tree_leaves(
            distribution, is_leaf=lambda x: isinstance(x, dist.Distribution)
        )
        values = jax.tree_util.tree_leaves(value)
        return sum(d.log_prob(v) for d, v in zip(leaves, values))


def _dtype_of(tree: Any) -> Any:
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        return jnp.result_type(float)
    return jnp.result_type(*leaves)
