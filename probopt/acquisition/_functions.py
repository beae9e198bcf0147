r"""Acquisition functions: scores of a predictive distribution of $\Delta f$.

Each is a pure function of a NumPyro ``Normal`` over the change in objective
(e.g. ``ValueChangeModel.distribution(alpha)``); larger is better.
Improvement means $\Delta f < 0$.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from jax.scipy.special import ndtr


def _check_normal(predictive) -> None:
    if not isinstance(predictive, dist.Normal):
        raise TypeError(
            "`predictive` must be a numpyro.distributions.Normal over the change in objective; "
            f"got {type(predictive).__name__}."
        )


def probability_of_improvement(predictive: dist.Normal) -> jax.Array:
    r"""$\mathrm{PI} = P(\Delta f < 0) = \Phi(-\mu/\sqrt V)$ (Kushner, 1964; Meka, Eq. 12).

    Scale-free: multiplying the loss by a constant leaves it unchanged.

    **Arguments:**

    - ``predictive``: ``numpyro.distributions.Normal`` with ``loc`` $\mu$ and
      ``scale`` $\sqrt V$ (any batch shape).

    **Returns:** an array of the batch shape, in $[0, 1]$.
    """
    _check_normal(predictive)
    return ndtr(-predictive.loc / predictive.scale)


def expected_improvement(predictive: dist.Normal) -> jax.Array:
    r"""$\mathrm{EI} = \mathbb E[\max(0, -\Delta f)] = \sigma\varphi(\mu/\sigma) - \mu\Phi(-\mu/\sigma)$.

    Jones et al. (1998).  Meka (Sec. 3.1, App. D) found it less robust than
    PI: its maximiser is large when the variance grows slowly.

    **Arguments:**

    - ``predictive``: ``numpyro.distributions.Normal`` over $\Delta f$.

    **Returns:** an array of the batch shape, $\ge 0$.
    """
    _check_normal(predictive)
    mu, sigma = predictive.loc, predictive.scale
    z = -mu / sigma
    density = jnp.exp(-0.5 * z**2) / jnp.sqrt(2.0 * jnp.pi).astype(z.dtype)
    return sigma * density + (-mu) * ndtr(z)


def expected_decrease(predictive: dist.Normal) -> jax.Array:
    r"""$-\mathbb E[\Delta f] = -\mu$: the score maximised by the quadratic rule.

    Ignores all uncertainty; for $\mu(\alpha) = -\alpha a + \tfrac12\alpha^2\beta$
    with $\beta > 0$ its maximiser is $\alpha = a/\beta$.

    **Arguments:**

    - ``predictive``: ``numpyro.distributions.Normal`` over $\Delta f$.

    **Returns:** an array of the batch shape.
    """
    _check_normal(predictive)
    return -predictive.loc
