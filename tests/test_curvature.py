"""Newton, Hessian-free CG, natural gradient (Fisher vs empirical Fisher), Lanczos, K-FAC."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax
import pytest
from jax.flatten_util import ravel_pytree

from probopt.curvature import (
    condition_number,
    fisher_matrix,
    hessian_extreme_eigenvalues,
    hessian_free_direction,
    hessian_free_newton,
    hessian_matrix,
    hessian_vector_product,
    kfac,
    lanczos,
    natural_gradient,
    natural_gradient_direction,
    negative_log_likelihood,
    newton,
    newton_direction,
    scale_by_kfac,
    scale_by_newton,
)
from probopt.curvature._kfac import _import_kfac_jax


def _quadratic(dtype=jnp.float64):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 5))
    h = jnp.asarray(a @ a.T + np.eye(5), dtype)
    b = jnp.asarray(rng.standard_normal(5), dtype)

    def value_fn(params):
        x = jnp.concatenate([params["u"], params["v"].reshape(-1)])
        return 0.5 * x @ h @ x - b @ x

    params = {"u": jnp.ones(2, dtype), "v": jnp.full((3, 1), -0.5, dtype)}
    x_star = jnp.linalg.solve(h, b)
    return value_fn, params, h, x_star


def _flat(tree):
    return ravel_pytree(tree)[0]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_newton_solves_quadratic_in_one_step(dtype):
    value_fn, params, h, x_star = _quadratic(dtype)
    opt = newton()
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(value_fn)(params)
        upd, state = opt.update(grads, state, params, value_fn=value_fn)
        return optax.apply_updates(params, upd), state

    new, state = step(params, state)
    assert all(leaf.dtype == dtype for leaf in jax.tree.leaves(new))
    got = jnp.concatenate([new["u"], new["v"].reshape(-1)])
    tol = 1e-4 if dtype == jnp.float32 else 1e-10
    np.testing.assert_allclose(got, x_star, rtol=tol, atol=tol)
    assert int(state[0].fallback_count) == 0


def test_newton_accepts_dense_hessian_and_rejects_ambiguous_extras():
    value_fn, params, h, x_star = _quadratic()
    opt = scale_by_newton()
    state = opt.init(params)
    grads = jax.grad(value_fn)(params)
    upd, _ = jax.jit(lambda g, s, p, hess: opt.update(g, s, p, hessian=hess))(grads, state, params, h)
    np.testing.assert_allclose(_flat(params) - _flat(upd), x_star, rtol=1e-10)
    with pytest.raises(TypeError, match="exactly one"):
        opt.update(grads, state, params)
    with pytest.raises(TypeError, match="exactly one"):
        opt.update(grads, state, params, value_fn=value_fn, hessian=h)
    with pytest.raises(ValueError, match="damping"):
        scale_by_newton(damping=-1.0)


def test_damped_newton_interpolates_to_gradient_descent():
    value_fn, params, _, _ = _quadratic()
    g = _flat(jax.grad(value_fn)(params))
    direction = jax.jit(lambda lam: _flat(newton_direction(value_fn, params, damping=lam)))
    errors = []
    for lam in (1e2, 1e4, 1e6):
        d = direction(lam)
        errors.append(float(jnp.linalg.norm(lam * d - g) / jnp.linalg.norm(g)))
    # lambda d = (I + H/lambda)^{-1} g = g - H g / lambda + O(1/lambda^2).
    assert errors[0] < 0.2 and errors[2] < 1e-4
    np.testing.assert_allclose(errors[1] / errors[2], 100.0, rtol=0.05)
    # lambda = 0 is plain Newton.
    np.testing.assert_allclose(direction(0.0), jnp.linalg.solve(hessian_matrix(value_fn, params), g), rtol=1e-10)


def test_newton_falls_back_to_gradient_on_negative_curvature():
    def saddle(p):
        return 0.5 * (p[0] ** 2 - 2.0 * p[1] ** 2) + p[0] + p[1]

    opt = scale_by_newton()
    params = jnp.array([-0.9, 0.0])
    state = opt.init(params)
    g = jax.grad(saddle)(params)
    # Here g = (0.1, 1) and the Newton direction is (0.1, -0.5): an ascent direction.
    d = jnp.linalg.solve(jnp.diag(jnp.array([1.0, -2.0])), g)
    assert float(g @ d) < 0
    upd, state = jax.jit(lambda g, s, p: opt.update(g, s, p, value_fn=saddle))(g, state, params)
    np.testing.assert_allclose(upd, g)
    assert int(state.fallback_count) == 1


def test_hessian_free_cg_matches_dense_solve():
    value_fn, params, h, _ = _quadratic()
    grads = jax.grad(value_fn)(params)
    lam = 0.3
    hvp = lambda v: hessian_vector_product(value_fn, params, v)  # noqa: E731
    d = hessian_free_direction(hvp, grads, damping=lam)
    dense = jnp.linalg.solve(h + lam * jnp.eye(5), _flat(grads))
    np.testing.assert_allclose(_flat(d), dense, rtol=1e-8)
    # As an optimizer it solves the quadratic in one step when undamped.
    opt = hessian_free_newton(damping=0.0)
    state = opt.init(params)
    upd, _ = jax.jit(lambda g, s, p: opt.update(g, s, p, value_fn=value_fn))(grads, state, params)
    x_new = _flat(optax.apply_updates(params, upd))
    np.testing.assert_allclose(x_new, _flat(params) - jnp.linalg.solve(h, _flat(grads)), rtol=1e-8)


# ---------------------------------------------------------------- natural gradient


def _softmax_problem(n=40, d=3, c=4, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((n, d)))
    y = jnp.asarray(rng.integers(0, c, n))
    params = {"w": jnp.asarray(0.5 * rng.standard_normal((d, c))), "b": jnp.asarray(0.1 * rng.standard_normal(c))}

    def predictive(p, inputs):
        return dist.Categorical(logits=inputs @ p["w"] + p["b"])

    return predictive, params, x, y


def test_true_fisher_equals_hessian_for_softmax_regression():
    predictive, params, x, y = _softmax_problem()
    loss = lambda p: negative_log_likelihood(predictive, p, x, y)  # noqa: E731

    @jax.jit
    def compute(params):
        f = fisher_matrix(predictive, params, x, kind="true")  # exact, by enumerating labels
        ng = natural_gradient_direction(predictive, params, x, y, kind="true", damping=1e-3)
        return f, hessian_matrix(loss, params), ng, newton_direction(loss, params, damping=1e-3)

    f, h, ng, nt = compute(params)
    np.testing.assert_allclose(f, h, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(_flat(ng), _flat(nt), rtol=1e-8)


def test_fisher_and_empirical_fisher_for_logistic_regression_against_formulas():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((30, 2))
    y = rng.integers(0, 2, 30).astype(float)
    theta = jnp.array([0.7, -1.2])

    def predictive(p, inputs):
        return dist.Bernoulli(logits=inputs @ p)

    p = 1 / (1 + np.exp(-(x @ np.asarray(theta))))
    fisher_ref = (x.T * (p * (1 - p))) @ x / 30
    empirical_ref = (x.T * (y - p) ** 2) @ x / 30
    both = jax.jit(
        lambda t: (
            fisher_matrix(predictive, t, jnp.asarray(x)),
            fisher_matrix(predictive, t, jnp.asarray(x), jnp.asarray(y), kind="empirical"),
        )
    )
    f, ef = both(theta)
    np.testing.assert_allclose(f, fisher_ref, rtol=1e-10)
    np.testing.assert_allclose(ef, empirical_ref, rtol=1e-10)


def _gaussian_regression(n=400, seed=2, sigma=0.5):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 2)) @ np.array([[1.0, 0.0], [0.8, 0.6]])
    theta_true = np.array([1.0, -2.0])
    y = x @ theta_true + sigma * rng.standard_normal(n)

    def predictive(p, inputs):
        return dist.Normal(inputs @ p["theta"] + p["bias"], sigma)

    return predictive, jnp.asarray(x), jnp.asarray(y), sigma


def test_true_fisher_natural_gradient_equals_newton_for_gaussian_model():
    predictive, x, y, sigma = _gaussian_regression()
    params = {"theta": jnp.array([3.0, 1.0]), "bias": jnp.array(0.5)}
    loss = lambda p: negative_log_likelihood(predictive, p, x, y)  # noqa: E731

    @jax.jit
    def compute(params, key):
        f = fisher_matrix(predictive, params, x, kind="true", key=key, num_samples=500)
        ng = natural_gradient_direction(predictive, params, x, y, kind="true", key=key, num_samples=500)
        return f, hessian_matrix(loss, params), ng, newton_direction(loss, params)

    f, h, ng, nt = compute(params, jax.random.key(0))
    # Monte Carlo over 400 x 500 labels: a few per cent at most.
    np.testing.assert_allclose(f, h, rtol=0.03, atol=0.03 * float(jnp.max(jnp.abs(h))))
    np.testing.assert_allclose(_flat(ng), _flat(nt), rtol=0.05)
    with pytest.raises(ValueError, match="key"):
        fisher_matrix(predictive, params, x, kind="true")


def test_empirical_fisher_differs_from_fisher_away_from_optimum():
    """Kunstner, Balles & Hennig (2019), linear regression: the empirical Fisher is
    (1/n) sum_i r_i^2 / sigma^4 x_i x_i^T, which scales with the residuals r_i and
    so is a bad curvature estimate far from the optimum, while it approximates the
    Fisher X^T X / (n sigma^2) at the optimum of a well-specified model."""
    predictive, x, y, sigma = _gaussian_regression(n=4000)
    xn, yn = np.asarray(x), np.asarray(y)

    @jax.jit
    def emp(theta, bias=jnp.array(0.0)):
        return fisher_matrix(predictive, {"theta": jnp.asarray(theta), "bias": bias}, x, y, kind="empirical")

    design = np.concatenate([np.ones((4000, 1)), xn], 1)  # ravel order: bias, theta
    fisher = design.T @ design / (4000 * sigma**2)  # exact true Fisher (= Hessian)
    far = np.array([4.0, 2.0])
    r = yn - xn @ far
    np.testing.assert_allclose(emp(far), (design.T * r**2) @ design / (4000 * sigma**4), rtol=1e-10)
    rel_far = np.linalg.norm(emp(far) - fisher) / np.linalg.norm(fisher)
    theta_hat = np.linalg.lstsq(design, yn, rcond=None)[0]
    emp_opt = emp(jnp.asarray(theta_hat[1:]), jnp.asarray(theta_hat[0]))
    rel_opt = np.linalg.norm(emp_opt - fisher) / np.linalg.norm(fisher)
    assert rel_far > 10.0  # residuals ~ 5x the noise: EF is ~ 25-100x too large
    assert rel_opt < 0.1
    # The EF "natural gradient" is not the Newton direction away from the optimum.
    params = {"theta": jnp.asarray(far), "bias": jnp.array(0.0)}
    loss = lambda p: negative_log_likelihood(predictive, p, x, y)  # noqa: E731
    d_ef, d_nt = jax.jit(
        lambda p: (
            _flat(natural_gradient_direction(predictive, p, x, y, kind="empirical")),
            _flat(newton_direction(loss, p)),
        )
    )(params)
    # With Gaussian inputs the EF direction stays roughly parallel to Newton's, but its
    # length is off by the squared residual-to-noise ratio: the step is far too short.
    assert float(jnp.linalg.norm(d_ef)) < 0.2 * float(jnp.linalg.norm(d_nt))


def test_natural_gradient_transform_descends_float32():
    predictive, params, x, y = _softmax_problem()
    params = jax.tree.map(lambda a: a.astype(jnp.float32), params)
    x = x.astype(jnp.float32)
    for kind in ("true", "empirical"):
        opt = natural_gradient(0.5, predictive, kind=kind, damping=1e-3)
        state = opt.init(params)

        @jax.jit
        def step(p, state):
            loss, g = jax.value_and_grad(lambda q: negative_log_likelihood(predictive, q, x, y))(p)
            upd, state = opt.update(g, state, p, batch=(x, y))
            return optax.apply_updates(p, upd), state, loss

        p = params
        losses = []
        for _ in range(10):
            p, state, loss = step(p, state)
            losses.append(float(loss))
        assert p["w"].dtype == jnp.float32
        assert losses[-1] < losses[0] - 0.1


def test_monte_carlo_natural_gradient_vmaps_over_seeds():
    predictive, x, y, _ = _gaussian_regression(n=50)
    params = {"theta": jnp.array([3.0, 1.0]), "bias": jnp.array(0.5)}

    def run(key):
        opt = natural_gradient(1.0, predictive, kind="true", num_samples=4, key=key)
        state = opt.init(params)
        g = jax.grad(lambda p: negative_log_likelihood(predictive, p, x, y))(params)
        upd, state = opt.update(g, state, params, batch=(x, y))
        return upd["theta"], state[0].fallback_count

    steps, fallbacks = jax.jit(jax.vmap(run))(jax.random.split(jax.random.key(0), 3))
    assert steps.shape == (3, 2) and np.all(np.asarray(fallbacks) == 0)
    assert not np.allclose(steps[0], steps[1])  # different Monte Carlo labels per seed


# ---------------------------------------------------------------- Lanczos


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_lanczos_full_run_recovers_spectrum(dtype):
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.standard_normal((12, 12)))
    evals = np.linspace(-1.0, 7.0, 12)
    a = jnp.asarray(q @ np.diag(evals) @ q.T, dtype)
    res = jax.jit(lambda v, k: lanczos(lambda u: a @ u, v, 20, key=k))(
        jnp.asarray(rng.standard_normal(12), dtype), jax.random.key(0)
    )
    assert res.ritz_values.shape == (12,) and res.ritz_values.dtype == dtype
    tol = 1e-4 if dtype == jnp.float32 else 1e-10
    np.testing.assert_allclose(res.ritz_values, jnp.linalg.eigh(a)[0], atol=tol * 10)
    np.testing.assert_allclose(res.basis @ res.basis.T, np.eye(12), atol=tol * 10)


def test_lanczos_restarts_after_invariant_subspace():
    # Three distinct eigenvalues with multiplicity: the Krylov space is invariant after 3 steps.
    rng = np.random.default_rng(4)
    q, _ = np.linalg.qr(rng.standard_normal((9, 9)))
    evals = np.repeat([1.0, 2.0, 5.0], 3)
    a = jnp.asarray(q @ np.diag(evals) @ q.T)
    res = jax.jit(lambda v, k: lanczos(lambda u: a @ u, v, 9, key=k))(
        jnp.asarray(rng.standard_normal(9)), jax.random.key(1)
    )
    np.testing.assert_allclose(res.ritz_values, np.sort(evals), atol=1e-8)
    assert np.sum(np.asarray(res.betas) == 0) >= 2


def test_hessian_extreme_eigenvalues_match_eigh_on_small_network():
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((50, 4)))
    y = jnp.asarray(rng.standard_normal(50))
    params = {"w1": jnp.asarray(0.5 * rng.standard_normal((4, 6))), "w2": jnp.asarray(0.5 * rng.standard_normal(6))}

    def value_fn(p):
        return 0.5 * jnp.mean((jnp.tanh(x @ p["w1"]) @ p["w2"] - y) ** 2)

    exact = jnp.linalg.eigh(jax.jit(hessian_matrix, static_argnums=0)(value_fn, params))[0]
    extremes = jax.jit(hessian_extreme_eigenvalues, static_argnames=("value_fn", "num_iterations"))
    full = extremes(value_fn, params, key=jax.random.key(2), num_iterations=100)
    np.testing.assert_allclose([full.min_eigenvalue, full.max_eigenvalue], [exact[0], exact[-1]], rtol=1e-8, atol=1e-10)
    # A partial run (15 of 30 dims) already has the largest eigenvalue.
    part = extremes(value_fn, params, key=jax.random.key(2), num_iterations=15)
    np.testing.assert_allclose(part.max_eigenvalue, exact[-1], rtol=1e-6)
    assert float(part.min_eigenvalue) >= float(exact[0]) - 1e-12  # Ritz values interlace


def test_condition_number_of_talk_quadratics():
    @jax.jit
    def kappa(lam_max):
        value_fn = lambda p: 0.5 * (lam_max * p[0] ** 2 + 2.0 * p[1] ** 2)  # noqa: E731
        return condition_number(value_fn, jnp.array([0.5, 0.5]), key=jax.random.key(0))

    for lam_max in (2.0, 3.0, 4.0, 5.0):
        np.testing.assert_allclose(kappa(lam_max), lam_max / 2.0, rtol=1e-10)
    saddle = lambda p: p[0] ** 2 - p[1] ** 2  # noqa: E731
    assert np.isinf(condition_number(saddle, jnp.array([0.1, 0.1]), key=jax.random.key(0)))


# ---------------------------------------------------------------- K-FAC via kfac-jax


def _kfac_softmax(c=4):
    kfac_jax = _import_kfac_jax()

    def value_func(params, batch):
        x, y = batch
        logits = x @ params["w"] + params["b"]
        kfac_jax.register_softmax_cross_entropy_loss(logits, y)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

    def predictive(p, inputs):
        return dist.Categorical(logits=inputs @ p["w"] + p["b"])

    return value_func, predictive


def test_kfac_direction_against_exact_kronecker_and_natural_gradient():
    """For one dense softmax layer K-FAC's block is A kron G with A = mean [x,1][x,1]^T and
    G = mean_i (diag p_i - p_i p_i^T).  With exact factors and exact damping the
    preconditioned gradient is (A kron G + lambda I)^{-1} g; when all inputs coincide
    A kron G is the exact Fisher, so it is the damped natural gradient (F + lambda I)^{-1} g."""
    value_func, predictive = _kfac_softmax()
    rng = np.random.default_rng(7)
    n, d_in, c = 6, 3, 4
    x = jnp.asarray(rng.standard_normal((n, d_in)))
    y = jnp.asarray(rng.integers(0, c, n))
    params = {"w": jnp.asarray(0.4 * rng.standard_normal((d_in, c))), "b": jnp.asarray(0.1 * rng.standard_normal(c))}
    lam = 0.05
    opt = scale_by_kfac(
        value_func, (x, y), damping=lam, estimation_mode="fisher_exact", use_exact_inverses=True,
        inverse_update_period=1, curvature_ema=0.0,
    )
    state = opt.init(params)

    @jax.jit
    def direction(batch):
        g = jax.grad(value_func)(params, batch)
        return g, opt.update(g, state, params, batch=batch)[0]

    # Distinct inputs: the Kronecker-factored matrix, built independently.
    g, d = direction((x, y))
    p = np.asarray(jax.nn.softmax(x @ params["w"] + params["b"]))
    a = np.concatenate([np.asarray(x), np.ones((n, 1))], axis=1)
    big_a = a.T @ a / n
    big_g = np.mean([np.diag(pi) - np.outer(pi, pi) for pi in p], axis=0)
    gm = np.concatenate([np.asarray(g["w"]), np.asarray(g["b"])[None]], axis=0).reshape(-1)
    ref = np.linalg.solve(np.kron(big_a, big_g) + lam * np.eye(gm.size), gm).reshape(d_in + 1, c)
    np.testing.assert_allclose(d["w"], ref[:d_in], rtol=1e-8)
    np.testing.assert_allclose(d["b"], ref[d_in], rtol=1e-8)
    # One shared input: exactly the damped natural gradient.
    x_same = jnp.repeat(x[:1], n, axis=0)
    _, d_same = direction((x_same, y))
    exact = natural_gradient_direction(predictive, params, x_same, y, kind="true", damping=lam)
    np.testing.assert_allclose(_flat(d_same), _flat(exact), rtol=1e-8)
    # And the K-FAC approximation is not the Fisher when inputs differ.
    exact_distinct = natural_gradient_direction(predictive, params, x, y, kind="true", damping=lam)
    assert not np.allclose(_flat(d), _flat(exact_distinct), rtol=1e-2)


def test_kfac_optimizer_reduces_loss_on_mlp():
    kfac_jax = _import_kfac_jax()

    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.standard_normal((128, 5)), jnp.float32)
    y = jnp.asarray((np.asarray(x[:, 0]) * np.asarray(x[:, 1]) > 0).astype(np.int32) + 2 * (np.asarray(x[:, 2]) > 0))
    params = {
        "w1": jnp.asarray(0.5 * rng.standard_normal((5, 16)), jnp.float32),
        "b1": jnp.zeros(16, jnp.float32),
        "w2": jnp.asarray(0.5 * rng.standard_normal((16, 4)), jnp.float32),
        "b2": jnp.zeros(4, jnp.float32),
    }

    def value_func(p, batch):
        xb, yb = batch
        h = jnp.tanh(xb @ p["w1"] + p["b1"])
        logits = h @ p["w2"] + p["b2"]
        kfac_jax.register_softmax_cross_entropy_loss(logits, yb)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), yb[:, None], axis=1))

    opt = kfac(0.3, value_func, (x[:32], y[:32]), damping=1e-2, momentum=0.5, key=jax.random.key(1))
    state = opt.init(params)

    @jax.jit
    def step(p, state, batch):
        loss, g = jax.value_and_grad(value_func)(p, batch)
        upd, state = opt.update(g, state, p, batch=batch)
        return optax.apply_updates(p, upd), state, loss

    p = params
    initial = float(value_func(params, (x, y)))
    for t in range(25):
        idx = (np.arange(32) + 32 * t) % 128
        p, state, _ = step(p, state, (x[idx], y[idx]))
    assert p["w1"].dtype == jnp.float32
    assert float(value_func(p, (x, y))) < 0.6 * initial


# ---------------------------------------------------------------- reproduction (slow)


@pytest.mark.slow
def test_textbook_comparison_quadratics_reproduction():
    """examples/textbook_comparison.py on Perone's quadratics: Newton needs one step at
    every kappa, tuned GD needs more as kappa grows, natural gradient with the Fisher is
    (Monte Carlo) Newton, and the empirical Fisher is an order of magnitude slower."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[1] / "examples" / "textbook_comparison.py"
    spec = importlib.util.spec_from_file_location("textbook_comparison", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    iterations = {}
    for kappa in (1.0, 2.5):
        predictive, inputs, targets = module.gaussian_quadratic(kappa)
        f_star = float(negative_log_likelihood(predictive, jnp.zeros(2), inputs, targets))
        table, _, _, _ = module.compare(
            predictive, inputs, targets, jnp.array([2.0, 2.0]), l2=0.0, num_steps=300, second_order_steps=100,
            grid=list(np.geomspace(0.01, 1.0, 21)), betas=(0.1, 0.5, 0.9),
            damping={"damped": 1.0, "ng": 1e-8, "samples": 64}, f_star=f_star,
        )
        iterations[kappa] = {name: entry[0] for name, entry in table.items()}
    for kappa in (1.0, 2.5):
        assert iterations[kappa]["Newton"] == 1
        assert iterations[kappa]["NG (Fisher)"] <= 2
        assert iterations[kappa]["NG (empirical F)"] >= 10 * iterations[kappa]["NG (Fisher)"]
    assert iterations[2.5]["GD"] > iterations[1.0]["GD"] + 3
