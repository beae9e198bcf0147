"""Acquisition functions and step-size solvers against grid searches and closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate
from scipy.stats import norm

from probopt.acquisition import (
    ValueChangeModel,
    ei_step_size,
    expected_decrease,
    expected_improvement,
    pi_stationarity,
    pi_step_size,
    probability_of_improvement,
    quadratic_step_size,
    solve_step_size,
)

# Compile each solver once for the whole module (eager calls would recompile their loops).
_pi = jax.jit(pi_step_size)
_ei = jax.jit(ei_step_size)


def _grid_pi(model, low=1e-12, high=1e6, points=400_001):
    """Dense log grid for argmax PI (= argmin mu/sqrt(V)), refined once around the best point."""
    a, b, s, p, q, c = (float(x) for x in (model.slope, model.curvature, model.value_variance,
                                            model.gradient_variance, model.curvature_variance,
                                            model.third_order))

    def ratio(alpha):
        return (-alpha * a + 0.5 * alpha**2 * b) / np.sqrt(2 * s + alpha**2 * p + 0.25 * alpha**4 * q + alpha**6 * c)

    grid = np.geomspace(low, high, points)
    best = grid[np.argmin(ratio(grid))]
    fine = np.linspace(best * (1 - 1e-4), best * (1 + 1e-4), 20_001)
    best = fine[np.argmin(ratio(fine))]
    return best, ratio


# (a, beta, s, p, q, third_order): generic, s -> 0, beta <= 0, q = 0, third-order cases.
EDGE_CASES = [
    (1.0, 2.0, 0.1, 0.5, 0.3, 0.0),
    (1.0, 2.0, 1e-10, 0.5, 0.3, 0.0),  # s -> 0: tiny step
    (1.0, 2.0, 1e-10, 0.0, 0.3, 0.0),
    (1.0, 2.0, 0.1, 0.0, 0.0, 0.0),  # no uncertainty in slope/curvature: quadratic rule
    (1.0, 2.0, 0.1, 0.5, 0.0, 0.0),  # q = 0
    (1.0, -2.0, 0.1, 0.5, 0.3, 0.0),  # negative curvature, bounded by q
    (1.0, 0.0, 0.1, 0.5, 0.3, 0.0),  # zero curvature
    (1.0, -2.0, 0.1, 0.5, 0.0, 0.5),  # negative curvature, bounded by the third-order term
    (1.0, 2.0, 0.1, 0.5, 0.3, 10.0),  # positive curvature with third-order term
    (3e-4, 5e3, 2e-6, 1e-2, 7e4, 0.0),  # badly scaled
]


@pytest.mark.parametrize("coefficients", EDGE_CASES)
def test_pi_solver_matches_grid_search_on_edge_cases(coefficients):
    model = ValueChangeModel(*coefficients)
    solution = _pi(model)
    assert bool(solution.valid)
    best, ratio = _grid_pi(model)
    np.testing.assert_allclose(float(solution.step_size), best, rtol=1e-4)
    # The solver's value is at least as good as anything on the grid.
    assert ratio(float(solution.step_size)) <= ratio(best) + 1e-12
    np.testing.assert_allclose(
        solution.acquisition_value, norm.cdf(-ratio(float(solution.step_size))), rtol=1e-10
    )


def test_pi_solver_matches_grid_search_on_random_models():
    rng = np.random.default_rng(0)
    for _ in range(15):
        coefficients = (
            10 ** rng.uniform(-2, 2),
            rng.choice([-1, 1]) * 10 ** rng.uniform(-2, 2),
            10 ** rng.uniform(-6, 1),
            10 ** rng.uniform(-3, 2) * rng.integers(0, 2),
            10 ** rng.uniform(-3, 2),
            0.0,
        )
        model = ValueChangeModel(*coefficients)
        solution = _pi(model)
        assert bool(solution.valid), coefficients
        best, ratio = _grid_pi(model, low=1e-10, high=1e8, points=200_001)
        np.testing.assert_allclose(float(solution.step_size), best, rtol=1e-4, err_msg=str(coefficients))
        if coefficients[1] > 0:  # PI shrinks the quadratic-rule step
            assert float(solution.step_size) < coefficients[0] / coefficients[1]


def test_stationarity_polynomial_is_the_derivative_numerator():
    model = ValueChangeModel(1.3, -0.7, 0.2, 0.4, 0.9, 0.05)
    ratio = lambda alpha: model.mean(alpha) / jnp.sqrt(model.variance(alpha))  # noqa: E731
    for alpha in (0.1, 0.8, 2.5):
        alpha = jnp.asarray(alpha)
        expected = jax.grad(ratio)(alpha) * model.variance(alpha) ** 1.5
        np.testing.assert_allclose(pi_stationarity(model, alpha), expected, rtol=1e-10)


def test_pi_without_a_maximiser_is_invalid_not_nan():
    unbounded = ValueChangeModel(1.0, -1.0, 0.1, 0.5, 0.0)  # beta <= 0 and nothing bounds V
    uphill = ValueChangeModel(-1.0, 1.0, 0.1, 0.5, 0.3)  # a <= 0: no improvement expected
    degenerate = ValueChangeModel(1.0, 1.0, 0.0, 0.5, 0.3)  # s = 0: optimum at alpha -> 0
    broken = ValueChangeModel(jnp.nan, 1.0, 0.1, 0.5, 0.3)
    for model in (unbounded, uphill, degenerate, broken):
        solution = _pi(model)
        assert not bool(solution.valid)
        assert float(solution.step_size) == 0.0
        assert np.isfinite(float(solution.acquisition_value))


def test_pi_step_is_invariant_to_loss_scale():
    model = ValueChangeModel(0.8, 1.7, 0.05, 0.3, 0.6, 0.01)
    alpha = float(_pi(model).step_size)
    for scale in (1e-3, 7.0, 1e3):
        scaled = _pi(model.scaled(scale))
        # alpha -> alpha / c, so the parameter step alpha * u (u -> c u) is unchanged.
        np.testing.assert_allclose(float(scaled.step_size) * scale, alpha, rtol=1e-9)
        np.testing.assert_allclose(scaled.acquisition_value, _pi(model).acquisition_value, rtol=1e-9)


finite = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e30, max_value=1e30)
nonneg = st.floats(allow_nan=False, allow_infinity=False, min_value=0.0, max_value=1e30)


@settings(max_examples=100, deadline=None)
@given(a=finite, beta=finite, s=nonneg, p=nonneg, q=nonneg, c=nonneg)
def test_pi_step_is_finite_and_nonnegative_for_any_finite_input(a, beta, s, p, q, c):
    solution = _pi(ValueChangeModel(a, beta, s, p, q, c))
    assert np.isfinite(float(solution.step_size)) and float(solution.step_size) >= 0.0
    assert np.isfinite(float(solution.acquisition_value))


def test_pi_float32_matches_float64_and_keeps_dtype():
    coefficients = (1.0, 2.0, 0.1, 0.5, 0.3, 0.01)
    model64 = ValueChangeModel(*(jnp.asarray(x, jnp.float64) for x in coefficients))
    model32 = ValueChangeModel(*(jnp.asarray(x, jnp.float32) for x in coefficients))
    s64, s32 = _pi(model64), _pi(model32)
    assert s32.step_size.dtype == jnp.float32 and s64.step_size.dtype == jnp.float64
    np.testing.assert_allclose(s32.step_size, s64.step_size, rtol=1e-5)


def test_solvers_jit_and_vmap_over_models():
    rng = np.random.default_rng(3)
    size = 4
    batch = ValueChangeModel(
        jnp.asarray(rng.uniform(0.5, 2, size)),
        jnp.asarray(rng.uniform(-1, 2, size)),
        jnp.asarray(rng.uniform(0.01, 1, size)),
        jnp.asarray(rng.uniform(0, 1, size)),
        jnp.asarray(rng.uniform(0.1, 1, size)),
        jnp.zeros(size),
    )
    # the quadratic rule has no loops to batch; the single-model solvers are the module's jitted ones
    for acquisition, single in (("pi", _pi), ("ei", _ei)):
        solve = lambda m, a=acquisition: solve_step_size(m, a)  # noqa: E731
        batched = jax.jit(jax.vmap(solve))(batch)
        for i in range(size):
            expected = single(jax.tree_util.tree_map(lambda x, i=i: x[i], batch)).step_size
            np.testing.assert_allclose(batched.step_size[i], expected, rtol=1e-8)


def test_acquisition_functions_against_numerical_integrals():
    model = ValueChangeModel(1.0, 2.0, 0.1, 0.5, 0.3)
    alpha = jnp.asarray([0.05, 0.3, 1.2])
    predictive = model.distribution(alpha)
    assert isinstance(predictive, dist.Normal)
    mu, sd = np.asarray(model.mean(alpha)), np.sqrt(np.asarray(model.variance(alpha)))
    np.testing.assert_allclose(probability_of_improvement(predictive), norm.cdf(0, mu, sd), rtol=1e-12)
    np.testing.assert_allclose(probability_of_improvement(predictive), predictive.cdf(0.0), rtol=1e-10)
    for i in range(3):
        improvement = integrate.quad(lambda x, i=i: max(0.0, -x) * norm.pdf(x, mu[i], sd[i]), -50, 50, points=[0.0])[0]
        np.testing.assert_allclose(expected_improvement(predictive)[i], improvement, rtol=1e-7)
    np.testing.assert_allclose(expected_decrease(predictive), -mu)
    with pytest.raises(TypeError, match="Normal"):
        probability_of_improvement(dist.Laplace(0.0, 1.0))


def test_predictive_samples_have_the_model_moments(key):
    model = ValueChangeModel(1.0, 2.0, 0.1, 0.5, 0.3)
    samples = model.distribution(0.4).sample(key, (200_000,))
    np.testing.assert_allclose(samples.mean(), model.mean(0.4), atol=4 * np.sqrt(model.variance(0.4) / 2e5))
    np.testing.assert_allclose(samples.var(), model.variance(0.4), rtol=2e-2)


def test_ei_solver_matches_grid_search_within_its_range():
    for coefficients in [(1.0, 2.0, 0.1, 0.5, 5.0), (1.0, 2.0, 1.0, 2.0, 20.0), (0.5, 0.3, 0.02, 0.1, 3.0)]:
        model = ValueChangeModel(*coefficients)
        solution = _ei(model)
        assert bool(solution.valid)
        reference = float(_pi(model).step_size)
        grid = np.geomspace(reference * 1e-3, reference * 1e3, 200_001)
        values = np.asarray(expected_improvement(model.distribution(jnp.asarray(grid))))
        np.testing.assert_allclose(float(solution.step_size), grid[np.argmax(values)], rtol=1e-3)
        assert float(solution.acquisition_value) >= values.max() * (1 - 1e-9)


def test_quadratic_rule_and_scaling():
    model = ValueChangeModel(1.5, 3.0, 0.1, 0.5, 0.3)
    np.testing.assert_allclose(quadratic_step_size(model).step_size, 0.5)
    np.testing.assert_allclose(quadratic_step_size(model, scale=0.1).step_size, 0.05)
    np.testing.assert_allclose(solve_step_size(model, "quadratic", scale=0.1).step_size, 0.05)
    np.testing.assert_allclose(
        solve_step_size(model, "pi", scale=3.0).step_size, 3.0 * _pi(model).step_size
    )
    assert not bool(quadratic_step_size(ValueChangeModel(1.0, -1.0, 0.1, 0.5, 0.3)).valid)
    with pytest.raises(ValueError, match="acquisition"):
        solve_step_size(model, "ucb")
    with pytest.raises(ValueError, match="shape"):
        _pi(ValueChangeModel(jnp.ones(2), 1.0, 0.1, 0.5, 0.3))
