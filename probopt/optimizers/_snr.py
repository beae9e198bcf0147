r"""McAllester's signal-to-noise learning rate ("A Complete Algorithm").

For every coordinate $i$ the rule keeps running averages of the minibatch
gradient $\hat g$ whose time constant is the optimal batch size $B^*$ itself,
and steps with a learning rate proportional to the squared signal-to-noise
ratio $\tilde g^2/\tilde\sigma^2$.  The derivation maximises a lower bound on
the loss decrease per example for an $L$-smooth loss: $B^* = 16\hat\sigma^2/\hat
g^2$, $\eta^* = 1/(2L)$ at $B^*$, and by linear scaling
$\eta_B = (B/B^*)\,\eta^* = B\hat g^2/(32\hat\sigma^2 L)$ at batch size $B$
(McAllester, TTIC 31230 lecture "Stochastic Gradient Descent", 2018).

Per coordinate, with $r_t = \min\!\big(1/M, B/B^*(t)\big)$ (the slide has
$r_t = B/B^*(t)$; see the safeguards below):

$$\tilde g_{t+1} = (1 - r_t)\,\tilde g_t + r_t\,\hat g_{t+1},\qquad
  \tilde s_{t+1} = (1 - r_t)\,\tilde s_t + r_t\,\hat g_{t+1}^2,$$

$$B^*(t) = \begin{cases} K & t \le K \\
  \lambda_B\,\tilde\sigma_t^2/(\tilde g_t^2 + \epsilon) & \text{otherwise}\end{cases},\qquad
  \eta_t = \begin{cases} 0 & t \le K \\
  \lambda_\eta\,\min\!\big(B\tilde g_t^2/\tilde\sigma_t^2,\ \lambda_B\big) & \text{otherwise}\end{cases},$$

and $\Phi_{t} \leftarrow \Phi_{t} - \eta_t\,\hat g_t$.

Here $\tilde\sigma^2$ is the **per-example** gradient variance, the
$\hat\sigma^2$ of the derivation.  Two estimators are offered:

- ``variance="temporal"`` (the slide's): $\tilde\sigma^2 = B\,(\tilde s - \tilde
  g^2)$.  The temporal spread $\tilde s - \tilde g^2$ of minibatch means
  estimates $\sigma^2/B$ (the slide "Scaling η with Batch Size for RMSProp":
  $E\hat g^2 = \mu^2 + \sigma^2/B$), so the factor $B$ turns it into the
  per-example variance.  At $B = 1$ this is exactly the slide's
  $\tilde\sigma = \sqrt{\tilde s - \tilde g^2}$ and
  $\eta = \lambda_\eta\tilde g^2/\tilde\sigma^2$.
- ``variance="per_example"``: $\tilde\sigma^2$ is the same running average of
  the within-batch sample variance ``BatchStats.grad_var``, which the lecture
  argues is what RMSProp-like rules should track when $B$ grows.

Two departures from the slides, both documented safeguards:

- the averaging weight is $r_t = \min(1/M, B/B^*(t))$ with
  $M$ = ``min_averaging_steps`` (default 2) instead of $B/B^*(t)$.  A weight
  above one would extrapolate instead of average (it happens when
  $B > B^*$), and a weight of exactly one makes $\tilde s = \tilde g^2$, so
  the variance estimate collapses to zero and, since $B^*$ then stays zero,
  never recovers.  With $M = 1$ the slide's rule (capped at one) is recovered;
- the learning rate is capped at $\lambda_\eta\lambda_B$, its value at
  $B = B^*$ ($\eta^* = 1/(2L)$ for the default constants): once the batch is
  at least the optimal one the bound gives no reason to step further.  This
  cap also makes zero variance (deterministic gradients) safe: $\eta$ is then
  $\lambda_\eta\lambda_B$ instead of infinite.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .._validation import check_same_structure, is_concrete
from ..stats import BatchStats
from ._nonfinite import all_finite as _all_finite
from ._nonfinite import apply_nonfinite_policy as _apply_nonfinite_policy
from ._nonfinite import check_on_nonfinite as _check_on_nonfinite


class SNRState(NamedTuple):
    """State of [`scale_by_snr`][probopt.optimizers.scale_by_snr].

    **Attributes:**

    - `count`: $t$, the number of gradients seen, shape ``()``.
    - `grad_mean`: $\\tilde g_t$, pytree like params.
    - `grad_sq_mean`: $\\tilde s_t$ (``variance="temporal"``), else ``None``.
    - `example_variance`: running per-example variance
      (``variance="per_example"``), else ``None``.
    - `learning_rate`: $\\eta_t$ used by the last update, pytree like params.
    - `optimal_batch_size`: $B^*(t)$ that will weight the next gradient,
      pytree like params.
    - `skipped_updates`: how many updates were skipped because the gradient,
      the per-example variance or the step was not finite
      (``on_nonfinite="skip"``), shape ``()``.
    """

    count: jax.Array  # shape=()
    grad_mean: Any
    grad_sq_mean: Any
    example_variance: Any
    learning_rate: Any
    optimal_batch_size: Any
    skipped_updates: jax.Array  # shape=()


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    positive = den > 0
    return jnp.where(positive, num / jnp.where(positive, den, 1), 0)


def scale_by_snr(
    *,
    warmup_steps: int = 10,
    lambda_b: float = 16.0,
    lambda_eta: float = 1.0 / 32.0,
    eps: float = 1e-12,
    batch_size: float = 1.0,
    variance: Literal["temporal", "per_example"] = "temporal",
    min_averaging_steps: float = 2.0,
    on_nonfinite: str = "skip",
) -> optax.GradientTransformationExtraArgs:
    r"""McAllester's SNR rule as a transformation: returns $\eta_t\odot\hat g_t$.

    Chain it with ``optax.scale(-1.0)`` (or use
    [`snr_sgd`][probopt.optimizers.snr_sgd]); the rule owns the learning
    rate, so do not chain another one.

    **Arguments:**

    - `warmup_steps`: $K \ge 1$; during the first $K$ gradients the averages use
      $B^* = K$ and the learning rate is zero.
    - `lambda_b`: $\lambda_B > 0$ ($16$ in the derivation).
    - `lambda_eta`: $\lambda_\eta > 0$, i.e. $1/(32L)$ for an $L$-smooth loss.
    - `eps`: $\epsilon \ge 0$ added to $\tilde g^2$ in $B^*$.
    - `batch_size`: $B$ for ``variance="temporal"``.  Ignored for
      ``"per_example"``, which reads it from ``stats.batch_size``.
    - `variance`: ``"temporal"`` or ``"per_example"`` (see the module text).
    - `min_averaging_steps`: $M \ge 1$, the shortest time constant (in steps)
      of the running averages; caps the averaging weight at $1/M$.
    - `on_nonfinite`: what to do when the gradient, the per-example variance
      or the output contains NaN or infinity (as in
      [`meka`][probopt.optimizers.meka]).  ``"skip"`` (default): return zero
      updates, keep the state (``count`` included) and count the skip in
      ``state.skipped_updates``.  ``"raise"``: raise at run time through
      ``equinox.error_if``.

    **Extra arguments of `update`:**

    - `stats`: a [`BatchStats`][probopt.stats.BatchStats] with ``grad_var``;
      keyword-only and required when ``variance="per_example"``, ignored
      otherwise.  ``updates`` should be its ``grad_mean``.

    **References:** McAllester, *TTIC 31230: Stochastic Gradient Descent*, 2018.
    """
    if variance not in ("temporal", "per_example"):
        raise ValueError(f"`variance` must be 'temporal' or 'per_example'; got {variance!r}.")
    if not (isinstance(warmup_steps, (int, np.integer)) and warmup_steps >= 1):
        raise ValueError(f"`warmup_steps` must be an integer >= 1; got {warmup_steps!r}.")
    for name, value in (("lambda_b", lambda_b), ("lambda_eta", lambda_eta)):
        if is_concrete(value) and not np.all(np.asarray(value) > 0):
            raise ValueError(f"`{name}` must be positive; got {value!r}.")
    if is_concrete(eps) and not np.all(np.asarray(eps) >= 0):
        raise ValueError(f"`eps` must be non-negative; got {eps!r}.")
    if is_concrete(batch_size) and not np.all(np.asarray(batch_size) >= 1):
        raise ValueError(f"`batch_size` must be >= 1; got {batch_size!r}.")
    if is_concrete(min_averaging_steps) and not np.all(np.asarray(min_averaging_steps) >= 1):
        raise ValueError(f"`min_averaging_steps` must be >= 1; got {min_averaging_steps!r}.")
    _check_on_nonfinite(on_nonfinite)
    temporal = variance == "temporal"

    def init_fn(params):
        zeros = optax.tree.zeros_like(params)
        return SNRState(
            count=jnp.zeros([], jnp.int32),
            grad_mean=zeros,
            grad_sq_mean=zeros if temporal else None,
            example_variance=None if temporal else zeros,
            learning_rate=zeros,
            optimal_batch_size=jax.tree.map(lambda x: jnp.full_like(x, warmup_steps), params),
            skipped_updates=jnp.zeros([], jnp.int32),
        )

    def update_fn(updates, state, params=None, *, stats: BatchStats | None = None, **extra_args):
        del params, extra_args
        if temporal:
            n = batch_size
            observed_var = None
        else:
            if stats is None:
                raise TypeError(
                    "scale_by_snr(variance='per_example') needs the keyword argument "
                    "`stats=` (a probopt.BatchStats with per-example `grad_var`) in update."
                )
            if stats.grad_var is None:
                raise ValueError("`stats.grad_var` is None; compute BatchStats with per-parameter variances.")
            check_same_structure(updates, stats.grad_var, "updates", "stats.grad_var")
            n = stats.batch_size
            observed_var = stats.grad_var
        count = optax.safe_int32_increment(state.count)
        warm = count <= warmup_steps

        def average(old, new, b_star):
            n_ = jnp.asarray(n, old.dtype)
            max_rate = 1.0 / jnp.asarray(min_averaging_steps, old.dtype)
            rate = jnp.where(b_star > 0, jnp.minimum(max_rate, _safe_div(n_, b_star)), max_rate)
            return old + rate * (new - old)

        b_star_prev = state.optimal_batch_size
        grad_mean = jax.tree.map(average, state.grad_mean, updates, b_star_prev)
        if temporal:
            grad_sq_mean = jax.tree.map(
                lambda s, g, b: average(s, jnp.square(g), b), state.grad_sq_mean, updates, b_star_prev
            )
            # Clamped at zero: in floating point s - g^2 can come out slightly negative.
            example_var = jax.tree.map(
                lambda s, g: jnp.asarray(n, s.dtype) * jnp.maximum(s - jnp.square(g), 0),
                grad_sq_mean,
                grad_mean,
            )
            example_variance = None
        else:
            grad_sq_mean = None
            example_variance = jax.tree.map(average, state.example_variance, observed_var, b_star_prev)
            example_var = example_variance

        def next_b_star(g, v):
            b = _safe_div(jnp.asarray(lambda_b, v.dtype) * v, jnp.square(g) + jnp.asarray(eps, v.dtype))
            return jnp.where(count <= warmup_steps, jnp.asarray(warmup_steps, v.dtype), b)

        def learning_rate(g, v):
            n_ = jnp.asarray(n, v.dtype)
            lam_b = jnp.asarray(lambda_b, v.dtype)
            signal = n_ * jnp.square(g)
            at_cap = signal >= lam_b * v  # B >= B*: includes zero variance
            eta = jnp.asarray(lambda_eta, v.dtype) * jnp.where(at_cap, lam_b, _safe_div(signal, v))
            return jnp.where(warm, jnp.zeros_like(eta), eta)

        eta = jax.tree.map(learning_rate, grad_mean, example_var)
        b_star = jax.tree.map(next_b_star, grad_mean, example_var)
        scaled = jax.tree.map(lambda e, g: e * g, eta, updates)
        new_state = SNRState(
            count=count,
            grad_mean=grad_mean,
            grad_sq_mean=grad_sq_mean,
            example_variance=example_variance,
            learning_rate=eta,
            optimal_batch_size=b_star,
            skipped_updates=state.skipped_updates,
        )
        finite = _all_finite(updates, observed_var, scaled)
        return _apply_nonfinite_policy(on_nonfinite, finite, scaled, new_state, state, "snr_sgd")

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def snr_sgd(
    *,
    warmup_steps: int = 10,
    lambda_b: float = 16.0,
    lambda_eta: float = 1.0 / 32.0,
    eps: float = 1e-12,
    batch_size: float = 1.0,
    variance: Literal["temporal", "per_example"] = "temporal",
    min_averaging_steps: float = 2.0,
    on_nonfinite: str = "skip",
) -> optax.GradientTransformationExtraArgs:
    r"""SGD with McAllester's per-coordinate SNR learning rate: $\Phi \leftarrow \Phi - \eta_t\odot\hat g_t$.

    Same arguments as [`scale_by_snr`][probopt.optimizers.scale_by_snr];
    pass ``stats=`` to ``update`` when ``variance="per_example"``.
    """
    return optax.chain(
        scale_by_snr(
            warmup_steps=warmup_steps,
            lambda_b=lambda_b,
            lambda_eta=lambda_eta,
            eps=eps,
            batch_size=batch_size,
            variance=variance,
            min_averaging_steps=min_averaging_steps,
            on_nonfinite=on_nonfinite,
        ),
        optax.scale(-1.0),
    )
