"""Fast tests of LODO (Liao et al., 2023): preconditioner algebra, hypergradient, ablations."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.linalg import block_diag

from probopt.optimizers._lodo import (
    LodoState,
    lodo,
    lodo_diagonal,
    lodo_global,
    lodo_hypergradient,
    lodo_no_momentum,
    lodo_residuals,
    lodo_sgd,
    meta_learned_preconditioner,
)
from probopt.preconditioners import (
    DensePreconditioner,
    DiagonalPreconditioner,
    LodoPreconditioner,
    Preconditioner,
    ResidualPreconditioner,
    ScalarPreconditioner,
    compare_spectra,
    default_hidden_dim,
    exact_inverse_hessian_error,
    inverse_hessian_error,
    partition_trainable,
)
from probopt.preconditioners._lodo import _NARROW_MAX_WIDTH


def _perturb(module, key, scale=0.3):
    """Add noise to every trainable float leaf (to leave the orthogonal/identity init)."""
    trainable, structure = partition_trainable(module)
    leaves, treedef = jax.tree.flatten(trainable)
    keys = jax.random.split(key, len(leaves))
    leaves = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return eqx.combine(jax.tree.unflatten(treedef, leaves), structure)


def _lodo_dense_reference(p: LodoPreconditioner) -> np.ndarray:
    """G = a0 E^T (B_N P_N ... B_1 P_1)^T (B_N P_N ... B_1 P_1) E from explicit matrices."""
    n, hidden = p.dim, p.hidden_dim
    blocks = np.asarray(p.blocks)
    perms = np.asarray(p.permutations)
    network = np.eye(hidden)
    for i in range(blocks.shape[0]):
        permutation = np.eye(hidden)[perms[i]]  # (P v)_j = v[perm_j]
        network = block_diag(*blocks[i]) @ permutation @ network
    embed = np.eye(hidden)[:, :n]
    return float(p.scale) * embed.T @ network.T @ network @ embed


def _random_spd(key, n, low=0.2, high=1.0):
    q, _ = jnp.linalg.qr(jax.random.normal(key, (n, n)))
    return (q * jnp.geomspace(low, high, n)) @ q.T


# ----------------------------------------------------------------------------- preconditioners


# 300 makes the hidden width 600: the wide layer form (explicit multiply-adds, scatter).
@pytest.mark.parametrize("dim, block_size, depth", [(7, 4, 3), (5, 3, 4), (6, 2, 5), (300, 4, 3)])
def test_lodo_dense_equals_product_formula(dim, block_size, depth):
    p = LodoPreconditioner(
        dim, key=jax.random.key(1), initial_learning_rate=0.7, block_size=block_size, depth=depth
    )
    assert p.hidden_dim % block_size == 0 and p.hidden_dim >= 2 * dim
    assert (p.hidden_dim > _NARROW_MAX_WIDTH) == (dim == 300)
    p = _perturb(p, jax.random.key(2))
    reference = _lodo_dense_reference(p)
    np.testing.assert_allclose(p.dense(), reference, atol=1e-12)
    v = jax.random.normal(jax.random.key(3), (dim,))
    np.testing.assert_allclose(p(v), reference @ np.asarray(v), atol=1e-12)


def test_default_hidden_dim_rounds_up_to_block_multiple():
    assert default_hidden_dim(100, 4) == 200 and default_hidden_dim(5, 4) == 12
    assert default_hidden_dim(6, 3) == 12
    assert LodoPreconditioner(5, key=jax.random.key(0), block_size=4, depth=1).hidden_dim == 12


def test_lodo_is_scaled_identity_at_init():
    p = LodoPreconditioner(9, key=jax.random.key(4), initial_learning_rate=0.3)
    np.testing.assert_allclose(p.dense(), 0.3 * np.eye(9), atol=1e-12)
    # And the orthogonal blocks really are orthogonal.
    eye = np.broadcast_to(np.eye(4), p.blocks.shape)
    np.testing.assert_allclose(np.swapaxes(p.blocks, -1, -2) @ p.blocks, eye, atol=1e-12)


def test_residuals_dense_equals_product_formula():
    p = _perturb(ResidualPreconditioner(6, key=jax.random.key(5), depth=4, initial_learning_rate=0.5), jax.random.key(6))
    hidden = p.middle.shape[0]
    r = np.eye(hidden)
    for w, perm in zip(np.asarray(p.layer_weights), np.asarray(p.permutations)):
        r = (np.eye(hidden) + np.diag(w) @ np.eye(hidden)[perm]) @ r
    embed = np.eye(hidden)[:, :6]
    reference = 0.5 * embed.T @ r.T @ np.diag(np.asarray(p.middle)) @ r @ embed
    np.testing.assert_allclose(p.dense(), reference, atol=1e-12)


def test_diagonal_and_scalar_forms():
    d = _perturb(DiagonalPreconditioner(4, initial_learning_rate=0.2), jax.random.key(7))
    np.testing.assert_allclose(d.dense(), 0.2 * np.diag(d.weights), atol=1e-14)
    s = _perturb(ScalarPreconditioner(4, initial_learning_rate=0.2), jax.random.key(8))
    np.testing.assert_allclose(s.dense(), 0.2 * float(s.weight) * np.eye(4), atol=1e-14)


def test_partition_exposes_only_block_entries():
    p = LodoPreconditioner(10, key=jax.random.key(0), depth=3)
    trainable, structure = partition_trainable(p)
    leaves = jax.tree.leaves(trainable)
    assert len(leaves) == 1 and leaves[0].shape == p.blocks.shape
    assert structure.blocks is None and structure.permutations.dtype == jnp.int32


# ----------------------------------------------------------------------------- hypergradient


def _quadratic(key, n):
    a = _random_spd(key, n)
    centre = jax.random.normal(jax.random.fold_in(key, 1), (n,))
    return lambda x: 0.5 * (x - centre) @ a @ (x - centre)


@pytest.mark.parametrize(
    "make",
    [
        lambda k: LodoPreconditioner(6, key=k, depth=4, initial_learning_rate=0.4),
        lambda k: ResidualPreconditioner(6, key=k, depth=5, initial_learning_rate=0.4),
        lambda k: DiagonalPreconditioner(6, initial_learning_rate=0.4),
        lambda k: ScalarPreconditioner(6, initial_learning_rate=0.4),
        lambda k: DensePreconditioner(6, initial_learning_rate=0.4),
    ],
)
def test_hypergradient_equals_finite_difference_of_next_loss(make):
    k1, k2, k3, k4, k5 = jax.random.split(jax.random.key(11), 5)
    p = _perturb(make(k1), k2, scale=0.2)
    loss = _quadratic(k3, 6)
    x, m = jax.random.normal(k4, (2, 6))
    next_gradient = jax.grad(loss)(x - p(m))
    hyper = eqx.filter_jit(lodo_hypergradient)(p, m, next_gradient)

    trainable, structure = partition_trainable(p)
    direction = jax.tree.map(lambda t: jax.random.normal(k5, t.shape, t.dtype), trainable)

    @jax.jit
    def next_loss(eps):
        theta = jax.tree.map(lambda t, d: t + eps * d, trainable, direction)
        return loss(x - eqx.combine(theta, structure)(m))

    eps = 1e-5
    finite_difference = (next_loss(eps) - next_loss(-eps)) / (2 * eps)
    analytic = sum(jnp.vdot(h, d) for h, d in zip(jax.tree.leaves(hyper), jax.tree.leaves(direction)))
    np.testing.assert_allclose(analytic, finite_difference, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("dim, depth", [(11, 6), (300, 3)])
def test_lodo_closed_form_hypergradient_matches_autodiff_vjp(dim, depth):
    p = _perturb(LodoPreconditioner(dim, key=jax.random.key(3), depth=depth), jax.random.key(4))
    v, c = jax.random.normal(jax.random.key(5), (2, dim))
    fast = eqx.filter_jit(lambda p, v, c: p.hypergradient(v, c))(p, v, c).blocks
    autodiff = eqx.filter_jit(Preconditioner.hypergradient)(p, v, c).blocks
    np.testing.assert_allclose(fast, autodiff, atol=1e-12)


# ----------------------------------------------------------------------------- optimizer


def _run(opt, loss, x0, steps):
    state = opt.init(x0)
    update = jax.jit(opt.update)
    grad = jax.jit(jax.grad(loss))
    x = x0
    updates_seen, states = [], [state]
    for _ in range(steps):
        g = grad(x)
        u, state = update(g, state, x)
        x = x + u
        updates_seen.append(u)
        states.append(state)
    return x, updates_seen, states


def test_first_update_is_momentum_sgd():
    g = {"a": jnp.arange(3.0), "b": jnp.ones((2, 2))}
    opt = lodo(1e-2, 0.25, 0.6, key=jax.random.key(0), depth=3)
    state = opt.init(jax.tree.map(jnp.zeros_like, g))
    u, state = opt.update(g, state)
    np.testing.assert_allclose(u["a"], -0.25 * 0.4 * g["a"], atol=1e-14)
    np.testing.assert_allclose(u["b"], -0.25 * 0.4 * g["b"], atol=1e-14)
    assert isinstance(state, LodoState) and int(state.count) == 1


def _adam_reference(lr, b1=0.9, b2=0.999, eps=1e-7):
    """Adam as optax defines it (eps added after bias correction), in NumPy."""

    class Adam:
        def __init__(self, shape):
            self.m, self.v, self.t = np.zeros(shape), np.zeros(shape), 0

        def step(self, grad):
            self.t += 1
            self.m = b1 * self.m + (1 - b1) * grad
            self.v = b2 * self.v + (1 - b2) * grad**2
            m_hat = self.m / (1 - b1**self.t)
            v_hat = self.v / (1 - b2**self.t)
            return -lr * m_hat / (np.sqrt(v_hat) + eps)

    return Adam


def test_lodo_matches_reference_loop():
    """The optax mapping reproduces the authors' loop with G built from explicit matrices."""
    n, depth, steps, alpha0, beta, meta_lr = 5, 3, 12, 0.3, 0.5, 0.05
    loss = _quadratic(jax.random.key(20), n)
    key = jax.random.key(21)
    opt = lodo(meta_lr, alpha0, beta, key=key, depth=depth)
    x_opt, _, states = _run(opt, loss, jnp.zeros(n), steps)

    # Independent loop: x_{t+1} = x_t - G(theta_t) m_t, gradient at x_{t+1}, Adam on theta.
    p0 = states[0].preconditioner
    perms = np.asarray(p0.permutations)
    hidden = p0.hidden_dim
    embed = np.eye(hidden)[:, :n]

    def dense_g(blocks):
        network = jnp.eye(hidden)
        for i in range(depth):
            full = jax.scipy.linalg.block_diag(*blocks[i])
            network = full @ jnp.eye(hidden)[perms[i]] @ network
        return alpha0 * embed.T @ network.T @ network @ embed

    theta = np.asarray(p0.blocks)
    adam = _adam_reference(meta_lr)(theta.shape)
    hyper_fn = jax.jit(jax.grad(lambda th, x, m: loss(x - dense_g(th) @ m)))
    dense_g = jax.jit(dense_g)
    x, m = np.zeros(n), np.zeros(n)
    for _ in range(steps):
        x_next = x - np.asarray(dense_g(theta)) @ m
        hyper = hyper_fn(jnp.asarray(theta), jnp.asarray(x), jnp.asarray(m))
        g_next = np.asarray(jax.grad(loss)(jnp.asarray(x_next)))
        theta = theta + adam.step(np.asarray(hyper))
        m = beta * m + (1 - beta) * g_next
        x = x_next
    x = x - np.asarray(dense_g(theta)) @ m  # the optax loop has applied one more step
    np.testing.assert_allclose(states[-1].preconditioner.blocks, theta, atol=1e-10)
    np.testing.assert_allclose(x_opt, x, atol=1e-10)


