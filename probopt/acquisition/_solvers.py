r"""Step sizes that maximise an acquisition function, inside ``jit``.

All solvers take a [`ValueChangeModel`][probopt.acquisition.ValueChangeModel]
and return a [`StepSolution`][probopt.acquisition.StepSolution]; they use only
``jax.lax`` control flow on scalars, so they compile once, ``vmap`` over
batches of models and keep the model's dtype.  When no finite positive
maximiser exists they say so (``valid=False``, ``step_size=0``) instead of
returning NaN or a negative number; the caller decides on the fallback
(``ProbabilisticStepSize`` reuses its moving average of accepted steps).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtr

from ._functions import expected_decrease, expected_improvement
from ._predictive import ValueChangeModel

ACQUISITIONS = ("pi", "ei", "quadratic")


class StepSolution(NamedTuple):
    r"""Result of a step-size solver.

    **Attributes:**

    - ``step_size``: the maximiser $\alpha^\star$, finite and $\ge 0$; ``0`` when
      ``valid`` is ``False``.  Shape ``()``.
    - ``valid``: ``True`` when a finite, positive maximiser was found from
      finite inputs.  Boolean, shape ``()``.
    - ``acquisition_value``: the acquisition at ``step_size`` (``0`` when not
      valid).
    - ``iterations``: number of solver iterations used, ``int32``.
    """

    step_size: jax.Array
    valid: jax.Array
    acquisition_value: jax.Array
    iterations: jax.Array


def _coefficients(model: ValueChangeModel):
    dtype = model.dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.result_type(float)
    fields = (
        model.slope,
        model.curvature,
        model.value_variance,
        model.gradient_variance,
        model.curvature_variance,
        model.third_order,
    )
    for field in fields:
        if jnp.shape(field) != ():
            raise ValueError(
                "step-size solvers work on one model at a time (every coefficient of shape ()); "
                f"got a coefficient of shape {jnp.shape(field)}.  Use jax.vmap for batches."
            )
    return dtype, tuple(jnp.asarray(field, dtype) for field in fields)


def pi_stationarity(model: ValueChangeModel, step_size: jax.Array) -> jax.Array:
    r"""The PI stationarity polynomial $N(\alpha)$, zero at the PI-optimal step.

    $\frac{d}{d\alpha}\,\mu/\sqrt V = 0 \iff 2\mu' V - \mu V' = 0$, which for
    $\mu = -\alpha a + \tfrac12\alpha^2\beta$ and
    $V = 2s + \alpha^2\tilde p + \tfrac14\alpha^4\tilde q + \kappa_3\alpha^6$ is,
    halved,

    $$N(\alpha) = -2as + 2\beta s\alpha + \tfrac12\beta\tilde p\alpha^3
      + \tfrac14 a\tilde q\alpha^4 + 2a\kappa_3\alpha^6 - \tfrac12\beta\kappa_3\alpha^7.$$

    Without the third-order term it is the quartic
    $\tfrac14 a\tilde q\alpha^4 + \tfrac12\beta\tilde p\alpha^3 + 2\beta s\alpha - 2as$.
    $N < 0$ where $\mu/\sqrt V$ is decreasing.
    """
    a, beta, s, p, q, c = (
        model.slope,
        model.curvature,
        model.value_variance,
        model.gradient_variance,
        model.curvature_variance,
        model.third_order,
    )
    x = jnp.asarray(step_size)
    return (
        -2 * a * s
        + 2 * beta * s * x
        + 0.5 * beta * p * x**3
        + 0.25 * a * q * x**4
        + 2 * a * c * x**6
        - 0.5 * beta * c * x**7
    )


def pi_step_size(model: ValueChangeModel, *, max_iterations: int = 100) -> StepSolution:
    r"""The step maximising the probability of improvement $\Phi(-\mu/\sqrt V)$ (Meka, Eqs. 12-13).

    Solves $N(\alpha) = 0$ (see [`pi_stationarity`][probopt.acquisition.pi_stationarity])
    with a safeguarded Newton iteration:

    - **Positive curvature** ($\beta > 0$): $N(0) = -2as < 0 < N(a/\beta)$
      and $N$ is increasing and convex on $[0, a/\beta]$ (also with the
      third-order term), so there is exactly one root, below the quadratic-rule
      step.  Newton started at $a/\beta$ decreases monotonically to it.
    - **Curvature $\le 0$**: the coefficients of $N$ change sign once, so there
      is one positive root if $\tilde q > 0$ or $\kappa_3 > 0$; an upper
      bracket is found by doubling from the scale
      $\min\{(8s/\tilde q)^{1/4}, (s/\kappa_3)^{1/6}\}$, then Newton runs
      inside the bracket.  If $\tilde q = \kappa_3 = 0$, $\mu/\sqrt V$
      decreases for ever: no finite maximiser (``valid=False``).
    - Every Newton iterate that is not finite or leaves the bracket is replaced
      by a bisection step.

    Invalid (``valid=False``, ``step_size=0``): non-finite inputs, $a \le 0$
    (no expected decrease along the direction), $s \le 0$ (the optimum is
    $\alpha\to 0$; callers floor $s$), negative variances, unbounded PI.

    The problem is solved in the dimensionless variable $x = \alpha/\alpha_0$
    with $N$ divided by $2as$, so float32 works for any loss scale.

    **Arguments:**

    - ``model``: a [`ValueChangeModel`][probopt.acquisition.ValueChangeModel]
      with shape-``()`` coefficients (``vmap`` for batches).
    - ``max_iterations``: cap on Newton/bisection iterations (default 100;
      typically 3-10 are used).

    **Returns:** a [`StepSolution`][probopt.acquisition.StepSolution].
    """
    dtype, (a, beta, s, p, q, c) = _coefficients(model)
    eps = jnp.finfo(dtype).eps
    finite = jnp.all(jnp.isfinite(jnp.stack([a, beta, s, p, q, c])))
    usable = finite & (a > 0) & (s > 0) & (p >= 0) & (q >= 0) & (c >= 0)
    one = jnp.ones((), dtype)
    zero = jnp.zeros((), dtype)
    # Sanitise so that unused branches never produce NaN (NaN would leak through vmap/grad).
    a = jnp.where(usable, a, one)
    beta = jnp.where(usable, beta, one)
    s = jnp.where(usable, s, one)
    p, q, c = (jnp.where(usable, v, zero) for v in (p, q, c))

    convex = beta > 0
    inf = jnp.asarray(jnp.inf, dtype)
    q_scale = jnp.where(q > 0, (8 * s / jnp.where(q > 0, q, one)) ** 0.25, inf)
    c_scale = jnp.where(c > 0, (s / jnp.where(c > 0, c, one)) ** (1.0 / 6.0), inf)
    alpha0 = jnp.where(convex, a / jnp.where(convex, beta, one), jnp.minimum(q_scale, c_scale))
    bounded = convex | (q > 0) | (c > 0)
    scale_ok = jnp.isfinite(alpha0) & (alpha0 > 0)
    alpha0 = jnp.where(scale_ok, alpha0, one)

    # N(alpha0 x) / (2 a s), written with ratios that do not overflow.
    k1 = beta * alpha0 / a
    ps = (alpha0 * jnp.sqrt(p / s)) ** 2
    cs = (alpha0 * (c / s) ** (1.0 / 6.0)) ** 6
    k3 = 0.25 * k1 * ps
    k4 = (alpha0 * (q / (8 * s)) ** 0.25) ** 4
    k6 = cs
    k7 = -0.25 * k1 * cs

    def poly(x):
        x2 = x * x
        x3 = x2 * x
        value = -1 + k1 * x + k3 * x3 + k4 * x3 * x + k6 * x3 * x3 + k7 * x3 * x3 * x
        slope = k1 + 3 * k3 * x2 + 4 * k4 * x3 + 6 * k6 * x2 * x3 + 7 * k7 * x3 * x3
        return value, slope

    # Upper bracket: x = 1 for positive curvature, else double until N > 0.
    max_doublings = int(jnp.finfo(dtype).maxexp) + 8

    def grow_cond(carry):
        hi, count = carry
        value, _ = poly(hi)
        return (value <= 0) & jnp.isfinite(hi) & (count < max_doublings)

    def grow_body(carry):
        hi, count = carry
        return 2 * hi, count + 1

    hi, _ = jax.lax.while_loop(grow_cond, grow_body, (one, jnp.zeros((), jnp.int32)))
    hi_value, _ = poly(hi)
    bracketed = jnp.isfinite(hi) & (hi_value > 0)
    hi = jnp.where(bracketed, hi, one)

    def newton_cond(carry):
        _, _, _, count, done = carry
        return (~done) & (count < max_iterations)

    def newton_body(carry):
        x, lo, hi, count, _ = carry
        value, slope = poly(x)
        lo = jnp.where(value < 0, x, lo)
        hi = jnp.where(value > 0, x, hi)
        newton = x - value / slope
        converged = (jnp.isfinite(newton) & (jnp.abs(newton - x) <= 4 * eps * x)) | (value == 0)
        inside = jnp.isfinite(newton) & (newton >= lo) & (newton <= hi)
        middle = jnp.where(lo > 0, jnp.sqrt(lo * hi), 0.5 * hi)
        new_x = jnp.where(converged, x, jnp.where(inside, newton, middle))
        done = converged | (hi - lo <= 4 * eps * hi)
        return new_x, lo, hi, count + 1, done

    x, _, _, iterations, _ = jax.lax.while_loop(
        newton_cond,
        newton_body,
        (hi, zero, hi, jnp.zeros((), jnp.int32), jnp.asarray(False)),
    )
    alpha = alpha0 * x
    # PI = Phi(-mu/sqrt(V)) in the scaled variables, so that huge steps do not overflow alpha^4.
    x2 = x * x
    spread = jnp.sqrt(1 + 0.5 * ps * x2 + k4 * x2 * x2 + 0.5 * cs * x2 * x2 * x2)
    z = (alpha0 * a / jnp.sqrt(2 * s)) * x * (1 - 0.5 * k1 * x) / spread
    value = ndtr(z)
    valid = usable & bounded & scale_ok & bracketed & jnp.isfinite(alpha) & (alpha > 0)
    valid = valid & jnp.isfinite(value)
    alpha = jnp.where(valid, alpha, zero)
    return StepSolution(
        step_size=alpha,
        valid=valid,
        acquisition_value=jnp.where(valid, value, zero),
        iterations=iterations,
    )


def quadratic_step_size(model: ValueChangeModel, *, scale: float = 1.0) -> StepSolution:
    r"""The quadratic rule $\alpha = c\, a/\beta$: the minimiser of the mean $\mu(\alpha)$, scaled.

    Ignores every variance.  Without noise and with $c=1$ it is the exact line
    search on the local quadratic model; Meka (Fig. 6) found it needs
    $c \approx 0.1$ in the stochastic setting.  Invalid when $\beta \le 0$ or
    $a \le 0$ (the quadratic model has no positive minimiser) or on non-finite
    input.

    **Arguments:**

    - ``model``: a [`ValueChangeModel`][probopt.acquisition.ValueChangeModel].
    - ``scale``: the factor $c > 0$ (default 1).

    **Returns:** a [`StepSolution`][probopt.acquisition.StepSolution] whose
    ``acquisition_value`` is the expected decrease $-\mu(\alpha)$.
    """
    dtype, (a, beta, _, _, _, _) = _coefficients(model)
    zero = jnp.zeros((), dtype)
    one = jnp.ones((), dtype)
    finite = jnp.all(jnp.isfinite(jnp.stack([a, beta])))
    usable = finite & (a > 0) & (beta > 0)
    alpha = jnp.asarray(scale, dtype) * a / jnp.where(usable, beta, jnp.ones((), dtype))
    valid = usable & jnp.isfinite(alpha) & (alpha > 0)
    alpha = jnp.where(valid, alpha, zero)
    # Only the mean is used, so any non-negative variance keeps the Normal well defined.
    safe_model = ValueChangeModel(
        jnp.where(valid, a, zero), jnp.where(valid, beta, zero), one, zero, zero, zero
    )
    value = expected_decrease(safe_model.distribution(alpha))
    return StepSolution(alpha, valid, jnp.where(valid, value, zero), jnp.zeros((), jnp.int32))


def ei_step_size(
    model: ValueChangeModel,
    *,
    reference: jax.Array | None = None,
    decades: float = 3.0,
    grid_size: int = 129,
    refinements: int = 40,
) -> StepSolution:
    r"""The step maximising expected improvement, by a bounded search in $\log\alpha$.

    EI (see [`expected_improvement`][probopt.acquisition.expected_improvement])
    need not be unimodal and, with slowly growing variance, is maximised at
    very large steps (Meka, App. B.2).  The search is therefore bounded: a
    log-spaced grid of ``grid_size`` points on
    $[\alpha_\text{ref} 10^{-d}, \alpha_\text{ref} 10^{d}]$, then a
    golden-section refinement around the best grid point.  The reference
    $\alpha_\text{ref}$ defaults to the PI step (else the quadratic step),
    which keeps the search scale-free.

    **Arguments:**

    - ``model``: a [`ValueChangeModel`][probopt.acquisition.ValueChangeModel].
    - ``reference``: $\alpha_\text{ref} > 0$ (default: PI step).
    - ``decades``: half-width $d$ of the search range in decades (default 3).
    - ``grid_size``, ``refinements``: grid points and golden-section iterations.

    **Returns:** a [`StepSolution`][probopt.acquisition.StepSolution]; invalid
    when no finite reference exists or EI is not positive.
    """
    dtype, (a, beta, s, p, q, c) = _coefficients(model)
    zero = jnp.zeros((), dtype)
    one = jnp.ones((), dtype)
    if reference is None:
        pi = pi_step_size(model)
        quad = quadratic_step_size(model)
        reference = jnp.where(pi.valid, pi.step_size, quad.step_size)
    reference = jnp.asarray(reference, dtype)
    finite = jnp.all(jnp.isfinite(jnp.stack([a, beta, s, p, q, c])))
    usable = finite & (s >= 0) & (p >= 0) & (q >= 0) & (c >= 0)
    usable = usable & jnp.isfinite(reference) & (reference > 0)
    defaults = (one, one, one, zero, zero, zero)
    safe_model = ValueChangeModel(
        *(jnp.where(usable, v, d) for v, d in zip((a, beta, s, p, q, c), defaults))
    )
    reference = jnp.where(usable, reference, one)

    def score(log_alpha):
        alpha = jnp.exp(log_alpha)
        # V = 0 would divide by 0; EI of a deterministic change is max(0, -mu).
        variance = safe_model.variance(alpha)
        positive = variance > jnp.finfo(dtype).tiny
        spread = ValueChangeModel(
            safe_model.slope,
            safe_model.curvature,
            jnp.where(positive, safe_model.value_variance, one),
            safe_model.gradient_variance,
            safe_model.curvature_variance,
            safe_model.third_order,
        )
        value = jnp.where(
            positive,
            expected_improvement(spread.distribution(alpha)),
            jnp.maximum(-safe_model.mean(alpha), 0),
        )
        return jnp.where(jnp.isfinite(value), value, -jnp.inf)

    width = jnp.asarray(decades * jnp.log(10.0), dtype)
    center = jnp.log(reference)
    grid = center + jnp.linspace(-width, width, grid_size, dtype=dtype)
    values = jax.vmap(score)(grid)
    best = jnp.argmax(values)
    lo = grid[jnp.maximum(best - 1, 0)]
    hi = grid[jnp.minimum(best + 1, grid_size - 1)]
    ratio = jnp.asarray((jnp.sqrt(5.0) - 1) / 2, dtype)

    def golden(_, carry):
        lo, hi = carry
        left = hi - ratio * (hi - lo)
        right = lo + ratio * (hi - lo)
        keep_left = score(left) >= score(right)
        return jnp.where(keep_left, lo, left), jnp.where(keep_left, right, hi)

    lo, hi = jax.lax.fori_loop(0, refinements, golden, (lo, hi))
    log_alpha = 0.5 * (lo + hi)
    refined = score(log_alpha)
    log_alpha = jnp.where(refined >= values[best], log_alpha, grid[best])
    value = jnp.maximum(refined, values[best])
    alpha = jnp.exp(log_alpha)
    valid = usable & jnp.isfinite(alpha) & (alpha > 0) & jnp.isfinite(value) & (value > 0)
    return StepSolution(
        step_size=jnp.where(valid, alpha, zero),
        valid=valid,
        acquisition_value=jnp.where(valid, value, zero),
        iterations=jnp.asarray(grid_size + refinements, jnp.int32),
    )


def solve_step_size(
    model: ValueChangeModel, acquisition: str = "pi", *, scale: float = 1.0, **options
) -> StepSolution:
    r"""Dispatch to [`pi_step_size`][probopt.acquisition.pi_step_size],
    [`ei_step_size`][probopt.acquisition.ei_step_size] or
    [`quadratic_step_size`][probopt.acquisition.quadratic_step_size].

    **Arguments:**

    - ``model``: a [`ValueChangeModel`][probopt.acquisition.ValueChangeModel].
    - ``acquisition``: ``"pi"``, ``"ei"`` or ``"quadratic"`` (static).
    - ``scale``: a multiplier $c$ applied to the maximiser (Meka, Fig. 6).
    - ``options``: passed on to the solver.

    **Returns:** a [`StepSolution`][probopt.acquisition.StepSolution] with the
    scaled step; ``acquisition_value`` is at the unscaled maximiser.
    """
    if acquisition not in ACQUISITIONS:
        raise ValueError(f"`acquisition` must be one of {ACQUISITIONS}; got {acquisition!r}.")
    if acquisition == "pi":
        solution = pi_step_size(model, **options)
    elif acquisition == "ei":
        solution = ei_step_size(model, **options)
    else:
        solution = quadratic_step_size(model, **options)
    return solution._replace(step_size=solution.step_size * jnp.asarray(scale, solution.step_size.dtype))
