"""Meka's gradient filter against an independent dense NumPy Kalman filter and closed forms."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from probopt.filters import GaussianBelief
from probopt.filters._gradient import GradientFilter, run_gradient_filter
from probopt.stats import BatchStats


def _tree_template():
    return {"w": np.zeros((2, 3)), "b": np.zeros(4)}


def _random_sequence(seed, steps, template, n=8, diagonal=False):
    """Random observations, drifts and variances, as a list of BatchStats and flat arrays."""
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree_util.tree_flatten(template)
    sizes = [leaf.size for leaf in leaves]
    dim = sum(sizes)

    def unflat(vec):
        parts, start = [], 0
        for leaf, size in zip(leaves, sizes):
            parts.append(jnp.asarray(vec[start : start + size].reshape(leaf.shape)))
            start += size
        return treedef.unflatten(parts)

    records = []
    for t in range(steps):
        g = rng.normal(size=dim) * 3.0
        b = rng.normal(size=dim) if t > 0 else np.zeros(dim)
        grad_var = rng.uniform(0.5, 4.0, size=dim)
        hvp_var = rng.uniform(0.1, 2.0, size=dim) if t > 0 else np.zeros(dim)
        stats = BatchStats(
            batch_size=jnp.asarray(n),
            loss_mean=jnp.asarray(0.0),
            loss_var=jnp.asarray(0.0),
            grad_mean=unflat(g),
            grad_sq_sum=None,
            grad_var=unflat(grad_var) if diagonal else None,
            grad_var_mean=jnp.asarray(grad_var.mean()),
            hvp_mean=unflat(b),
            hvp_sq_sum=None,
            hvp_var=unflat(hvp_var) if diagonal else None,
            hvp_var_mean=jnp.asarray(hvp_var.mean()),
        )
        records.append((stats, g, b, grad_var, hvp_var))
    return records, dim


def _numpy_dense_filter(records, dim, n, p0, decay_sigma, decay_q, diagonal):
    """Textbook Kalman filter with dense matrices (written independently of probopt)."""
    m = np.zeros(dim)
    P = p0 * np.eye(dim)
    sigma_avg = q_avg = None
    out = []
    for t, (_, g, b, grad_var, hvp_var) in enumerate(records):
        sigma_hat = grad_var / n if diagonal else np.full(dim, grad_var.mean() / n)
        q_hat = hvp_var / n if diagonal else np.full(dim, hvp_var.mean() / n)
        sigma_avg = sigma_hat if t == 0 else decay_sigma * sigma_avg + (1 - decay_sigma) * sigma_hat
        q_avg = q_hat if t <= 1 else decay_q * q_avg + (1 - decay_q) * q_hat
        R, Q = np.diag(sigma_avg), np.diag(q_avg)
        m_pred = m + b
        P_pred = P + Q
        K = P_pred @ np.linalg.inv(P_pred + R)
        m = m_pred + K @ (g - m_pred)
        I = np.eye(dim)
        P = (I - K) @ P_pred @ (I - K).T + K @ R @ K.T
        out.append((m.copy(), P.copy(), K.copy(), m_pred.copy(), P_pred.copy()))
    return out


def _flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(tree)])


@pytest.mark.parametrize("covariance", ["scalar", "diagonal"])
def test_filter_matches_dense_numpy_kalman_filter(covariance):
    diagonal = covariance == "diagonal"
    template = _tree_template()
    n, steps = 8, 12
    records, dim = _random_sequence(0, steps, template, n=n, diagonal=diagonal)
    filt = GradientFilter(
        prior_variance=50.0, noise_decay=0.7, process_noise_decay=0.4, covariance=covariance
    )
    reference = _numpy_dense_filter(records, dim, n, 50.0, 0.7, 0.4, diagonal)

    belief = filt.init(template)
    noise = filt.init_noise(template)
    update = jax.jit(GradientFilter.update)
    for t, ((stats, *_), (m, P, K, m_pred, P_pred)) in enumerate(zip(records, reference)):
        belief, noise, info = update(filt, belief, stats, noise, t)
        np.testing.assert_allclose(_flat(belief.mean), m, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(np.asarray(belief.dense_covariance()), P, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(_flat(info.predicted.mean), m_pred, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(
            np.asarray(info.predicted.dense_covariance()), P_pred, rtol=1e-10, atol=1e-12
        )
        gain = info.gain if not diagonal else _flat(info.gain)
        np.testing.assert_allclose(np.broadcast_to(gain, (dim,)), np.diag(K), rtol=1e-10)
        # Off-diagonals of the reference stay zero: scalar/diagonal structure is exact.
        np.testing.assert_allclose(K - np.diag(np.diag(K)), 0.0, atol=1e-14)


def test_offline_scan_reproduces_online_states():
    template = _tree_template()
    records, _ = _random_sequence(1, 10, template)
    filt = GradientFilter(noise_decay=0.9, process_noise_decay=0.5)
    belief, noise = filt.init(template), filt.init_noise(template)
    online = []
    step = jax.jit(GradientFilter.update)
    for t, (stats, *_) in enumerate(records):
        belief, noise, info = step(filt, belief, stats, noise, t)
        online.append((belief, noise, info))
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[r[0] for r in records])
    trace = jax.jit(run_gradient_filter)(filt, stacked)
    for t, (b, nz, info) in enumerate(online):
        at_t = jax.tree_util.tree_map(lambda x: x[t], trace)
        for got, want in [(at_t.belief, b), (at_t.noise, nz), (at_t.info.gain, info.gain)]:
            for x, y in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
                # Same arithmetic, different XLA fusion: equal up to round-off.
                np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("covariance", ["scalar", "diagonal"])
def test_proposition_1_closed_form_on_noisy_quadratic(covariance):
    """Noisy quadratic with known Sigma and Q = 0, started at m_0 = g_0, P_0 = Sigma.

    Closed form (Chen et al. 2020, Sec. 6): P_t = Sigma/(t+1), K_t = 1/(t+1), and m_t
    is the mean of the gradients transported to theta_t, (1/(t+1)) sum_s [g_s + H(theta_t - theta_s)].
    """
    rng = np.random.default_rng(3)
    d, n, lr = 5, 4, 0.3
    A = rng.normal(size=(d, d))
    H = A @ A.T / d + np.eye(d)
    if covariance == "scalar":
        sigma = 0.8  # Sigma = sigma I
        var_mean = sigma * n
    else:
        sigma = rng.uniform(0.2, 2.0, size=d)
        var_mean = None
    filt = GradientFilter(noise_decay=0.0, noise_floor=1e-30, covariance=covariance)

    theta = rng.normal(size=d)
    g0 = H @ theta + rng.normal(size=d) * np.sqrt(sigma)
    if covariance == "scalar":
        belief = GaussianBelief.scalar(jnp.asarray(g0), sigma)
    else:
        belief = GaussianBelief.diagonal(jnp.asarray(g0), jnp.asarray(sigma))
    noise = filt.init_noise(jnp.zeros(d))
    thetas, grads = [theta.copy()], [g0]
    for t in range(1, 15):
        delta = -lr * np.asarray(belief.mean)
        theta = theta + delta
        g = H @ theta + rng.normal(size=d) * np.sqrt(sigma)
        stats = BatchStats(
            batch_size=jnp.asarray(n),
            loss_mean=jnp.asarray(0.0),
            loss_var=jnp.asarray(0.0),
            grad_mean=jnp.asarray(g),
            grad_sq_sum=None,
            grad_var=None if covariance == "scalar" else jnp.asarray(sigma * n),
            grad_var_mean=jnp.asarray(var_mean if var_mean is not None else 0.0),
            hvp_mean=jnp.asarray(H @ delta),
            hvp_sq_sum=None,
            hvp_var=None if covariance == "scalar" else jnp.zeros(d),
            hvp_var_mean=jnp.asarray(0.0),
        )
        belief, noise, info = filt.update(belief, stats, noise, t)
        thetas.append(theta.copy())
        grads.append(g)
        np.testing.assert_allclose(np.asarray(belief.variance), np.asarray(sigma) / (t + 1), rtol=1e-10)
        np.testing.assert_allclose(np.asarray(info.gain), 1.0 / (t + 1), rtol=1e-10)
        transported = np.mean([gs + H @ (theta - ts) for gs, ts in zip(grads, thetas)], axis=0)
        np.testing.assert_allclose(np.asarray(belief.mean), transported, rtol=1e-9, atol=1e-10)


def test_first_step_without_hvp_and_prior():
    filt = GradientFilter()
    params = {"a": jnp.zeros(3)}
    belief = filt.init(params)
    np.testing.assert_array_equal(belief.mean["a"], 0.0)
    assert float(belief.variance) == 1e4
    g = jnp.array([1.0, -2.0, 0.5])
    stats = BatchStats(
        batch_size=jnp.asarray(10),
        loss_mean=jnp.asarray(0.0),
        loss_var=jnp.asarray(0.0),
        grad_mean={"a": g},
        grad_sq_sum=None,
        grad_var=None,
        grad_var_mean=jnp.asarray(2.0),
    )
    posterior, noise, info = filt.update(belief, stats, filt.init_noise(params), 0)
    k = 1e4 / (1e4 + 0.2)
    np.testing.assert_allclose(info.gain, k, rtol=1e-12)
    np.testing.assert_allclose(posterior.mean["a"], k * g, rtol=1e-12)
    np.testing.assert_allclose(info.process_noise, 0.0)
    np.testing.assert_allclose(noise.observation_noise, 0.2, rtol=1e-12)


def test_noise_floor_keeps_filter_alive_with_zero_variance():
    """Batch size 1 reports zero variance; without a floor P would collapse to 0 and
    the filter would ignore every later observation."""
    filt = GradientFilter(noise_floor=1e-6)
    params = jnp.zeros(2)
    belief, noise = filt.init(params), filt.init_noise(params)
    for t, value in enumerate([1.0, 5.0, -3.0]):
        stats = BatchStats(
            batch_size=jnp.asarray(1),
            loss_mean=jnp.asarray(0.0),
            loss_var=jnp.asarray(0.0),
            grad_mean=jnp.full(2, value),
            grad_sq_sum=None,
            grad_var=None,
            grad_var_mean=jnp.asarray(0.0),
            hvp_mean=jnp.zeros(2),
            hvp_var_mean=jnp.asarray(0.0),
        )
        belief, noise, info = filt.update(belief, stats, noise, t)
        assert float(info.observation_noise) == pytest.approx(1e-6)
        assert np.all(np.isfinite(belief.mean))
    # Gains stay at 1/(t+1) (P shrinks like floor/(t+1)), so later data still counts.
    assert float(info.gain) == pytest.approx(1 / 3, rel=1e-6)
    np.testing.assert_allclose(belief.mean, 1.0, rtol=1e-5)  # mean of 1, 5, -3


def test_hyperparameters_do_not_recompile_and_dtype_is_kept():
    params = jnp.zeros(3, dtype=jnp.float32)
    stats = BatchStats(
        batch_size=jnp.asarray(4),
        loss_mean=jnp.asarray(0.0, jnp.float32),
        loss_var=jnp.asarray(0.0, jnp.float32),
        grad_mean=jnp.ones(3, jnp.float32),
        grad_sq_sum=None,
        grad_var=None,
        grad_var_mean=jnp.asarray(1.0, jnp.float32),
        hvp_mean=jnp.ones(3, jnp.float32),
        hvp_var_mean=jnp.asarray(1.0, jnp.float32),
    )

    @eqx.debug.assert_max_traces(max_traces=1)
    def run(filt, belief, noise):
        return filt.update(belief, stats, noise, 3)

    run = jax.jit(run)
    gains = []
    for decay in (0.9, 0.5):
        filt = GradientFilter(noise_decay=decay, prior_variance=2.0)
        belief, noise, info = run(filt, filt.init(params), filt.init_noise(params))
        assert belief.mean.dtype == jnp.float32
        assert belief.variance.dtype == jnp.float32
        gains.append(float(info.gain))
    assert gains[0] != gains[1]


def test_bad_configuration_raises():
    with pytest.raises(ValueError, match="covariance"):
        GradientFilter(covariance="dense")
    with pytest.raises(ValueError, match="noise_decay"):
        GradientFilter(noise_decay=1.0)
    with pytest.raises(ValueError, match="prior_variance"):
        GradientFilter(prior_variance=0.0)
    filt = GradientFilter(covariance="diagonal")
    params = jnp.zeros(2)
    stats = BatchStats(
        batch_size=jnp.asarray(4),
        loss_mean=jnp.asarray(0.0),
        loss_var=jnp.asarray(0.0),
        grad_mean=jnp.ones(2),
        grad_sq_sum=None,
        grad_var=None,
        grad_var_mean=jnp.asarray(1.0),
    )
    with pytest.raises(ValueError, match="grad_var"):
        filt.update(filt.init(params), stats, filt.init_noise(params), 0)
    with pytest.raises(ValueError, match="covariance"):
        GradientFilter().update(filt.init(params), stats, filt.init_noise(params), 0)
