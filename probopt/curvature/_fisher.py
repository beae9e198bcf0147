r"""Natural gradient with the true Fisher or the empirical Fisher.

A model with a probabilistic output is a function
``predictive(params, inputs) -> numpyro.distributions.Distribution`` whose
batch shape is ``(n,)`` (one predictive distribution per example).  The loss
is the mean negative log-likelihood
$L(\theta) = -\frac1n\sum_i \log p_\theta(y_i\mid x_i)$, and with the scores
$s_i(y) = \nabla_\theta \log p_\theta(y\mid x_i)$:

- the **Fisher** (true Fisher) takes labels from the model's predictive,
  $F = \frac1n\sum_i \mathbb{E}_{y\sim p_\theta(\cdot\mid x_i)}[s_i(y)s_i(y)^\top]$.
  It is computed exactly when the predictive has enumerable support
  (``Categorical``, ``Bernoulli``: a sum over labels weighted by their
  probabilities) and by Monte Carlo with ``num_samples`` labels per example
  otherwise (e.g. ``Normal``);
- the **empirical Fisher** uses the data labels,
  $\tilde F = \frac1n\sum_i s_i(y_i)s_i(y_i)^\top$.

For exponential-family outputs with the canonical link (softmax/logistic
regression, Gaussian regression with fixed noise) the Fisher equals the
generalised Gauss–Newton matrix, and for models linear in $\theta$ it equals
the Hessian of $L$, so natural gradient is Newton's method.  The empirical
Fisher is a different matrix: it is the uncentred covariance of the
per-example gradients, scales with the squared residuals, and is a good
approximation of the Fisher only near the optimum of a well-specified model
(Kunstner, Balles & Hennig, "Limitations of the empirical Fisher
approximation for natural gradient descent", NeurIPS 2019).

The natural-gradient direction solves $(F + \lambda I)d = g$; the same
descent-direction fallback as the Newton transformations applies (the
gradient is returned and ``fallback_count`` incremented).
"""

from __future__ import annotations

from typing import Any, Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
import optax
from jax.flatten_util import ravel_pytree

from .._validation import check_same_structure
from ._newton import _check_damping, _descent_or_gradient, damped_newton_solve

Predictive = Callable[[Any, Any], dist.Distribution]
FisherKind = Literal["true", "empirical"]


def _check_predictive(predictive: Predictive, params: Any, inputs: Any) -> dist.Distribution:
    d = predictive(params, inputs)
    if not isinstance(d, dist.Distribution):
        raise TypeError(
            "`predictive(params, inputs)` must return a numpyro.distributions.Distribution; "
            f"got {type(d).__name__}."
        )
    if len(d.batch_shape) != 1:
        raise ValueError(
            "`predictive(params, inputs)` must have batch shape (n,), one predictive "
            f"distribution per example; got batch shape {d.batch_shape}."
        )
    return d


def negative_log_likelihood(predictive: Predictive, params: Any, inputs: Any, targets: Any) -> jax.Array:
    r"""The mean negative log-likelihood $-\frac1n\sum_i\log p_\theta(y_i\mid x_i)$, shape ``()``."""
    return -jnp.mean(predictive(params, inputs).log_prob(targets))


def fisher_matrix(
    predictive: Predictive,
    params: Any,
    inputs: Any,
    targets: Any = None,
    *,
    kind: FisherKind = "true",
    key: jax.Array | None = None,
    num_samples: int = 1,
) -> jax.Array:
    r"""Dense Fisher or empirical Fisher over ``ravel_pytree(params)``, shape ``(P, P)``.

    **Arguments:**

    - `predictive`: ``(params, inputs) -> Distribution`` with batch shape ``(n,)``.
    - `params`: pytree $\theta$.
    - `inputs`: inputs $x_{1..n}$ (anything `predictive` accepts).
    - `targets`: data labels $y_{1..n}$; required for ``kind="empirical"``.
    - `kind`: ``"true"`` (labels from the model) or ``"empirical"`` (data labels).
    - `key`: PRNG key; required for ``kind="true"`` when the predictive has no
      enumerable support (Monte Carlo).
    - `num_samples`: Monte Carlo labels per example (true Fisher only).

    **Returns:** $F$ or $\tilde F$, normalised by $1/n$ to match the Hessian of
    the *mean* negative log-likelihood.
    """
    if kind not in ("true", "empirical"):
        raise ValueError(f"`kind` must be 'true' or 'empirical'; got {kind!r}.")
    d = _check_predictive(predictive, params, inputs)
    n = d.batch_shape[0]
    flat, unravel = ravel_pytree(params)

    def scores(labels):
        # Row i is the score s_i(y_i) = grad_theta log p(y_i | x_i), shape (n, P).
        return jax.jacrev(lambda v: predictive(unravel(v), inputs).log_prob(labels))(flat)

    if kind == "empirical":
        if targets is None:
            raise ValueError("`targets` (the data labels) are required for kind='empirical'.")
        s = scores(targets)
        return s.T @ s / n
    if d.has_enumerate_support:
        support = d.enumerate_support(expand=True)  # (K, n, ...)
        probs = jax.lax.stop_gradient(jnp.exp(jax.vmap(d.log_prob)(support)))  # (K, n)
        s = jax.vmap(scores)(support)  # (K, n, P)
        return jnp.einsum("kn,knp,knq->pq", probs, s, s) / n
    if key is None:
        raise ValueError(
            f"kind='true' with a {type(d).__name__} predictive (no enumerable support) needs "
            "`key=` for Monte Carlo labels."
        )
    if not (isinstance(num_samples, int) and num_samples >= 1):
        raise ValueError(f"`num_samples` must be a positive integer; got {num_samples!r}.")
    labels = jax.lax.stop_gradient(d.sample(key, (num_samples,)))  # (S, n, ...)
    s = jax.vmap(scores)(labels)  # (S, n, P)
    return jnp.einsum("snp,snq->pq", s, s) / (n * num_samples)


