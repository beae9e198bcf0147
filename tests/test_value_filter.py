"""The function-value filter against closed forms: joint Gaussian, marginal likelihood, Taylor terms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize, stats

from probopt.filters import GaussianBelief
from probopt.filters._value import (
    ValueFilter,
    fit_model_correction,
    quadratic_form,
    taylor_dynamics,
)


def _run_filter(value_filter, ys, rs, drifts, variances, step_norms, fit_first=True):
    belief = value_filter.init(jnp.float64)
    infos = []
    for t, (y, r, d, v, n) in enumerate(zip(ys, rs, drifts, variances, step_norms)):
        belief, info = value_filter.update(
            belief, y, r, drift=d, model_variance=v, step_norm=n, fit_correction=fit_first or t > 0
        )
        infos.append(info)
    return belief, infos


def test_value_filter_matches_joint_gaussian_posterior():
    rng = np.random.default_rng(0)
    steps = 7
    prior_mean, prior_variance = 0.3, 2.0
    drifts = rng.normal(size=steps)
    variances = rng.uniform(0.01, 0.5, size=steps)
    rs = rng.uniform(0.05, 0.3, size=steps)
    ys = np.cumsum(drifts) + rng.normal(scale=1.5, size=steps)  # misfit: some lambda > 0
    norms = rng.uniform(0.5, 2.0, size=steps)
    value_filter = ValueFilter(prior_mean=prior_mean, prior_variance=prior_variance)
    belief, infos = _run_filter(value_filter, ys, rs, drifts, variances, norms)
    lambdas = np.array([float(info.correction) for info in infos])
    assert np.any(lambdas > 0) and np.any(lambdas == 0), lambdas

    # Joint Gaussian of (f_1..f_T, y_1..y_T) given the fitted lambdas, conditioned by hand.
    process = variances + lambdas
    mean_f = prior_mean + np.cumsum(drifts)
    cumulative = prior_variance + np.cumsum(process)
    cov_f = cumulative[np.minimum.outer(np.arange(steps), np.arange(steps))]
    cov_y = cov_f + np.diag(rs)
    gain = np.linalg.solve(cov_y, cov_f[:, -1])
    post_mean = mean_f[-1] + gain @ (ys - mean_f)
    post_var = cov_f[-1, -1] - cov_f[-1] @ gain
    np.testing.assert_allclose(float(belief.mean), post_mean, rtol=1e-10)
    np.testing.assert_allclose(float(belief.variance), post_var, rtol=1e-10)

    # The filter's log-likelihoods add up to the joint marginal density of the y's.
    total = sum(float(info.log_likelihood) for info in infos)
    expected = stats.multivariate_normal(mean_f, cov_y).logpdf(ys)
    np.testing.assert_allclose(total, expected, rtol=1e-10)


def test_correction_maximises_marginal_likelihood():
    rng = np.random.default_rng(1)
    for _ in range(20):
        innovation = rng.normal(scale=3.0)
        predicted_variance = rng.uniform(0.0, 4.0)
        noise = rng.uniform(0.0, 2.0)

        def negative_log_likelihood(lam):
            total = predicted_variance + lam + noise
            return 0.5 * (np.log(total) + innovation**2 / total)

        upper = 10 * innovation**2 + 10.0
        numeric = optimize.minimize_scalar(
            negative_log_likelihood, bounds=(0.0, upper), method="bounded", options={"xatol": 1e-10}
        ).x
        closed = float(fit_model_correction(jnp.asarray(innovation), predicted_variance, noise))
        np.testing.assert_allclose(closed, numeric, atol=1e-6 * (1 + upper))
        if innovation**2 <= predicted_variance + noise:
            assert closed == 0.0


def test_update_uses_fitted_correction_as_extra_process_noise():
    value_filter = ValueFilter(prior_mean=0.0, prior_variance=1.0)
    belief = value_filter.init(jnp.float64)
    belief, info = value_filter.update(belief, 5.0, 0.5, drift=0.2, model_variance=0.3, step_norm=2.0)
    expected_lambda = (5.0 - 0.2) ** 2 - (1.0 + 0.3) - 0.5
    np.testing.assert_allclose(info.correction, expected_lambda)
    np.testing.assert_allclose(info.third_order, expected_lambda / 2.0**6)
    prior = 1.0 + 0.3 + expected_lambda
    gain = prior / (prior + 0.5)
    np.testing.assert_allclose(info.gain, gain)
    np.testing.assert_allclose(belief.mean, 0.2 + gain * 4.8)
    np.testing.assert_allclose(belief.variance, (1 - gain) ** 2 * prior + gain**2 * 0.5)
    # The fitted lambda makes the predictive variance equal the squared innovation (ML).
    np.testing.assert_allclose(info.innovation_variance, 4.8**2)


def test_first_observation_can_skip_the_fit():
    value_filter = ValueFilter()
    belief = value_filter.init(jnp.float64)
    _, fitted = value_filter.update(belief, 1e3, 1.0, drift=0.0, model_variance=0.0)
    _, skipped = value_filter.update(belief, 1e3, 1.0, drift=0.0, model_variance=0.0, fit_correction=False)
    np.testing.assert_allclose(fitted.correction, 1e6 - 1e4 - 1.0)
    assert float(skipped.correction) == 0.0
    assert float(skipped.gain) > 0.9999  # the vague prior already gives gain ~ 1


@pytest.mark.parametrize("structure", ["scalar", "diagonal", "dense"])
def test_taylor_dynamics_against_dense_formula(structure):
    rng = np.random.default_rng(2)
    dim = 5
    mean = {"w": jnp.asarray(rng.normal(size=(2, 2))), "b": jnp.asarray(rng.normal(size=1))}
    step = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape)), mean)
    hvp = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape)), mean)
    if structure == "scalar":
        belief = GaussianBelief.scalar(mean, 0.7)
        hvp_noise = jnp.asarray(0.2)
        cov_p, cov_q = 0.7 * np.eye(dim), 0.2 * np.eye(dim)
    elif structure == "diagonal":
        variance = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.uniform(0.1, 1, size=x.shape)), mean)
        noise = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.uniform(0.1, 1, size=x.shape)), mean)
        belief = GaussianBelief.diagonal(mean, variance)
        hvp_noise = noise
        cov_p = np.diag(jax.flatten_util.ravel_pytree(variance)[0])
        cov_q = np.diag(jax.flatten_util.ravel_pytree(noise)[0])
    else:
        root = rng.normal(size=(dim, dim))
        cov_p = root @ root.T
        root = rng.normal(size=(dim, dim))
        cov_q = root @ root.T
        belief = GaussianBelief.dense(mean, cov_p)
        hvp_noise = jnp.asarray(cov_q)
    flat = lambda tree: np.asarray(jax.flatten_util.ravel_pytree(tree)[0])  # noqa: E731
    drift, variance = taylor_dynamics(belief, step, hvp, hvp_noise)
    m, d, b = flat(mean), flat(step), flat(hvp)
    np.testing.assert_allclose(drift, m @ d + 0.5 * d @ b, rtol=1e-12)
    np.testing.assert_allclose(variance, d @ cov_p @ d + 0.25 * d @ cov_q @ d, rtol=1e-12)


def test_quadratic_form_rejects_unknown_structure():
    with pytest.raises(ValueError, match="structure"):
        quadratic_form(1.0, "banded", jnp.ones(3))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="prior_variance"):
        ValueFilter(prior_variance=-1.0)
    value_filter = ValueFilter()
    belief = value_filter.init(jnp.float64)
    with pytest.raises(ValueError, match="observation_noise"):
        value_filter.update(belief, 1.0, -1.0, drift=0.0, model_variance=0.0)
    with pytest.raises(ValueError, match="observation"):
        value_filter.update(belief, jnp.ones(2), 1.0, drift=0.0, model_variance=0.0)
    with pytest.raises(ValueError, match="scalar GaussianBelief"):
        value_filter.update(GaussianBelief.scalar(jnp.zeros(2), 1.0), 1.0, 1.0, drift=0.0, model_variance=0.0)


def test_float32_jit_and_vmap():
    value_filter = ValueFilter()

    @jax.jit
    def run(ys):
        const = lambda x: jnp.asarray(x, ys.dtype)  # noqa: E731

        def body(belief, y):
            belief, info = value_filter.update(
                belief, y, const(0.1), drift=const(-0.1), model_variance=const(0.01)
            )
            return belief, info.correction

        return jax.lax.scan(body, value_filter.init(ys.dtype), ys)

    ys = jax.random.normal(jax.random.key(0), (3, 10), jnp.float32)
    beliefs, corrections = jax.vmap(run)(ys)
    assert beliefs.mean.dtype == jnp.float32 and corrections.dtype == jnp.float32
    assert beliefs.mean.shape == (3,)
    # vmap over seeds equals running each seed alone, in float64 too.
    single, _ = run(ys[1])
    np.testing.assert_allclose(beliefs.mean[1], single.mean, rtol=1e-6)
    reference, _ = run(ys[1].astype(jnp.float64))
    assert reference.mean.dtype == jnp.float64
    np.testing.assert_allclose(single.mean, reference.mean, rtol=1e-4)
