"""Meka and AdaMeka as optax optimizers: the update rule, the optax contract, make_step."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from probopt.filters._gradient import GradientFilter, run_gradient_filter
from probopt.optimizers._meka import MekaState, adameka, hvp_direction, make_step, meka
from probopt.optimizers._step_size import StepSizeRule
from probopt.stats import BatchStats

DIM = 4


def _hessian(dtype=jnp.float64):
    rng = np.random.default_rng(0)
    A = rng.normal(size=(DIM, DIM))
    return jnp.asarray(A @ A.T / DIM + 0.5 * np.eye(DIM), dtype)


def _loss(params, batch):
    """Per-example noisy quadratic 1/2 (theta - xi)^T H (theta - xi), shape (n,)."""
    H = _hessian(params["theta"].dtype)
    r = params["theta"][None, :] - batch["xi"]
    return 0.5 * jnp.einsum("ni,ij,nj->n", r, H, r) + 0.0 * params["bias"]


def _params(dtype=jnp.float64):
    return {"theta": jnp.ones(DIM, dtype) * 2.0, "bias": jnp.zeros((), dtype)}


def _batch(key, n=8, dtype=jnp.float64):
    return {"xi": jax.random.normal(key, (n, DIM), dtype)}


def _stats(g, var_mean=1.0, n=8, hvp=None, hvp_var_mean=None):
    return BatchStats(
        batch_size=jnp.asarray(n),
        loss_mean=jnp.asarray(0.0),
        loss_var=jnp.asarray(0.0),
        grad_mean=g,
        grad_sq_sum=None,
        grad_var=None,
        grad_var_mean=jnp.asarray(var_mean),
        hvp_mean=hvp,
        hvp_var_mean=hvp_var_mean,
    )


def _assert_tree_close(a, b, **kw):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw)


def test_meka_step_is_minus_lr_times_filtered_mean():
    params = {"a": jnp.zeros(3)}
    g = {"a": jnp.array([1.0, 2.0, -1.0])}
    opt = meka(0.5)
    state = opt.init(params)
    updates, state = jax.jit(opt.update)(g, state, params, stats=_stats(g, var_mean=4.0))
    k = 1e4 / (1e4 + 0.5)
    np.testing.assert_allclose(state.gain, k, rtol=1e-12)
    np.testing.assert_allclose(updates["a"], -0.5 * k * g["a"], rtol=1e-12)
    _assert_tree_close(state.previous_step, updates)
    assert int(state.count) == 1
    assert float(state.step_size) == 0.5
    # Second step: predict with the HVP drift, condition on the new gradient (scalar algebra).
    g2 = {"a": jnp.array([0.5, 0.0, 1.0])}
    b = {"a": jnp.array([0.1, -0.1, 0.2])}
    p1 = float(state.belief.variance)
    updates, state2 = jax.jit(opt.update)(g2, state, params, stats=_stats(g2, var_mean=2.0, hvp=b, hvp_var_mean=jnp.asarray(0.8)))
    sigma = 0.999 * 0.5 + 0.001 * 0.25
    p_pred = p1 + 0.1
    k2 = p_pred / (p_pred + sigma)
    m_pred = state.belief.mean["a"] + b["a"]
    np.testing.assert_allclose(state2.predicted.mean["a"], m_pred, rtol=1e-12)
    np.testing.assert_allclose(state2.belief.mean["a"], m_pred + k2 * (g2["a"] - m_pred), rtol=1e-12)
    np.testing.assert_allclose(state2.belief.variance, (1 - k2) ** 2 * p_pred + k2**2 * sigma, rtol=1e-12)
    np.testing.assert_allclose(state2.noise.observation_noise, sigma, rtol=1e-12)
    np.testing.assert_allclose(state2.process_noise, 0.1, rtol=1e-12)


def test_adameka_direction_uses_posterior_second_moment():
    params = jnp.zeros(3)
    g = jnp.array([1e-3, 2.0, -5.0])
    for covariance in ("scalar", "diagonal"):
        opt = adameka(0.1, epsilon=1e-8, covariance=covariance)
        state = opt.init(params)
        stats = _stats(g, var_mean=3.0)._replace(grad_var=jnp.array([1.0, 3.0, 5.0]))
        updates, state = jax.jit(opt.update)(g, state, params, stats=stats)
        m = np.asarray(state.belief.mean)
        p = np.broadcast_to(np.asarray(state.belief.variance), m.shape)
        np.testing.assert_allclose(updates, -0.1 * m / (np.sqrt(m**2 + p) + 1e-8), rtol=1e-12)
        assert np.all(np.abs(updates) <= 0.1)


def test_filter_false_is_the_unfiltered_ablation():
    params = jnp.zeros(3)
    opt = meka(0.3, filter=False)
    state = opt.init(params)
    for i in range(3):
        g = jnp.array([1.0, -2.0, 3.0]) * (i + 1)
        updates, state = jax.jit(opt.update)(g, state, params, stats=_stats(g, hvp=jnp.ones(3), hvp_var_mean=jnp.asarray(1.0)))
        np.testing.assert_allclose(updates, -0.3 * g, rtol=1e-14)
        np.testing.assert_allclose(state.gain, 1.0)
        np.testing.assert_allclose(state.belief.variance, state.observation_noise)


def test_missing_or_wrong_stats_raise_clear_errors():
    params = jnp.zeros(2)
    opt = meka(0.1)
    state = opt.init(params)
    with pytest.raises(TypeError, match="requires the keyword argument `stats`"):
        opt.update(jnp.ones(2), state, params)
    with pytest.raises(TypeError, match="BatchStats"):
        opt.update(jnp.ones(2), state, params, stats={"grad_mean": jnp.ones(2)})
    with pytest.raises(ValueError, match="updates"):
        opt.update(jnp.ones(3), state, params, stats=_stats(jnp.ones(3)))


def test_learning_rate_validation():
    with pytest.raises(ValueError, match="one of"):
        meka("armijo")
    with pytest.raises(TypeError, match="inject_hyperparams"):
        meka(optax.constant_schedule(0.1))
    with pytest.raises(ValueError, match="step_size_options"):
        meka(0.1, step_size_options={"decay": 0.9})
    with pytest.raises(ValueError, match="covariance"):
        meka(0.1, covariance="dense")


def test_probabilistic_learning_rate_string_builds_the_rule():
    probabilistic = pytest.importorskip("probopt.optimizers._probabilistic_step")
    opt = meka("pi")
    state = opt.init(jnp.zeros(2))
    assert isinstance(state.step_size_state, probabilistic.ProbabilisticStepSizeState)


class _RecordingRule(StepSizeRule):
    """alpha_t = scale / (t + 1); its state records <u, m_t> to check the context."""

    scale: jax.Array = eqx.field(converter=jnp.asarray)

    def init(self, params):
        return jnp.zeros(())

    def __call__(self, state, context):
        inner = sum(
            jnp.vdot(u, m)
            for u, m in zip(jax.tree_util.tree_leaves(context.direction), jax.tree_util.tree_leaves(context.belief.mean))
        )
        return self.scale / (context.count + 1), inner


def test_custom_step_size_rule_gets_the_context():
    params = jnp.zeros(2)
    opt = meka(_RecordingRule(scale=1.0))
    state = opt.init(params)
    g = jnp.array([3.0, 4.0])
    updates, state = jax.jit(opt.update)(g, state, params, stats=_stats(g))
    np.testing.assert_allclose(state.step_size_state, jnp.sum(state.belief.mean**2))
    np.testing.assert_allclose(updates, -1.0 * state.belief.mean)
    updates, state = jax.jit(opt.update)(g, state, params, stats=_stats(g, hvp=jnp.zeros(2), hvp_var_mean=jnp.asarray(0.0)))
    np.testing.assert_allclose(updates, -0.5 * state.belief.mean)


def test_works_in_optax_chain_and_ignores_other_extra_args():
    params = jnp.array([1.0, -1.0])
    g = jnp.array([0.5, 0.5])
    chained = optax.chain(optax.add_decayed_weights(0.1), meka(0.2))
    state = chained.init(params)
    updates, state = jax.jit(chained.update)(g, state, params, stats=_stats(g), unrelated=123)
    inner = state[1]
    assert isinstance(inner, MekaState)
    # The observation is the transformed gradient g + 0.1 * params.
    observed = g + 0.1 * params
    np.testing.assert_allclose(inner.belief.mean, inner.gain * observed, rtol=1e-12)
    np.testing.assert_allclose(updates, -0.2 * inner.belief.mean, rtol=1e-12)
    _assert_tree_close(hvp_direction(state), updates)
    np.testing.assert_array_equal(optax.tree.get(state, "gain"), inner.gain)
    assert hvp_direction(optax.sgd(0.1).init(params)) is None
    with pytest.raises(ValueError, match="MekaStates"):
        hvp_direction((inner, inner))


def test_inject_hyperparams_and_no_recompilation():
    params = jnp.zeros(3)
    opt = optax.inject_hyperparams(meka)(learning_rate=0.1)
    state = opt.init(params)
    traces = []

    @jax.jit
    def update(g, state):
        traces.append(1)
        return opt.update(g, state, params, stats=_stats(g))

    g = jnp.array([1.0, 2.0, 3.0])
    updates1, state = update(g, state)
    state.hyperparams["learning_rate"] = jnp.asarray(0.05, jnp.float64)
    updates2, state = update(g, state)
    assert len(traces) == 1
    np.testing.assert_allclose(state.inner_state.step_size, 0.05)
    np.testing.assert_allclose(updates2, -0.05 * state.inner_state.belief.mean, rtol=1e-12)
    assert hvp_direction(state) is state.inner_state.previous_step


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("factory", [meka, adameka])
def test_dtype_preserved(dtype, factory):
    params = _params(dtype)
    opt = factory(0.1)
    step = make_step(opt, _loss)
    state = opt.init(params)
    for i in range(2):
        params, state, stats = step(params, state, _batch(jax.random.key(i), dtype=dtype))
    for leaf in jax.tree_util.tree_leaves((params, state.belief, state.predicted, state.gain, state.noise, state.step_size)):
        assert leaf.dtype == dtype, leaf
    assert state.count.dtype == jnp.int32


def test_make_step_first_step_with_zero_direction_and_sgd_baseline():
    params = _params()
    opt = meka(0.1)
    step = make_step(opt, _loss)
    state = opt.init(params)
    batch = _batch(jax.random.key(0))
    new_params, state, stats = step(params, state, batch)
    # t = 0: direction is delta = 0, so the HVP (drift) is exactly zero.
    _assert_tree_close(stats.hvp_mean, jax.tree_util.tree_map(jnp.zeros_like, params), atol=0)
    assert np.all(np.isfinite(np.asarray(state.belief.mean["theta"])))
    # The gradient is the analytic one, and the step is -lr * k * g.
    H = np.asarray(_hessian())
    g = (np.asarray(params["theta"])[None] - np.asarray(batch["xi"])) @ H
    np.testing.assert_allclose(stats.grad_mean["theta"], g.mean(0), rtol=1e-12)
    np.testing.assert_allclose(
        new_params["theta"] - params["theta"], -0.1 * state.gain * g.mean(0), rtol=1e-12
    )
    # Second step uses the previous step as HVP direction: hvp_mean = H delta.
    delta = state.previous_step["theta"]
    _, state, stats = step(new_params, state, _batch(jax.random.key(1)))
    np.testing.assert_allclose(stats.hvp_mean["theta"], H @ np.asarray(delta), rtol=1e-12)
    # A plain optax optimizer gets no direction and takes the usual SGD step.
    sgd = optax.sgd(0.1)
    sgd_step = make_step(sgd, _loss)
    p_sgd, _, s = sgd_step(params, sgd.init(params), batch)
    assert s.hvp_mean is None
    np.testing.assert_allclose(p_sgd["theta"], params["theta"] - 0.1 * g.mean(0), rtol=1e-12)


def _train(key, opt, steps=30, n=8):
    params = _params()
    step = make_step(opt, _loss)

    def body(carry, k):
        params, state = carry
        params, state, stats = step(params, state, _batch(k, n))
        return (params, state), (stats, state.belief if isinstance(state, MekaState) else None)

    (params, state), (stats, beliefs) = jax.lax.scan(body, (params, opt.init(params)), jax.random.split(key, steps))
    return params, state, stats, beliefs


def test_vmap_over_seeds_matches_single_runs():
    keys = jax.random.split(jax.random.key(7), 3)
    opt = meka(0.3)
    train = jax.jit(lambda k: _train(k, opt, steps=10)[0])
    batched = jax.jit(jax.vmap(train))(keys)
    for i, k in enumerate(keys):
        _assert_tree_close(jax.tree_util.tree_map(lambda x: x[i], batched), train(k), rtol=1e-10, atol=1e-12)


def test_offline_filter_reproduces_online_meka_beliefs():
    opt = meka(0.3, noise_decay=0.9)
    _, _, stats, beliefs = jax.jit(lambda k: _train(k, opt))(jax.random.key(3))
    trace = jax.jit(run_gradient_filter)(GradientFilter(noise_decay=0.9), stats)
    # Same arithmetic, different XLA fusion: equal up to round-off.
    _assert_tree_close(trace.belief, beliefs, rtol=1e-12, atol=1e-15)


def test_meka_beats_sgd_at_the_same_constant_step():
    """On the noisy quadratic with a large step, SGD diffuses; Meka's averaged gradient does not."""
    H = np.asarray(_hessian())
    lr = 1.0 / np.linalg.eigvalsh(H).max()
    results = {}
    for name, opt in [("meka", meka(lr)), ("sgd", optax.sgd(lr))]:
        params, *_ = jax.jit(lambda k: _train(k, opt, steps=300, n=4))(jax.random.key(11))
        theta = np.asarray(params["theta"])
        results[name] = 0.5 * theta @ H @ theta  # f - f*
    assert results["meka"] < 0.2 * results["sgd"], results


