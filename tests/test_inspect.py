"""ArviZ conversion of recorded runs: structure, NetCDF round trip, posterior draws."""

import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import xarray as xr

from probopt.filters import GaussianBelief
from probopt.inspect import (
    find_beliefs,
    find_diagnostics,
    load_inference_data,
    plot_diagnostics,
    save_inference_data,
    to_inference_data,
)

T = 7


@pytest.fixture
def seed():
    return 0


class Info(NamedTuple):
    gain: Any
    innovation: Any


class FakeState(NamedTuple):
    count: Any
    belief: GaussianBelief
    value: GaussianBelief
    info: Info
    step_size: Any
    lam: Any
    previous_step: Any


def _params_like(rng, lead=()):
    return {"w": rng.standard_normal(lead + (2, 3)), "b": rng.standard_normal(lead + (3,))}


def _stacked_state(seed, lead=(T,)):
    # NumPy arrays: the conversion accepts any array leaves, and this keeps the tests fast.
    rng = np.random.default_rng(seed)
    mean = _params_like(rng, lead)
    variance = {k: np.exp(v) for k, v in _params_like(rng, lead).items()}
    return FakeState(
        count=np.broadcast_to(np.arange(lead[-1], dtype=np.int32), lead),
        belief=GaussianBelief(mean, variance, "diagonal"),
        value=GaussianBelief(rng.standard_normal(lead), np.exp(rng.standard_normal(lead)), "scalar"),
        info=Info(gain=rng.uniform(size=lead), innovation=_params_like(rng, lead)),
        step_size=np.linspace(0.1, 0.2, lead[-1]) * np.ones(lead),
        lam=np.zeros(lead),
        previous_step=_params_like(rng, lead),
    )


def _flat(tree):
    """Stacked param dict -> (T, D) in ravel_pytree order (sorted keys: b, then w)."""
    return np.concatenate([tree["b"].reshape(T, -1), tree["w"].reshape(T, -1)], axis=1)


def _group(idata, name):
    if isinstance(idata, xr.DataTree):
        return idata[name].to_dataset()
    return getattr(idata, name)


def test_structure_dims_coords_and_values(seed):
    state = _stacked_state(seed)
    losses = np.arange(T, dtype=np.float64)
    idata = to_inference_data(state, observations={"loss": losses}, steps=np.arange(10, 10 + T))
    fs = _group(idata, "filter_state")
    assert fs.sizes["step"] == T and fs.sizes["param"] == 9
    np.testing.assert_array_equal(fs["step"].values, np.arange(10, 10 + T))
    # Belief over the parameter pytree is flattened in ravel_pytree order.
    assert fs["belief.mean"].dims == ("step", "param")
    np.testing.assert_allclose(fs["belief.mean"].values, _flat(state.belief.mean))
    np.testing.assert_allclose(fs["belief.variance"].values, _flat(state.belief.variance))
    # Scalar belief over a scalar: one value per step.
    assert fs["value.mean"].dims == ("step",) and fs["value.variance"].dims == ("step",)
    np.testing.assert_allclose(fs["value.variance"].values, state.value.variance)
    # NamedTuple fields, nested ones by dotted path; param-shaped subtrees flattened.
    assert fs["info.gain"].dims == ("step",)
    assert fs["info.innovation"].dims == ("step", "param")
    np.testing.assert_allclose(fs["previous_step"].values, _flat(state.previous_step))
    np.testing.assert_allclose(fs["step_size"].values, state.step_size)
    obs = _group(idata, "observed_data")
    np.testing.assert_allclose(obs["loss"].values, losses)
    assert obs["loss"].dims == ("step",)
    assert set(find_beliefs(state)) == {"belief", "value"}


def test_chain_axis_and_param_names(seed):
    state = _stacked_state(seed, lead=(3, T))
    names = [f"p{i}" for i in range(9)]
    idata = to_inference_data(state, chain_axis=True, param_names=names)
    fs = _group(idata, "filter_state")
    assert fs["belief.mean"].dims == ("chain", "step", "param")
    assert list(fs["param"].values) == names
    np.testing.assert_allclose(fs["belief.mean"].values[1, 4, 6:], state.belief.mean["w"][1, 4, 1])
    np.testing.assert_allclose(fs["belief.mean"].values[2, 3, :3], state.belief.mean["b"][2, 3])


def test_netcdf_round_trip_equals_original(seed, tmp_path):
    state = _stacked_state(seed)
    idata = to_inference_data(
        state, observations={"loss": np.linspace(1, 0, T)}, draws=20, key=jax.random.key(1)
    )
    path = tmp_path / "trace.nc"
    save_inference_data(idata, path)
    back = load_inference_data(path)
    for group in ("filter_state", "observed_data", "posterior"):
        xr.testing.assert_identical(_group(back, group), _group(idata, group))


