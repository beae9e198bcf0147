"""Slow reproductions of LODO's experiments (Liao et al., 2023); run with ``pytest -m slow``."""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_noisy_bowl_lodo_beats_baselines_and_nears_newton():
    """§5.1: 100k steps, sigma^2 = 1, n = 100; mean loss over the last 10%."""
    bowl = _example("lodo_noisy_bowl")
    from probopt.optimizers._lodo import lodo
    from probopt.problems import MovingQuadraticBowlFamily

    steps, record_every = 100_000, 10_000
    problem_key, walk_key, lodo_key = jax.random.split(jax.random.key(0), 3)
    problem = MovingQuadraticBowlFamily().sample(problem_key)
    newton = float(problem.newton_optimum)
    assert abs(newton - 7.41) < 0.01

    run = jax.jit(bowl.run_bowl, static_argnums=(0, 3, 4))
    late = {}
    losses, errors, _ = run(lodo(**bowl.TABLE6["lodo"], key=lodo_key), problem, walk_key, steps, record_every)
    late["lodo"] = float(jnp.mean(losses[-steps // 10 :]))
    for name, opt in bowl.make_baselines().items():
        losses, _, _ = run(opt, problem, walk_key, steps, record_every)
        value = float(jnp.mean(losses[-steps // 10 :]))
        late[name] = value if np.isfinite(value) else np.inf
    best_rmsprop = min(v for k, v in late.items() if k.startswith("rmsprop"))
    best_lbfgs = min(v for k, v in late.items() if k.startswith("lbfgs"))
    assert late["lodo"] < 1.3 * newton, late
    assert late["lodo"] < min(late["adam"], late["momentum"], best_rmsprop, best_lbfgs), late
    initial_error = float(jnp.linalg.norm(jnp.eye(100) - 0.27 * problem.hessian_matrix) / 10)
    errors = np.asarray(errors)
    assert errors[-1] < errors[0] < initial_error
    assert errors[-1] < 0.85 * initial_error


def test_frozen_preconditioner_diverges_on_new_bowl():
    frozen = _example("lodo_frozen_preconditioner")
    _, same, new, radius_same, radius_new = frozen.frozen_experiment(100_000, 20)
    assert radius_new > 2.0
    assert float(jnp.max(new)) > 1e6
    assert float(jnp.max(same)) < 100.0


def test_rosenbrock_reaches_paper_loss():
    """§5.2 / Table 8: LODO's mean loss over steps 180-200 is about 1.04e-3 (8 seeds)."""
    from probopt.optimizers._lodo import lodo
    from probopt.problems import Rosenbrock

    rosen = _example("lodo_rosenbrock")
    problem = Rosenbrock()

    def run(key):
        return rosen.trajectory(lodo(1.394e-4, 0.2946, 0.897, key=key), problem, 200)[1]

    losses = jax.jit(jax.vmap(run))(jax.random.split(jax.random.key(0), 8))
    late = np.asarray(losses[:, 180:].mean(axis=1))
    assert np.all(late < 5e-3) and float(losses[:, 0].mean()) > 3.0
    assert 2e-4 < late.mean() < 5e-3


def test_autoregressive_cnn_matches_paper_size_and_conv():
    from jax import lax

    from models.autoregressive_cnn import (
        NUM_PARAMETERS,
        _depthwise_conv3x3,
        count_parameters,
        init_autoregressive_cnn,
        load_mnist_5k,
        make_autoregressive_batch,
        per_example_loss,
    )

    params = init_autoregressive_cnn(jax.random.key(0))
    assert count_parameters(params) == NUM_PARAMETERS == 94_696
    x = jax.random.normal(jax.random.key(1), (2, 7, 7, 4))
    kernel = jax.random.normal(jax.random.key(2), (3, 3, 1, 12))
    reference = lax.conv_general_dilated(
        x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=4
    )
    np.testing.assert_allclose(_depthwise_conv3x3(x, kernel), reference, atol=1e-10)
    images, _ = load_mnist_5k()
    assert images.shape == (5000, 28, 28)
    batch = make_autoregressive_batch(images[:4], jax.random.key(3))
    assert batch["inputs"].shape == (4, 28, 28, 5)
    losses = per_example_loss(params, batch)
    assert losses.shape == (4,) and bool(jnp.all(jnp.isfinite(losses)))
    # Query pixel and everything after it are hidden; the target is that pixel's value.
    flat = np.asarray(batch["inputs"][..., 1]).reshape(4, -1)
    query = (flat < 0).sum(axis=1)  # number of visible pixels = query index
    np.testing.assert_array_equal(images[:4].reshape(4, -1)[np.arange(4), query], batch["targets"])
