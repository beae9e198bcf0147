"""How a filtering optimizer chooses its step length.

Meka and AdaMeka compute a direction ``u`` from the gradient belief and step
``theta <- theta - alpha * u``.  The step length ``alpha`` comes from a
[`StepSizeRule`][probopt.optimizers.StepSizeRule]: a constant, or a
probabilistic rule that filters the function value and maximises an
acquisition function.  Rules see everything the optimizer knows through a
[`StepSizeContext`][probopt.optimizers.StepSizeContext].
"""

from __future__ import annotations

import abc
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

from ..filters import GaussianBelief
from ..stats import BatchStats


class StepSizeContext(NamedTuple):
    r"""Everything a step-size rule may use at iteration $t$.

    **Attributes:**

    - ``direction``: $u_t$, pytree like ``params``; the step is $-\alpha u_t$.
    - ``previous_belief``: the gradient posterior at $t-1$ ($m_{t-1}$, $P_{t-1}$).
    - ``belief``: the gradient posterior at $t$ ($m_t$, $P_t$).
    - ``previous_step``: $\delta_{t-1} = \theta_t - \theta_{t-1}$, pytree.
    - ``stats``: the [`BatchStats`][probopt.stats.BatchStats] at $\theta_t$
      (``hvp_mean`` is $B_t\delta_{t-1}$).
    - ``process_noise``: $Q_t$ as used by the gradient filter.
    - ``observation_noise``: $\Sigma_t$ as used by the gradient filter.
    - ``count``: iteration counter $t$ (``0`` at the first update), shape ``()``.
    """

    direction: Any
    previous_belief: GaussianBelief
    belief: GaussianBelief
    previous_step: Any
    stats: BatchStats
    process_noise: Any
    observation_noise: Any
    count: jax.Array


class StepSizeRule(eqx.Module):
    """Abstract step-size rule: ``init(params) -> state``, ``__call__(state, context) -> (alpha, state)``."""

    @abc.abstractmethod
    def init(self, params: Any) -> Any:
        """Initial rule state (a pytree of arrays)."""

    @abc.abstractmethod
    def __call__(self, state: Any, context: StepSizeContext) -> tuple[jax.Array, Any]:
        """Return the step length ``alpha`` (shape ``()``) and the new rule state."""


class ConstantStepSize(StepSizeRule):
    """A fixed step length (the ``learning_rate=float`` case of Meka)."""

    learning_rate: jax.Array = eqx.field(converter=jnp.asarray)

    def init(self, params: Any) -> Any:
        return ()

    def __call__(self, state: Any, context: StepSizeContext) -> tuple[jax.Array, Any]:
        return jnp.asarray(self.learning_rate), state