@pytest.mark.parametrize("structure", ["scalar", "diagonal", "dense"])
def test_posterior_draws_match_belief_moments(structure):
    dim, draws = 3, 4000
    mean = jnp.stack([jnp.array([1.0, -2.0, 0.5]) * (t + 1) for t in range(2)])
    if structure == "scalar":
        belief = GaussianBelief(mean, jnp.array([0.25, 4.0]), "scalar")
        cov = [0.25 * np.eye(dim), 4.0 * np.eye(dim)]
    elif structure == "diagonal":
        var = jnp.array([[0.1, 1.0, 9.0], [2.0, 0.5, 0.3]])
        belief = GaussianBelief(mean, var, "diagonal")
        cov = [np.diag(v) for v in np.asarray(var)]
    else:
        a = np.array([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [-0.5, 0.3, 1.2]])
        cov = [a @ a.T, 2.0 * (a @ a.T)]
        belief = GaussianBelief(mean, jnp.asarray(np.stack(cov)), "dense")
    idata = to_inference_data({"grad_belief": belief}, draws=draws, key=jax.random.key(3))
    post = _group(idata, "posterior")["grad_belief"]
    assert post.dims == ("chain", "draw", "step", "param")
    assert post.shape == (1, draws, 2, dim)
    samples = post.values[0]
    for t in range(2):
        sd = np.sqrt(np.diag(cov[t]))
        # Sample mean within 4 standard errors; sample covariance within 4 standard errors of a
        # Wishart entry, sqrt((S_ij^2 + S_ii S_jj) / n).
        np.testing.assert_array_less(np.abs(samples[:, t].mean(0) - np.asarray(mean[t])), 4 * sd / np.sqrt(draws))
        emp = np.cov(samples[:, t], rowvar=False)
        se = np.sqrt((cov[t] ** 2 + np.outer(np.diag(cov[t]), np.diag(cov[t]))) / draws)
        np.testing.assert_array_less(np.abs(emp - cov[t]), 4 * se + 1e-12)


def test_arviz_summary_and_plot_trace_work(seed):
    import arviz as az
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    state = _stacked_state(seed)
    idata = to_inference_data(state, draws=20, key=jax.random.key(2))
    summary = az.summary(idata, var_names=["belief"], coords={"step": [T - 1]}, kind="stats")
    assert len(summary) == 9
    posterior_mean = _group(idata, "posterior")["belief"].values[0, :, T - 1].mean(0)
    np.testing.assert_allclose(summary["mean"].values, posterior_mean, atol=1e-3)
    with warnings.catch_warnings():
        # arviz 0.23 calls a Matplotlib API deprecated in 3.11 (not ours).
        warnings.simplefilter("ignore", matplotlib.MatplotlibDeprecationWarning)
        axes = az.plot_trace(idata, var_names=["value"], coords={"step": [0, T - 1]})
    assert np.asarray(axes).shape[1] == 2
    plt.close("all")


def test_diagnostics_found_by_name_and_plotted(seed):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    state = _stacked_state(seed)
    idata = to_inference_data(state)
    found = find_diagnostics(idata)
    assert set(found) == {"step_size", "lambda", "gain", "snr"}
    np.testing.assert_allclose(found["step_size"].values, state.step_size)
    np.testing.assert_allclose(found["gain"].values, state.info.gain)
    # SNR computed from the gradient belief: mean over params of m^2 / var.
    expected = np.mean(_flat(state.belief.mean) ** 2 / _flat(state.belief.variance), axis=1)
    assert found["snr"].dims == ("step",)
    np.testing.assert_allclose(found["snr"].values, expected)
    fig = plot_diagnostics(idata)
    assert len(fig.axes) == len(found)
    plt.close(fig)


def test_bad_input_raises(seed):
    state = _stacked_state(seed)
    with pytest.raises(ValueError, match="key"):
        to_inference_data(state, draws=3)
    with pytest.raises(ValueError, match="draws"):
        to_inference_data(state, draws=-1)
    bad = state._replace(step_size=np.zeros(T + 1))
    with pytest.raises(ValueError, match="leading dims"):
        to_inference_data(bad)
    with pytest.raises(ValueError, match="param_names"):
        to_inference_data(state, param_names=["a"])


def test_real_meka_trace_converts():
    meka_module = pytest.importorskip("probopt.optimizers._meka")

    def per_example_loss(params, batch):
        return 0.5 * jnp.sum((params[None] - batch) ** 2, axis=-1)

    opt = meka_module.meka(0.5)
    step = meka_module.make_step(opt, per_example_loss)
    params = jnp.ones(4)
    state = opt.init(params)

    def body(carry, key):
        params, state = carry
        params, state, _ = step(params, state, jax.random.normal(key, (8, 4)))
        return (params, state), state

    _, trace = jax.lax.scan(body, (params, state), jax.random.split(jax.random.key(0), 5))
    idata = to_inference_data(trace)
    fs = _group(idata, "filter_state")
    assert fs["belief.mean"].dims == ("step", "param") and fs.sizes["param"] == 4
    np.testing.assert_allclose(fs["belief.mean"].values, np.asarray(trace.belief.mean))
    assert "gain" in find_diagnostics(idata)


def test_belief_recorded_without_mean_keeps_scalar_variance(seed):
    state = _stacked_state(seed)
    state = state._replace(value=GaussianBelief(None, state.value.variance, "scalar"))
    fs = _group(to_inference_data(state, draws=2, key=jax.random.key(0)), "filter_state")
    assert "value.mean" not in fs
    np.testing.assert_allclose(fs["value.variance"].values, state.value.variance)
