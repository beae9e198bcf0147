"""Diagnostics: how well a learned preconditioner approximates an inverse Hessian."""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from ._base import Preconditioner


def _check_preconditioner(preconditioner: Preconditioner) -> None:
    if not isinstance(preconditioner, Preconditioner):
        raise TypeError(
            "`preconditioner` must be a probopt Preconditioner; "
            f"got {type(preconditioner).__name__}."
        )


def _check_hessian(hessian: jax.Array, dim: int) -> jax.Array:
    hessian = jnp.asarray(hessian)
    if hessian.shape != (dim, dim):
        raise ValueError(f"`hessian` must have shape ({dim}, {dim}); got {hessian.shape}.")
    return hessian


def inverse_hessian_error(
    preconditioner: Preconditioner,
    hessian_vector_product: Callable[[jax.Array], jax.Array],
    key: jax.Array,
    num_probes: int = 100,
) -> jax.Array:
    r"""Monte-Carlo error estimator $\mathbb E_v \|v - G H v\|$ over random unit vectors $v$.

    This is the estimator plotted in the paper's Figure 2: it equals 0 iff
    $G = H^{-1}$ and is about 1 for a badly scaled $G$.  It needs only
    Hessian-vector products, so it works at any $n$.

    **Arguments:**

    - ``preconditioner``: the current $G$.
    - ``hessian_vector_product``: ``v -> H v`` for ``v`` of shape ``(n,)``.
    - ``key``: PRNG key for the probe directions.
    - ``num_probes``: number of random unit vectors (default 100, as in the paper's code).

    **Returns:** the mean error, shape ``()``.
    """
    _check_preconditioner(preconditioner)
    if isinstance(num_probes, bool) or not isinstance(num_probes, int) or num_probes < 1:
        raise ValueError(f"`num_probes` must be a positive integer; got {num_probes!r}.")
    dtype = preconditioner.scale.dtype
    probes = jax.random.normal(key, (num_probes, preconditioner.dim), dtype)
    probes = probes / jnp.linalg.norm(probes, axis=-1, keepdims=True)

    def error(v):
        return jnp.linalg.norm(v - preconditioner(hessian_vector_product(v)))

    return jnp.mean(jax.vmap(error)(probes))


def exact_inverse_hessian_error(preconditioner: Preconditioner, hessian: jax.Array) -> jax.Array:
    r"""$\|I - G H\|_F / \sqrt n$ from the dense $G$ (small $n$ only).

    Equals the root-mean-square of $\|v - GHv\|$ over an orthonormal basis;
    1 for $G = 0$, 0 for $G = H^{-1}$.

    **Arguments:** ``preconditioner`` ($G$), ``hessian`` ($H$, shape ``(n, n)``).

    **Returns:** shape ``()``.
    """
    _check_preconditioner(preconditioner)
    n = preconditioner.dim
    hessian = _check_hessian(hessian, n)
    residual = jnp.eye(n, dtype=hessian.dtype) - preconditioner.matmat(hessian)
    return jnp.linalg.norm(residual) / jnp.sqrt(n)


class SpectrumComparison(NamedTuple):
    r"""Eigenvalues comparing $G$ with $H^{-1}$ (all sorted ascending, shape ``(n,)``).

    **Attributes:**

    - ``preconditioner``: eigenvalues of the symmetric part of $G$.
    - ``inverse_hessian``: eigenvalues of $H^{-1}$.
    - ``preconditioned_hessian``: eigenvalues of $GH$ (computed as those of
      $G^{1/2} H G^{1/2}$, with negative eigenvalues of $G$ floored at 0); all
      ones iff $G = H^{-1}$.
    """

    preconditioner: jax.Array
    inverse_hessian: jax.Array
    preconditioned_hessian: jax.Array


def compare_spectra(preconditioner: Preconditioner, hessian: jax.Array) -> SpectrumComparison:
    r"""Eigen-spectrum of $G$ against the true inverse Hessian (dense; small $n$ only).

    **Arguments:** ``preconditioner`` ($G$), ``hessian`` (symmetric positive
    definite $H$, shape ``(n, n)``).

    **Returns:** a [`SpectrumComparison`][probopt.preconditioners.SpectrumComparison].
    """
    _check_preconditioner(preconditioner)
    hessian = _check_hessian(hessian, preconditioner.dim)
    g = preconditioner.dense()
    g = 0.5 * (g + g.T)
    g_eigs, g_vecs = jnp.linalg.eigh(g)
    root = (g_vecs * jnp.sqrt(jnp.clip(g_eigs, 0.0))) @ g_vecs.T
    product = root @ hessian @ root
    inverse = jnp.sort(1.0 / jnp.linalg.eigvalsh(hessian))
    return SpectrumComparison(
        preconditioner=g_eigs,
        inverse_hessian=inverse,
        preconditioned_hessian=jnp.linalg.eigvalsh(0.5 * (product + product.T)),
    )
