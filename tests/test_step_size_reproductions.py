"""Slow reproductions of the Meka paper's step-size experiments (run with ``-m slow``).

They call the example scripts' functions, so the numbers in the docs and the
assertions here come from the same code.
"""

import importlib.util
import pathlib

import numpy as np
import pytest

pytestmark = pytest.mark.slow

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def noisy_quadratic():
    module = _load("step_size_noisy_quadratic")
    return module.main(["--steps", "1000", "--seeds", "5", "--no-plot"])


def test_meka_pi_beats_gd_and_fixed_meka_and_sgd_pi_stalls(noisy_quadratic):
    """Meka Fig. 4: PI helps Meka; SGD + PI is unreliable."""
    curves, _, _ = noisy_quadratic
    final = {name: np.median(c[:, -1]) for name, c in curves.items()}
    assert final["Meka + PI"] < 0.5 * final["GD (1/L)"], final
    assert final["Meka + PI"] < 0.5 * final["Meka (1/L)"], final
    assert final["SGD + PI"] > 10 * final["Meka + PI"], final
    # SGD + PI does no better than plain SGD's noise floor.
    assert final["SGD + PI"] > 0.5 * final["SGD (1/L)"], final


def test_lambda_off_when_the_quadratic_model_fits_on_when_it_does_not(noisy_quadratic):
    """Meka Fig. 8 / App. B.1: lambda ~ 0 on the quadratic, positive on Rosenbrock."""
    _, traces, (_, _, rosenbrock) = noisy_quadratic
    quadratic_lambda = traces["Meka + PI"][1][0][:, 500:]
    rosenbrock_lambda = rosenbrock[0][:, 500:]
    # A calibrated model has lambda > 0 with probability P(chi2_1 > 1) = 0.32.
    assert np.mean(quadratic_lambda > 0) < 0.32
    assert np.median(quadratic_lambda) == 0.0
    assert np.mean(rosenbrock_lambda > 0) > 0.6
    assert np.median(rosenbrock_lambda) > 0.0


@pytest.fixture(scope="module")
def multiplier_runs():
    module = _load("step_size_multiplier")
    from models.data import load_mnist5k

    data = load_mnist5k()
    runs = {}
    for acquisition, multipliers in (("pi", (0.1, 0.3, 1.0, 3.0)), ("quadratic", (0.1, 1.0))):
        for c in multipliers:
            runs[acquisition, c] = module.train(acquisition, c, data=data, steps=600, batch_size=128, seed=0)
    return runs


def test_pi_steps_are_correctly_scaled(multiplier_runs):
    """Meka Fig. 6: a multiplier c on the PI step is best at c = 1; the quadratic rule needs c ~ 0.1."""
    loss = {key: value[0] for key, value in multiplier_runs.items()}
    pi = {c: loss["pi", c] for c in (0.1, 0.3, 1.0, 3.0)}
    assert min(pi, key=pi.get) == 1.0, pi
    assert loss["quadratic", 0.1] < loss["quadratic", 1.0], loss


def test_lambda_positive_early_in_mlp_training(multiplier_runs):
    _, (alpha, lam, fallback) = multiplier_runs["pi", 1.0]
    assert np.mean(lam[1:51] > 0) > 0.5
    assert np.mean(lam[1:51] > 0) > np.mean(lam[-200:] > 0)
    assert not fallback[1:].any()
    assert np.all(np.isfinite(alpha))
