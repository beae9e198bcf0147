r"""Probabilistic step sizes: filter the objective value, then maximise an acquisition.

``ProbabilisticStepSize`` is the [`StepSizeRule`][probopt.optimizers.StepSizeRule]
behind ``meka(learning_rate="pi" | "ei" | "quadratic")``.  At iteration $t$,
with direction $u = u_t$ and the step taken last $\delta = \delta_{t-1}$:

1. **Loss noise.** $r_t$ = moving average of ``loss_var / n``.
2. **Value filter.** Condition the belief over $f(\theta_t)$ on the minibatch
   loss $y_t$ with the quadratic-Taylor dynamics and the fitted correction
   $\lambda_t$ (`probopt.filters.ValueFilter`).
3. **Curvature.** $\kappa_t$ = moving average of the Rayleigh quotient
   $\delta^\top(B_t\delta)/\lVert\delta\rVert^2$.
4. **Predictive model** of $\Delta f(\alpha)$ for the step $-\alpha u$
   (`probopt.acquisition.ValueChangeModel`):

   - $a = u^\top m_t$;
   - $\beta = \kappa_t \lVert u\rVert^2$;
   - $s = \max(s_t, s_\text{floor})$;
   - $\tilde p = u^\top P_t u$;
   - $\tilde q = (u^\top Q_t u)\,\lVert u\rVert^2/\lVert\delta\rVert^2$;
   - $\kappa_3\lVert u\rVert^6$ (if ``third_order``).

5. **Solve** for the maximiser $\alpha^\star$ of the acquisition
   (`probopt.acquisition.solve_step_size`).
6. **Safeguard and smooth.** Accept $\alpha^\star$ if the solver found a
   finite positive maximiser, clip it to within a factor ``max_step_change``
   of the running average (of ``initial_step_size`` before the first
   acceptance), and update the average.  The step returned is ``scale``
   times the smaller of the average and $\alpha^\star$.

Reference: Chen, Choi, Balles, Duvenaud, Hennig, *Self-Tuning Stochastic
Optimization with Curvature-Aware Gradient Filtering*, ICBINB 2020, Sec. 3 and
Apps. A-B.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

from ..acquisition import ACQUISITIONS, ValueChangeModel, solve_step_size
from ..filters import GaussianBelief
from ..filters._value import ValueFilter, quadratic_form, taylor_dynamics
from ._step_size import StepSizeContext, StepSizeRule


class MovingAverage(NamedTuple):
    r"""A bias-corrected exponential moving average.

    After $k$ accepted values $x_1..x_k$ with decay $\rho$,
    ``value`` $= \sum_i \rho^{k-i} x_i / \sum_i \rho^{k-i}$ and ``weight``
    $= 1 - \rho^k$.  So the first value is taken as is, the first
    $\sim 1/(1-\rho)$ values are (nearly) equally averaged, and later ones
    enter with rate $1-\rho$.  ``weight == 0`` means nothing was averaged yet.

    **Attributes:** ``value`` and ``weight``, shape ``()``.
    """

    value: jax.Array
    weight: jax.Array


def _update_average(average: MovingAverage, sample: jax.Array, decay: jax.Array, accept: jax.Array) -> MovingAverage:
    weight = decay * average.weight + (1 - decay)
    value = average.value + (1 - decay) / weight * (sample - average.value)
    return MovingAverage(
        value=jnp.where(accept, value, average.value).astype(average.value.dtype),
        weight=jnp.where(accept, weight, average.weight).astype(average.weight.dtype),
    )


class ProbabilisticStepSizeState(NamedTuple):
    r"""State of `ProbabilisticStepSize`: every quantity it used.

    **Attributes** (shape ``()`` unless stated):

    - ``count``: number of calls so far, ``int32``.
    - ``value_belief``: $\mathcal N(u_t, s_t)$, the posterior over $f(\theta_t)$
      (scalar [`GaussianBelief`][probopt.filters.GaussianBelief]).
    - ``loss_noise``: $r_t$, a `MovingAverage`
      of ``loss_var / batch_size``.
    - ``curvature``: $\kappa_t$, a ``MovingAverage`` of
      $\delta^\top B\delta/\lVert\delta\rVert^2$.
    - ``step_average``: the ``MovingAverage`` of accepted (unscaled) steps.
    - ``correction``: $\lambda_t$ fitted by the value filter.
    - ``third_order``: $\kappa_{3,t} = \lambda_t/\lVert\delta_{t-1}\rVert^6$.
    - ``model``: the `ValueChangeModel` $(a, \beta, s, \tilde p, \tilde q,
      \kappa_3)$ the step was chosen from; ``model.distribution(alpha)`` is
      the predictive NumPyro ``Normal`` of $\Delta f(\alpha)$.
    - ``acquisition_value``: the acquisition at the solver's maximiser.
    - ``raw_step_size``: the solver's maximiser $\alpha^\star$ (``0`` when none).
    - ``step_size``: the step returned: ``scale`` times the moving average
      (or, with ``conservative=True``, times $\min(\bar\alpha, \alpha^\star)$).
    - ``fallback``: ``True`` when $\alpha^\star$ was not used (no curvature
      yet, or no finite positive maximiser), so the previous average (or
      ``initial_step_size``) was returned.
    - ``clipped``: ``True`` when $\alpha^\star$ was clipped to within
      ``max_step_change`` of the average before entering it.
    """

    count: jax.Array
    value_belief: GaussianBelief
    loss_noise: MovingAverage
    curvature: MovingAverage
    step_average: MovingAverage
    correction: jax.Array
    third_order: jax.Array
    model: ValueChangeModel
    acquisition_value: jax.Array
    raw_step_size: jax.Array
    step_size: jax.Array
    fallback: jax.Array
    clipped: jax.Array


def _vdot(a: Any, b: Any) -> jax.Array:
    return sum(jnp.sum(x * y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def _check_fraction(value: float, name: str) -> None:
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"`{name}` must be in [0, 1); got {value!r}.")


def _check_positive(value: float, name: str) -> None:
    if not float(value) > 0.0:
        raise ValueError(f"`{name}` must be positive; got {value!r}.")


class ProbabilisticStepSize(StepSizeRule):
    r"""Step sizes from a function-value filter and an acquisition function (Meka, Sec. 3).

    ``meka(learning_rate="pi")`` builds ``ProbabilisticStepSize(acquisition="pi")``;
    options go through ``meka(..., step_size_options={...})``.

    **Arguments:**

    - ``acquisition``: ``"pi"`` (probability of improvement, the paper's
      choice), ``"ei"`` (expected improvement, bounded search) or
      ``"quadratic"`` (minimiser $a/\beta$ of the mean, no uncertainty).
    - ``scale``: multiplier $c$ on the returned step (Meka, Fig. 6; default 1).
    - ``initial_step_size``: the step used while no curvature has been
      observed (the first update, where $\delta_{-1} = 0$ so the
      Hessian-vector product is empty) and on fallbacks before any step was
      accepted; it also anchors the warm-up clip (default ``1e-3``).
    - ``step_decay``: decay of the bias-corrected moving average of accepted
      steps (default ``0.999``, Meka Sec. 4; ``0`` returns $\alpha^\star$).
    - ``curvature_decay``: decay of the curvature average $\kappa$ (default
      ``0.999``; App. B.2 reports the averaged curvature was always positive).
    - ``loss_noise_decay``: decay of the average of the loss variance $r$
      (default ``0.999``).
    - ``value_prior_mean``, ``value_prior_variance``: the value filter's prior
      $\mathcal N(u_0, s_0)$ (defaults ``0`` and ``1e4``; see
      `probopt.filters.ValueFilter` for the first step).
    - ``third_order``: add the fitted third-order term
      $\kappa_3\alpha^6\lVert u\rVert^6$ to the predictive variance, with
      $\kappa_3 = \lambda_t/\lVert\delta_{t-1}\rVert^6$ (App. B.2, proposed for
      negative curvature and untested by the authors).  Default ``True``, a
      deliberate departure from the paper's main experiments: without it the
      predictive variance ignores the misfit of the quadratic model (a large
      $\lambda$ only inflates $s$, which makes PI *closer* to the quadratic
      rule), and in our runs Meka+PI diverged on the MNIST MLP and on
      Rosenbrock.  With it, a misfit ($\lambda_t > 0$) shortens the next step,
      and when the model fits ($\lambda_t = 0$) it vanishes.
    - ``value_std_floor``: relative floor $\rho$ on the value uncertainty,
      $s \ge (\rho\, a\, \bar\alpha)^2$ with $\bar\alpha$ the current average
      step: $f$ is never treated as known to better than a fraction $\rho$ of
      the first-order decrease of a typical step.  With $s = 0$ the PI step
      collapses to 0 (its optimum is $\alpha \sim \sqrt{2s/\tilde p}$).  The
      floor is scale-free (it scales like $f$).  Default ``1e-2``.
    - ``max_step_change``: a new $\alpha^\star$ is clipped to
      $[\bar\alpha/c_\text{max}, c_\text{max}\bar\alpha]$ before it enters the
      average, with $\bar\alpha$ = ``initial_step_size`` before the first
      acceptance, so the step warms up by at most this factor per iteration
      (a ProbLS-style safeguard; default ``10``).
    - ``max_iterations``: Newton iterations of the PI solver (default 100).
    - ``conservative``: return $\min(\bar\alpha_t, \alpha^\star_t)$ instead of
      the average $\bar\alpha_t$ alone, so smoothing delays increases of the
      step but never decreases (default ``True``; ``False`` is the paper's
      plain moving average, which kept taking long steps after the model had
      started to reject them).

    **Curvature along $u$.**  $B_t$ is only observed along $\delta_{t-1}$
    (the Hessian-vector product Meka already computes), so the curvature
    along the new direction is approximated by $\beta = \kappa\lVert
    u\rVert^2$, with $\kappa$ the averaged Rayleigh quotient along past steps.
    Likewise $Q_t$ is the covariance of $B_t\delta_{t-1}$, which grows like
    $\lVert\delta\rVert^2$; the variance of $u^\top B u$ is taken as
    $\tilde q = (u^\top Q_t u)\lVert u\rVert^2/\lVert\delta\rVert^2$
    (Hessian noise per unit direction, times $\lVert u\rVert^4$), which keeps
    $\tfrac14\alpha^4\tilde q$ in units of $f^2$ and the rule invariant to
    rescaling the loss.

    **Fallbacks** (each recorded in the state as ``fallback=True``): no
    curvature observed yet; $a \le 0$; curvature $\le 0$ with no variance
    growth to bound PI; any non-finite quantity.  The previous average (or
    ``initial_step_size``) is returned instead; NaN is never returned.
    """

    acquisition: str = eqx.field(static=True)
    scale: jax.Array
    initial_step_size: jax.Array
    step_decay: jax.Array
    curvature_decay: jax.Array
    loss_noise_decay: jax.Array
    value_filter: ValueFilter
    third_order: bool = eqx.field(static=True)
    value_std_floor: jax.Array
    max_step_change: jax.Array
    max_iterations: int = eqx.field(static=True)
    conservative: bool = eqx.field(static=True)

    def __init__(
        self,
        acquisition: str = "pi",
        *,
        scale: float = 1.0,
        initial_step_size: float = 1e-3,
        step_decay: float = 0.999,
        curvature_decay: float = 0.999,
        loss_noise_decay: float = 0.999,
        value_prior_mean: float = 0.0,
        value_prior_variance: float = 1e4,
        third_order: bool = True,
        value_std_floor: float = 1e-2,
        max_step_change: float = 10.0,
        max_iterations: int = 100,
        conservative: bool = True,
    ):
        if acquisition not in ACQUISITIONS:
            raise ValueError(f"`acquisition` must be one of {ACQUISITIONS}; got {acquisition!r}.")
        _check_positive(scale, "scale")
        _check_positive(initial_step_size, "initial_step_size")
        _check_fraction(step_decay, "step_decay")
        _check_fraction(curvature_decay, "curvature_decay")
        _check_fraction(loss_noise_decay, "loss_noise_decay")
        if not float(value_std_floor) >= 0.0:
            raise ValueError(f"`value_std_floor` must be non-negative; got {value_std_floor!r}.")
        if not float(max_step_change) >= 1.0:
            raise ValueError(f"`max_step_change` must be >= 1; got {max_step_change!r}.")
        if not isinstance(max_iterations, int) or max_iterations < 1:
            raise ValueError(f"`max_iterations` must be a positive int; got {max_iterations!r}.")
        if not isinstance(third_order, bool):
            raise TypeError(f"`third_order` must be a bool; got {type(third_order).__name__}.")
        self.acquisition = acquisition
        self.scale = jnp.asarray(scale)
        self.initial_step_size = jnp.asarray(initial_step_size)
        self.step_decay = jnp.asarray(step_decay)
        self.curvature_decay = jnp.asarray(curvature_decay)
        self.loss_noise_decay = jnp.asarray(loss_noise_decay)
        self.value_filter = ValueFilter(prior_mean=value_prior_mean, prior_variance=value_prior_variance)
        self.third_order = third_order
        self.value_std_floor = jnp.asarray(value_std_floor)
        self.max_step_change = jnp.asarray(max_step_change)
        self.max_iterations = max_iterations
        self.conservative = bool(conservative)

    def init(self, params: Any) -> ProbabilisticStepSizeState:
        leaves = jax.tree_util.tree_leaves(params)
        if not leaves:
            raise ValueError("`params` must contain at least one array.")
        dtype = jnp.result_type(*leaves)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"`params` must be floating point; got dtype {dtype}.")
        zero = jnp.zeros((), dtype)
        empty = MovingAverage(zero, zero)
        return ProbabilisticStepSizeState(
            count=jnp.zeros((), jnp.int32),
            value_belief=self.value_filter.init(dtype),
            loss_noise=empty,
            curvature=empty,
            step_average=empty,
            correction=zero,
            third_order=zero,
            model=ValueChangeModel(zero, zero, zero, zero, zero, zero),
            acquisition_value=zero,
            raw_step_size=zero,
            step_size=zero,
            fallback=jnp.asarray(False),
            clipped=jnp.asarray(False),
        )

    def __call__(
        self, state: ProbabilisticStepSizeState, context: StepSizeContext
    ) -> tuple[jax.Array, ProbabilisticStepSizeState]:
        stats = context.stats
        if stats.hvp_mean is None:
            raise ValueError(
                "ProbabilisticStepSize needs `stats.hvp_mean` (B_t delta_{t-1}): compute the "
                "batch statistics with `direction=state.previous_step` (make_step does this)."
            )
        dtype = state.step_size.dtype
        cast = lambda x: jnp.asarray(x).astype(dtype)  # noqa: E731
        belief, previous = context.belief, context.previous_belief
        step, direction = context.previous_step, context.direction

        # 1. Loss-observation noise r_t: variance of the minibatch mean, smoothed.
        batch_size = jnp.maximum(cast(stats.batch_size), 1)
        loss_noise = _update_average(
            state.loss_noise, cast(stats.loss_var) / batch_size, self.loss_noise_decay, True
        )

        # 2. Value filter with quadratic-Taylor dynamics over delta_{t-1}.
        step_sq = cast(_vdot(step, step))
        drift, model_variance = taylor_dynamics(previous, step, stats.hvp_mean, context.process_noise)
        value_belief, value_info = self.value_filter.update(
            state.value_belief,
            cast(stats.loss_mean),
            loss_noise.value,
            drift=cast(drift),
            model_variance=jnp.maximum(cast(model_variance), 0),
            step_norm=jnp.sqrt(step_sq),
            fit_correction=state.count > 0,
        )

        # 3. Curvature along the last step (the Rayleigh quotient), averaged.
        moved = step_sq > 0
        safe_step_sq = jnp.where(moved, step_sq, 1)
        rayleigh = cast(_vdot(step, stats.hvp_mean)) / safe_step_sq
        curvature = _update_average(
            state.curvature, rayleigh, self.curvature_decay, moved & jnp.isfinite(rayleigh)
        )

        # 4. The predictive model of Delta f(alpha) along -alpha u.
        direction_sq = cast(_vdot(direction, direction))
        slope = cast(_vdot(direction, belief.mean))
        gradient_variance = cast(quadratic_form(belief.variance, belief.structure, direction))
        hvp_variance = cast(quadratic_form(context.process_noise, belief.structure, direction))
        curvature_variance = jnp.where(moved, hvp_variance * direction_sq / safe_step_sq, 0)
        third = value_info.third_order * direction_sq**3 if self.third_order else jnp.zeros((), dtype)
        has_average = state.step_average.weight > 0
        reference = jnp.where(has_average, state.step_average.value, cast(self.initial_step_size))
        floor = (cast(self.value_std_floor) * slope * reference) ** 2
        model = ValueChangeModel(
            slope=slope,
            curvature=cast(curvature.value) * direction_sq,
            value_variance=jnp.maximum(value_belief.variance, floor),
            gradient_variance=jnp.maximum(gradient_variance, 0),
            curvature_variance=jnp.maximum(curvature_variance, 0),
            third_order=cast(third),
        )

        # 5. Maximise the acquisition.
        options = {"max_iterations": self.max_iterations} if self.acquisition == "pi" else {}
        solution = solve_step_size(model, self.acquisition, **options)
        candidate = solution.step_size.astype(dtype)

        # 6. Safeguards and smoothing.
        accept = (curvature.weight > 0) & solution.valid & jnp.isfinite(candidate) & (candidate > 0)
        change = cast(self.max_step_change)
        limited = jnp.clip(candidate, reference / change, reference * change)
        step_average = _update_average(state.step_average, limited, self.step_decay, accept)
        base = jnp.where(step_average.weight > 0, step_average.value, cast(self.initial_step_size))
        if self.conservative:
            # Smoothing may delay increases, never decreases: a step the current model
            # rejects as too long is not taken because the history liked longer ones.
            base = jnp.where(accept, jnp.minimum(base, candidate), base)
        alpha = (cast(self.scale) * base).astype(dtype)

        new_state = ProbabilisticStepSizeState(
            count=state.count + 1,
            value_belief=value_belief,
            loss_noise=loss_noise,
            curvature=curvature,
            step_average=step_average,
            correction=value_info.correction.astype(dtype),
            third_order=value_info.third_order.astype(dtype),
            model=model,
            acquisition_value=solution.acquisition_value.astype(dtype),
            raw_step_size=candidate,
            step_size=alpha,
            fallback=~accept,
            clipped=accept & (limited != candidate),
        )
        return alpha, new_state
