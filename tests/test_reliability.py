"""Scale and reliability: data parallelism, checkpoint/resume, numerical safeguards, bad input.

Each section covers one item of ``docs/reliability.md``.  The property tests
for the Kalman kernels (symmetric PSD covariances) and for the PI solver
(finite non-negative step for any finite input) live next to their code, in
``tests/test_kernels.py::test_kernels_keep_covariance_symmetric_psd`` and
``tests/test_acquisition.py::test_pi_step_is_finite_and_nonnegative_for_any_finite_input``;
here the gradient filter is tested the same way on whole minibatch statistics.
"""

import json
import os
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from probopt import checkpoint
from probopt.filters._gradient import GradientFilter
from probopt.optimizers._meka import adameka, make_step, meka
from probopt.stats import BatchStats, batch_stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARDED_SCRIPT = os.path.join(ROOT, "tests", "_scripts", "sharded_step.py")
DIM = 3
CURVATURES = np.array([1.0, 2.0, 4.0])


def quadratic_loss(params, batch):
    """Per-example $\\tfrac12 (\\theta-\\xi_i)^\\top \\operatorname{diag}(h)(\\theta-\\xi_i)$, shape (n,)."""
    h = jnp.asarray(CURVATURES, params.dtype)
    return 0.5 * jnp.sum(h * (params[None, :] - batch["xi"]) ** 2, axis=-1)


def sample_batch(key, n=8, dtype=jnp.float64):
    return {"xi": jax.random.normal(key, (n, DIM), dtype)}


def leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def assert_trees_equal(a, b):
    la, lb = leaves(a), leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype
        assert np.array_equal(x, y), (x, y)


# =========================================================================== 1. data parallel


def _run_sharded_script(*args):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(
        [sys.executable, SHARDED_SCRIPT, *args],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


# Measured (4 virtual CPU devices, relative to each leaf's largest entry):
# float64 stats 1.6e-16 (generic) and 9e-16 (fast path), Meka params
# bit-identical, AdaMeka params 4e-16; float32 at most 3.2e-7.  The remaining
# difference is the order of the cross-device sum (docs/reliability.md).
FLOAT64_BOUND = 8 * float(jnp.finfo(jnp.float64).eps)  # a few ulps of a sum of 16 terms
FLOAT32_BOUND = 1e-6


@pytest.mark.slow
def test_sharded_batch_gives_the_same_stats_and_steps():
    result = _run_sharded_script()
    for key, value in result["float64"].items():
        assert value <= FLOAT64_BOUND, (key, value)
    for key, value in result["float32"].items():
        assert value <= FLOAT32_BOUND, (key, value)


@pytest.mark.slow
def test_reproducible_generic_path_makes_sharded_stats_and_meka_steps_bit_identical():
    """``batch_stats(..., reproducible=True)``: exact equality across shardings on the generic path."""
    result = _run_sharded_script("--quick", "--deterministic")
    assert result["float64"] == {"stats_generic": 0.0, "meka_params": 0.0, "meka_state": 0.0}, result
    assert result["float32"] == {"stats_generic": 0.0, "meka_params": 0.0, "meka_state": 0.0}, result


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_reproducible_sum_is_exact_up_to_one_rounding_and_order_free(dtype):
    from fractions import Fraction

    from probopt.stats._reproducible_sum import reproducible_sum

    rng = np.random.default_rng(0)
    x = (rng.normal(size=(16, 5)) * 10.0 ** rng.uniform(-4, 4, size=(16, 5))).astype(dtype)
    total = np.asarray(reproducible_sum(jnp.asarray(x)))
    # Any grouping (devices) or order gives the same bits ...
    for seed in range(3):
        perm = np.random.default_rng(seed).permutation(16)
        assert np.array_equal(np.asarray(reproducible_sum(jnp.asarray(x[perm]))), total)
    # ... and the value is the exact sum to within the dtype's rounding.
    exact = np.array([float(sum(Fraction(float(v)) for v in x[:, j])) for j in range(5)])
    np.testing.assert_allclose(total.astype(np.float64), exact, rtol=2 * float(np.finfo(dtype).eps))


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_reproducible_batch_stats_do_not_depend_on_example_order(dtype):
    """Order-free batch sums: a permuted batch gives the same bits; values match the plain path."""
    batch = sample_batch(jax.random.key(3), n=24, dtype=dtype)
    batch["xi"] = batch["xi"] * jnp.asarray([1.0, 1e3, 1e-3], dtype)  # terms of very different scales
    params, direction = jnp.full((DIM,), 0.5, dtype), jnp.asarray([1.0, -2.0, 0.5], dtype)
    perm = np.random.default_rng(0).permutation(24)
    permuted = {"xi": batch["xi"][perm]}
    run = lambda b, r: batch_stats(quadratic_loss, params, b, direction=direction, reproducible=r)  # noqa: E731
    assert_trees_equal(run(batch, True), run(permuted, True))
    tol = 1e-12 if dtype == jnp.float64 else 1e-5
    for x, y in zip(leaves(run(batch, True)), leaves(run(batch, False))):
        np.testing.assert_allclose(x, y, rtol=tol, atol=tol * np.max(np.abs(y)))


def test_reproducible_sum_takes_enough_folds_and_survives_huge_terms():
    from probopt.stats._reproducible_sum import default_folds, reproducible_sum

    assert default_folds(16, jnp.float64) == 2 and default_folds(1024, jnp.float32) == 3
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1024, 3)).astype(np.float32) * np.float32(1e3)
    exact = np.sum(x.astype(np.float64), axis=0)
    np.testing.assert_allclose(np.asarray(reproducible_sum(jnp.asarray(x))), exact, rtol=1e-5, atol=1e-3)
    # sigma would overflow float32 here: the column falls back to a plain finite sum, not NaN.
    big = jnp.full((8, 1), 1e37, jnp.float32)
    np.testing.assert_allclose(np.asarray(reproducible_sum(big)), [8e37], rtol=1e-6)