def test_psd_and_symmetric_after_training():
    loss = _quadratic(jax.random.key(30), 8)
    opt = lodo(0.05, 0.5, 0.3, key=jax.random.key(31), depth=4)
    _, _, states = _run(opt, loss, jnp.ones(8), 30)
    p = states[-1].preconditioner
    g = np.asarray(p.dense())
    assert np.abs(g - 0.5 * np.eye(8)).max() > 1e-2  # it has moved away from alpha0 I
    np.testing.assert_allclose(g, g.T, atol=1e-12)
    assert np.linalg.eigvalsh(g).min() > -1e-12


def test_lodo_sgd_meta_step_is_minus_eta_hypergradient():
    loss = _quadratic(jax.random.key(40), 6)
    eta = 0.01
    opt = lodo_sgd(eta, 0.4, 0.5, key=jax.random.key(41), depth=3)
    _, _, states = _run(opt, loss, jnp.ones(6), 4)
    x = jnp.ones(6) + sum(_run(opt, loss, jnp.ones(6), 2)[1][:2])
    before, after = states[2], states[3]
    g = jax.grad(loss)(x)
    hyper = lodo_hypergradient(before.preconditioner, before.momentum, g)
    np.testing.assert_allclose(after.preconditioner.blocks, before.preconditioner.blocks - eta * hyper.blocks, atol=1e-12)


