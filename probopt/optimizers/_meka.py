r"""Meka and AdaMeka: optax optimizers that step along a Kalman-filtered gradient.

Each update conditions the gradient belief (a
`GradientFilter`) on the minibatch statistics at
$\theta_t$, forms a direction $u_t$ from the posterior and steps
$\theta_{t+1} = \theta_t - \alpha_t u_t$:

- Meka: $u_t = m_t$ (the posterior mean of $\nabla f(\theta_t)$);
- AdaMeka: $u_t = m_t / (\sqrt{m_t^2 + \operatorname{diag} P_t} + \epsilon)$,
  an Adam-like direction whose second moment is the posterior one.

The step length $\alpha_t$ comes from a `StepSizeRule` (a constant, or a
probabilistic rule).

Reference: Chen, Choi, Balles, Duvenaud, Hennig, *Self-Tuning Stochastic
Optimization with Curvature-Aware Gradient Filtering*, ICBINB 2020
(arXiv:2011.04803), Sections 2-4.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ._nonfinite import NONFINITE_POLICIES as NONFINITE_POLICIES
from ._nonfinite import all_finite as _all_finite
from ._nonfinite import check_on_nonfinite
from .. import stats as stats_module
from .._validation import check_bool, check_real_scalar, check_same_structure
from ..filters import GaussianBelief
from ..filters._gradient import GradientFilter, NoiseEstimate
from ..stats import BatchStats
from ._step_size import ConstantStepSize, StepSizeContext, StepSizeRule

PROBABILISTIC_STEP_SIZES = ("pi", "ei", "quadratic")


class MekaState(NamedTuple):
    r"""State of [`meka`][probopt.optimizers.meka] and [`adameka`][probopt.optimizers.adameka].

    All beliefs are `GaussianBelief`s, so every quantity can be sampled or
    scored as a NumPyro distribution, e.g. ``state.belief.distribution()``
    (the gradient posterior) or ``state.predicted.distribution()``.

    **Attributes:**

    - ``count``: number of updates done so far, ``int32`` shape ``()``.
    - ``belief``: gradient posterior $\mathcal N(m_t, P_t)$ after the last update
      (the prior $\mathcal N(0, p_0 I)$ before the first).  With
      ``filter=False`` it is the observation $\mathcal N(g_t, \Sigma_t)$.
    - ``predicted``: the prediction $\mathcal N(m_t^-, P_t^-)$ of the last update.
    - ``gain``: the Kalman gain $k_t$ (shape ``()`` or per coordinate);
      ``1`` with ``filter=False``.
    - ``noise``: the smoothed noise averages $(\sigma_t, q_t)$ (a
      `NoiseEstimate`), before the floor.
    - ``observation_noise``: $\Sigma_t$ as used (smoothed, floored).
    - ``process_noise``: $Q_t$ as used.
    - ``observation_noise_estimate``: this minibatch's raw $\hat\sigma_t$.
    - ``process_noise_estimate``: this minibatch's raw $\hat q_t$.
    - ``previous_step``: $\delta_t = -\alpha_t u_t$, the update emitted by the
      last call, pytree like ``params``; the next minibatch's HVP direction
      (zeros before the first update).
    - ``step_size``: $\alpha_t$ used by the last update, shape ``()``.
    - ``step_size_state``: the state of the step-size rule.
    - ``skipped_updates``: how many updates were skipped because a gradient,
      loss, Hessian-vector product or the resulting step was not finite
      (``on_nonfinite="skip"``), ``int32`` shape ``()``.  A skipped update
      returns zero updates and leaves every other field (``count`` included)
      unchanged.
    """

    count: jax.Array
    belief: GaussianBelief
    predicted: GaussianBelief
    gain: Any
    noise: NoiseEstimate
    observation_noise: Any
    process_noise: Any
    observation_noise_estimate: Any
    process_noise_estimate: Any
    previous_step: Any
    step_size: jax.Array
    step_size_state: Any
    skipped_updates: jax.Array

    def predictive_observation(self) -> GaussianBelief:
        r"""The predictive distribution of the last observed gradient, $\mathcal N(m_t^-, P_t^- + \Sigma_t)$.

        Useful for calibration checks: the observed $g_t$ should look like a
        draw from it.
        """
        predicted = self.predicted
        if predicted.structure == "scalar":
            variance = predicted.variance + self.observation_noise
        else:
            variance = jax.tree_util.tree_map(jnp.add, predicted.variance, self.observation_noise)
        return GaussianBelief(mean=predicted.mean, variance=variance, structure=predicted.structure)


def _as_step_size_rule(learning_rate: Any, step_size_options: dict | None) -> StepSizeRule:
    if isinstance(learning_rate, StepSizeRule):
        if step_size_options:
            raise ValueError(
                "`step_size_options` only applies to a string `learning_rate`; "
                "configure the StepSizeRule instance directly instead."
            )
        return learning_rate
    if isinstance(learning_rate, str):
        if learning_rate not in PROBABILISTIC_STEP_SIZES:
            raise ValueError(
                f"`learning_rate` string must be one of {PROBABILISTIC_STEP_SIZES}; "
                f"got {learning_rate!r}."
            )
        # Lazy: the probabilistic rules are only needed when asked for.
        from ._probabilistic_step import ProbabilisticStepSize

        return ProbabilisticStepSize(acquisition=learning_rate, **(step_size_options or {}))
    if step_size_options:
        raise ValueError("`step_size_options` only applies to a string `learning_rate`.")
    if callable(learning_rate):
        raise TypeError(
            "`learning_rate` must be a number, a StepSizeRule or one of "
            f"{PROBABILISTIC_STEP_SIZES}; got the callable {learning_rate!r}. For an optax "
            "schedule use `optax.inject_hyperparams(meka)(learning_rate=schedule)`."
        )
    try:
        # A real, finite, non-negative scalar (zero allowed: schedules such as a
        # warm-up start there).  Traced values (inject_hyperparams under jit)
        # are checked for shape and dtype only.
        check_real_scalar(learning_rate, "learning_rate", minimum=0.0)
    except TypeError as error:
        raise TypeError(
            f"{error} Expected a number, a StepSizeRule or one of {PROBABILISTIC_STEP_SIZES}."
        ) from None
    return ConstantStepSize(learning_rate=jnp.asarray(learning_rate))


def _dtype_of(tree: Any) -> Any:
    return jnp.result_type(*jax.tree_util.tree_leaves(tree))


def _in_param_dtypes(tree: Any, template: Any) -> Any:
    """Cast a pytree shaped like the parameters leafwise to ``template``'s dtypes.

    With mixed-precision parameters (say a float32 and a float64 leaf) the
    filter's scalar quantities take the widest dtype and would promote every
    leaf they touch; the state must instead keep each leaf in its parameter's
    dtype (the stored step is the next ``jax.jvp`` tangent, which must match
    its primal).  Trees of another structure (scalar noise levels) are
    returned unchanged.
    """
    if jax.tree_util.tree_structure(tree) != jax.tree_util.tree_structure(template):
        return tree
    return jax.tree_util.tree_map(lambda x, t: jnp.asarray(x).astype(t.dtype), tree, template)


def _belief_in_param_dtypes(belief: GaussianBelief, template: Any) -> GaussianBelief:
    return GaussianBelief(
        mean=_in_param_dtypes(belief.mean, template),
        variance=_in_param_dtypes(belief.variance, template),
        structure=belief.structure,
    )


def _widen_low_precision(tree: Any) -> Any:
    """Cast floating leaves narrower than float32 (bfloat16, float16) to float32.

    The step-size rules evaluate special functions (e.g. ``ndtr`` in the
    probabilistic acquisitions) that JAX does not implement for 16-bit
    floats; they run in float32 and Meka casts the step length back.
    """

    def widen(x):
        if isinstance(x, jax.Array | np.ndarray) and jnp.issubdtype(x.dtype, jnp.floating):
            if jnp.finfo(x.dtype).bits < 32:
                return x.astype(jnp.float32)
        return x

    return jax.tree_util.tree_map(widen, tree)


def _check_stats(stats: BatchStats, updates: Any, params: Any) -> None:
    """Trace-time checks that ``stats`` describes one minibatch of a model shaped like ``updates``."""
    if jnp.shape(stats.batch_size) != ():
        raise ValueError(
            "`stats.batch_size` must be a scalar (the size of one minibatch); got shape "
            f"{jnp.shape(stats.batch_size)}. Stacked statistics of several steps (a leading "
            "time axis) cannot drive one update; use `run_gradient_filter` for those."
        )
    if not isinstance(stats.batch_size, jax.core.Tracer) and int(stats.batch_size) < 1:
        raise ValueError(f"`stats.batch_size` must be at least 1; got {int(stats.batch_size)}.")
    if params is not None:
        check_same_structure(params, updates, "params", "updates")
    check_same_structure(updates, stats.grad_mean, "updates", "stats.grad_mean")
    for name in ("grad_var", "hvp_mean", "hvp_var"):
        field = getattr(stats, name)
        if field is not None:
            check_same_structure(updates, field, "updates", f"stats.{name}")
    for name in ("loss_mean", "loss_var", "grad_var_mean", "hvp_var_mean"):
        field = getattr(stats, name)
        if field is not None and jnp.shape(field) != ():
            raise ValueError(
                f"`stats.{name}` must be a scalar; got shape {jnp.shape(field)} "
                "(statistics of one minibatch are reduced over its examples)."
            )


def _adam_direction(belief: GaussianBelief, epsilon: Any) -> Any:
    variance = belief.marginal_variance()
    return jax.tree_util.tree_map(
        lambda m, v: m / (jnp.sqrt(m**2 + v) + jnp.asarray(epsilon).astype(m.dtype)),
        belief.mean,
        variance,
    )


def _filtered_optimizer(
    learning_rate: Any,
    *,
    adaptive: bool,
    epsilon: Any,
    prior_variance: Any,
    noise_decay: Any,
    process_noise_decay: Any,
    noise_floor: Any,
    covariance: str,
    filter: bool,
    step_size_options: dict | None,
    on_nonfinite: str,
) -> optax.GradientTransformationExtraArgs:
    check_on_nonfinite(on_nonfinite)
    rule = _as_step_size_rule(learning_rate, step_size_options)
    gradient_filter = GradientFilter(
        prior_variance=prior_variance,
        noise_decay=noise_decay,
        process_noise_decay=process_noise_decay,
        noise_floor=noise_floor,
        covariance=covariance,
    )
    use_filter = check_bool(filter, "filter")

    def init_fn(params: Any) -> MekaState:
        belief = gradient_filter.init(params)
        noise = gradient_filter.init_noise(params)
        dtype = _dtype_of(params)
        # No observation has been conditioned on yet: the gain is zero, shaped
        # like the observation noise (scalar or per-parameter).
        zero_gain = jax.tree_util.tree_map(jnp.zeros_like, noise.observation_noise)
        return MekaState(
            count=jnp.zeros((), jnp.int32),
            belief=belief,
            predicted=belief,
            gain=zero_gain,
            noise=noise,
            observation_noise=noise.observation_noise,
            process_noise=noise.process_noise,
            observation_noise_estimate=noise.observation_noise,
            process_noise_estimate=noise.process_noise,
            previous_step=jax.tree_util.tree_map(jnp.zeros_like, params),
            step_size=jnp.zeros((), dtype),
            step_size_state=rule.init(_widen_low_precision(params)),
            skipped_updates=jnp.zeros((), jnp.int32),
        )

    def update_fn(updates, state, params=None, *, stats=None, **extra_args):
        del extra_args  # other transformations' extra arguments are not ours
        if stats is None:
            raise TypeError(
                "Meka's `update` requires the keyword argument `stats` (a "
                "probopt.stats.BatchStats of the minibatch at the current params, with "
                "`direction=state.previous_step` for the Hessian-vector product): call "
                "`opt.update(grads, state, params, stats=stats)` or use `make_step`. If you "
                "did use `make_step` (or pass `stats=`), a wrapper around Meka dropped it: "
                "wrappers that are not `optax.GradientTransformationExtraArgs` (such as "
                "`optax.MultiSteps`, which forwards no extra arguments) never pass `stats` "
                "on. Use Meka directly or inside `optax.chain` (which forwards `stats`), or "
                "accumulate gradients yourself before calling Meka."
            )
        if not isinstance(stats, BatchStats):
            raise TypeError(
                f"`stats` must be a probopt.stats.BatchStats; got {type(stats).__name__}."
            )
        if not isinstance(state, MekaState):
            raise TypeError(f"`state` must be a MekaState; got {type(state).__name__}.")
        check_same_structure(state.belief.mean, updates, "state.belief.mean", "updates")
        _check_stats(stats, updates, params)
        # The (possibly transformed) incoming gradient is the observation g_t.
        observed = stats._replace(grad_mean=updates)
        posterior, noise, info = gradient_filter.update(state.belief, observed, state.noise, state.count)
        template = state.belief.mean  # zeros in the parameters' own dtypes
        posterior = _belief_in_param_dtypes(posterior, template)
        noise = NoiseEstimate(*(_in_param_dtypes(x, template) for x in noise))
        info = info._replace(
            predicted=_belief_in_param_dtypes(info.predicted, template),
            **{
                name: _in_param_dtypes(getattr(info, name), template)
                for name in (
                    "gain",
                    "observation_noise",
                    "process_noise",
                    "observation_noise_estimate",
                    "process_noise_estimate",
                )
            },
        )
        gain = info.gain
        if not use_filter:
            # Ablation: the belief is the observation itself, N(g_t, Sigma_t).
            posterior = GaussianBelief(
                mean=jax.tree_util.tree_map(
                    lambda g, m: jnp.asarray(g).astype(m.dtype), updates, state.belief.mean
                ),
                variance=info.observation_noise,
                structure=gradient_filter.covariance,
            )
            gain = jax.tree_util.tree_map(jnp.ones_like, info.gain)
        direction = _adam_direction(posterior, epsilon) if adaptive else posterior.mean
        direction = _in_param_dtypes(direction, template)
        context = StepSizeContext(
            direction=direction,
            previous_belief=state.belief,
            belief=posterior,
            previous_step=state.previous_step,
            stats=stats,
            process_noise=info.process_noise,
            observation_noise=info.observation_noise,
            count=state.count,
        )
        alpha, step_size_state = rule(state.step_size_state, _widen_low_precision(context))
        alpha = jnp.asarray(alpha).astype(state.step_size.dtype)
        step = jax.tree_util.tree_map(lambda u: (-alpha * u).astype(u.dtype), direction)
        new_state = MekaState(
            count=optax.safe_increment(state.count),
            belief=posterior,
            predicted=info.predicted,
            gain=gain,
            noise=noise,
            observation_noise=info.observation_noise,
            process_noise=info.process_noise,
            observation_noise_estimate=info.observation_noise_estimate,
            process_noise_estimate=info.process_noise_estimate,
            previous_step=step,
            step_size=alpha,
            step_size_state=step_size_state,
            skipped_updates=state.skipped_updates,
        )
        # Safeguard: a non-finite input (gradient, loss, HVP, their variances) or
        # output (step) must not reach the belief, which would stay NaN forever.
        # Only what Meka reads: the unused *_sq_sum fields would cost extra passes.
        used = [updates, stats.loss_mean, stats.loss_var, stats.grad_var_mean, stats.hvp_mean, stats.hvp_var_mean]
        if gradient_filter.covariance == "diagonal":
            used += [stats.grad_var, stats.hvp_var]
        finite = _all_finite(*used, step, alpha)
        if on_nonfinite == "raise":
            step = eqx.error_if(
                step,
                ~finite,
                "Meka update: non-finite gradient, loss, Hessian-vector product or step "
                "(on_nonfinite='raise'); use on_nonfinite='skip' to skip such updates.",
            )
            return step, new_state
        skipped = state._replace(skipped_updates=optax.safe_increment(state.skipped_updates))
        new_state = jax.tree_util.tree_map(
            lambda new, old: jnp.where(finite, new, old), new_state, skipped
        )
        step = jax.tree_util.tree_map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), step)
        return step, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def meka(
    learning_rate: Any,
    *,
    prior_variance: float = 1e4,
    noise_decay: float = 0.999,
    process_noise_decay: float = 0.0,
    noise_floor: float = 1e-12,
    covariance: str = "scalar",
    filter: bool = True,
    step_size_options: dict | None = None,
    on_nonfinite: str = "skip",
) -> optax.GradientTransformationExtraArgs:
    r"""Meka: step along the Kalman-filtered gradient, $\theta_{t+1} = \theta_t - \alpha_t m_t$.

    The optimizer's ``update(grads, state, params, *, stats)`` conditions the
    gradient belief on the minibatch at $\theta_t$ and returns
    ``updates = -alpha * m``.  ``stats`` is keyword-only and required: the
    `BatchStats` of the same minibatch, computed with
    ``direction=state.previous_step`` so that ``stats.hvp_mean`` is
    $B_t\delta_{t-1}$ (see `make_step`, which wires this up).  ``grads`` is
    the observation $g_t$ (normally ``stats.grad_mean``).  Other extra
    arguments are ignored, so Meka works inside ``optax.chain``; transforms
    chained *after* Meka change the step actually taken, and the HVP
    direction stored in the state (Meka's own update) would then differ from
    it.

    **Arguments:**

    - ``learning_rate``: the step length $\alpha$: a number (constant step), a
      `StepSizeRule` instance, or ``"pi"``, ``"ei"``, ``"quadratic"`` for the
      probabilistic rules (``ProbabilisticStepSize(acquisition=...)``,
      configured by ``step_size_options``).  A number must be a real,
      finite scalar ``>= 0`` (checked at construction when concrete).  Under
      ``optax.inject_hyperparams`` a number may be scheduled; pass a
      `StepSizeRule` there with ``static_args="learning_rate"``.
    - ``prior_variance``: $p_0$ of the prior $\mathcal N(0, p_0 I)$ (``1e4``).
    - ``noise_decay``: EMA decay of the observation-noise estimate (``0.999``).
    - ``process_noise_decay``: EMA decay of the process-noise estimate (``0``).
    - ``noise_floor``: lower bound on the observation noise (``1e-12``).
    - ``covariance``: ``"scalar"`` (the paper's default) or ``"diagonal"``.
    - ``filter``: ``False`` gives the unfiltered ablation $m_t = g_t$ (SGD with
      Meka's step-size machinery).
    - ``step_size_options``: keyword arguments for the probabilistic step size.
    - ``on_nonfinite``: what to do when the gradient, the loss, the
      Hessian-vector product, any of their variances or the resulting step
      contains NaN or infinity.  ``"skip"`` (default): return zero updates,
      keep the whole state (belief, noise averages, step-size state, the
      previous step that drives the next HVP) and count the skip in
      ``state.skipped_updates``.  ``"raise"``: raise at run time through
      ``equinox.error_if`` (an ``EquinoxRuntimeError`` naming Meka).

    **Raises** (at trace time): ``ValueError`` if ``updates``, ``params``,
    ``stats.grad_mean`` / ``grad_var`` / ``hvp_mean`` / ``hvp_var`` differ
    in pytree structure or shapes, or ``stats`` is not the reduced statistics
    of one minibatch (non-scalar ``batch_size`` or ``*_mean``/``*_var_mean``
    fields); ``TypeError`` if ``stats`` is missing.  At construction:
    ``ValueError`` for a negative or non-finite ``learning_rate``,
    ``TypeError`` for a ``None``, bool, complex or non-numeric one or a
    non-bool ``filter``.

    **Precision.**  Every parameter-shaped leaf of the state keeps its own
    parameter's dtype (mixed float32/float64 parameters work).  With 16-bit
    parameters (bfloat16, float16) the step-size rule runs in float32 and
    the step length is cast back.

    See `GradientFilter` for the noise conventions, smoothing and floor.

    **Returns:** an ``optax.GradientTransformationExtraArgs`` with state
    [`MekaState`][probopt.optimizers.MekaState].
    """
    return _filtered_optimizer(
        learning_rate,
        adaptive=False,
        epsilon=0.0,
        prior_variance=prior_variance,
        noise_decay=noise_decay,
        process_noise_decay=process_noise_decay,
        noise_floor=noise_floor,
        covariance=covariance,
        filter=filter,
        step_size_options=step_size_options,
        on_nonfinite=on_nonfinite,
    )


def adameka(
    learning_rate: Any,
    *,
    epsilon: float = 1e-8,
    prior_variance: float = 1e4,
    noise_decay: float = 0.999,
    process_noise_decay: float = 0.0,
    noise_floor: float = 1e-12,
    covariance: str = "scalar",
    filter: bool = True,
    step_size_options: dict | None = None,
    on_nonfinite: str = "skip",
) -> optax.GradientTransformationExtraArgs:
    r"""AdaMeka: Meka with the Adam-like direction $u_t = m_t / (\sqrt{m_t^2 + \operatorname{diag} P_t} + \epsilon)$.

    The denominator uses the posterior second moment
    $\mathbb E[(\nabla f)^2] = m_t^2 + \operatorname{diag} P_t$ (Chen et al.,
    2020, Eq. 9), so no moving averages of squared gradients are needed.  With
    scalar covariance $\operatorname{diag}P_t = p_t$.

    **Arguments:** as [`meka`][probopt.optimizers.meka], plus

    - ``epsilon``: $\epsilon$ in the denominator (``1e-8``).

    **Returns:** an ``optax.GradientTransformationExtraArgs`` with state
    [`MekaState`][probopt.optimizers.MekaState].
    """
    return _filtered_optimizer(
        learning_rate,
        adaptive=True,
        epsilon=epsilon,
        prior_variance=prior_variance,
        noise_decay=noise_decay,
        process_noise_decay=process_noise_decay,
        noise_floor=noise_floor,
        covariance=covariance,
        filter=filter,
        step_size_options=step_size_options,
        on_nonfinite=on_nonfinite,
    )


def hvp_direction(opt_state: Any) -> Any:
    r"""The direction for the next Hessian-vector product: $\delta_{t-1}$ from a Meka state.

    Searches ``opt_state`` (which may be a `MekaState` or contain one, e.g.
    inside ``optax.chain`` or ``optax.inject_hyperparams``) and returns its
    ``previous_step``; returns ``None`` when there is no Meka state (plain
    optax optimizers need no HVP).

    **Raises:** ``ValueError`` if the state holds more than one `MekaState`.
    """
    found = [
        node
        for node in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, MekaState))
        if isinstance(node, MekaState)
    ]
    if not found:
        return None
    if len(found) > 1:
        raise ValueError(
            f"`opt_state` holds {len(found)} MekaStates; pass `direction=` to make_step "
            "to choose which previous step drives the Hessian-vector product."
        )
    return found[0].previous_step


def make_step(
    optimizer: optax.GradientTransformation,
    per_example_loss: Callable[[Any, Any], jax.Array],
    *,
    batch_stats_options: dict | None = None,
    direction: Callable[[Any], Any] = hvp_direction,
) -> Callable[[Any, Any, Any], tuple[Any, Any, BatchStats]]:
    r"""A jitted training step: ``batch_stats`` $\to$ ``optimizer.update`` $\to$ ``apply_updates``.

    ```python
    step = make_step(meka(0.1), per_example_loss)
    opt_state = optimizer.init(params)
    params, opt_state, stats = step(params, opt_state, batch)
    ```

    **Arguments:**

    - ``optimizer``: any optax transformation; extra arguments are passed as
      ``stats=`` and ignored by transformations that do not take them.
    - ``per_example_loss``: ``per_example_loss(params, batch) -> (n,)``, one
      loss per example (not averaged).
    - ``batch_stats_options``: keyword arguments for ``probopt.stats.batch_stats``
      (e.g. ``{"method": "fast"}`` where supported).
    - ``direction``: ``direction(opt_state)`` returns the HVP direction
      $\delta_{t-1}$ or ``None``; the default `hvp_direction` finds the
      ``previous_step`` of the Meka state and gives ``None`` for other optimizers.

    **Returns:** ``step(params, opt_state, batch) -> (params, opt_state, stats)``.
    """
    if not callable(per_example_loss):
        raise TypeError("`per_example_loss` must be callable: per_example_loss(params, batch) -> (n,).")
    if not hasattr(optimizer, "update") or not hasattr(optimizer, "init"):
        raise TypeError("`optimizer` must be an optax GradientTransformation.")
    options = dict(batch_stats_options or {})
    transformation = optax.with_extra_args_support(optimizer)

    @jax.jit
    def step(params, opt_state, batch):
        stats = stats_module.batch_stats(
            per_example_loss, params, batch, direction=direction(opt_state), **options
        )
        updates, opt_state = transformation.update(stats.grad_mean, opt_state, params, stats=stats)
        return optax.apply_updates(params, updates), opt_state, stats

    return step