# =========================================================================== 2. checkpoint


def _optimizer(name):
    if name == "meka":
        return meka(0.1)
    if name == "adameka":
        return adameka(0.05)
    if name == "meka_pi":
        return meka("pi", step_size_options={"initial_step_size": 0.05})
    if name == "lodo":
        from probopt.optimizers._lodo import lodo

        return lodo(1e-3, 0.1, 0.9, key=jax.random.key(7), depth=4)
    raise AssertionError(name)


def _train(step, params, opt_state, key, num_steps, dtype):
    for _ in range(num_steps):
        key, sub = jax.random.split(key)
        params, opt_state, _ = step(params, opt_state, sample_batch(sub, dtype=dtype))
    return params, opt_state, key


@pytest.mark.parametrize(
    "name,dtype",
    [
        ("meka", jnp.float64),
        ("meka", jnp.float32),
        ("adameka", jnp.float64),
        ("meka_pi", jnp.float64),
        pytest.param("meka_pi", jnp.float32, marks=pytest.mark.slow),
        ("lodo", jnp.float64),
    ],
)
def test_resumed_run_reproduces_the_uninterrupted_run_bit_for_bit(tmp_path, name, dtype):
    total, interrupt = 12, 5
    params0 = jnp.full((DIM,), 2.0, dtype)
    optimizer = _optimizer(name)
    step = make_step(optimizer, quadratic_loss)
    reference = _train(step, params0, optimizer.init(params0), jax.random.key(0), total, dtype)

    # Interrupted run: train k steps and write everything to disk.
    first = _train(step, params0, optimizer.init(params0), jax.random.key(0), interrupt, dtype)
    path = tmp_path / "ckpt" / "state.eqx"
    checkpoint.save(path, first)
    assert sorted(os.listdir(path.parent)) == ["state.eqx"]  # written atomically
    del first

    # Resume with fresh Python objects; the template's values are irrelevant.
    fresh = _optimizer(name)
    fresh_step = make_step(fresh, quadratic_loss)
    like = (jnp.zeros((DIM,), dtype), fresh.init(jnp.zeros((DIM,), dtype)), jax.random.key(123))
    params, opt_state, key = checkpoint.load(path, like)
    resumed = _train(fresh_step, params, opt_state, key, total - interrupt, dtype)

    assert_trees_equal(jax.random.key_data(resumed[2]), jax.random.key_data(reference[2]))
    assert_trees_equal(resumed[:2], reference[:2])
    # The state is the whole model: nothing was reset on load.
    assert int(resumed[1].count) == total


