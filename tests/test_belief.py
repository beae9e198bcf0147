"""GaussianBelief: builders, moments of its NumPyro distributions, log densities."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from jax.flatten_util import ravel_pytree
from scipy import stats

from probopt.filters import GaussianBelief

NUM_DRAWS = 20_000


def _mean_tree():
    return {"a": jnp.array([1.0, -2.0, 0.5]), "b": jnp.array([[3.0, 0.0], [-1.0, 2.0]])}


def _flat(tree):
    return np.asarray(ravel_pytree(tree)[0])


def _check_moments(draws, mean, cov):
    """Sample mean: n (xbar - mu)^T S^-1 (xbar - mu) ~ chi^2_D below its 1e-4 upper
    quantile (a joint test, since dense coordinates are correlated); sample
    covariance entries within 5 of their own standard errors."""
    n, dim = draws.shape
    error = draws.mean(0) - mean
    assert n * error @ np.linalg.solve(cov, error) < stats.chi2(dim).ppf(1 - 1e-4)
    sample_cov = np.cov(draws, rowvar=False)
    # Var of a sample covariance entry of a Gaussian: (S_ij^2 + S_ii S_jj) / n.
    entry_sd = np.sqrt((cov**2 + np.outer(np.diagonal(cov), np.diagonal(cov))) / n)
    assert np.all(np.abs(sample_cov - cov) < 5 * entry_sd)


def _draws_as_matrix(samples):
    leaves = jax.tree_util.tree_leaves(samples)
    return np.concatenate([np.asarray(leaf).reshape(NUM_DRAWS, -1) for leaf in leaves], axis=1)


def test_scalar_belief_moments(key):
    belief = GaussianBelief.scalar(_mean_tree(), 0.7)
    samples = belief.sample(key, (NUM_DRAWS,))
    assert samples["b"].shape == (NUM_DRAWS, 2, 2)
    _check_moments(_draws_as_matrix(samples), _flat(belief.mean), 0.7 * np.eye(7))


def test_diagonal_belief_moments(key):
    variance = {"a": jnp.array([0.1, 1.0, 4.0]), "b": jnp.array([[0.5, 2.0], [0.01, 9.0]])}
    belief = GaussianBelief.diagonal(_mean_tree(), variance)
    samples = belief.sample(key, (NUM_DRAWS,))
    _check_moments(_draws_as_matrix(samples), _flat(belief.mean), np.diag(_flat(variance)))


def test_dense_belief_uses_multivariate_normal_and_its_moments(key):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(7, 7))
    cov = a @ a.T / 7 + 0.2 * np.eye(7)
    belief = GaussianBelief.dense(_mean_tree(), cov)
    assert isinstance(belief.distribution(), dist.MultivariateNormal)
    samples = belief.sample(key, (NUM_DRAWS,))
    assert samples["a"].shape == (NUM_DRAWS, 3) and samples["b"].shape == (NUM_DRAWS, 2, 2)
    _check_moments(_draws_as_matrix(samples), _flat(belief.mean), cov)


def test_scalar_and_diagonal_distributions_are_per_leaf_normals():
    belief = GaussianBelief.diagonal(_mean_tree(), 2.0)
    distribution = belief.distribution()
    assert set(distribution) == {"a", "b"}
    for leaf, mean in zip(jax.tree_util.tree_leaves(distribution, is_leaf=lambda d: isinstance(d, dist.Distribution)), jax.tree_util.tree_leaves(belief.mean)):
        assert isinstance(leaf, dist.Independent)
        assert isinstance(leaf.base_dist, dist.Normal)
        assert leaf.event_shape == mean.shape
        np.testing.assert_allclose(leaf.variance, 2.0)


def test_sample_shape_with_several_axes(key):
    belief = GaussianBelief.dense(_mean_tree(), np.eye(7))
    samples = belief.sample(key, (4, 5))
    assert samples["a"].shape == (4, 5, 3)
    assert samples["b"].shape == (4, 5, 2, 2)
    # The unravelling keeps each leaf's own coordinates.
    flat = belief.distribution().sample(key, (4, 5))
    np.testing.assert_array_equal(samples["a"], flat[..., :3])
    np.testing.assert_array_equal(samples["b"], flat[..., 3:].reshape(4, 5, 2, 2))


@pytest.mark.parametrize("structure", ["scalar", "diagonal", "dense"])
def test_log_prob_matches_scipy(structure):
    rng = np.random.default_rng(1)
    mean = _mean_tree()
    if structure == "scalar":
        belief = GaussianBelief.scalar(mean, 1.7)
        cov = 1.7 * np.eye(7)
    elif structure == "diagonal":
        var = rng.uniform(0.1, 3.0, 7)
        belief = GaussianBelief.diagonal(mean, ravel_pytree(mean)[1](jnp.asarray(var)))
        cov = np.diag(var)
    else:
        a = rng.normal(size=(7, 7))
        cov = a @ a.T + 0.5 * np.eye(7)
        belief = GaussianBelief.dense(mean, cov)
    value_flat = rng.normal(size=7)
    value = ravel_pytree(mean)[1](jnp.asarray(value_flat))
    expected = stats.multivariate_normal(_flat(mean), cov).logpdf(value_flat)
    np.testing.assert_allclose(float(belief.log_prob(value)), expected, rtol=1e-12)


def test_marginal_variance_and_dense_covariance_agree():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(7, 7))
    cov = a @ a.T + np.eye(7)
    dense = GaussianBelief.dense(_mean_tree(), cov)
    np.testing.assert_allclose(_flat(dense.marginal_variance()), np.diagonal(cov))
    scalar = GaussianBelief.scalar(_mean_tree(), 3.0)
    np.testing.assert_allclose(scalar.dense_covariance(), 3.0 * np.eye(7))
    assert scalar.marginal_variance()["b"].shape == (2, 2)
    assert scalar.dim == dense.dim == 7


def test_float32_belief_samples_and_scores_in_float32(key):
    mean = {"w": jnp.zeros(3, jnp.float32)}
    for belief in (
        GaussianBelief.scalar(mean, 1.0),
        GaussianBelief.diagonal(mean, 1.0),
        GaussianBelief.dense(mean, np.eye(3)),
    ):
        for leaf in jax.tree_util.tree_leaves(belief):
            assert leaf.dtype == jnp.float32
        # Dtypes are fixed at trace time, so tracing (without compiling) is enough.
        draw = jax.eval_shape(lambda k: belief.sample(k, (2,)), key)
        assert draw["w"].dtype == jnp.float32
        assert jax.eval_shape(belief.log_prob, mean).dtype == jnp.float32


def test_builders_reject_bad_input():
    mean = {"a": jnp.zeros(3)}
    with pytest.raises(ValueError, match="variance"):
        GaussianBelief.scalar(mean, -1.0)
    with pytest.raises(ValueError, match="variance"):
        GaussianBelief.scalar(mean, jnp.ones(3))
    with pytest.raises(ValueError, match="variance"):
        GaussianBelief.diagonal(mean, {"a": jnp.array([1.0, -1.0, 1.0])})
    with pytest.raises(ValueError, match="variance"):
        GaussianBelief.diagonal(mean, {"b": jnp.ones(3)})
    with pytest.raises(ValueError, match="covariance"):
        GaussianBelief.dense(mean, jnp.eye(2))
    with pytest.raises(ValueError, match="covariance"):
        GaussianBelief.dense(mean, -jnp.eye(3))