def test_global_is_hypergradient_descent_on_momentum_sgd():
    """LODO-Global with an SGD meta-step: w <- w + eta a0 g_{t+1}.m_t, step -a0 w m."""
    n, eta, alpha0, beta, steps = 5, 0.3, 0.2, 0.6, 15
    loss = _quadratic(jax.random.key(50), n)
    x_opt, updates, _ = _run(lodo_global(eta, alpha0, beta, meta_optimizer=optax.sgd(eta)), loss, jnp.ones(n), steps)
    x, m, w = np.ones(n), np.zeros(n), 1.0
    for t in range(steps):
        g = np.asarray(jax.grad(loss)(jnp.asarray(x)))
        w = w + eta * alpha0 * g @ m
        m = beta * m + (1 - beta) * g
        np.testing.assert_allclose(updates[t], -alpha0 * w * m, atol=1e-12)
        x = x - alpha0 * w * m
    np.testing.assert_allclose(x_opt, x, atol=1e-12)


def test_diagonal_is_per_coordinate_hypergradient_descent():
    n, eta, alpha0, beta, steps = 5, 0.3, 0.2, 0.6, 15
    loss = _quadratic(jax.random.key(51), n)
    x_opt, _, _ = _run(lodo_diagonal(eta, alpha0, beta, meta_optimizer=optax.sgd(eta)), loss, jnp.ones(n), steps)
    x, m, w = np.ones(n), np.zeros(n), np.ones(n)
    for _ in range(steps):
        g = np.asarray(jax.grad(loss)(jnp.asarray(x)))
        w = w + eta * alpha0 * g * m
        m = beta * m + (1 - beta) * g
        x = x - alpha0 * w * m
    np.testing.assert_allclose(x_opt, x, atol=1e-12)