def test_checkpoint_load_rejects_a_mismatched_template(tmp_path):
    params = jnp.zeros(DIM)
    path = tmp_path / "state.eqx"
    checkpoint.save(path, (params, meka(0.1).init(params)))
    with pytest.raises(ValueError, match="like"):
        checkpoint.load(path, (jnp.zeros(DIM + 1), meka(0.1).init(jnp.zeros(DIM + 1))))
    with pytest.raises(ValueError, match="path"):
        checkpoint.load(tmp_path / "missing.eqx", params)


# =========================================================================== 3. safeguards


def _stats_at(params, previous_step, key=jax.random.key(0), n=8):
    return batch_stats(quadratic_loss, params, sample_batch(key, n), direction=previous_step)


def _poison(stats, field, value):
    leaf = getattr(stats, field)
    poisoned = jax.tree_util.tree_map(lambda x: x.at[...].set(value) if jnp.ndim(x) == 0 else x.at[0].set(value), leaf)
    return stats._replace(**{field: poisoned})


@pytest.fixture(scope="module")
def two_steps_in():
    """A Meka state after two good steps (non-trivial belief, EMAs, previous step) and its jitted update."""
    optimizer = meka(0.1)
    update = jax.jit(optimizer.update)
    params = jnp.full((DIM,), 2.0)
    state = optimizer.init(params)
    for t in range(2):
        stats = _stats_at(params, state.previous_step, jax.random.key(t))
        updates, state = update(stats.grad_mean, state, params, stats=stats)
        params = optax.apply_updates(params, updates)
    stats = _stats_at(params, state.previous_step, jax.random.key(5))
    return update, params, state, stats


