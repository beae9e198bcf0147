"""The lecture's min(t, N) running averages, simplified Adam, conjugate scaling, and
the SGD stationary-distribution theorem."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from probopt.optimizers._running_average import (
    ConjugateHyperparameters,
    MomentumHyperparameters,
    conjugate_to_momentum,
    momentum_to_conjugate,
    rescale_for_batch_size,
    running_average,
    simplified_adam,
    update_running_average,
)


def test_running_average_is_exact_mean_then_ema():
    rng = np.random.default_rng(0)
    xs = rng.standard_normal(30)
    n = 7
    avg = jnp.zeros(())
    for t, x in enumerate(xs, start=1):
        avg = update_running_average(avg, jnp.asarray(x), jnp.asarray(t), n)
        if t <= n:
            np.testing.assert_allclose(avg, xs[:t].mean(), rtol=1e-12)
    # After t >= N it is the EMA with weight 1/N started from the mean of the first N.
    ref = xs[:n].mean()
    for x in xs[n:]:
        ref = (1 - 1 / n) * ref + x / n
    np.testing.assert_allclose(avg, ref, rtol=1e-12)


def test_running_average_transform_and_dtype():
    opt = running_average(3.0)
    params = {"a": jnp.zeros(2, jnp.float32)}
    state = opt.init(params)
    outs = []
    for g in ([1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]):
        upd, state = jax.jit(opt.update)({"a": jnp.asarray(g, jnp.float32)}, state)
        outs.append(np.asarray(upd["a"]))
    assert upd["a"].dtype == jnp.float32
    np.testing.assert_allclose(outs[2], [3.0, 4.0], rtol=1e-6)  # mean of the first three
    np.testing.assert_allclose(outs[3], [3.0 * 2 / 3 + 7 / 3, 4.0 * 2 / 3 + 8 / 3], rtol=1e-6)


def test_simplified_adam_matches_slide():
    rng = np.random.default_rng(1)
    grads = rng.standard_normal((25, 3)) + np.array([1.0, -0.5, 0.0])
    eta, n_g, n_s, eps = 0.1, 4.0, 10.0, 1e-8
    opt = simplified_adam(eta, n_g, n_s, eps)
    params = jnp.zeros(3)
    state = opt.init(params)
    phi = params
    mu = s = np.zeros(3)
    phi_ref = np.zeros(3)
    for t, g in enumerate(grads, start=1):
        upd, state = opt.update(jnp.asarray(g), state, phi)
        phi = optax.apply_updates(phi, upd)
        mu = (1 - 1 / min(t, n_g)) * mu + g / min(t, n_g)
        s = (1 - 1 / min(t, n_s)) * s + g**2 / min(t, n_s)
        phi_ref = phi_ref - eta / np.sqrt(s + eps) * mu
    np.testing.assert_allclose(phi, phi_ref, rtol=1e-10)


def test_conjugate_scaling_against_lecture_formulas():
    # eta' = 0.01, N_g' = 100 examples.
    # B = 10: N_g = N_g'/B = 10, eta = B eta' / N_g = 0.01.
    hp = conjugate_to_momentum(0.01, 100.0, 10)
    np.testing.assert_allclose(hp.momentum_time_constant, 10.0)
    np.testing.assert_allclose(hp.learning_rate, 0.01)
    # B = 1: N_g = 100, eta = eta' / N_g (the "Solving for eta in terms of N_g" slide).
    hp1 = conjugate_to_momentum(0.01, 100.0, 1)
    np.testing.assert_allclose(hp1.momentum_time_constant, 100.0)
    np.testing.assert_allclose(hp1.learning_rate, 1e-4)
    # B = 400 > N_g': momentum switched off (N_g floored at 1), eta = B eta' (linear scaling).
    hp2 = conjugate_to_momentum(0.01, 100.0, 400)
    np.testing.assert_allclose(hp2.momentum_time_constant, 1.0)
    np.testing.assert_allclose(hp2.learning_rate, 4.0)
    np.testing.assert_allclose(hp2.momentum_decay, 0.0)
    # Round trips.
    back = momentum_to_conjugate(hp.learning_rate, hp.momentum_time_constant, 10)
    assert isinstance(back, ConjugateHyperparameters)
    np.testing.assert_allclose(back, (0.01, 100.0))
    moved = rescale_for_batch_size(hp.learning_rate, hp.momentum_time_constant, from_batch_size=10, to_batch_size=50)
    np.testing.assert_allclose(moved, conjugate_to_momentum(0.01, 100.0, 50))


def test_momentum_decay_plugs_into_optax_sgd():
    """optax.sgd(eta, momentum=1 - 1/N_g) is the lecture's v_t = (1 - 1/N_g) v + eta g."""
    hp = MomentumHyperparameters(learning_rate=0.05, momentum_time_constant=5.0)
    opt = optax.sgd(hp.learning_rate, momentum=hp.momentum_decay)
    rng = np.random.default_rng(2)
    grads = rng.standard_normal((12, 2))
    state = opt.init(jnp.zeros(2))
    v = np.zeros(2)
    for g in grads:
        upd, state = opt.update(jnp.asarray(g), state)
        v = (1 - 1 / 5.0) * v + 0.05 * g
        np.testing.assert_allclose(-upd, v, rtol=1e-12)