def natural_gradient_direction(
    predictive: Predictive,
    params: Any,
    inputs: Any,
    targets: Any,
    *,
    kind: FisherKind = "true",
    damping: Any = 0.0,
    key: jax.Array | None = None,
    num_samples: int = 1,
) -> Any:
    r"""$(F + \lambda I)^{-1}\nabla L$ at ``params`` for the mean NLL $L$ (dense).

    The gradient always uses the data labels; only the curvature matrix
    depends on `kind`.  Arguments as in
    [`fisher_matrix`][probopt.curvature.fisher_matrix], plus `damping`
    $\lambda \ge 0$.  No fallback is applied.

    **Returns:** pytree like `params`.
    """
    _check_damping(damping)
    flat, unravel = ravel_pytree(params)
    grad = jax.grad(lambda v: negative_log_likelihood(predictive, unravel(v), inputs, targets))(flat)
    fisher = fisher_matrix(predictive, params, inputs, targets, kind=kind, key=key, num_samples=num_samples)
    return unravel(damped_newton_solve(fisher, grad, damping))


class NaturalGradientState(NamedTuple):
    """State of [`scale_by_natural_gradient`][probopt.curvature.scale_by_natural_gradient].

    **Attributes:**

    - `key`: PRNG key for Monte Carlo labels.
    - `fallback_count`: updates that fell back to the gradient, shape ``()``.
    """

    key: jax.Array
    fallback_count: jax.Array  # shape=()


def scale_by_natural_gradient(
    predictive: Predictive,
    *,
    kind: FisherKind = "true",
    damping: float = 1e-4,
    num_samples: int = 1,
    key: jax.Array | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Precondition the updates by $(F + \lambda I)^{-1}$, $F$ the (empirical) Fisher.

    Returns $(F + \lambda I)^{-1} g$ (gradient sign convention).

    **Arguments:**

    - `predictive`: ``(params, inputs) -> Distribution``, batch shape ``(n,)``.
    - `kind`: ``"true"`` or ``"empirical"``.
    - `damping`: $\lambda \ge 0$ (a softmax Fisher is singular along the
      logit-shift direction, so keep it positive there).
    - `num_samples`: Monte Carlo labels per example when the predictive has
      no enumerable support.
    - `key`: PRNG key for those labels (default ``jax.random.key(0)``); it is
      split at every update.

    **Extra arguments of `update` (keyword-only, required):**

    - `batch`: ``(inputs, targets)``; ``params`` is required too.
    """
    if kind not in ("true", "empirical"):
        raise ValueError(f"`kind` must be 'true' or 'empirical'; got {kind!r}.")
    _check_damping(damping)

    def init_fn(params):
        del params
        k = jax.random.key(0) if key is None else key
        return NaturalGradientState(key=k, fallback_count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None, *, batch, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("scale_by_natural_gradient.update needs `params`.")
        check_same_structure(params, updates, "params", "updates")
        inputs, targets = batch
        next_key, sample_key = jax.random.split(state.key)
        fisher = fisher_matrix(
            predictive, params, inputs, targets, kind=kind, key=sample_key, num_samples=num_samples
        )
        grad, unravel = ravel_pytree(updates)
        direction = damped_newton_solve(fisher.astype(grad.dtype), grad, damping)
        direction, fell_back = _descent_or_gradient(direction, grad)
        return unravel(direction), NaturalGradientState(
            key=next_key, fallback_count=state.fallback_count + fell_back.astype(jnp.int32)
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def natural_gradient(
    learning_rate: optax.ScalarOrSchedule,
    predictive: Predictive,
    *,
    kind: FisherKind = "true",
    damping: float = 1e-4,
    num_samples: int = 1,
    key: jax.Array | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Natural gradient descent $\theta \leftarrow \theta - \eta (F + \lambda I)^{-1} g$.

    Pass ``batch=(inputs, targets)`` to ``update``; see
    [`scale_by_natural_gradient`][probopt.curvature.scale_by_natural_gradient].
    """
    return optax.chain(
        scale_by_natural_gradient(predictive, kind=kind, damping=damping, num_samples=num_samples, key=key),
        optax.scale_by_learning_rate(learning_rate),
    )
