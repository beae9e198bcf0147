"""Problem generators: truth vs autodiff, unbiasedness, NumPyro draws, validation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro.infer import Predictive

from probopt.problems import (
    DiagonalNoisyQuadratic,
    DiagonalNoisyQuadraticFamily,
    MovingQuadraticBowl,
    MovingQuadraticBowlFamily,
    NoisyQuadratic,
    NoisyQuadraticFamily,
    Problem,
    Rosenbrock,
    RosenbrockFamily,
    haar_orthogonal,
)

FAMILIES = {
    "noisy_quadratic": NoisyQuadraticFamily(dim=6, condition_number=100.0, noise_scale=0.7),
    "moving_bowl": MovingQuadraticBowlFamily(dim=8, centre_noise_scale=0.5),
    "diagonal": DiagonalNoisyQuadraticFamily(dim=6, gradient_noise_scale=0.8),
    "rosenbrock": RosenbrockFamily(gradient_noise_scale=0.3),
}


def make_problem(name, seed=0):
    problem = FAMILIES[name].sample(jax.random.key(seed))
    if name == "moving_bowl":
        # Move the centre away from 0 so the truth queries are not trivially centred.
        problem = problem.advance(problem.sample_batch(jax.random.key(seed + 100), 1))
    return problem


def random_point(problem, seed=1):
    return problem.init_params(jax.random.key(seed), scale=0.5)


def per_example_grads(problem, params, batch):
    def one(example):
        single = jax.tree_util.tree_map(lambda x: x[None], example)
        return jax.grad(lambda p: problem.loss(p, single)[0])(params)

    return jax.vmap(one)(batch)


@pytest.fixture(params=list(FAMILIES))
def name(request):
    return request.param


# ------------------------------------------------------------------- truth


@jax.jit
def truth_and_autodiff(problem, params, vector):
    """Everything the truth tests compare, in one compiled program per problem."""
    eps = 1e-6
    basis = jnp.eye(problem.dim, dtype=params.dtype)
    shifted = jax.vmap(lambda e: problem.full_loss(params + eps * e) - problem.full_loss(params - eps * e))
    optimum = problem.optimum()
    nearby = optimum + 0.1 * jax.random.normal(jax.random.key(0), (5, problem.dim), optimum.dtype)
    return dict(
        grad=problem.full_grad(params),
        autodiff_grad=jax.grad(problem.full_loss)(params),
        central_difference=shifted(basis) / (2 * eps),
        hessian=problem.hessian(params),
        autodiff_hessian=jax.hessian(problem.full_loss)(params),
        hvp=problem.hvp(params, vector),
        grad_jvp=jax.jvp(problem.full_grad, (params,), (vector,))[1],
        grad_at_optimum=problem.full_grad(optimum),
        loss_at_optimum=problem.full_loss(optimum),
        hessian_at_optimum=problem.hessian(optimum),
        loss_nearby=jax.vmap(problem.full_loss)(nearby),
        optimal_loss=problem.optimal_loss,
    )


def test_truth_matches_autodiff_and_finite_differences(name):
    problem = make_problem(name)
    assert isinstance(problem, Problem)
    params = random_point(problem)
    assert params.shape == (problem.dim,)
    vector = jax.random.normal(jax.random.key(5), (problem.dim,))
    out = jax.tree_util.tree_map(np.asarray, truth_and_autodiff(problem, params, vector))
    np.testing.assert_allclose(out["grad"], out["autodiff_grad"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out["grad"], out["central_difference"], rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(out["hessian"], out["autodiff_hessian"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out["hvp"], out["hessian"] @ np.asarray(vector), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out["hvp"], out["grad_jvp"], rtol=1e-10, atol=1e-12)
    # The optimum is a stationary point with positive-definite Hessian and the stated value.
    np.testing.assert_allclose(out["grad_at_optimum"], 0.0, atol=1e-12)
    np.testing.assert_allclose(out["loss_at_optimum"], out["optimal_loss"], rtol=1e-12, atol=1e-14)
    assert np.all(np.linalg.eigvalsh(out["hessian_at_optimum"]) > 0)
    assert np.all(out["loss_nearby"] > out["optimal_loss"])


# ------------------------------------------------------------ unbiasedness

NUM_EXAMPLES = 20_000


@functools.partial(jax.jit, static_argnums=2)
def minibatch_quantities(problem, params, num_examples):
    batch = problem.sample_batch(jax.random.key(11), num_examples)
    few = jax.tree_util.tree_map(lambda x: x[:3], batch)
    single_hessians = jax.vmap(
        lambda example: jax.hessian(
            lambda p: problem.loss(p, jax.tree_util.tree_map(lambda x: x[None], example))[0]
        )(params)
    )(few)
    return dict(
        losses=problem.loss(params, batch),
        grads=per_example_grads(problem, params, batch),
        grad_of_mean=jax.grad(lambda p: problem.loss(p, batch).mean())(params),
        single_hessians=single_hessians,
        truth=problem.full_grad(params),
        noise_covariance=problem.gradient_noise_covariance(params),
        full_loss=problem.full_loss(params),
        hessian=problem.hessian(params),
    )


def test_minibatch_gradients_are_unbiased_with_the_stated_covariance(name):
    """Mean of N per-example gradients within 4 standard errors of the truth,
    with the standard error taken from the closed-form noise covariance; the
    sample covariance within 5 of its own standard errors; the mean loss
    within 4 (empirical) standard errors of ``full_loss``."""
    problem = make_problem(name)
    params = random_point(problem, seed=3)
    out = jax.tree_util.tree_map(np.asarray, minibatch_quantities(problem, params, NUM_EXAMPLES))
    grads, cov = out["grads"], out["noise_covariance"]
    stderr = np.sqrt(np.diagonal(cov) / NUM_EXAMPLES)
    assert np.all(np.abs(grads.mean(0) - out["truth"]) < 4 * stderr)
    # The minibatch gradient of the mean loss is the mean of per-example gradients.
    np.testing.assert_allclose(out["grad_of_mean"], grads.mean(0), rtol=1e-9, atol=1e-12)
    entry_sd = np.sqrt((cov**2 + np.outer(np.diagonal(cov), np.diagonal(cov))) / NUM_EXAMPLES)
    assert np.all(np.abs(np.cov(grads, rowvar=False) - cov) < 5 * entry_sd)
    losses = out["losses"]
    assert losses.shape == (NUM_EXAMPLES,)
    assert abs(losses.mean() - out["full_loss"]) < 4 * losses.std(ddof=1) / np.sqrt(NUM_EXAMPLES)
    if name != "rosenbrock":
        # Meka's Q = 0: every example of the quadratics has Hessian exactly H.
        for hessian in out["single_hessians"]:
            np.testing.assert_allclose(hessian, out["hessian"], rtol=1e-10, atol=1e-13)


def test_noise_free_rosenbrock_examples_equal_the_function():
    problem = RosenbrockFamily().sample(jax.random.key(0))
    params = problem.init_params()
    np.testing.assert_array_equal(params, [-0.5, 2.0])
    losses = problem.loss(params, problem.sample_batch(jax.random.key(1), 5))
    # 0.01 * 1.5^2 + (2 - 0.25)^2
    np.testing.assert_allclose(losses, np.full(5, 0.01 * 2.25 + 1.75**2), rtol=1e-14)
    np.testing.assert_allclose(problem.full_loss(jnp.array([1.0, 1.0])), 0.0)


def test_diagonal_model_minibatch_covariance_is_h_over_b():
    """Zhang et al.'s C = H / B for the gradient of a minibatch mean."""
    problem = DiagonalNoisyQuadraticFamily(dim=5).sample(jax.random.key(0))
    params = problem.init_params()
    batch_size, num_batches = 8, 6000
    examples = problem.sample_batch(jax.random.key(1), batch_size * num_batches)
    batches = {"xi": examples["xi"].reshape(num_batches, batch_size, 5)}
    grads = jax.jit(
        jax.vmap(lambda b: jax.grad(lambda p: problem.loss(p, b).mean())(params))
    )(batches)
    h = 1.0 / np.arange(1, 6)
    expected_var = h / batch_size
    sample_var = np.asarray(grads).var(0, ddof=1)
    # sd of a sample variance of Gaussians: var * sqrt(2 / (n - 1)).
    assert np.all(np.abs(sample_var - expected_var) < 5 * expected_var * np.sqrt(2 / (num_batches - 1)))
    np.testing.assert_allclose(problem.curvatures, h)
    np.testing.assert_allclose(problem.full_loss(params), 0.5 * h.sum())