def test_no_momentum_steps_with_current_gradient():
    loss = _quadratic(jax.random.key(52), 6)
    key = jax.random.key(53)
    x_a, updates, states = _run(lodo_no_momentum(0.01, 0.3, key=key, depth=3), loss, jnp.ones(6), 6)
    x_b, _, _ = _run(lodo(0.01, 0.3, 0.0, key=key, depth=3), loss, jnp.ones(6), 6)
    np.testing.assert_array_equal(x_a, x_b)
    x = jnp.ones(6)
    for t in range(6):
        g = jax.grad(loss)(x)
        np.testing.assert_allclose(updates[t], -states[t + 1].preconditioner(g), atol=1e-13)
        x = x + updates[t]


def test_residuals_runs_and_decreases_loss():
    loss = _quadratic(jax.random.key(54), 6)
    x, _, _ = _run(lodo_residuals(1e-3, 0.5, 0.5, key=jax.random.key(55), depth=8), loss, jnp.ones(6) * 3, 40)
    assert loss(x) < 0.2 * loss(jnp.ones(6) * 3)


def test_dense_meta_learning_converges_to_inverse_hessian():
    """§4.1: dense G, SGD meta-step, no momentum, moving bowl: G -> H^{-1}."""
    n, alpha0, eta, steps = 5, 0.5, 0.02, 20_000
    hessian = _random_spd(jax.random.key(60), n, 0.2, 1.0)
    opt = meta_learned_preconditioner(
        lambda dim, dtype: DensePreconditioner(dim, initial_learning_rate=alpha0, dtype=dtype),
        optax.sgd(eta / alpha0**2),  # G = a0 W, so an SGD step eta on G is eta / a0^2 on W
        alpha0,
        0.0,
    )

    @jax.jit
    def run(key):
        def body(carry, k):
            x, c, state = carry
            c = c + jax.random.normal(k, (n,))
            u, state = opt.update(hessian @ (x - c), state)
            return (x + u, c, state), None

        init = (jnp.zeros(n), jnp.zeros(n), opt.init(jnp.zeros(n)))
        return jax.lax.scan(body, init, jax.random.split(key, steps))[0][2]

    state = run(jax.random.key(61))
    g = state.preconditioner
    initial = float(jnp.linalg.norm(jnp.eye(n) - alpha0 * hessian) / jnp.sqrt(n))
    final = float(exact_inverse_hessian_error(g, hessian))
    inverse = jnp.linalg.inv(hessian)
    relative = float(jnp.linalg.norm(g.dense() - inverse) / jnp.linalg.norm(inverse))
    assert initial > 0.6 and final < 0.15 and relative < 0.15


