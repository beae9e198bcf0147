r"""Running averages with $\min(t, N)$ bias correction, simplified Adam, and
the conjugate rescaling of SGD hyperparameters with the batch size.

All formulas follow McAllester's TTIC 31230 lecture "Stochastic Gradient
Descent" (2018):

- the running average
  $\hat\mu_t = (1 - 1/\min(t, N))\,\hat\mu_{t-1} + x_t/\min(t, N)$ is exactly the
  mean of $x_1..x_t$ while $t \le N$ and an exponential moving average with
  time constant $N$ afterwards, so it has no initial bias toward zero;
- "Adam (simplified)" uses that average for both moments,
  $\Phi_{t+1} = \Phi_t - \eta\,\mu_t / \sqrt{s_t + \epsilon}$;
- conjugate hyperparameters $(\eta', N_g')$, tuned at batch size one and no
  momentum, give $N_g = \max(1, N_g'/B)$ and $\eta = B\eta'/N_g$ at batch size
  $B$ (see [`conjugate_to_momentum`][probopt.optimizers.conjugate_to_momentum]).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from .._validation import is_concrete
from ._nonfinite import all_finite as _all_finite
from ._nonfinite import apply_nonfinite_policy as _apply_nonfinite_policy
from ._nonfinite import check_on_nonfinite as _check_on_nonfinite


def _check_time_constant(value: Any, name: str) -> None:
    if is_concrete(value) and not np.all(np.asarray(value) >= 1):
        raise ValueError(f"`{name}` is a time constant in steps and must be >= 1; got {value!r}.")


def _check_positive(value: Any, name: str) -> None:
    if is_concrete(value) and not np.all(np.asarray(value) > 0):
        raise ValueError(f"`{name}` must be positive; got {value!r}.")


def running_average_rate(count: jax.Array, time_constant: Any) -> jax.Array:
    r"""The weight $1/\min(t, N)$ given to the $t$-th observation.

    **Arguments:**

    - `count`: $t \ge 1$, the index of the observation being added, shape ``()``.
    - `time_constant`: $N \ge 1$, shape ``()``.

    **Returns:** $1/\min(t, N)$ as a floating array of shape ``()``.
    """
    count = jnp.maximum(jnp.asarray(count), 1)
    return 1.0 / jnp.minimum(count.astype(jnp.result_type(float)), jnp.asarray(time_constant))


def update_running_average(average: Any, observation: Any, count: jax.Array, time_constant: Any) -> Any:
    r"""One step of the bias-corrected running average, leaf by leaf.

    $$\hat\mu_t = \Big(1 - \frac{1}{\min(t, N)}\Big)\hat\mu_{t-1}
      + \frac{1}{\min(t, N)}\,x_t .$$

    **Arguments:**

    - `average`: $\hat\mu_{t-1}$, a pytree ($\hat\mu_0$ is conventionally zero,
      but it is ignored at $t = 1$ because the weight of $x_1$ is one).
    - `observation`: $x_t$, a pytree like `average`.
    - `count`: $t \ge 1$, shape ``()``.
    - `time_constant`: $N \ge 1$.

    **Returns:** $\hat\mu_t$, a pytree like `average` with its dtypes.
    """
    _check_time_constant(time_constant, "time_constant")
    rate = running_average_rate(count, time_constant)
    return jax.tree.map(
        lambda m, x: m + rate.astype(jnp.result_type(m)) * (x - m), average, observation
    )


class RunningAverageState(NamedTuple):
    """State of [`running_average`][probopt.optimizers.running_average]."""

    count: jax.Array  # shape=(), number of observations averaged so far
    average: Any  # pytree like params


def running_average(time_constant: float) -> optax.GradientTransformation:
    r"""Replace the updates by their $\min(t, N)$ running average.

    Chained with a learning rate this is momentum in the lecture's "equivalent
    formulation", $\Phi_{t+1} = \Phi_t - \eta'\mu_t$, where
    $\eta' = N_g\,\eta$ relates it to heavy-ball momentum
    ``optax.sgd(eta, momentum=1 - 1/N_g)`` (up to the warm-up, where the
    average has no bias toward zero).

    **Arguments:**

    - `time_constant`: $N \ge 1$, the number of recent updates averaged.
    """
    _check_time_constant(time_constant, "time_constant")

    def init_fn(params):
        return RunningAverageState(count=jnp.zeros([], jnp.int32), average=optax.tree.zeros_like(params))

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_int32_increment(state.count)
        average = update_running_average(state.average, updates, count, time_constant)
        return average, RunningAverageState(count=count, average=average)

    return optax.GradientTransformation(init_fn, update_fn)


class SimplifiedAdamState(NamedTuple):
    """State of [`scale_by_simplified_adam`][probopt.optimizers.scale_by_simplified_adam]."""

    count: jax.Array  # shape=(), number of updates so far
    mu: Any  # running mean of the gradient, pytree like params
    s: Any  # running mean of the squared gradient, pytree like params
    skipped_updates: jax.Array  # shape=(), updates skipped for a non-finite gradient or step


def scale_by_simplified_adam(
    momentum_time_constant: float = 10.0,
    second_moment_time_constant: float = 1000.0,
    eps: float = 1e-8,
    *,
    on_nonfinite: str = "skip",
) -> optax.GradientTransformation:
    r"""McAllester's simplified Adam, without the learning rate.

    $$\mu_t = \Big(1 - \tfrac{1}{\min(t, N_g)}\Big)\mu_{t-1} + \tfrac{1}{\min(t, N_g)}\hat g_t,\qquad
      s_t = \Big(1 - \tfrac{1}{\min(t, N_s)}\Big)s_{t-1} + \tfrac{1}{\min(t, N_s)}\hat g_t^2,$$

    and the output is $\mu_t/\sqrt{s_t + \epsilon}$ per coordinate ($\epsilon$
    sits *inside* the square root, as on the slide).  Adam's
    $\beta_1 = 1 - 1/N_g$, $\beta_2 = 1 - 1/N_s$; Adam's
    $1/(1-\beta^t)$ correction is replaced by $\min(t, N)$, which "yields
    essentially the same effect".

    **Arguments:**

    - `momentum_time_constant`: $N_g \ge 1$.
    - `second_moment_time_constant`: $N_s \ge 1$.
    - `eps`: $\epsilon \ge 0$.
    - `on_nonfinite`: what to do when the gradient or the output contains NaN
      or infinity (as in [`meka`][probopt.optimizers.meka]).  ``"skip"``
      (default): return zero updates, keep the state (``count`` included) and
      count the skip in ``state.skipped_updates``.  ``"raise"``: raise at run
      time through ``equinox.error_if``.
    """
    _check_on_nonfinite(on_nonfinite)
    _check_time_constant(momentum_time_constant, "momentum_time_constant")
    _check_time_constant(second_moment_time_constant, "second_moment_time_constant")
    if is_concrete(eps) and not float(eps) >= 0:
        raise ValueError(f"`eps` must be non-negative; got {eps!r}.")

    def init_fn(params):
        return SimplifiedAdamState(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params),
            s=optax.tree.zeros_like(params),
            skipped_updates=jnp.zeros([], jnp.int32),
        )

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_int32_increment(state.count)
        mu = update_running_average(state.mu, updates, count, momentum_time_constant)
        squares = jax.tree.map(jnp.square, updates)
        s = update_running_average(state.s, squares, count, second_moment_time_constant)
        scaled = jax.tree.map(lambda m, v: m / jnp.sqrt(v + jnp.asarray(eps, v.dtype)), mu, s)
        new_state = SimplifiedAdamState(count=count, mu=mu, s=s, skipped_updates=state.skipped_updates)
        finite = _all_finite(updates, scaled)
        return _apply_nonfinite_policy(on_nonfinite, finite, scaled, new_state, state, "simplified_adam")

    return optax.GradientTransformation(init_fn, update_fn)


def simplified_adam(
    learning_rate: optax.ScalarOrSchedule,
    momentum_time_constant: float = 10.0,
    second_moment_time_constant: float = 1000.0,
    eps: float = 1e-8,
    *,
    on_nonfinite: str = "skip",
) -> optax.GradientTransformation:
    r"""McAllester's simplified Adam: $\Phi_{t+1} = \Phi_t - \eta\,\mu_t/\sqrt{s_t + \epsilon}$.

    **Arguments:**

    - `learning_rate`: $\eta$, a float or an optax schedule.
    - `momentum_time_constant`, `second_moment_time_constant`, `eps`,
      `on_nonfinite`: see
      [`scale_by_simplified_adam`][probopt.optimizers.scale_by_simplified_adam].
      (A skipped update is zero; a `learning_rate` schedule's own step count,
      in the chain's second state, still advances.)
    """
    return optax.chain(
        scale_by_simplified_adam(
            momentum_time_constant, second_moment_time_constant, eps, on_nonfinite=on_nonfinite
        ),
        optax.scale_by_learning_rate(learning_rate),
    )


class MomentumHyperparameters(NamedTuple):
    r"""Hyperparameters of heavy-ball SGD at a given batch size.

    The lecture's momentum is $v_t = (1 - 1/N_g)v_{t-1} + \eta\hat g_t$,
    $\Phi_{t+1} = \Phi_t - v_t$, which is ``optax.sgd(learning_rate,
    momentum=momentum_decay)``.

    **Attributes:**

    - `learning_rate`: $\eta$.
    - `momentum_time_constant`: $N_g \ge 1$.
    """

    learning_rate: Any
    momentum_time_constant: Any

    @property
    def momentum_decay(self) -> Any:
        r"""$1 - 1/N_g$, the ``momentum`` argument of ``optax.sgd``."""
        return 1.0 - 1.0 / self.momentum_time_constant


class ConjugateHyperparameters(NamedTuple):
    r"""Batch-size-free ("conjugate") SGD hyperparameters.

    **Attributes:**

    - `learning_rate`: $\eta'$, the learning rate appropriate at batch size one
      without momentum.
    - `momentum_time_constant`: $N_g'$, the momentum time constant, counted in
      *examples*, appropriate at batch size one.
    """

    learning_rate: Any
    momentum_time_constant: Any


def conjugate_to_momentum(
    conjugate_learning_rate: Any, conjugate_time_constant: Any, batch_size: Any
) -> MomentumHyperparameters:
    r"""Heavy-ball hyperparameters at batch size $B$ from conjugate ones.

    $$N_g = \max\!\Big(1, \frac{N_g'}{B}\Big), \qquad \eta = \frac{B\,\eta'}{N_g}.$$

    $\eta = B\eta'$ keeps two batch-one steps equal to one batch-two step;
    $N_g B = N_g'$ keeps the momentum averaging over the same number of
    examples; and $\eta = \eta'/N_g$ keeps the momentum step
    $N_g\eta\,\mu_t$ equal to the momentum-free step $\eta'\mu_t$.

    Note: the lecture's slide "Putting It Together" prints
    $N_g = \min(1, N_g'/B)$.  That would force $N_g \le 1$, i.e. no momentum
    at all, and contradicts the preceding slide ($N_g = N_g'/B$); since a time
    constant must be at least one step, the floor is read as $\max(1, \cdot)$.

    **Arguments:**

    - `conjugate_learning_rate`: $\eta' > 0$.
    - `conjugate_time_constant`: $N_g' \ge 1$ (in examples).
    - `batch_size`: $B \ge 1$.

    **Returns:** a [`MomentumHyperparameters`][probopt.optimizers.MomentumHyperparameters].
    """
    _check_positive(conjugate_learning_rate, "conjugate_learning_rate")
    _check_time_constant(conjugate_time_constant, "conjugate_time_constant")
    _check_time_constant(batch_size, "batch_size")
    batch_size = jnp.asarray(batch_size, jnp.result_type(float))
    time_constant = jnp.maximum(1.0, conjugate_time_constant / batch_size)
    return MomentumHyperparameters(
        learning_rate=batch_size * conjugate_learning_rate / time_constant,
        momentum_time_constant=time_constant,
    )


def momentum_to_conjugate(
    learning_rate: Any, momentum_time_constant: Any, batch_size: Any
) -> ConjugateHyperparameters:
    r"""Inverse of [`conjugate_to_momentum`][probopt.optimizers.conjugate_to_momentum].

    $N_g' = B N_g$ and $\eta' = \eta N_g / B$.  When the forward map was
    floored ($N_g = 1$ because $N_g' < B$) the original $N_g'$ cannot be
    recovered; this returns $N_g' = B$, which maps back to the same
    $(\eta, N_g)$.

    **Arguments:**

    - `learning_rate`: $\eta > 0$ at batch size $B$.
    - `momentum_time_constant`: $N_g \ge 1$ at batch size $B$.
    - `batch_size`: $B \ge 1$.
    """
    _check_positive(learning_rate, "learning_rate")
    _check_time_constant(momentum_time_constant, "momentum_time_constant")
    _check_time_constant(batch_size, "batch_size")
    batch_size = jnp.asarray(batch_size, jnp.result_type(float))
    return ConjugateHyperparameters(
        learning_rate=learning_rate * momentum_time_constant / batch_size,
        momentum_time_constant=momentum_time_constant * batch_size,
    )


def rescale_for_batch_size(
    learning_rate: Any, momentum_time_constant: Any, *, from_batch_size: Any, to_batch_size: Any
) -> MomentumHyperparameters:
    r"""Move tuned heavy-ball hyperparameters $(\eta, N_g)$ to another batch size.

    Goes through the conjugate pair $(\eta', N_g')$, which the lecture expects
    to be independent of the batch size.

    **Arguments:**

    - `learning_rate`, `momentum_time_constant`: $(\eta, N_g)$ tuned at
      `from_batch_size`.
    - `from_batch_size`, `to_batch_size`: batch sizes $\ge 1$.
    """
    conjugate = momentum_to_conjugate(learning_rate, momentum_time_constant, from_batch_size)
    return conjugate_to_momentum(conjugate.learning_rate, conjugate.momentum_time_constant, to_batch_size)
