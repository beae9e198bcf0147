r"""The Kalman kernels: the one place where probopt predicts and conditions.

Both of probopt's filters (the gradient filter of Meka and the function-value
filter of the probabilistic step sizes) are random walks with a known drift,
observed directly through additive Gaussian noise:

$$x_t = x_{t-1} + d_t + w_t,\quad w_t\sim\mathcal N(0, Q_t), \qquad
  y_t = x_t + v_t,\quad v_t \sim \mathcal N(0, R_t).$$

[`predict`][probopt.filters.predict] adds the drift $d_t$ and the process
noise $Q_t$; [`condition`][probopt.filters.condition] applies the update

$$K = P^- (P^- + R)^{-1},\quad m = m^- + K (y - m^-),\quad
  P = (I-K) P^- (I-K)^\top + K R K^\top$$

in Joseph form by default (it stays symmetric positive semi-definite under
round-off) or the standard form $P = (I-K)P^-$.  Each works for scalar,
diagonal and dense covariance without ever forming a dense matrix for the
first two.
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from .._validation import check_nonnegative, check_same_structure
from ._belief import GaussianBelief

_LOG_2PI = math.log(2.0 * math.pi)


class ConditionInfo(NamedTuple):
    """What [`condition`][probopt.filters.condition] used to update a belief.

    **Attributes:**

    - ``gain``: the Kalman gain $K$, shape ``()`` (scalar structure), a pytree
      like the mean (diagonal), or ``(D, D)`` (dense).
    - ``innovation``: $y - m^-$, a pytree like the mean.
    - ``innovation_variance``: $P^- + R$ in the belief's structure.
    - ``log_likelihood``: $\\log \\mathcal N(y; m^-, P^- + R)$, shape ``()``.
    """

    gain: Any
    innovation: Any
    innovation_variance: Any
    log_likelihood: jax.Array


def _as_structure(noise: Any, belief: GaussianBelief, name: str) -> Any:
    """Check a noise term and bring it into the belief's covariance structure."""
    if belief.structure == "dense" and jnp.ndim(noise) == 2:
        # A full covariance matrix may have negative off-diagonal entries.
        check_nonnegative(jnp.diagonal(jnp.asarray(noise)), f"{name} diagonal")
    else:
        check_nonnegative(noise, name)
    if belief.structure == "scalar":
        noise = jnp.asarray(noise)
        if noise.shape != ():
            raise ValueError(
                f"`{name}` must be a scalar (shape ()) for a belief with scalar "
                f"covariance; got shape {noise.shape}."
            )
        return noise.astype(belief.variance.dtype)
    if belief.structure == "diagonal":
        leaves = jax.tree_util.tree_leaves(noise)
        if len(leaves) == 1 and jnp.ndim(leaves[0]) == 0:
            return jax.tree_util.tree_map(
                lambda v: jnp.broadcast_to(leaves[0], jnp.shape(v)).astype(jnp.result_type(v)),
                belief.variance,
            )
        check_same_structure(belief.variance, noise, "belief.variance", name)
        return noise
    dim = belief.variance.shape[0]
    noise = jnp.asarray(noise, dtype=belief.variance.dtype)
    if noise.shape == ():
        return noise * jnp.eye(dim, dtype=noise.dtype)
    if noise.shape == (dim,):
        return jnp.diag(noise)
    if noise.shape != (dim, dim):
        raise ValueError(
            f"`{name}` must be a scalar, a ({dim},) vector or a ({dim}, {dim}) matrix "
            f"for a dense belief; got shape {noise.shape}."
        )
    return noise


def _symmetrize(matrix: jax.Array) -> jax.Array:
    return 0.5 * (matrix + matrix.T)


def predict(
    belief: GaussianBelief,
    *,
    process_noise: Any,
    drift: Any = None,
) -> GaussianBelief:
    r"""Time update of a random walk with drift: $m^- = m + d$, $P^- = P + Q$.

    **Arguments:**

    - ``belief``: the filtered belief at $t-1$.
    - ``process_noise``: $Q_t$, non-negative; shape ``()`` for scalar
      structure, a pytree like the mean or a scalar for diagonal structure,
      and a scalar, ``(D,)`` or ``(D, D)`` array for dense structure.
    - ``drift``: $d_t$, a pytree like the mean (``None`` means zero).

    **Returns:** the predicted belief, same structure.
    """
    noise = _as_structure(process_noise, belief, "process_noise")
    mean = belief.mean
    if drift is not None:
        check_same_structure(belief.mean, drift, "belief.mean", "drift")
        mean = jax.tree_util.tree_map(jnp.add, mean, drift)
    if belief.structure == "diagonal":
        variance = jax.tree_util.tree_map(jnp.add, belief.variance, noise)
    elif belief.structure == "dense":
        variance = _symmetrize(belief.variance + noise)
    else:
        variance = belief.variance + noise
    return GaussianBelief(mean=mean, variance=variance, structure=belief.structure)


