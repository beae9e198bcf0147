r"""The predictive distribution of the change in objective along a direction.

Meka's probabilistic step sizes (Chen et al., 2020, Sec. 3, Eq. 11) model the
change $\Delta f(\alpha) = f(\theta - \alpha u) - f(\theta)$ for a step of
length $\alpha$ along a direction $u$ as Gaussian,

$$\Delta f(\alpha) \sim \mathcal N\big(\mu(\alpha), V(\alpha)\big),\qquad
  \mu(\alpha) = -\alpha a + \tfrac12 \alpha^2 \beta,\qquad
  V(\alpha) = 2s + \alpha^2 \tilde p + \tfrac14\alpha^4 \tilde q + \kappa_3\alpha^6.$$
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpyro.distributions as dist


class ValueChangeModel(eqx.Module):
    r"""Gaussian model of $\Delta f(\alpha)$ for a step $-\alpha u$ (Meka, Eq. 11 and App. B.2).

    Every coefficient comes from a belief the optimizer already holds:

    - ``slope`` $a = u^\top m_t$: the expected directional derivative; the
      first-order decrease is $\alpha a$.  From the gradient posterior mean.
    - ``curvature`` $\beta \approx u^\top B u$: the curvature along $u$; the
      second-order term is $\tfrac12\alpha^2\beta$.  From the Hessian-vector
      products (``ProbabilisticStepSize`` uses $\kappa\lVert u\rVert^2$).
    - ``value_variance`` $s$: the posterior variance of $f(\theta_t)$ from the
      `ValueFilter`.  It enters twice ($2s$): the current value and the value
      after the step are each known only up to variance $s$.  This constant
      term is what keeps the PI step away from 0: without it
      $\mu/\sqrt V \to -a/\sqrt{\tilde p}$ is smallest as $\alpha\to 0$.
    - ``gradient_variance`` $\tilde p = u^\top P_t u$: the uncertainty of the
      slope, contributing $\alpha^2\tilde p$.
    - ``curvature_variance`` $\tilde q \approx \operatorname{Var}[u^\top B u]$:
      the uncertainty of the curvature term, contributing $\tfrac14\alpha^4\tilde q$.
    - ``third_order`` $\kappa_3 \ge 0$: coefficient of the optional third-order
      term $\kappa_3\alpha^6$ (App. B.2), already multiplied by $\lVert
      u\rVert^6$; 0 by default.

    All fields are arrays of shape ``()`` (or broadcastable batches of them);
    the variances must be non-negative.
    """

    slope: jax.Array = eqx.field(converter=jnp.asarray)
    curvature: jax.Array = eqx.field(converter=jnp.asarray)
    value_variance: jax.Array = eqx.field(converter=jnp.asarray)
    gradient_variance: jax.Array = eqx.field(converter=jnp.asarray)
    curvature_variance: jax.Array = eqx.field(converter=jnp.asarray)
    third_order: jax.Array = eqx.field(default=0.0, converter=jnp.asarray)

    @property
    def dtype(self):
        """The floating dtype the coefficients promote to."""
        return jnp.result_type(
            self.slope,
            self.curvature,
            self.value_variance,
            self.gradient_variance,
            self.curvature_variance,
            self.third_order,
        )

    def mean(self, step_size: jax.Array) -> jax.Array:
        r"""$\mu(\alpha) = -\alpha a + \tfrac12\alpha^2\beta$."""
        alpha = jnp.asarray(step_size)
        return -alpha * self.slope + 0.5 * alpha**2 * self.curvature

    def variance(self, step_size: jax.Array) -> jax.Array:
        r"""$V(\alpha) = 2s + \alpha^2\tilde p + \tfrac14\alpha^4\tilde q + \kappa_3\alpha^6$."""
        alpha2 = jnp.asarray(step_size) ** 2
        return (
            2.0 * self.value_variance
            + alpha2 * self.gradient_variance
            + 0.25 * alpha2**2 * self.curvature_variance
            + alpha2**3 * self.third_order
        )

    def distribution(self, step_size: jax.Array) -> dist.Normal:
        r"""$\Delta f(\alpha)$ as a NumPyro ``Normal`` (batched over ``step_size``).

        ``model.distribution(alpha).sample(key, (n,))`` draws changes in
        objective; ``.cdf(0.)`` is the probability of improvement.
        """
        return dist.Normal(self.mean(step_size), jnp.sqrt(self.variance(step_size)))

    def scaled(self, loss_scale: jax.Array) -> "ValueChangeModel":
        r"""The model of the same problem with the loss multiplied by $c > 0$.

        With $u = m$ (Meka), $a\to c^2 a$, $\beta\to c^3\beta$, $s\to c^2 s$,
        $\tilde p\to c^4\tilde p$, $\tilde q\to c^6\tilde q$, $\kappa_3\to
        c^8\kappa_3$; a scale-free acquisition then picks $\alpha/c$, i.e. the
        same step $\alpha u$ in parameter space.
        """
        c = jnp.asarray(loss_scale)
        return ValueChangeModel(
            slope=c**2 * self.slope,
            curvature=c**3 * self.curvature,
            value_variance=c**2 * self.value_variance,
            gradient_variance=c**4 * self.gradient_variance,
            curvature_variance=c**6 * self.curvature_variance,
            third_order=c**8 * self.third_order,
        )
