"""Hardening of Meka/AdaMeka: argument validation, mixed and low precision, wrapper errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from probopt.filters._gradient import GradientFilter
from probopt.optimizers._meka import MekaState, adameka, make_step, meka
from probopt.stats import BatchStats, batch_stats

DIM = 3


def _loss(params, batch):
    """Per-example 1/2 ||theta - xi||^2 summed over every leaf, shape (n,)."""
    total = 0.0
    for leaf in jax.tree_util.tree_leaves(params):
        r = leaf[None, :] - batch["xi"].astype(leaf.dtype)
        total = total + 0.5 * jnp.sum(r * r, axis=-1).astype(jnp.float32)
    return total


def _batch(seed=0, n=8):
    return {"xi": jax.random.normal(jax.random.key(seed), (n, DIM), jnp.float32)}


# ---------------------------------------------------------------- learning rate
@pytest.mark.parametrize("factory", [meka, adameka])
@pytest.mark.parametrize(
    "learning_rate, error, match",
    [
        (-0.1, ValueError, ">= 0"),
        (float("nan"), ValueError, "finite"),
        (float("inf"), ValueError, "finite"),
        (jnp.asarray(-1.0), ValueError, ">= 0"),
        (1.0 + 2.0j, TypeError, "complex"),
        (jnp.asarray(1.0 + 0.0j), TypeError, "complex"),
        (None, TypeError, "None"),
        (True, TypeError, "True"),
        (np.bool_(False), TypeError, "real number"),
        (jnp.ones(2), ValueError, "scalar"),
        (object(), TypeError, "real number"),
    ],
)
def test_bad_learning_rate_raises_naming_it(factory, learning_rate, error, match):
    with pytest.raises(error, match=match) as info:
        factory(learning_rate)
    assert "`learning_rate`" in str(info.value)


@pytest.mark.parametrize("learning_rate", [0.0, 0.1, 1, np.float32(0.1), jnp.asarray(0.1), "pi", "ei", "quadratic"])
def test_valid_learning_rates_accepted(learning_rate):
    opt = meka(learning_rate)
    state = opt.init(jnp.zeros(DIM))
    assert isinstance(state, MekaState)


def test_callable_learning_rate_still_points_to_inject_hyperparams():
    with pytest.raises(TypeError, match="inject_hyperparams"):
        meka(optax.linear_schedule(0.1, 0.0, 10))


def test_inject_hyperparams_schedule_still_runs_and_follows_schedule():
    """A traced learning rate (inject_hyperparams inside jit) passes validation."""
    schedule = optax.linear_schedule(0.0, 0.2, 2)  # 0.0 (allowed), 0.1, 0.2
    opt = optax.inject_hyperparams(meka)(learning_rate=schedule)
    params = {"theta": jnp.ones(DIM, jnp.float32)}
    step = make_step(opt, _loss)
    state = opt.init(params)
    taken = []
    for i in range(3):
        new_params, state, _ = step(params, state, _batch(i))
        inner = state.inner_state
        taken.append(float(inner.step_size))
        # The step is -alpha * m with the scheduled alpha.
        np.testing.assert_allclose(
            new_params["theta"] - params["theta"], -taken[-1] * inner.belief.mean["theta"], rtol=1e-5, atol=1e-7
        )
        params = new_params
    np.testing.assert_allclose(taken, [0.0, 0.1, 0.2], rtol=1e-6)


# --------------------------------------------------------------- bool / ints
def test_filter_must_be_a_bool():
    with pytest.raises(TypeError, match="`filter`"):
        meka(0.1, filter="no")
    assert isinstance(meka(0.1, filter=np.bool_(False)).init(jnp.zeros(2)), MekaState)


def test_batch_stats_per_parameter_must_be_a_bool():
    params = {"theta": jnp.ones(DIM)}
    with pytest.raises(TypeError, match="`per_parameter`"):
        batch_stats(_loss, params, _batch(), per_parameter="no")
    with pytest.raises(TypeError, match="`per_parameter`"):
        batch_stats(_loss, params, _batch(), per_parameter=0)
    assert batch_stats(_loss, params, _batch(), per_parameter=False).grad_var is None


def test_batch_stats_chunk_size_accepts_numpy_integers_only():
    params = {"theta": jnp.ones(DIM)}
    reference = batch_stats(_loss, params, _batch(), chunk_size=4)
    for size in (np.int64(4), np.int32(4)):
        stats = batch_stats(_loss, params, _batch(), chunk_size=size)
        np.testing.assert_allclose(stats.grad_var["theta"], reference.grad_var["theta"], rtol=1e-6)
    for bad, error in ((True, TypeError), (4.0, TypeError), (np.float64(4), TypeError), (0, ValueError), (np.int64(-1), ValueError)):
        with pytest.raises(error, match="`chunk_size`"):
            batch_stats(_loss, params, _batch(), chunk_size=bad)


# ---------------------------------------------------------------- precision
@pytest.mark.parametrize("factory", [meka, adameka])
@pytest.mark.parametrize("covariance", ["scalar", "diagonal"])
def test_mixed_precision_leaves_keep_their_dtypes(factory, covariance):
    params = {"a": jnp.ones(DIM, jnp.float32), "b": jnp.ones(DIM, jnp.float64)}
    opt = factory(0.1, covariance=covariance)
    step = make_step(opt, _loss)
    state = opt.init(params)
    for i in range(3):  # used to fail at the second step, inside jax.jvp
        params, state, _ = step(params, state, _batch(i))
    assert params["a"].dtype == jnp.float32 and params["b"].dtype == jnp.float64
    assert int(state.count) == 3 and int(state.skipped_updates) == 0
    for field in MekaState._fields:
        value = getattr(state, field)
        for path, leaf in jax.tree_util.tree_leaves_with_path(value):
            key = path[-1].key if path and hasattr(path[-1], "key") else None
            if key in params:
                assert leaf.dtype == params[key].dtype, (field, path, leaf.dtype)
    # Both leaves see the same data, so their filtered gradients agree.
    np.testing.assert_allclose(state.belief.mean["a"], state.belief.mean["b"], rtol=1e-4)


def test_bfloat16_with_probabilistic_step_size_runs():
    params = {"theta": jnp.ones(DIM, jnp.bfloat16)}
    opt = meka("pi")
    step = make_step(opt, _loss)
    state = opt.init(params)
    for i in range(3):  # used to fail in jax.scipy.special.ndtr
        params, state, _ = step(params, state, _batch(i))
    assert params["theta"].dtype == jnp.bfloat16
    assert state.previous_step["theta"].dtype == jnp.bfloat16
    assert state.step_size.dtype == jnp.bfloat16
    assert int(state.count) == 3 and int(state.skipped_updates) == 0
    assert float(state.step_size) > 0
    assert np.all(np.isfinite(np.asarray(params["theta"], np.float32)))
    # It descends toward the data mean (about 0) from 1.
    assert np.all(np.asarray(params["theta"], np.float32) < 1.0)


# ---------------------------------------------------------------- wrappers
def test_multisteps_error_explains_dropped_stats():
    opt = optax.MultiSteps(meka(0.1), every_k_schedule=2)
    params = {"theta": jnp.ones(DIM)}
    step = make_step(opt, _loss)
    with pytest.raises(TypeError, match="MultiSteps") as info:
        step(params, opt.init(params), _batch())
    assert "GradientTransformationExtraArgs" in str(info.value)
    assert "optax.chain" in str(info.value)


# ---------------------------------------------------------------- drift docs
def test_gradient_filter_applies_hvp_mean_at_count_zero_as_documented():
    """The drift is stats.hvp_mean whenever given, even at count == 0."""
    gradient_filter = GradientFilter()
    mean = jnp.zeros(DIM)
    belief = gradient_filter.init(mean)
    drift = jnp.array([1.0, -2.0, 0.5])
    stats = BatchStats(
        loss_mean=jnp.asarray(0.0), loss_var=jnp.asarray(0.0),
        grad_mean=jnp.zeros(DIM), grad_sq_sum=None, grad_var=None,
        grad_var_mean=jnp.asarray(1.0), hvp_mean=drift, hvp_sq_sum=None, hvp_var=None,
        hvp_var_mean=jnp.asarray(0.0), batch_size=jnp.asarray(8),
    )
    _, _, info = gradient_filter.update(belief, stats, gradient_filter.init_noise(mean), 0)
    np.testing.assert_allclose(info.predicted.mean, drift)
    _, _, info = gradient_filter.update(belief, stats._replace(hvp_mean=None, hvp_var_mean=None),
                                        gradient_filter.init_noise(mean), 0)
    np.testing.assert_array_equal(info.predicted.mean, np.zeros(DIM))
    assert "count == 0`` included" in GradientFilter.__doc__