# ------------------------------------------------------------ NumPyro draws


def test_noisy_quadratic_family_predictive_draws():
    family = NoisyQuadraticFamily(dim=5, condition_number=1e3, noise_scale=0.5)
    num_samples, batch_size = 2000, 4
    draws = Predictive(family.model, num_samples=num_samples)(jax.random.key(0), batch_size=batch_size)
    assert set(draws) >= {"gaussian_matrix", "rotation", "hessian", "xi"}
    rotations = np.asarray(draws["rotation"])
    np.testing.assert_allclose(rotations @ rotations.transpose(0, 2, 1), np.broadcast_to(np.eye(5), (num_samples, 5, 5)), atol=1e-12)
    # Haar: every entry has mean 0 and variance 1/d (a QR without the sign fix
    # has diagonal entries with mean about -0.35 here).
    diag = rotations[:, np.arange(5), np.arange(5)]
    assert np.all(np.abs(diag.mean(0)) < 4 * np.sqrt(1 / 5 / num_samples))
    # Spectrum: exactly the documented log-spaced eigenvalues, condition number 1e3.
    spectrum = np.linalg.eigvalsh(np.asarray(draws["hessian"]))
    np.testing.assert_allclose(spectrum, np.broadcast_to(np.geomspace(1e-3, 1.0, 5), spectrum.shape), rtol=1e-9)
    # Observations: xi ~ N(0, 0.25 I).
    xi = np.asarray(draws["xi"]).reshape(-1, 5)
    assert np.all(np.abs(xi.mean(0)) < 4 * 0.5 / np.sqrt(len(xi)))
    assert np.all(np.abs(xi.var(0) - 0.25) < 5 * 0.25 * np.sqrt(2 / len(xi)))


