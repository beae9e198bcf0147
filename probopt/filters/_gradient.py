r"""Meka's gradient filter: a Kalman filter over the true gradient $\nabla f(\theta_t)$.

The model (Chen et al., 2020, Eqs. 3-4) treats the full-batch gradient as the
latent state of a linear-Gaussian system driven by the optimizer's own steps:

$$\nabla f_t \mid \nabla f_{t-1} \sim \mathcal N\big(\nabla f_{t-1} + B_t\delta_{t-1},\, Q_t\big),
\qquad g_t \mid \nabla f_t \sim \mathcal N(\nabla f_t, \Sigma_t),$$

where $\delta_{t-1} = \theta_t - \theta_{t-1}$ is the step just taken,
$B_t\delta_{t-1}$ the minibatch Hessian-vector product at the **new** point
$\theta_t$ along that step, and $g_t$ the minibatch gradient.  Both noise
covariances are estimated from the per-example statistics of the same
minibatch (`BatchStats`), so the filter has no
noise hyperparameters to tune.

The prediction and the correction are the shared kernels
[`predict`][probopt.filters.predict] and [`condition`][probopt.filters.condition];
this module only turns a minibatch into their inputs.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._validation import check_same_structure, is_concrete
from ..stats import BatchStats
from ._belief import GaussianBelief
from ._kernels import condition, predict

COVARIANCES = ("scalar", "diagonal")


class NoiseEstimate(NamedTuple):
    r"""The smoothed (exponential moving average) noise levels of the gradient filter.

    Both fields are in the filter's covariance structure: shape ``()`` for
    ``covariance="scalar"``, pytrees shaped like the parameters for
    ``covariance="diagonal"``.  They are the averages *before* the noise floor
    is applied; the floored values actually used are reported in
    `GradientFilterInfo`.

    **Attributes:**

    - ``observation_noise``: EMA of $\hat\sigma_t$, the variance of the
      minibatch-mean gradient.
    - ``process_noise``: EMA of $\hat q_t$, the variance of the minibatch-mean
      Hessian-vector product.
    """

    observation_noise: Any
    process_noise: Any


class GradientFilterInfo(NamedTuple):
    r"""Everything one `GradientFilter.update` used.

    **Attributes:**

    - ``predicted``: the predictive belief $\mathcal N(m_t^-, P_t^-)$ with
      $m_t^- = m_{t-1} + B_t\delta_{t-1}$, $P_t^- = P_{t-1} + Q_t$.
    - ``gain``: the Kalman gain $k_t$ (shape ``()`` for scalar covariance, a
      pytree like the parameters for diagonal covariance).
    - ``innovation``: $g_t - m_t^-$, pytree like the parameters.
    - ``log_likelihood``: $\log\mathcal N(g_t; m_t^-, P_t^- + \Sigma_t)$, shape ``()``.
    - ``observation_noise``: $\Sigma_t$ as used (smoothed and floored).
    - ``process_noise``: $Q_t$ as used (smoothed).
    - ``observation_noise_estimate``: this minibatch's raw $\hat\sigma_t$.
    - ``process_noise_estimate``: this minibatch's raw $\hat q_t$.
    """

    predicted: GaussianBelief
    gain: Any
    innovation: Any
    log_likelihood: jax.Array
    observation_noise: Any
    process_noise: Any
    observation_noise_estimate: Any
    process_noise_estimate: Any


def _dtype_of(tree: Any) -> Any:
    return jnp.result_type(*jax.tree_util.tree_leaves(tree))


def _check_unit_interval(value: jax.Array, name: str) -> None:
    if is_concrete(value):
        arr = np.asarray(value)
        if arr.shape != () or not (0.0 <= float(arr) < 1.0):
            raise ValueError(f"`{name}` must be a scalar in [0, 1); got {arr!r}.")


class GradientFilter(eqx.Module):
    r"""Kalman filter over the true gradient, with noise levels estimated per minibatch.

    One `update` is

    $$m_t^- = m_{t-1} + B_t\delta_{t-1},\quad P_t^- = P_{t-1} + Q_t,\qquad
      K_t = P_t^-(P_t^- + \Sigma_t)^{-1},\quad m_t = m_t^- + K_t(g_t - m_t^-)$$

    with the Joseph-form covariance update (Chen et al., 2020, Eqs. 6-8).

    **Noise model.**  With ``n`` the batch size and the per-example variances
    of `BatchStats` (unbiased, ``1/(n-1)``):

    - ``covariance="scalar"`` (the paper's default, $\Sigma_t = \sigma_t I$,
      $Q_t = q_t I$): $\hat\sigma_t$ = ``grad_var_mean / n`` and
      $\hat q_t$ = ``hvp_var_mean / n``, the variance of the minibatch *mean*
      averaged over all $D$ coordinates.
    - ``covariance="diagonal"``: $\hat\sigma_t$ = ``grad_var / n`` and
      $\hat q_t$ = ``hvp_var / n`` per coordinate.

    The division by ``n`` follows from the observation being a mean of ``n``
    independent terms (Eq. 3).  Negative estimates (round-off in one-pass
    variance formulas) are clamped to zero.

    **Smoothing.**  $\sigma_t = \beta_\sigma\sigma_{t-1} + (1-\beta_\sigma)\hat\sigma_t$
    with $\beta_\sigma$ = ``noise_decay`` (0.999 in the paper); the average is
    initialised with the first estimate (at ``count == 0``) rather than
    bias-corrected.  The process noise is smoothed the same way with
    ``process_noise_decay`` (default 0: no smoothing, as in the paper's
    algorithm); its average starts at ``count == 1``, the first step along a
    nonzero $\delta$ (at ``count == 0`` the step is zero and so is $\hat q$).

    **Floor.**  The observation noise actually used is
    $\max(\sigma_t, \text{noise\_floor})$.  Without it a batch of size 1 (whose
    sample variance is reported as 0) or a noiseless problem would give
    $k_t = 1$ and then $P_t = 0$; with $Q_t = 0$ as well, every later gain
    would be 0 and the filter would ignore all further gradients.

    **Prior.**  $m_0 = 0$ and $P_0$ = ``prior_variance`` $\cdot I$ (``1e4``,
    so that $k \approx 1$ and $m \approx g$ at the first step).

    **Drift.**  The drift $B_t\delta_{t-1}$ is ``stats.hvp_mean`` whenever it
    is given, at every ``count`` (``count == 0`` included: the filter does not
    zero it there), and zero when ``stats.hvp_mean is None``.  Meka computes
    the first minibatch's HVP along its initial ``previous_step``, which is
    zero, so the drift vanishes at ``count == 0`` by construction; callers
    that pass their own statistics to the first `update` should pass
    ``hvp_mean=None`` (or zeros) for the same effect.

    Hyperparameters are array fields, so a new value does not recompile a
    jitted function that takes the filter as an argument.

    **Arguments:**

    - ``prior_variance``: $p_0$, positive scalar.
    - ``noise_decay``: $\beta_\sigma \in [0, 1)$.
    - ``process_noise_decay``: $\beta_q \in [0, 1)$.
    - ``noise_floor``: minimum observation noise, positive scalar (``1e-12``).
    - ``covariance``: ``"scalar"`` or ``"diagonal"`` (static).
    - ``form``: ``"joseph"`` or ``"standard"`` covariance update (static).

    **References:** Chen, Choi, Balles, Duvenaud, Hennig, *Self-Tuning
    Stochastic Optimization with Curvature-Aware Gradient Filtering*, ICBINB
    2020 (arXiv:2011.04803).
    """

    prior_variance: jax.Array = eqx.field(converter=jnp.asarray, default=1e4)
    noise_decay: jax.Array = eqx.field(converter=jnp.asarray, default=0.999)
    process_noise_decay: jax.Array = eqx.field(converter=jnp.asarray, default=0.0)
    noise_floor: jax.Array = eqx.field(converter=jnp.asarray, default=1e-12)
    covariance: str = eqx.field(static=True, default="scalar")
    form: str = eqx.field(static=True, default="joseph")

    def __check_init__(self):
        if self.covariance not in COVARIANCES:
            raise ValueError(
                f"`covariance` must be 'scalar' or 'diagonal'; got {self.covariance!r}."
            )
        if self.form not in ("joseph", "standard"):
            raise ValueError(f"`form` must be 'joseph' or 'standard'; got {self.form!r}.")
        _check_unit_interval(self.noise_decay, "noise_decay")
        _check_unit_interval(self.process_noise_decay, "process_noise_decay")
        for name in ("prior_variance", "noise_floor"):
            value = getattr(self, name)
            if is_concrete(value):
                arr = np.asarray(value)
                if arr.shape != () or not float(arr) > 0:
                    raise ValueError(f"`{name}` must be a positive scalar; got {arr!r}.")

    # ------------------------------------------------------------------ init
    def init(self, params: Any) -> GaussianBelief:
        """The prior $\\mathcal N(0, p_0 I)$ over a gradient shaped like ``params``."""
        mean = jax.tree_util.tree_map(jnp.zeros_like, params)
        variance = self.prior_variance.astype(_dtype_of(params))
        if self.covariance == "scalar":
            return GaussianBelief.scalar(mean, variance)
        return GaussianBelief.diagonal(mean, variance)

    def init_noise(self, params: Any) -> NoiseEstimate:
        """Zero noise averages in the filter's structure (overwritten at the first update)."""
        zero = self._zero_noise(params)
        return NoiseEstimate(observation_noise=zero, process_noise=zero)

    def _zero_noise(self, params: Any) -> Any:
        if self.covariance == "scalar":
            return jnp.zeros((), _dtype_of(params))
        return jax.tree_util.tree_map(jnp.zeros_like, params)

    # ------------------------------------------------------------------ noise
    def noise_estimates(self, stats: BatchStats, template: Any) -> tuple[Any, Any]:
        r"""Raw $(\hat\sigma_t, \hat q_t)$ of one minibatch, in the filter's structure.

        ``template`` is a pytree shaped like the parameters (it sets dtype and
        shapes).  $\hat q_t = 0$ when ``stats.hvp_mean is None``.
        """
        dtype = _dtype_of(template)
        n = jnp.asarray(stats.batch_size).astype(dtype)

        def per_mean(variance):
            # Variance of the minibatch mean; clamp round-off negatives.
            return jnp.maximum(jnp.asarray(variance).astype(dtype), 0) / n

        if self.covariance == "scalar":
            sigma = per_mean(stats.grad_var_mean)
            if stats.hvp_mean is None:
                q = jnp.zeros((), dtype)
            elif stats.hvp_var_mean is None:
                raise ValueError(
                    "`stats.hvp_var_mean` is None although `stats.hvp_mean` is given; "
                    "the gradient filter needs the HVP variance for its process noise."
                )
            else:
                q = per_mean(stats.hvp_var_mean)
            return sigma, q

        if stats.grad_var is None:
            raise ValueError(
                "`covariance='diagonal'` needs per-parameter variances, but "
                "`stats.grad_var` is None; compute the statistics with per-parameter "
                "variances."
            )
        check_same_structure(template, stats.grad_var, "params", "stats.grad_var")
        sigma = jax.tree_util.tree_map(per_mean, stats.grad_var)
        if stats.hvp_mean is None:
            q = jax.tree_util.tree_map(jnp.zeros_like, template)
        elif stats.hvp_var is None:
            raise ValueError(
                "`stats.hvp_var` is None although `stats.hvp_mean` is given; "
                "`covariance='diagonal'` needs per-parameter HVP variances."
            )
        else:
            check_same_structure(template, stats.hvp_var, "params", "stats.hvp_var")
            q = jax.tree_util.tree_map(per_mean, stats.hvp_var)
        return sigma, q

    # ------------------------------------------------------------------ update
    def update(
        self,
        belief: GaussianBelief,
        stats: BatchStats,
        noise: NoiseEstimate,
        count: Any,
    ) -> tuple[GaussianBelief, NoiseEstimate, GradientFilterInfo]:
        r"""One predict-and-condition step on a minibatch.

        **Arguments:**

        - ``belief``: the posterior $\mathcal N(m_{t-1}, P_{t-1})$ (or the prior at $t=0$).
        - ``stats``: the minibatch at $\theta_t$; ``grad_mean`` is the
          observation $g_t$ and ``hvp_mean`` (if not ``None``) the drift
          $B_t\delta_{t-1}$.
        - ``noise``: the running `NoiseEstimate`.
        - ``count``: iteration $t$ (``0`` at the first update), shape ``()``.

        **Returns:** ``(posterior, noise, info)``: the belief $\mathcal N(m_t, P_t)$,
        the updated noise averages and a
        `GradientFilterInfo`.
        """
        if not isinstance(stats, BatchStats):
            raise TypeError(f"`stats` must be a probopt BatchStats; got {type(stats).__name__}.")
        if belief.structure != self.covariance:
            raise ValueError(
                f"`belief` has {belief.structure!r} covariance but the filter uses "
                f"{self.covariance!r}; build it with `GradientFilter.init`."
            )
        check_same_structure(belief.mean, stats.grad_mean, "belief.mean", "stats.grad_mean")
        dtype = _dtype_of(belief.mean)
        count = jnp.asarray(count)
        sigma_hat, q_hat = self.noise_estimates(stats, belief.mean)

        def smooth(decay, start):
            decay = decay.astype(dtype)

            def leaf(old, new):
                return jnp.where(count <= start, new, decay * old + (1 - decay) * new)

            return leaf

        sigma = jax.tree_util.tree_map(smooth(self.noise_decay, 0), noise.observation_noise, sigma_hat)
        q = jax.tree_util.tree_map(smooth(self.process_noise_decay, 1), noise.process_noise, q_hat)
        floor = self.noise_floor.astype(dtype)
        sigma_used = jax.tree_util.tree_map(lambda s: jnp.maximum(s, floor), sigma)

        drift = stats.hvp_mean
        if drift is not None:
            drift = jax.tree_util.tree_map(lambda d, m: jnp.asarray(d).astype(m.dtype), drift, belief.mean)
        observation = jax.tree_util.tree_map(
            lambda g, m: jnp.asarray(g).astype(m.dtype), stats.grad_mean, belief.mean
        )
        predicted = predict(belief, process_noise=q, drift=drift)
        posterior, cinfo = condition(predicted, observation, sigma_used, form=self.form)
        info = GradientFilterInfo(
            predicted=predicted,
            gain=cinfo.gain,
            innovation=cinfo.innovation,
            log_likelihood=cinfo.log_likelihood,
            observation_noise=sigma_used,
            process_noise=q,
            observation_noise_estimate=sigma_hat,
            process_noise_estimate=q_hat,
        )
        return posterior, NoiseEstimate(sigma, q), info