def condition(
    belief: GaussianBelief,
    observation: Any,
    observation_noise: Any,
    *,
    form: Literal["joseph", "standard"] = "joseph",
) -> tuple[GaussianBelief, ConditionInfo]:
    r"""Measurement update for a direct observation $y = x + v$, $v\sim\mathcal N(0, R)$.

    **Arguments:**

    - ``belief``: the predicted belief $\mathcal N(m^-, P^-)$.
    - ``observation``: $y$, a pytree like the mean.
    - ``observation_noise``: $R$, non-negative, in the same shapes that
      [`predict`][probopt.filters.predict] accepts for ``process_noise``.
    - ``form``: ``"joseph"`` (default) or ``"standard"`` covariance update.

    **Returns:** ``(posterior, info)`` with ``info`` a
    [`ConditionInfo`][probopt.filters.ConditionInfo].

    When $P^- + R = 0$ (no uncertainty at all) the gain is defined as 0, so
    the prediction is kept instead of producing NaN.
    """
    if form not in ("joseph", "standard"):
        raise ValueError(f"`form` must be 'joseph' or 'standard'; got {form!r}.")
    check_same_structure(belief.mean, observation, "belief.mean", "observation")
    noise = _as_structure(observation_noise, belief, "observation_noise")
    innovation = jax.tree_util.tree_map(jnp.subtract, observation, belief.mean)

    if belief.structure == "dense":
        return _condition_dense(belief, innovation, noise, form)

    def elementwise(prior_var, obs_var):
        total = prior_var + obs_var
        safe_total = jnp.where(total > 0, total, 1.0)
        gain = jnp.where(total > 0, prior_var / safe_total, 0.0)
        if form == "joseph":
            post_var = (1 - gain) ** 2 * prior_var + gain**2 * obs_var
        else:
            post_var = (1 - gain) * prior_var
        return gain, post_var, total, safe_total

    if belief.structure == "scalar":
        gain, post_var, total, safe_total = elementwise(belief.variance, noise)
        mean = jax.tree_util.tree_map(lambda m, r: m + gain * r, belief.mean, innovation)
        flat_innovation, _ = ravel_pytree(innovation)
        dim = flat_innovation.size
        log_likelihood = -0.5 * (
            jnp.sum(flat_innovation**2) / safe_total + dim * (jnp.log(safe_total) + _LOG_2PI)
        )
        posterior = GaussianBelief(mean=mean, variance=post_var, structure="scalar")
        return posterior, ConditionInfo(gain, innovation, total, log_likelihood)

    results = jax.tree_util.tree_map(elementwise, belief.variance, noise)
    treedef = jax.tree_util.tree_structure(belief.mean)
    parts = treedef.flatten_up_to(results)
    gain = treedef.unflatten([part[0] for part in parts])
    post_var = treedef.unflatten([part[1] for part in parts])
    total = treedef.unflatten([part[2] for part in parts])
    mean = jax.tree_util.tree_map(lambda m, k, r: m + k * r, belief.mean, gain, innovation)
    log_likelihood = sum(
        -0.5 * jnp.sum(e**2 / part[3] + jnp.log(part[3]) + _LOG_2PI)
        for e, part in zip(jax.tree_util.tree_leaves(innovation), parts)
    )
    posterior = GaussianBelief(mean=mean, variance=post_var, structure="diagonal")
    return posterior, ConditionInfo(gain, innovation, total, jnp.asarray(log_likelihood))


def _condition_dense(belief, innovation, noise, form):
    flat_mean, unravel = ravel_pytree(belief.mean)
    flat_innovation, _ = ravel_pytree(innovation)
    prior = belief.variance
    total = _symmetrize(prior + noise)
    # K = P S^{-1}; S is symmetric, so solve S K^T = P^T = P.
    chol = jax.scipy.linalg.cho_factor(total, lower=True)
    gain = jax.scipy.linalg.cho_solve(chol, prior).T
    # Fallback for a singular P^- + R (e.g. P = R = 0 in some direction): the
    # Cholesky factor then has NaNs, and the pseudo-inverse gain P S^+ keeps the
    # prediction in the degenerate directions, as the scalar kernel does.
    singular = ~jnp.all(jnp.isfinite(chol[0]))
    gain = jnp.where(singular, prior @ jnp.linalg.pinv(total, hermitian=True), gain)
    identity = jnp.eye(prior.shape[0], dtype=prior.dtype)
    if form == "joseph":
        residual = identity - gain
        post = residual @ prior @ residual.T + gain @ noise @ gain.T
    else:
        post = (identity - gain) @ prior
    post = _symmetrize(post)
    mean = unravel(flat_mean + gain @ flat_innovation)
    whitened = jax.scipy.linalg.cho_solve(chol, flat_innovation)
    log_det = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol[0])))
    log_likelihood = -0.5 * (
        flat_innovation @ whitened + log_det + flat_innovation.size * _LOG_2PI
    )
    # A singular predictive covariance has no density: report -inf, never NaN.
    log_likelihood = jnp.where(singular, -jnp.inf, log_likelihood)
    posterior = GaussianBelief(mean=mean, variance=post, structure="dense")
    return posterior, ConditionInfo(gain, innovation, total, log_likelihood)