@pytest.mark.parametrize("field", ["grad_mean", "loss_mean", "loss_var", "grad_var_mean", "hvp_mean", "hvp_var_mean"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nonfinite_input_skips_the_update_and_keeps_the_belief(two_steps_in, field, value):
    update, params, state, stats = two_steps_in
    good_updates, good_state = update(stats.grad_mean, state, params, stats=stats)
    assert int(good_state.skipped_updates) == 0 and np.any(np.asarray(good_updates) != 0)
    stats = _poison(stats, field, value)
    updates, new_state = update(stats.grad_mean, state, params, stats=stats)
    assert np.array_equal(np.asarray(updates), np.zeros(DIM))
    assert int(new_state.skipped_updates) == 1
    assert_trees_equal(new_state._replace(skipped_updates=state.skipped_updates), state)


def test_a_skipped_update_leaves_the_run_as_if_the_batch_never_came():
    optimizer = meka(0.1)
    step = make_step(optimizer, quadratic_loss)
    params0 = jnp.full((DIM,), 2.0)
    batches = [sample_batch(jax.random.key(t)) for t in range(6)]
    bad = {"xi": batches[0]["xi"].at[3, 1].set(jnp.nan)}

    def run(sequence):
        params, state = params0, optimizer.init(params0)
        for batch in sequence:
            params, state, _ = step(params, state, batch)
        return params, state

    clean = run(batches)
    faulty = run(batches[:3] + [bad, bad] + batches[3:])
    assert int(faulty[1].skipped_updates) == 2 and int(clean[1].skipped_updates) == 0
    assert_trees_equal(faulty[0], clean[0])
    assert_trees_equal(faulty[1]._replace(skipped_updates=clean[1].skipped_updates), clean[1])


def test_on_nonfinite_raise_raises_a_clear_runtime_error():
    optimizer = meka(0.1, on_nonfinite="raise")
    step = make_step(optimizer, quadratic_loss)
    params = jnp.full((DIM,), 2.0)
    state = optimizer.init(params)
    good = sample_batch(jax.random.key(0))
    # Finite input: the same step as the default policy.
    expected = make_step(meka(0.1), quadratic_loss)(params, meka(0.1).init(params), good)
    assert_trees_equal(step(params, state, good)[0], expected[0])
    bad = {"xi": good["xi"].at[0, 0].set(jnp.inf)}
    # Under jax.jit the message arrives inside JAX's runtime error ...
    with pytest.raises(Exception, match="Meka update: non-finite"):
        jax.block_until_ready(step(params, state, bad))
    # ... and under equinox.filter_jit as an EquinoxRuntimeError.
    stats = batch_stats(quadratic_loss, params, bad, direction=state.previous_step)
    update = eqx.filter_jit(optimizer.update)
    with pytest.raises(eqx.EquinoxRuntimeError, match="Meka update: non-finite"):
        jax.block_until_ready(update(stats.grad_mean, state, params, stats=stats))
    with pytest.raises(ValueError, match="on_nonfinite"):
        meka(0.1, on_nonfinite="ignore")


def test_zero_gradient_variance_uses_the_noise_floor_and_follows_gradient_descent():
    """Noiseless quadratic (every example identical): Meka must reduce to exact GD."""
    floor, lr = 1e-12, 0.2
    optimizer = meka(lr, noise_floor=floor)
    step = make_step(optimizer, quadratic_loss)
    target = jnp.array([0.5, -1.0, 0.25])
    batch = {"xi": jnp.tile(target, (4, 1))}
    params = jnp.full((DIM,), 2.0)
    state = optimizer.init(params)
    reference = np.full(DIM, 2.0)
    for _ in range(15):
        params, state, stats = step(params, state, batch)
        reference = reference - lr * CURVATURES * (reference - np.asarray(target))
        assert float(stats.grad_var_mean) == 0.0
        assert float(state.observation_noise) == floor
        assert 0.0 < float(state.gain) <= 1.0 and float(state.belief.variance) >= 0.0
    np.testing.assert_allclose(np.asarray(params), reference, rtol=1e-10, atol=1e-12)


def test_first_update_with_zero_previous_step_matches_closed_form():
    """t = 0: delta = 0, so the HVP is zero and the gain is p0 / (p0 + sigma)."""
    p0, lr, n = 1e4, 0.1, 8
    params = jnp.full((DIM,), 2.0)
    batch = sample_batch(jax.random.key(3), n)
    stats = batch_stats(quadratic_loss, params, batch, direction=jnp.zeros(DIM))
    assert np.array_equal(np.asarray(stats.hvp_mean), np.zeros(DIM))
    sigma = float(stats.grad_var_mean) / n
    expected = -lr * p0 / (p0 + sigma) * np.asarray(stats.grad_mean)
    optimizer = meka(lr, prior_variance=p0)
    params1, state, _ = make_step(optimizer, quadratic_loss)(params, optimizer.init(params), batch)
    np.testing.assert_allclose(np.asarray(params1 - params), expected, rtol=1e-12)
    assert float(state.process_noise) == 0.0
    # For the PI rule at t = 0 see test_negative_curvature_takes_the_pi_fallback.


@pytest.mark.parametrize("name", ["meka", "adameka", pytest.param("meka_pi", marks=pytest.mark.slow)])
def test_batch_size_one_stays_finite(name):
    optimizer = _optimizer(name)
    step = make_step(optimizer, quadratic_loss)
    params = jnp.full((DIM,), 2.0)
    state = optimizer.init(params)
    for t in range(25):
        params, state, stats = step(params, state, sample_batch(jax.random.key(t), n=1))
        assert float(stats.grad_var_mean) == 0.0  # undefined for n = 1, reported as 0
        # The floor, not the (zero) estimate, is the observation noise.
        assert float(state.observation_noise) == 1e-12
        assert np.all(np.isfinite(leaves(state)[1]))
    assert np.all(np.isfinite(np.asarray(params)))
    assert float(state.step_size) > 0
    assert int(state.skipped_updates) == 0


def concave_loss(params, batch):
    """Per-example $-\\tfrac12\\lVert\\theta\\rVert^2 + \\xi_i^\\top\\theta$: curvature -1 along every step."""
    return -0.5 * jnp.sum(params**2) + batch["xi"] @ params


@pytest.mark.parametrize("third_order", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_negative_curvature_takes_the_pi_fallback_not_an_infinite_step(third_order):
    initial = 1e-3
    optimizer = meka("pi", step_size_options={"initial_step_size": initial, "third_order": third_order})
    step = make_step(optimizer, concave_loss)
    params = jnp.ones(DIM)
    state = optimizer.init(params)
    for t in range(8):
        params, state, _ = step(params, state, sample_batch(jax.random.key(t), n=4))
        rule = state.step_size_state
        alpha = float(state.step_size)
        assert np.isfinite(alpha) and 0 < alpha <= 10 * initial
        if t == 0:
            # delta = 0 at t = 0: no curvature observed yet, so the initial step.
            assert bool(rule.fallback) and float(rule.curvature.weight) == 0.0
            assert alpha == pytest.approx(initial, rel=1e-12)
        else:
            assert float(rule.curvature.value) < 0  # the model sees the negative curvature
        if not third_order:
            # mu/sqrt(V) -> -inf as alpha -> inf: no maximiser, so the fallback step.
            assert bool(rule.fallback)
            assert alpha == pytest.approx(initial, rel=1e-12)
    assert int(state.skipped_updates) == 0


def test_float32_variance_survives_a_large_common_offset():
    """E[x^2] - E[x]^2 cancels catastrophically in float32; batch_stats must not."""
    rng = np.random.default_rng(0)
    n = 64
    offsets = (1e4 + rng.normal(size=n)).astype(np.float32)  # losses ~1e4, spread ~1
    slopes = (1e3 + 1e-1 * rng.normal(size=(n, DIM))).astype(np.float32)  # gradients ~1e3, spread 0.1

    def loss(params, batch):
        return batch["c"] + batch["x"] @ params

    params = jnp.zeros(DIM, jnp.float32)
    stats = batch_stats(loss, params, {"c": jnp.asarray(offsets), "x": jnp.asarray(slopes)}, method="generic")
    assert stats.loss_var.dtype == jnp.float32
    ref_loss_var = np.var(offsets.astype(np.float64), ddof=1)
    ref_grad_var = np.var(slopes.astype(np.float64), axis=0, ddof=1)
    np.testing.assert_allclose(float(stats.loss_var), ref_loss_var, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(stats.grad_var), ref_grad_var, rtol=1e-3)
    # The naive one-pass formula in float32 is wrong here, so this test can fail.
    x = offsets
    naive = (np.mean(x * x) - np.mean(x) ** 2) * n / (n - 1)
    assert abs(naive - ref_loss_var) / ref_loss_var > 1e-2


@pytest.mark.parametrize("per_parameter, chunk_size", [(True, None), (False, None), (True, 5)])
def test_float32_fast_path_variance_survives_a_large_common_offset(per_parameter, chunk_size):
    """sum g^2 - n mean^2 cancels here; the guard must redo the leaf generically."""
    from probopt.stats import Linear

    rng = np.random.default_rng(0)
    x = (1e3 + 1e-1 * rng.normal(size=(64, DIM))).astype(np.float32)  # g_i = x_i
    layer = Linear(DIM, 1, use_bias=False, key=jax.random.key(0), dtype=jnp.float32)

    def loss(model, batch):
        return jax.vmap(model)(batch["x"])[:, 0]

    stats = batch_stats(
        loss, layer, {"x": jnp.asarray(x)}, method="fast", per_parameter=per_parameter, chunk_size=chunk_size
    )
    reference = np.var(x.astype(np.float64), axis=0, ddof=1)
    assert stats.grad_var_mean.dtype == jnp.float32
    np.testing.assert_allclose(float(stats.grad_var_mean), reference.mean(), rtol=1e-3)
    if per_parameter:
        np.testing.assert_allclose(np.asarray(stats.grad_var.weight)[0], reference, rtol=1e-3)
        # sum g^2 itself is a sum of positive terms: still the fast value, accurate.
        np.testing.assert_allclose(
            np.asarray(stats.grad_sq_sum.weight)[0], np.sum(x.astype(np.float64) ** 2, axis=0), rtol=1e-5
        )
    # Without the guard the one-pass formula is wrong here, so this test can fail.
    g = x.astype(np.float32)
    one_pass = (np.sum(g * g, axis=0) - 64 * np.mean(g, axis=0) ** 2) / 63
    assert np.max(np.abs(one_pass - reference) / reference) > 1e-1


def test_float32_fast_path_guard_under_vmap_takes_each_seeds_branch():
    """Vmapped over two batches, one that cancels and one that does not: both match float64."""
    from probopt.stats import Linear

    rng = np.random.default_rng(2)
    spread = 1e-1 * rng.normal(size=(2, 32, DIM))
    x = (np.array([1e3, 0.0])[:, None, None] + spread).astype(np.float32)  # batch 0 cancels, batch 1 not
    layer = Linear(DIM, 1, use_bias=False, key=jax.random.key(0), dtype=jnp.float32)

    def loss(model, batch):
        return jax.vmap(model)(batch)[:, 0]

    stats = jax.jit(jax.vmap(lambda b: batch_stats(loss, layer, b, method="fast")))(jnp.asarray(x))
    for i in range(2):
        reference = np.var(x[i].astype(np.float64), axis=0, ddof=1)
        np.testing.assert_allclose(np.asarray(stats.grad_var.weight)[i, 0], reference, rtol=1e-3)
        np.testing.assert_allclose(np.asarray(stats.grad_mean.weight)[i, 0], x[i].astype(np.float64).mean(0), rtol=1e-5)


def test_float32_fast_path_hvp_variance_survives_a_large_common_offset():
    """Same guard for the HVPs: h_i = x_i (x_i . delta) for a squared linear output."""
    from probopt.stats import Linear

    rng = np.random.default_rng(1)
    x = (1e3 + 1e-1 * rng.normal(size=(32, DIM))).astype(np.float32)
    layer = Linear(DIM, 1, use_bias=False, key=jax.random.key(0), dtype=jnp.float32)
    layer = eqx.tree_at(lambda m: m.weight, layer, jnp.full((1, DIM), 1e-3, jnp.float32))
    delta = eqx.tree_at(lambda m: m.weight, layer, jnp.asarray([[1.0, -0.5, 0.25]], jnp.float32))

    def loss(model, batch):
        return 0.5 * jax.vmap(model)(batch["x"])[:, 0] ** 2

    stats = batch_stats(loss, layer, {"x": jnp.asarray(x)}, direction=delta, method="fast")
    x64, w, d = x.astype(np.float64), np.full(DIM, 1e-3), np.array([1.0, -0.5, 0.25])
    g, h = x64 * (x64 @ w)[:, None], x64 * (x64 @ d)[:, None]
    np.testing.assert_allclose(np.asarray(stats.grad_var.weight)[0], np.var(g, axis=0, ddof=1), rtol=1e-3)
    np.testing.assert_allclose(np.asarray(stats.hvp_var.weight)[0], np.var(h, axis=0, ddof=1), rtol=1e-3)
    np.testing.assert_allclose(np.asarray(stats.hvp_mean.weight)[0], h.mean(axis=0), rtol=1e-5)


def test_float32_variance_does_not_overflow():
    """Losses ~1e20: squares overflow float32 (max ~3.4e38), deviations do not."""
    rng = np.random.default_rng(1)
    values = (1e20 * (1 + 1e-2 * rng.normal(size=16))).astype(np.float32)
    assert float(values[0]) ** 2 > float(np.finfo(np.float32).max)

    def loss(params, batch):
        return batch["c"] + 0.0 * params[0]

    stats = batch_stats(loss, jnp.zeros(1, jnp.float32), {"c": jnp.asarray(values)}, method="generic")
    np.testing.assert_allclose(float(stats.loss_var), np.var(values.astype(np.float64), ddof=1), rtol=1e-4)
    np.testing.assert_allclose(float(stats.loss_mean), np.mean(values.astype(np.float64)), rtol=1e-6)


# =========================================================================== 4. bad input


def _good_stats():
    params = jnp.full((DIM,), 2.0)
    return params, batch_stats(quadratic_loss, params, sample_batch(jax.random.key(0)), direction=jnp.zeros(DIM))


def _update_at_trace_time(optimizer, grads, params, stats):
    """Trace only (no run): errors raised here are trace-time errors."""
    state = optimizer.init(params)
    return jax.eval_shape(lambda g, s, p, st: optimizer.update(g, s, p, stats=st), grads, state, params, stats)


def test_wrong_pytree_structure_raises_naming_the_argument():
    optimizer = meka(0.1)
    params, stats = _good_stats()
    _update_at_trace_time(optimizer, stats.grad_mean, params, stats)  # the good case traces
    with pytest.raises(ValueError, match="updates"):
        _update_at_trace_time(optimizer, {"w": stats.grad_mean}, params, stats)
    with pytest.raises(ValueError, match="updates"):
        _update_at_trace_time(optimizer, stats.grad_mean[:2], params, stats)
    with pytest.raises(ValueError, match="`params`"):
        optimizer.update(stats.grad_mean, optimizer.init(params), {"w": params}, stats=stats)
    for field in ("grad_mean", "grad_var", "hvp_mean", "hvp_var"):
        bad = stats._replace(**{field: jnp.zeros(DIM + 1)})
        with pytest.raises(ValueError, match=f"stats.{field}"):
            _update_at_trace_time(optimizer, stats.grad_mean, params, bad)


def test_stats_from_another_batch_shape_raise_naming_the_field():
    """Statistics must be those of one reduced minibatch of the same model."""
    optimizer = meka(0.1)
    params, stats = _good_stats()
    n = int(stats.batch_size)
    stacked = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), stats)  # two steps' stats
    with pytest.raises(ValueError, match="stats.batch_size"):
        _update_at_trace_time(optimizer, stats.grad_mean, params, stacked)
    per_example = stats._replace(grad_mean=jnp.zeros((n, DIM)))  # not reduced over the batch
    with pytest.raises(ValueError, match="stats.grad_mean"):
        _update_at_trace_time(optimizer, stats.grad_mean, params, per_example)
    with pytest.raises(ValueError, match="stats.loss_mean"):
        _update_at_trace_time(optimizer, stats.grad_mean, params, stats._replace(loss_mean=jnp.zeros(n)))
    with pytest.raises(ValueError, match="stats.batch_size"):
        optimizer.update(stats.grad_mean, optimizer.init(params), params, stats=stats._replace(batch_size=jnp.asarray(0)))
    with pytest.raises(TypeError, match="stats"):
        optimizer.update(stats.grad_mean, optimizer.init(params), params)


def test_unknown_learning_rate_string_raises_naming_the_argument():
    for name in ("adam", "PI", ""):
        with pytest.raises(ValueError, match="learning_rate"):
            meka(name)
        with pytest.raises(ValueError, match="learning_rate"):
            adameka(name)


def test_per_example_loss_with_the_wrong_shape_raises_at_trace_time():
    optimizer = meka(0.1)
    params = jnp.full((DIM,), 2.0)

    def mean_loss(p, batch):
        return jnp.mean(quadratic_loss(p, batch))

    def matrix_loss(p, batch):
        return jnp.stack([quadratic_loss(p, batch)] * 2, axis=1)

    for bad in (mean_loss, matrix_loss):
        step = make_step(optimizer, bad)
        with pytest.raises(ValueError, match="per_example_loss"):
            jax.eval_shape(step, params, optimizer.init(params), sample_batch(jax.random.key(0)))


# =========================================================================== 5. property


@st.composite
def minibatch_statistics(draw):
    n = draw(st.integers(1, 64))
    log_scale = st.floats(-12.0, 12.0)
    grad = [draw(st.floats(-1e6, 1e6)) for _ in range(DIM)]
    hvp = [draw(st.floats(-1e6, 1e6)) for _ in range(DIM)]
    zero_var = draw(st.booleans())
    grad_var = 0.0 if zero_var else 10.0 ** draw(log_scale)
    hvp_var = 0.0 if zero_var else 10.0 ** draw(log_scale)
    count = draw(st.integers(0, 3))
    prior = 10.0 ** draw(st.floats(-6.0, 6.0))
    covariance = draw(st.sampled_from(["scalar", "diagonal"]))
    return n, grad, hvp, grad_var, hvp_var, count, prior, covariance


@settings(max_examples=40, deadline=None)
@given(minibatch_statistics())
def test_gradient_filter_keeps_variances_nonnegative_and_gain_in_unit_interval(inputs):
    n, grad, hvp, grad_var, hvp_var, count, prior, covariance = inputs
    gradient_filter = GradientFilter(prior_variance=prior, process_noise_decay=0.5, covariance=covariance)
    template = jnp.zeros(DIM)
    belief = gradient_filter.init(template)
    noise = gradient_filter.init_noise(template)
    stats = BatchStats(
        batch_size=jnp.asarray(n),
        loss_mean=jnp.asarray(0.0),
        loss_var=jnp.asarray(0.0),
        grad_mean=jnp.asarray(grad),
        grad_sq_sum=None,
        grad_var=jnp.full(DIM, grad_var),
        grad_var_mean=jnp.asarray(grad_var),
        hvp_mean=jnp.asarray(hvp),
        hvp_var=jnp.full(DIM, hvp_var),
        hvp_var_mean=jnp.asarray(hvp_var),
    )
    for t in range(count, count + 3):
        belief, noise, info = gradient_filter.update(belief, stats, noise, t)
        variance = np.asarray(belief.variance)
        gain = np.asarray(info.gain)
        assert np.all(np.isfinite(variance)) and np.all(variance >= 0)
        assert np.all(np.isfinite(np.asarray(belief.mean)))
        assert np.all((gain >= 0) & (gain <= 1))
        assert np.all(np.asarray(info.observation_noise) >= gradient_filter.noise_floor)


# =========================================================================== 6. fault injection


def test_nan_in_one_percent_of_steps_on_the_digits_mlp():
    from models.data import load_digits
    from models.losses import cross_entropy_per_example
    from models.mlp import MLP

    data = load_digits()
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    model = MLP((64, 32, 10), key=jax.random.key(0), dtype=jnp.float32)
    num_steps, batch_size = 300, 32
    rng = np.random.default_rng(0)
    indices = [rng.choice(x.shape[0], batch_size, replace=False) for _ in range(num_steps)]
    poisoned = set(rng.choice(num_steps, num_steps // 100, replace=False).tolist())
    assert len(poisoned) == 3

    optimizer = meka(0.1)
    step = make_step(optimizer, cross_entropy_per_example)
    full_loss = jax.jit(lambda m: jnp.mean(cross_entropy_per_example(m, {"x": x, "y": y})))

    @jax.jit
    def train(poison):
        def body(carry, xs):
            params, state = carry
            index, bad = xs
            inputs = x[index]
            inputs = inputs.at[0, 0].set(jnp.where(bad, jnp.nan, inputs[0, 0]))
            params, state, _ = step(params, state, {"x": inputs, "y": y[index]})
            return (params, state), None

        (params, state), _ = jax.lax.scan(body, (model, optimizer.init(model)), (jnp.asarray(np.stack(indices)), poison))
        return full_loss(params), state.skipped_updates

    def run(inject):
        mask = np.zeros(num_steps, bool)
        if inject:
            mask[sorted(poisoned)] = True
        loss, skipped = train(jnp.asarray(mask))
        return float(loss), int(skipped)

    clean_loss, clean_skips = run(False)
    faulty_loss, faulty_skips = run(True)
    assert clean_skips == 0 and faulty_skips == len(poisoned)
    assert clean_loss < 0.5 * float(full_loss(model))  # the clean run did learn
    assert np.isfinite(faulty_loss) and faulty_loss <= 1.5 * clean_loss