def test_family_sample_vmaps_over_keys():
    family = NoisyQuadraticFamily(dim=4)
    keys = jax.random.split(jax.random.key(3), 3)
    batched = jax.jit(jax.vmap(family.sample))(keys)
    assert batched.hessian_matrix.shape == (3, 4, 4)
    for i, key in enumerate(keys):
        single = family.sample(key)
        np.testing.assert_allclose(batched.hessian_matrix[i], single.hessian_matrix, rtol=1e-12)
        assert np.allclose(np.linalg.cond(np.asarray(single.hessian_matrix)), 1e3, rtol=1e-6)
    assert not np.allclose(batched.hessian_matrix[0], batched.hessian_matrix[1])


def test_problem_predictive_draws_match_sample_batch_distribution():
    problem = make_problem("moving_bowl")
    draws = Predictive(problem.model, num_samples=500)(jax.random.key(0), batch_size=4)
    centres = np.asarray(draws["centre"]).reshape(-1, problem.dim)
    sigma = float(problem.centre_noise_scale)
    assert np.all(np.abs(centres.mean(0) - np.asarray(problem.centre)) < 4 * sigma / np.sqrt(len(centres)))
    assert np.all(np.abs(centres.var(0) - sigma**2) < 5 * sigma**2 * np.sqrt(2 / len(centres)))


def test_haar_orthogonal_is_orthogonal():
    u = haar_orthogonal(jax.random.normal(jax.random.key(0), (7, 7)))
    np.testing.assert_allclose(u.T @ u, np.eye(7), atol=1e-12)


# --------------------------------------------------------- the moving bowl


def test_bowl_newton_optimum_closed_form():
    problem = MovingQuadraticBowlFamily().sample(jax.random.key(0))
    assert problem.dim == 100
    np.testing.assert_allclose(np.linalg.eigvalsh(problem.hessian_matrix), np.geomspace(1e-3, 1, 100), rtol=1e-8)
    # LODO App. F.1: 1/2 tr(H) sigma^2 = 7.41 for sigma^2 = 1.
    assert abs(float(problem.optimal_loss) - 7.41) < 0.005
    assert problem.newton_optimum == problem.optimal_loss
    np.testing.assert_array_equal(problem.init_params(), np.zeros(100))


def test_bowl_newton_method_simulated():
    """x_t = c_{t-1} (one exact Newton step from anywhere) has mean loss
    1/2 sigma^2 tr H, with per-step variance 1/2 sigma^4 tr(H^2)."""
    problem = MovingQuadraticBowlFamily().sample(jax.random.key(1))
    num_steps = 3000

    def step(problem, key):
        params = problem.init_params()
        newton = params - jnp.linalg.solve(problem.hessian(params), problem.full_grad(params))
        batch = problem.sample_batch(key, 1)
        loss = problem.loss(newton, batch)[0]
        return problem.advance(batch), (loss, problem.centre)

    final, (losses, centres) = jax.lax.scan(step, problem, jax.random.split(jax.random.key(2), num_steps))
    hessian = np.asarray(problem.hessian_matrix)
    sd = np.sqrt(0.5 * np.trace(hessian @ hessian))
    assert abs(float(losses.mean()) - float(problem.optimal_loss)) < 4 * sd / np.sqrt(num_steps)
    # The centre really walks: increments are N(0, I) and the final problem holds the last centre.
    increments = np.diff(np.asarray(centres), axis=0)
    assert abs(increments.var() - 1.0) < 5 * np.sqrt(2 / increments.size)
    assert not np.allclose(final.centre, 0.0)