def test_saddle_diverges_along_negative_curvature():
    """§4.2: a fixed PD G on an indefinite H grows |b| along the negative eigenvector."""
    hessian = jnp.diag(jnp.array([1.0, 0.5, -0.2]))
    opt = lodo(0.0, 0.5, 0.0, key=jax.random.key(0), depth=4)
    x, _, _ = _run(opt, lambda x: 0.5 * x @ hessian @ x, jnp.array([0.1, 0.1, 0.1]), 60)
    assert abs(float(x[2])) > 0.1 * 1.1**55 and 0.5 * x @ hessian @ x < 0


# ----------------------------------------------------------------------------- inspection


def test_inspection_tools():
    n = 6
    hessian = _random_spd(jax.random.key(70), n)
    p = LodoPreconditioner(n, key=jax.random.key(71), initial_learning_rate=0.4, depth=4)
    spectra = compare_spectra(p, hessian)
    lam = np.linalg.eigvalsh(hessian)
    np.testing.assert_allclose(spectra.preconditioner, 0.4, atol=1e-12)
    np.testing.assert_allclose(spectra.inverse_hessian, np.sort(1 / lam), rtol=1e-12)
    np.testing.assert_allclose(spectra.preconditioned_hessian, 0.4 * lam, atol=1e-12)
    np.testing.assert_allclose(
        exact_inverse_hessian_error(p, hessian), np.linalg.norm(np.eye(n) - 0.4 * hessian) / np.sqrt(n), rtol=1e-12
    )
    exact = DensePreconditioner(n, initial_learning_rate=1.0)
    exact = eqx.tree_at(lambda q: q.matrix, exact, jnp.linalg.inv(hessian))
    assert float(exact_inverse_hessian_error(exact, hessian)) < 1e-12
    assert float(inverse_hessian_error(exact, lambda v: hessian @ v, jax.random.key(0))) < 1e-12
    # MC estimator of E|v - 0.4 H v| agrees with a direct NumPy average over the same probes.
    est = inverse_hessian_error(p, lambda v: hessian @ v, jax.random.key(1), num_probes=50)
    probes = np.array(jax.random.normal(jax.random.key(1), (50, n)))
    probes /= np.linalg.norm(probes, axis=1, keepdims=True)
    direct = np.mean(np.linalg.norm(probes - probes @ (0.4 * np.asarray(hessian)), axis=1))
    np.testing.assert_allclose(est, direct, rtol=1e-12)


# ----------------------------------------------------------------------------- jax behaviour


