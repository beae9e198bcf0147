"""McAllester's SNR learning-rate rule against an independent NumPy reimplementation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from probopt.optimizers._snr import SNRState, scale_by_snr, snr_sgd
from probopt.stats import BatchStats, batch_stats


def _reference_snr(grads, *, warmup, lambda_b, lambda_eta, eps, batch_size, example_vars=None, min_steps=2.0):
    """Slide-by-slide scalar loops; returns the per-step parameter increments."""
    steps = np.zeros_like(grads)
    etas = np.zeros_like(grads)
    num_steps, dim = grads.shape
    for i in range(dim):
        g_avg = s_avg = v_avg = 0.0
        b_star = float(warmup)
        for t in range(1, num_steps + 1):
            g_hat = grads[t - 1, i]
            r = 1.0 / min_steps if b_star <= 0 else min(1.0 / min_steps, batch_size / b_star)
            g_avg = (1 - r) * g_avg + r * g_hat
            if example_vars is None:
                s_avg = (1 - r) * s_avg + r * g_hat**2
                if batch_size == 1:
                    sigma = np.sqrt(max(s_avg - g_avg**2, 0.0))  # the slide's sigma tilde
                    var = sigma**2
                else:
                    var = batch_size * max(s_avg - g_avg**2, 0.0)
            else:
                v_avg = (1 - r) * v_avg + r * example_vars[t - 1, i]
                var = v_avg
            if t <= warmup:
                eta = 0.0
            elif batch_size * g_avg**2 >= lambda_b * var:
                eta = lambda_eta * lambda_b
            else:
                eta = lambda_eta * batch_size * g_avg**2 / var
            etas[t - 1, i] = eta
            steps[t - 1, i] = -eta * g_hat
            b_star = float(warmup) if t <= warmup else lambda_b * var / (g_avg**2 + eps)
    return steps, etas


def _scripted_gradients(num_steps=40, seed=0):
    rng = np.random.default_rng(seed)
    means = np.array([3.0, 0.3, -0.1])  # high SNR (capped), low SNR, very low SNR
    scales = np.array([0.5, 1.0, 2.0])
    return means + scales * rng.standard_normal((num_steps, 3))


def _run(opt, grads, extra=None):
    params = jnp.zeros(grads.shape[1], grads.dtype)
    state = opt.init(params)

    @jax.jit
    def step(state, g, extra_t):
        kwargs = {} if extra_t is None else {"stats": extra_t}
        return opt.update(g, state, params, **kwargs)

    outs = []
    for t in range(grads.shape[0]):
        extra_t = None if extra is None else jax.tree.map(lambda x: x[t], extra)
        upd, state = step(state, jnp.asarray(grads[t]), extra_t)
        outs.append(upd)
    return np.stack(outs), state


@pytest.mark.parametrize("batch_size", [1.0, 4.0])
def test_temporal_rule_matches_slide_formulas(batch_size):
    grads = _scripted_gradients()
    hp = dict(warmup_steps=5, lambda_b=16.0, lambda_eta=0.05, eps=1e-12, batch_size=batch_size)
    updates, state = _run(snr_sgd(**hp), grads)
    expected, etas = _reference_snr(
        grads, warmup=5, lambda_b=16.0, lambda_eta=0.05, eps=1e-12, batch_size=batch_size
    )
    np.testing.assert_allclose(updates, expected, rtol=1e-9, atol=1e-12)
    # The scripted sequence exercises warm-up, the B >= B* cap and the uncapped branch.
    assert np.all(etas[:5] == 0)
    assert np.any(etas[5:, 0] == 0.05 * 16.0)
    assert np.all(etas[5:, 2] < 0.05 * 16.0) and np.all(etas[5:, 2] > 0)
    inner = state[0]
    assert isinstance(inner, SNRState)
    np.testing.assert_allclose(inner.learning_rate, etas[-1], rtol=1e-9)


def test_per_example_rule_uses_batch_variance():
    grads = _scripted_gradients(seed=1)
    rng = np.random.default_rng(2)
    example_vars = rng.uniform(0.5, 4.0, size=grads.shape)
    n = 8
    stats = BatchStats(
        batch_size=jnp.full((grads.shape[0],), n),
        loss_mean=jnp.zeros(grads.shape[0]),
        loss_var=jnp.zeros(grads.shape[0]),
        grad_mean=jnp.asarray(grads),
        grad_sq_sum=jnp.zeros_like(grads),
        grad_var=jnp.asarray(example_vars),
        grad_var_mean=jnp.asarray(example_vars.mean(1)),
    )
    opt = snr_sgd(warmup_steps=3, lambda_eta=0.02, variance="per_example")
    updates, _ = _run(opt, grads, extra=stats)
    expected, _ = _reference_snr(
        grads, warmup=3, lambda_b=16.0, lambda_eta=0.02, eps=1e-12, batch_size=n, example_vars=example_vars
    )
    np.testing.assert_allclose(updates, expected, rtol=1e-9, atol=1e-12)


def test_per_example_requires_stats():
    opt = scale_by_snr(variance="per_example")
    params = jnp.zeros(3)
    state = opt.init(params)
    with pytest.raises(TypeError, match="stats="):
        opt.update(jnp.ones(3), state, params)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(variance="spatial"),
        dict(warmup_steps=0),
        dict(lambda_b=-1.0),
        dict(lambda_eta=0.0),
        dict(batch_size=0.5),
        dict(min_averaging_steps=0.5),
    ],
)
def test_bad_hyperparameters_raise(kwargs):
    with pytest.raises(ValueError):
        scale_by_snr(**kwargs)


def test_float32_pytree_and_vmap_over_seeds():
    params = {"w": jnp.zeros((2, 3), jnp.float32), "b": jnp.zeros(3, jnp.float32)}
    opt = snr_sgd(warmup_steps=2)

    def run(key):
        state = opt.init(params)

        def body(state, k):
            g = jax.tree.map(lambda p: 1.0 + jax.random.normal(k, p.shape, p.dtype), params)
            upd, state = opt.update(g, state, params)
            return state, upd

        state, upds = jax.lax.scan(body, state, jax.random.split(key, 6))
        return upds

    upds = jax.jit(jax.vmap(run))(jax.random.split(jax.random.key(0), 4))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(upds))
    assert upds["w"].shape == (4, 6, 2, 3)
    assert np.all(np.isfinite(upds["w"]))
    # Different seeds give different steps after warm-up.
    assert not np.allclose(upds["w"][0, -1], upds["w"][1, -1])


def test_learning_rate_readable_with_tree_get():
    opt = snr_sgd(warmup_steps=1)
    params = jnp.zeros(2)
    state = opt.init(params)
    _, state = opt.update(jnp.array([1.0, -2.0]), state, params)
    _, state = opt.update(jnp.array([1.0, -1.0]), state, params)
    eta = optax.tree.get(state, "learning_rate")
    assert eta.shape == (2,) and np.all(eta > 0)


def test_snr_sgd_with_batch_stats_descends_noisy_regression():
    """End to end with real per-example statistics: the loss decreases."""
    key = jax.random.key(3)
    kx, kn = jax.random.split(key)
    x = jax.random.normal(kx, (256, 4))
    w_true = jnp.array([1.0, -2.0, 0.5, 3.0])
    y = x @ w_true + 0.3 * jax.random.normal(kn, (256,))

    def per_example_loss(w, batch):
        xb, yb = batch
        return 0.5 * (xb @ w - yb) ** 2

    opt = snr_sgd(warmup_steps=5, lambda_eta=1.0 / 32.0, variance="per_example")
    w = jnp.zeros(4)
    state = opt.init(w)

    @jax.jit
    def step(w, state, idx):
        batch = (x[idx], y[idx])
        stats = batch_stats(per_example_loss, w, batch)
        upd, state = opt.update(stats.grad_mean, state, w, stats=stats)
        return optax.apply_updates(w, upd), state

    rng = np.random.default_rng(0)
    for _ in range(150):
        w, state = step(w, state, jnp.asarray(rng.integers(0, 256, size=16)))
    full = lambda w: float(jnp.mean(per_example_loss(w, (x, y))))
    assert full(w) < 0.2 * full(jnp.zeros(4))