def test_bowl_advance_takes_the_first_examples_centre():
    problem = make_problem("moving_bowl")
    batch = problem.sample_batch(jax.random.key(4), 3)
    np.testing.assert_array_equal(problem.advance(batch).centre, batch["centre"][0])
    np.testing.assert_array_equal(problem.advance(batch).hessian_matrix, problem.hessian_matrix)


# ---------------------------------------------------- dtype, jit, validation


def test_float32_params_give_float32_results(name):
    problem = make_problem(name)

    def float32_outputs(params, batch):
        return (
            problem.loss(params, batch),
            jax.grad(lambda p: problem.loss(p, batch).mean())(params),
            problem.full_loss(params),
            problem.full_grad(params),
            problem.hvp(params, params),
            problem.hessian(params),
            problem.gradient_noise_covariance(params),
        )

    # Dtypes are fixed at trace time, so tracing (without compiling) is enough.
    params = problem.init_params().astype(jnp.float32)
    batch = problem.sample_batch(jax.random.key(0), 4)
    for value in jax.eval_shape(float32_outputs, params, batch):
        assert value.dtype == jnp.float32


def test_vmap_over_seeds():
    problem = make_problem("moving_bowl")

    def run(key):
        init_key, batch_key = jax.random.split(key)
        params = problem.init_params(init_key)
        return problem.loss(params, problem.sample_batch(batch_key, 5))

    keys = jax.random.split(jax.random.key(0), 3)
    losses = jax.jit(jax.vmap(run))(keys)
    assert losses.shape == (3, 5)
    single = jax.jit(run)
    for i, key in enumerate(keys):
        np.testing.assert_allclose(losses[i], single(key), rtol=1e-12)


def test_bad_batch_and_params_raise(name):
    problem = make_problem(name)
    params = problem.init_params()
    batch = problem.sample_batch(jax.random.key(0), 4)
    (site,) = [key for key in batch if key in ("xi", "centre")]
    with pytest.raises(ValueError, match="batch"):
        problem.loss(params, {site: batch[site][:, :-1]})
    with pytest.raises(ValueError, match="batch"):
        problem.loss(params, {site: batch[site][0]})
    with pytest.raises(ValueError, match="batch"):
        problem.loss(params, {"wrong": batch[site]})
    with pytest.raises(ValueError, match="batch"):
        problem.loss(params, batch[site])
    with pytest.raises(ValueError, match="params"):
        problem.loss(params[:-1], batch)
    with pytest.raises(ValueError, match="params"):
        problem.full_grad(jnp.zeros((problem.dim, 1)))
    with pytest.raises(ValueError, match="vector"):
        problem.hvp(params, params[:-1])
    with pytest.raises(ValueError, match="batch_size"):
        problem.sample_batch(jax.random.key(0), 0)


def test_bad_construction_raises():
    with pytest.raises(ValueError, match="condition_number"):
        NoisyQuadraticFamily(condition_number=0.5)
    with pytest.raises(ValueError, match="noise_scale"):
        NoisyQuadraticFamily(noise_scale=-1.0)
    with pytest.raises(ValueError, match="dim"):
        MovingQuadraticBowlFamily(dim=0)
    with pytest.raises(ValueError, match="min_eigenvalue"):
        MovingQuadraticBowlFamily(min_eigenvalue=2.0)
    with pytest.raises(ValueError, match="gradient_noise_scale"):
        DiagonalNoisyQuadraticFamily(gradient_noise_scale=0.0)
    with pytest.raises(ValueError, match="gradient_noise_scale"):
        RosenbrockFamily(gradient_noise_scale=-0.1)
    with pytest.raises(ValueError, match="hessian_matrix"):
        NoisyQuadratic(hessian_matrix=jnp.ones(3), noise_covariance=jnp.eye(3))
    with pytest.raises(ValueError, match="noise_covariance"):
        NoisyQuadratic(hessian_matrix=jnp.eye(3), noise_covariance=jnp.eye(2))
    with pytest.raises(ValueError, match="centre"):
        MovingQuadraticBowl(hessian_matrix=jnp.eye(3), centre=jnp.zeros(2), centre_noise_scale=1.0)
    with pytest.raises(ValueError, match="curvatures"):
        DiagonalNoisyQuadratic(curvatures=jnp.ones((2, 2)), gradient_noise_scale=1.0)
    with pytest.raises(ValueError, match="gradient_noise_scale"):
        Rosenbrock(gradient_noise_scale=-1.0)