def test_jit_does_not_retrace_and_float32_is_preserved():
    traces = []
    opt = lodo(1e-3, 0.3, 0.5, key=jax.random.key(0), depth=4)
    params = {"w": jnp.ones((3, 2), jnp.float32), "b": jnp.zeros(2, jnp.float32)}

    @jax.jit
    def step(params, state):
        traces.append(None)
        grads = jax.tree.map(lambda p: 2 * p + 1, params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = opt.init(params)
    params, state = step(params, state)
    params, state = step(params, state)
    assert len(traces) == 1
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    assert state.momentum.dtype == jnp.float32
    assert state.preconditioner.blocks.dtype == jnp.float32
    assert state.preconditioner.permutations.dtype == jnp.int32


@pytest.mark.parametrize("dim", [6, 300])  # narrow and wide layers
def test_vmap_over_seeds(dim):
    loss = _quadratic(jax.random.key(80), dim)

    def run(key):
        opt = lodo(1e-2, 0.3, 0.5, key=key, depth=3)

        def body(carry, _):
            x, state = carry
            u, state = opt.update(jax.grad(loss)(x), state)
            return (x + u, state), None

        x = jnp.ones(dim)
        (x, state), _ = jax.lax.scan(body, (x, opt.init(x)), None, length=5)
        return x, state.preconditioner.permutations

    xs, perms = jax.jit(jax.vmap(run))(jax.random.split(jax.random.key(81), 3))
    assert xs.shape == (3, dim) and bool(jnp.all(jnp.isfinite(xs)))
    assert not np.array_equal(perms[0], perms[1])
    single, _ = jax.jit(run)(jax.random.split(jax.random.key(81), 3)[1])
    np.testing.assert_allclose(xs[1], single, atol=1e-12)


def test_inject_hyperparams():
    opt = optax.inject_hyperparams(lodo, static_args=("key", "block_size", "depth", "unroll"))(
        meta_learning_rate=1e-3, initial_learning_rate=0.3, momentum=0.5, key=jax.random.key(0), depth=2
    )
    state = opt.init(jnp.ones(3))
    u, state = jax.jit(opt.update)(jnp.ones(3), state)
    np.testing.assert_allclose(u, -0.3 * 0.5 * jnp.ones(3), atol=1e-14)
    assert isinstance(optax.tree.get(state, "preconditioner"), LodoPreconditioner)


@pytest.mark.parametrize("dim, depth, bad", [(3, 2, jnp.nan), (100, 4, jnp.nan), (100, 4, jnp.inf)])
def test_nonfinite_hypergradient_skips_meta_step(dim, depth, bad):
    # The meta-step is skipped whole: theta and the Adam moments and count stay put.
    opt = lodo(1e-2, 0.3, 0.5, key=jax.random.key(0), depth=depth)
    state = opt.init(jnp.ones(dim))
    _, state = jax.jit(opt.update)(jnp.ones(dim), state)
    blocks, meta_state = state.preconditioner.blocks, state.meta_state
    _, state = jax.jit(opt.update)(jnp.ones(dim).at[0].set(bad), state)
    assert int(state.skipped_meta_updates) == 1
    np.testing.assert_array_equal(state.preconditioner.blocks, blocks)
    for new, old in zip(jax.tree.leaves(state.meta_state), jax.tree.leaves(meta_state)):
        np.testing.assert_array_equal(new, old)


def test_bad_arguments_raise():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="meta_learning_rate"):
        lodo(-1.0, 0.1, 0.5, key=key)
    with pytest.raises(ValueError, match="initial_learning_rate"):
        lodo(1e-3, 0.0, 0.5, key=key)
    with pytest.raises(ValueError, match="momentum"):
        lodo(1e-3, 0.1, 1.0, key=key)
    with pytest.raises(TypeError, match="key"):
        lodo(1e-3, 0.1, 0.5, key=None)
    with pytest.raises(ValueError, match="hidden_dim"):
        lodo(1e-3, 0.1, 0.5, key=key, hidden_dim=7)
    with pytest.raises(ValueError, match="block_size"):
        LodoPreconditioner(4, key=key, block_size=0)
    with pytest.raises(ValueError, match="vector"):
        LodoPreconditioner(4, key=key, depth=2)(jnp.ones(5))
    with pytest.raises(TypeError, match="dtype"):
        DiagonalPreconditioner(3, dtype=jnp.int32)