def test_beliefs_are_numpyro_distributions():
    params = {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)}
    opt = meka(0.1)
    state = opt.init(params)
    g = {"w": jnp.ones((2, 2)), "b": jnp.array([1.0, -1.0])}
    _, state = jax.jit(opt.update)(g, state, params, stats=_stats(g, var_mean=2.0))
    draws = state.belief.sample(jax.random.key(0), (5,))
    assert draws["w"].shape == (5, 2, 2)
    predictive = state.predictive_observation()
    # log N(g; m^-, P^- + Sigma), independently computed.
    var = float(state.predicted.variance + state.observation_noise)
    flat_g = np.concatenate([np.ravel(g["b"]), np.ravel(g["w"])])
    expected = -0.5 * np.sum(flat_g**2 / var + np.log(2 * np.pi * var))
    np.testing.assert_allclose(predictive.log_prob(g), expected, rtol=1e-10)


def test_diagonal_covariance_end_to_end_and_missing_per_parameter_stats():
    params = _params()
    opt = adameka(0.1, covariance="diagonal")
    step = make_step(opt, _loss)
    state = opt.init(params)
    batch = _batch(jax.random.key(0))
    _, state, stats = step(params, state, batch)
    # Per-coordinate observation noise is grad_var / n (first step: EMA = estimate).
    _assert_tree_close(state.observation_noise, jax.tree_util.tree_map(lambda v: np.maximum(v / 8, 1e-12), stats.grad_var), rtol=1e-12)
    assert jax.tree_util.tree_structure(state.belief.variance) == jax.tree_util.tree_structure(params)
    scalar_only = make_step(opt, _loss, batch_stats_options={"per_parameter": False})
    with pytest.raises(ValueError, match="grad_var"):
        scalar_only(params, opt.init(params), batch)