class GradientFilterTrace(NamedTuple):
    """Per-step outputs of `run_gradient_filter`.

    Every leaf has a leading time axis of length ``T``.

    **Attributes:**

    - ``belief``: the posteriors $\\mathcal N(m_t, P_t)$, a stacked
      `GaussianBelief`.
    - ``noise``: the stacked `NoiseEstimate`.
    - ``info``: the stacked `GradientFilterInfo`.
    """

    belief: GaussianBelief
    noise: NoiseEstimate
    info: GradientFilterInfo


def run_gradient_filter(
    gradient_filter: GradientFilter,
    stats: BatchStats,
    *,
    belief: GaussianBelief | None = None,
    noise: NoiseEstimate | None = None,
    start_count: int = 0,
) -> GradientFilterTrace:
    r"""Run the gradient filter offline over a recorded sequence of minibatches (``lax.scan``).

    This re-filters a trajectory after the fact (e.g. with another
    ``noise_decay`` or covariance structure) and reproduces, step for step,
    the beliefs that the online optimizer computed from the same statistics
    (the same arithmetic; equal up to round-off from XLA's different fusion).

    **Arguments:**

    - ``gradient_filter``: the `GradientFilter`.
    - ``stats``: a `BatchStats` whose array leaves
      carry a leading time axis ``T`` (e.g. the ``stats`` returned by a
      training loop, stacked with ``jax.tree.map(jnp.stack, ...)``).
      ``batch_size`` may have shape ``(T,)`` or ``()``.
    - ``belief``: starting belief; the prior ``gradient_filter.init`` by default.
    - ``noise``: starting noise averages; zeros by default.
    - ``start_count``: iteration number of the first recorded step.

    **Returns:** a `GradientFilterTrace`.
    """
    if not isinstance(stats, BatchStats):
        raise TypeError(f"`stats` must be a probopt BatchStats; got {type(stats).__name__}.")
    leaves = jax.tree_util.tree_leaves(stats.grad_mean)
    if not leaves or any(jnp.ndim(x) < 1 for x in leaves):
        raise ValueError("`stats.grad_mean` must have a leading time axis on every leaf.")
    steps = jnp.shape(leaves[0])[0]
    if jnp.ndim(stats.batch_size) == 0:
        stats = stats._replace(batch_size=jnp.full((steps,), stats.batch_size))
    template = jax.tree_util.tree_map(lambda x: x[0], stats.grad_mean)
    if belief is None:
        belief = gradient_filter.init(template)
    if noise is None:
        noise = gradient_filter.init_noise(template)
    counts = start_count + jnp.arange(steps, dtype=jnp.int32)

    def body(carry, xs):
        current, averages = carry
        step_stats, count = xs
        posterior, averages, info = gradient_filter.update(current, step_stats, averages, count)
        return (posterior, averages), GradientFilterTrace(posterior, averages, info)

    _, trace = jax.lax.scan(body, (belief, noise), (stats, counts))
    return trace
