r"""The function-value filter behind Meka's probabilistic step sizes.

Chen et al. (2020), Appendix B, track the latent objective value $f_t =
f(\theta_t)$ with a scalar Kalman filter whose dynamics are the quadratic
Taylor expansion implied by the gradient filter:

$$f_t \mid f_{t-1} \sim \mathcal N\!\Big(f_{t-1} + m_{t-1}^\top\delta
  + \tfrac12 \delta^\top B_t \delta,\;
  \lambda_t + \delta^\top P_{t-1}\delta + \tfrac14 \delta^\top Q_t \delta\Big),
  \qquad y_t \mid f_t \sim \mathcal N(f_t, r_t),$$

with $\delta = \delta_{t-1} = \theta_t - \theta_{t-1}$, $(m_{t-1}, P_{t-1})$ the
gradient belief before the step, $B_t\delta$ the minibatch Hessian-vector
product and $Q_t$ its covariance, $y_t$ the minibatch mean loss and $r_t$ its
variance.  The scalar $\lambda_t \ge 0$ corrects the quadratic model where it
does not fit; it is chosen by maximising the marginal likelihood of $y_t$
(Appendix B.1), which has the closed form of
`fit_model_correction`.

The filter only *computes* the drift and the variances; prediction and
conditioning are [`predict`][probopt.filters.predict] and
[`condition`][probopt.filters.condition] on a scalar
[`GaussianBelief`][probopt.filters.GaussianBelief] over $f$.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from .._validation import check_finite, check_nonnegative, check_same_structure, check_shape
from ._belief import GaussianBelief
from ._kernels import condition, predict


def fit_model_correction(
    innovation: jax.Array, predicted_variance: jax.Array, observation_noise: jax.Array
) -> jax.Array:
    r"""Maximum-likelihood model correction $\lambda = \max(0, e^2 - C - r)$ (Meka, Eqs. 18-22).

    Marginalising $f_t$, the observation is $y_t \sim \mathcal N(u^-, C + \lambda
    + r)$ with $e = y_t - u^-$.  Its log-likelihood
    $-\tfrac12[\log(C+\lambda+r) + e^2/(C+\lambda+r)]$ is maximised over
    $\lambda \ge 0$ at $C + \lambda + r = e^2$, clipped at 0 (a variance cannot
    be negative).  Note that $r$ belongs inside the subtraction.

    **Arguments:**

    - ``innovation``: $e = y_t - u^-_t$, shape ``()``.
    - ``predicted_variance``: $C = s_{t-1} + \delta^\top P\delta + \tfrac14\delta^\top Q\delta$
      (everything but $\lambda$ and $r$), shape ``()``.
    - ``observation_noise``: $r_t$, shape ``()``.

    **Returns:** $\lambda \ge 0$, shape ``()``.
    """
    return jnp.maximum(innovation**2 - predicted_variance - observation_noise, 0.0)


def _vdot(a: Any, b: Any) -> jax.Array:
    products = [jnp.sum(x * y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))]
    return sum(products) if products else jnp.zeros(())


def quadratic_form(covariance: Any, structure: str, vector: Any) -> jax.Array:
    r"""$v^\top \Sigma v$ for a covariance in a belief's structure.

    **Arguments:**

    - ``covariance``: shape ``()`` (``"scalar"``: $\Sigma = \sigma I$), a pytree
      like ``vector`` or a scalar (``"diagonal"``), or ``(D, D)`` (``"dense"``).
    - ``structure``: ``"scalar"``, ``"diagonal"`` or ``"dense"``.
    - ``vector``: pytree $v$.

    **Returns:** shape ``()``.
    """
    if structure == "scalar":
        return jnp.asarray(covariance) * _vdot(vector, vector)
    if structure == "diagonal":
        leaves = jax.tree_util.tree_leaves(covariance)
        if len(leaves) == 1 and jnp.ndim(leaves[0]) == 0:
            return leaves[0] * _vdot(vector, vector)
        check_same_structure(vector, covariance, "vector", "covariance")
        squares = jax.tree_util.tree_map(lambda v: v * v, vector)
        return _vdot(covariance, squares)
    if structure == "dense":
        flat, _ = ravel_pytree(vector)
        covariance = jnp.asarray(covariance)
        if covariance.ndim == 0:
            return covariance * jnp.sum(flat * flat)
        if covariance.ndim == 1:
            return jnp.sum(covariance * flat * flat)
        return flat @ covariance @ flat
    raise ValueError(f"`structure` must be 'scalar', 'diagonal' or 'dense'; got {structure!r}.")


def taylor_dynamics(
    gradient_belief: GaussianBelief, step: Any, hvp: Any, hvp_noise: Any
) -> tuple[jax.Array, jax.Array]:
    r"""Drift and model variance of $f$ over one step under the quadratic Taylor model.

    $$d = m^\top\delta + \tfrac12\delta^\top (B\delta), \qquad
      v = \delta^\top P\delta + \tfrac14 \delta^\top Q \delta.$$

    The first variance term is the uncertainty of the gradient belief
    $\mathcal N(m, P)$ projected on the step; the second is that of the
    curvature term: $Q$ is the covariance of the Hessian-vector product
    $B\delta$, so $\operatorname{Var}[\tfrac12 \delta^\top (B\delta)] =
    \tfrac14\delta^\top Q\delta$.

    **Arguments:**

    - ``gradient_belief``: $\mathcal N(m_{t-1}, P_{t-1})$, the gradient belief
      *before* the step.
    - ``step``: $\delta_{t-1}$, pytree like the belief mean.
    - ``hvp``: $B_t\delta_{t-1}$ (``BatchStats.hvp_mean``), pytree like ``step``.
    - ``hvp_noise``: $Q_t$ in the belief's covariance structure (shape ``()``
      for scalar).

    **Returns:** ``(drift, model_variance)``, each shape ``()``.
    """
    check_same_structure(gradient_belief.mean, step, "gradient_belief.mean", "step")
    check_same_structure(step, hvp, "step", "hvp")
    drift = _vdot(gradient_belief.mean, step) + 0.5 * _vdot(step, hvp)
    variance = quadratic_form(gradient_belief.variance, gradient_belief.structure, step)
    variance = variance + 0.25 * quadratic_form(hvp_noise, gradient_belief.structure, step)
    return drift, variance


class ValueFilterInfo(NamedTuple):
    r"""What one `ValueFilter.update` did.

    **Attributes** (all shape ``()``):

    - ``prediction``: $u^-_t = u_{t-1} + d_t$, the predicted mean.
    - ``predicted_variance``: $C_t = s_{t-1} + v_t$ (without $\lambda_t$).
    - ``correction``: the fitted $\lambda_t \ge 0$.
    - ``third_order``: $\kappa_{3,t} = \lambda_t / \lVert\delta\rVert^6$, the
      coefficient of the third-order alternative (0 when $\delta = 0$).
    - ``gain``: the Kalman gain $\gamma_t$.
    - ``innovation``: $y_t - u^-_t$.
    - ``innovation_variance``: $C_t + \lambda_t + r_t$.
    - ``log_likelihood``: $\log\mathcal N(y_t; u^-_t, C_t + \lambda_t + r_t)$.
    """

    prediction: jax.Array
    predicted_variance: jax.Array
    correction: jax.Array
    third_order: jax.Array
    gain: jax.Array
    innovation: jax.Array
    innovation_variance: jax.Array
    log_likelihood: jax.Array


class ValueFilter(eqx.Module):
    r"""Scalar Kalman filter on the objective value $f(\theta_t)$ (Meka, App. B).

    Each step predicts with the quadratic Taylor drift and variance (see
    `taylor_dynamics`) plus the fitted
    correction $\lambda_t$, then conditions on the minibatch loss:

    $$u^- = u + d,\quad C = s + v,\quad
      \lambda = \max(0, (y-u^-)^2 - C - r),\quad s^- = C + \lambda,$$
    $$\gamma = \frac{s^-}{s^- + r},\quad u \leftarrow u^- + \gamma (y-u^-),\quad
      s \leftarrow (1-\gamma)^2 s^- + \gamma^2 r.$$

    **Third-order alternative (App. B.2, untested by the authors).** With
    negative curvature the quadratic model can promise unbounded decrease.
    The paper proposes to model the misfit as a third-order Taylor remainder,
    whose variance grows like $\lVert\delta\rVert^6$: $\kappa_3
    \lVert\delta\rVert^6$ instead of a constant $\lambda$, fitted the same way,
    $\kappa_3 = \lambda / \lVert\delta\rVert^6$.  At the step where it is
    fitted it adds exactly $\lambda$ to the variance, so the filter update is
    the same; the difference is in the step-size model, where it contributes
    $\kappa_3 \alpha^6 \lVert u\rVert^6$ to the predictive variance (the
    ``third_order`` option of ``ProbabilisticStepSize``, on by default).
    ``info.third_order`` reports $\kappa_3$ at every update.

    **The first observation.**  The prior is $\mathcal N(u_0, s_0)$ with
    $u_0 = 0$, $s_0 = 10^4$ (Meka, App. A).  A first loss far from 0 (say
    $y_1 = 10^3$) would make $\lambda_1 = y_1^2 - s_0 - r_1$ enormous, although
    nothing is wrong with the Taylor model: there is no model before the
    first observation, only a vague prior.  ``update(..., fit_correction=False)``
    skips the fit; the step-size rule does so at the first update, so
    $\lambda$ only ever measures the misfit of the Taylor dynamics.  The
    posterior barely differs ($\gamma_1 \approx 1$ either way).

    **Arguments:**

    - ``prior_mean``: $u_0$ (default ``0``).
    - ``prior_variance``: $s_0 > 0$ (default ``1e4``).

    Reference: Chen, Choi, Balles, Duvenaud, Hennig, *Self-Tuning Stochastic
    Optimization with Curvature-Aware Gradient Filtering*, ICBINB 2020,
    Appendix B.
    """

    prior_mean: jax.Array = eqx.field(default=0.0, converter=jnp.asarray)
    prior_variance: jax.Array = eqx.field(default=1e4, converter=jnp.asarray)

    def __check_init__(self):
        check_shape(self.prior_mean, (), "prior_mean")
        check_shape(self.prior_variance, (), "prior_variance")
        check_finite(self.prior_mean, "prior_mean")
        check_finite(self.prior_variance, "prior_variance")
        check_nonnegative(self.prior_variance, "prior_variance")

    def init(self, dtype: Any = None) -> GaussianBelief:
        """The prior $\\mathcal N(u_0, s_0)$ as a scalar belief with mean shape ``()``."""
        dtype = jnp.result_type(float) if dtype is None else dtype
        return GaussianBelief.scalar(
            jnp.asarray(self.prior_mean, dtype), jnp.asarray(self.prior_variance, dtype)
        )

    def update(
        self,
        belief: GaussianBelief,
        observation: jax.Array,
        observation_noise: jax.Array,
        *,
        drift: jax.Array,
        model_variance: jax.Array,
        step_norm: jax.Array | None = None,
        fit_correction: Any = True,
    ) -> tuple[GaussianBelief, ValueFilterInfo]:
        r"""One predict-fit-condition step.

        **Arguments:**

        - ``belief``: $\mathcal N(u_{t-1}, s_{t-1})$, scalar, mean shape ``()``.
        - ``observation``: $y_t$, the minibatch mean loss, shape ``()``.
        - ``observation_noise``: $r_t \ge 0$, the variance of $y_t$ (per-example
          loss variance divided by the batch size), shape ``()``.
        - ``drift``, ``model_variance``: $d_t$ and $v_t$ from
          `taylor_dynamics`, shape ``()``.
        - ``step_norm``: $\lVert\delta_{t-1}\rVert$ for the third-order
          coefficient (``None``: reported as 0).
        - ``fit_correction``: boolean (may be traced); ``False`` uses
          $\lambda_t = 0$.

        **Returns:** ``(posterior, info)`` with ``info`` a
        `ValueFilterInfo`.
        """
        if belief.structure != "scalar" or jnp.shape(belief.mean) != ():
            raise ValueError(
                "`belief` must be a scalar GaussianBelief over f with mean shape (); "
                f"got structure {belief.structure!r} and mean shape {jnp.shape(belief.mean)}."
            )
        dtype = belief.variance.dtype
        observation = jnp.asarray(observation, dtype)
        observation_noise = jnp.asarray(observation_noise, dtype)
        drift = jnp.asarray(drift, dtype)
        model_variance = jnp.asarray(model_variance, dtype)
        for value, name in (
            (observation, "observation"),
            (observation_noise, "observation_noise"),
            (drift, "drift"),
            (model_variance, "model_variance"),
        ):
            check_shape(value, (), name)
        check_nonnegative(observation_noise, "observation_noise")
        check_nonnegative(model_variance, "model_variance")

        prediction = belief.mean + drift
        predicted_variance = belief.variance + model_variance
        correction = fit_model_correction(observation - prediction, predicted_variance, observation_noise)
        correction = jnp.where(jnp.asarray(fit_correction), correction, jnp.zeros_like(correction))
        predicted = predict(belief, process_noise=model_variance + correction, drift=drift)
        posterior, info = condition(predicted, observation, observation_noise)

        if step_norm is None:
            third_order = jnp.zeros_like(correction)
        else:
            norm6 = jnp.asarray(step_norm, dtype) ** 6
            positive = norm6 > 0
            third_order = jnp.where(positive, correction / jnp.where(positive, norm6, 1.0), 0.0)
        return posterior, ValueFilterInfo(
            prediction=prediction,
            predicted_variance=predicted_variance,
            correction=correction,
            third_order=third_order,
            gain=info.gain,
            innovation=info.innovation,
            innovation_variance=info.innovation_variance,
            log_likelihood=info.log_likelihood,
        )