@pytest.mark.parametrize(
    "call",
    [
        lambda: conjugate_to_momentum(0.01, 0.5, 1),
        lambda: conjugate_to_momentum(-0.01, 10.0, 1),
        lambda: conjugate_to_momentum(0.01, 10.0, 0),
        lambda: simplified_adam(0.1, momentum_time_constant=0.0),
        lambda: running_average(0.2),
    ],
)
def test_bad_hyperparameters_raise(call):
    with pytest.raises(ValueError):
        call()


def test_langevin_theorem_dL_deta_is_quarter_mean_squared_gradient():
    r"""dL(eta)/deta at 0 = E_i ||g_i||^2 / 4 (lecture, "A Nice Theorem").

    2-D finite-sum quadratic L_i(x) = 1/2 (x - c_i)^T H_i (x - c_i), SGD with
    B = 1.  The stationary mean and covariance of the linear SGD recursion are
    computed exactly (no simulation) by solving the moment equations, so the
    slope at eta -> 0 can be read off by finite differences.
    """
    rng = np.random.default_rng(3)
    n = 6
    hs = []
    for _ in range(n):
        a = rng.standard_normal((2, 2))
        hs.append(a @ a.T + 0.5 * np.eye(2))
    hs = np.stack(hs)
    cs = rng.standard_normal((n, 2))
    h_bar = hs.mean(0)
    x_star = np.linalg.solve(h_bar, np.einsum("nij,nj->i", hs, cs) / n)
    g = np.einsum("nij,nj->ni", hs, x_star - cs)  # per-example gradients at the optimum
    np.testing.assert_allclose(g.mean(0), 0, atol=1e-12)

    def loss(x_mean, x_cov):
        d = x_mean - x_star
        return 0.5 * (d @ h_bar @ d + np.trace(h_bar @ x_cov))  # excess loss E L(x) - L(x*)

    def stationary_excess_loss(eta):
        # x' = A_i x + b_i with A_i = I - eta H_i, b_i = eta H_i c_i; solve for the
        # fixed point of the first and second moments.
        a = np.eye(2)[None] - eta * hs
        b = eta * np.einsum("nij,nj->ni", hs, cs)
        mean = np.linalg.solve(np.eye(2) - a.mean(0), b.mean(0))
        # Second moment S = E[A S A^T] + E[A m b^T + b m^T A^T] + E[b b^T]
        lin = np.mean([np.kron(ai, ai) for ai in a], axis=0)
        const = np.mean(
            [np.outer(ai @ mean, bi) + np.outer(bi, ai @ mean) + np.outer(bi, bi) for ai, bi in zip(a, b)], axis=0
        )
        second = np.linalg.solve(np.eye(4) - lin, const.reshape(-1)).reshape(2, 2)
        cov = second - np.outer(mean, mean)
        return loss(mean, cov)

    etas = np.array([1e-4, 2e-4])
    losses = np.array([stationary_excess_loss(e) for e in etas])
    slope = (4 * losses[0] / etas[0] - losses[1] / etas[1]) / 3  # Richardson: removes the O(eta^2) term
    theorem = 0.25 * np.mean(np.sum(g**2, axis=1))
    np.testing.assert_allclose(slope, theorem, rtol=1e-3)

    # And a direct simulation of optax.sgd agrees with the exact stationary loss.
    eta = 0.05
    opt = optax.sgd(eta)

    def chain(key):
        def body(carry, k):
            x, state = carry
            i = jax.random.randint(k, (), 0, n)
            grad = jnp.asarray(hs)[i] @ (x - jnp.asarray(cs)[i])
            upd, state = opt.update(grad, state)
            x = optax.apply_updates(x, upd)
            d = x - x_star
            return (x, state), 0.5 * d @ jnp.asarray(h_bar) @ d

        x0 = jnp.asarray(x_star)
        _, excess = jax.lax.scan(body, (x0, opt.init(x0)), jax.random.split(key, 3000))
        return jnp.mean(excess[500:])

    sims = jax.jit(jax.vmap(chain))(jax.random.split(jax.random.key(0), 64))
    np.testing.assert_allclose(float(jnp.mean(sims)), stationary_excess_loss(eta), rtol=0.1)
