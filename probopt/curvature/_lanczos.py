r"""Hessian spectrum tools: Lanczos on Hessian-vector products.

$m$ steps of Lanczos build an orthonormal basis $V$ of the Krylov space
$\{v, Hv, \dots, H^{m-1}v\}$ and the tridiagonal $T = V^\top H V$; the extreme
eigenvalues of $T$ (Ritz values) converge quickly to the extreme eigenvalues
of $H$, so the largest and smallest curvatures and the condition number
$\kappa = \lambda_{\max}/\lambda_{\min}$ (Perone's "Hessian eigenvalues"
slides; Yao et al., PyHessian, 2019) come at the price of $m$ HVPs.

Numerics: every new vector is re-orthogonalised twice against all previous
ones (full reorthogonalisation, $O(mP)$ memory), which keeps $V$ orthonormal
in float32.  When the Krylov space becomes invariant ($\beta_{j+1} \approx 0$)
the iteration restarts from a random vector orthogonal to $V$ and records
$\beta_{j+1} = 0$, so $T$ stays exact (block diagonal).  $m$ is capped at $P$.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from ._newton import hessian_vector_product


class LanczosResult(NamedTuple):
    """Output of [`lanczos`][probopt.curvature.lanczos].

    **Attributes:**

    - `ritz_values`: eigenvalues of $T$ in ascending order, shape ``(m,)``.
    - `alphas`: diagonal of $T$, shape ``(m,)``.
    - `betas`: off-diagonal of $T$, shape ``(m - 1,)``.
    - `basis`: the Lanczos vectors $V$ as rows, shape ``(m, P)``.
    """

    ritz_values: jax.Array
    alphas: jax.Array
    betas: jax.Array
    basis: jax.Array


def _orthogonalize(w: jax.Array, basis: jax.Array) -> jax.Array:
    # Classical Gram-Schmidt twice ("twice is enough"); unused rows of basis are zero.
    for _ in range(2):
        w = w - basis.T @ (basis @ w)
    return w


def lanczos(
    matvec: Callable[[jax.Array], jax.Array],
    start_vector: jax.Array,
    num_iterations: int,
    *,
    key: jax.Array,
) -> LanczosResult:
    r"""Lanczos tridiagonalisation of a symmetric operator on flat vectors.

    **Arguments:**

    - `matvec`: ``v -> A v`` for ``v`` of shape ``(P,)``, $A$ symmetric.
    - `start_vector`: nonzero, shape ``(P,)``; its dtype is used throughout.
    - `num_iterations`: $m \ge 1$ (Python int; capped at $P$).
    - `key`: PRNG key for restart vectors after an exact breakdown.

    **Returns:** a [`LanczosResult`][probopt.curvature.LanczosResult].
    """
    if start_vector.ndim != 1:
        raise ValueError(f"`start_vector` must be a flat vector of shape (P,); got {start_vector.shape}.")
    if not (isinstance(num_iterations, int) and num_iterations >= 1):
        raise ValueError(f"`num_iterations` must be a positive Python int; got {num_iterations!r}.")
    dim = start_vector.shape[0]
    m = min(num_iterations, dim)
    dtype = start_vector.dtype
    tiny = jnp.finfo(dtype).tiny
    breakdown_tol = 100 * jnp.finfo(dtype).eps

    v0 = start_vector / jnp.maximum(jnp.linalg.norm(start_vector), tiny)
    basis = jnp.zeros((m, dim), dtype).at[0].set(v0)
    alphas = jnp.zeros((m,), dtype)
    betas = jnp.zeros((max(m - 1, 0),), dtype)

    def body(j, carry):
        basis, alphas, betas = carry
        v = basis[j]
        w = matvec(v)
        alpha = jnp.vdot(v, w)
        w = _orthogonalize(w, basis)
        beta = jnp.linalg.norm(w)
        scale = jnp.abs(alpha) + jnp.where(j > 0, betas[jnp.maximum(j - 1, 0)], 0) + tiny
        broke = beta <= breakdown_tol * scale
        fresh = _orthogonalize(jax.random.normal(jax.random.fold_in(key, j), (dim,), dtype), basis)
        nxt = jnp.where(broke, fresh / jnp.maximum(jnp.linalg.norm(fresh), tiny), w / jnp.maximum(beta, tiny))
        basis = basis.at[j + 1].set(nxt)
        betas = betas.at[j].set(jnp.where(broke, 0, beta))
        return basis, alphas.at[j].set(alpha), betas

    if m > 1:
        basis, alphas, betas = jax.lax.fori_loop(0, m - 1, body, (basis, alphas, betas))
    last = basis[m - 1]
    alphas = alphas.at[m - 1].set(jnp.vdot(last, matvec(last)))
    tridiagonal = jnp.diag(alphas)
    if m > 1:
        tridiagonal = tridiagonal + jnp.diag(betas, 1) + jnp.diag(betas, -1)
    ritz = jnp.linalg.eigvalsh(tridiagonal)
    return LanczosResult(ritz_values=ritz, alphas=alphas, betas=betas, basis=basis)


class HessianExtremes(NamedTuple):
    """Extreme Hessian eigenvalues and condition number.

    **Attributes:**

    - `min_eigenvalue`: $\\lambda_{\\min}$ estimate, shape ``()``.
    - `max_eigenvalue`: $\\lambda_{\\max}$ estimate, shape ``()``.
    - `condition_number`: $\\lambda_{\\max}/\\lambda_{\\min}$, or ``inf`` when
      $\\lambda_{\\min} \\le 0$ (not positive definite), shape ``()``.
    """

    min_eigenvalue: jax.Array
    max_eigenvalue: jax.Array
    condition_number: jax.Array


def hessian_extreme_eigenvalues(
    value_fn: Callable[[Any], jax.Array],
    params: Any,
    *,
    key: jax.Array,
    num_iterations: int = 30,
) -> HessianExtremes:
    r"""Extreme eigenvalues and condition number of $\nabla^2 f(\theta)$ by Lanczos on HVPs.

    **Arguments:**

    - `value_fn`: ``params -> scalar``.
    - `params`: pytree $\theta$.
    - `key`: PRNG key for the random start vector (and restarts).
    - `num_iterations`: Lanczos steps $m$ (capped at the number of parameters,
      where the result is exact up to rounding).

    **Returns:** a [`HessianExtremes`][probopt.curvature.HessianExtremes].
    """
    flat, unravel = ravel_pytree(params)
    start_key, restart_key = jax.random.split(key)

    def matvec(v):
        return ravel_pytree(hessian_vector_product(value_fn, params, unravel(v)))[0]

    start = jax.random.normal(start_key, flat.shape, flat.dtype)
    result = lanczos(matvec, start, num_iterations, key=restart_key)
    lo, hi = result.ritz_values[0], result.ritz_values[-1]
    kappa = jnp.where(lo > 0, hi / jnp.where(lo > 0, lo, 1), jnp.inf)
    return HessianExtremes(min_eigenvalue=lo, max_eigenvalue=hi, condition_number=kappa)


def condition_number(value_fn: Callable[[Any], jax.Array], params: Any, *, key: jax.Array, num_iterations: int = 30) -> jax.Array:
    r"""$\kappa = \lambda_{\max}/\lambda_{\min}$ of the Hessian (``inf`` if not positive definite)."""
    return hessian_extreme_eigenvalues(value_fn, params, key=key, num_iterations=num_iterations).condition_number
