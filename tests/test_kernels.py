"""The Kalman kernels against an independent dense NumPy Kalman filter."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.flatten_util import ravel_pytree
from scipy import stats

from probopt.filters import ConditionInfo, GaussianBelief, condition, predict

# --------------------------------------------------------------------------- reference


def reference_predict(mean, cov, process_noise, drift):
    return mean + drift, cov + process_noise


def reference_condition(mean, cov, observation, observation_noise):
    """Textbook dense update with an explicit inverse, independent of the kernels."""
    innovation_cov = cov + observation_noise
    gain = cov @ np.linalg.inv(innovation_cov)
    identity = np.eye(len(mean))
    post_mean = mean + gain @ (observation - mean)
    post_cov = (identity - gain) @ cov
    log_likelihood = stats.multivariate_normal(mean, innovation_cov).logpdf(observation)
    return post_mean, post_cov, gain, log_likelihood


def random_spd(rng, dim, scale=1.0):
    a = rng.normal(size=(dim, dim))
    return scale * (a @ a.T / dim + 0.1 * np.eye(dim))


def pytree_mean(rng):
    return {"a": jnp.asarray(rng.normal(size=3)), "b": jnp.asarray(rng.normal(size=(2, 2)))}


DIM = 7  # 3 + 2*2 coordinates of ``pytree_mean``


def flat(tree):
    return np.asarray(ravel_pytree(tree)[0])


def unflatten_like(tree, vector):
    return ravel_pytree(tree)[1](jnp.asarray(vector))


def make_sequence(structure, rng, steps=6):
    """A belief and a random sequence of (Q, R, drift, y) in the given structure,
    each also returned as dense NumPy matrices for the reference filter."""
    mean = pytree_mean(rng)
    if structure == "scalar":
        p = float(rng.uniform(0.5, 2.0))
        belief = GaussianBelief.scalar(mean, p)
        cov = p * np.eye(DIM)
    elif structure == "diagonal":
        var = np.abs(rng.normal(size=DIM)) + 0.1
        belief = GaussianBelief.diagonal(mean, unflatten_like(mean, var))
        cov = np.diag(var)
    else:
        cov = random_spd(rng, DIM)
        belief = GaussianBelief.dense(mean, cov)
    sequence = []
    for _ in range(steps):
        drift = rng.normal(size=DIM)
        observation = rng.normal(size=DIM) * 2.0
        if structure == "scalar":
            q, r = rng.uniform(0.01, 0.5), rng.uniform(0.1, 3.0)
            args = (jnp.asarray(q), jnp.asarray(r))
            dense = (q * np.eye(DIM), r * np.eye(DIM))
        elif structure == "diagonal":
            q, r = rng.uniform(0.01, 0.5, DIM), rng.uniform(0.1, 3.0, DIM)
            args = (unflatten_like(mean, q), unflatten_like(mean, r))
            dense = (np.diag(q), np.diag(r))
        else:
            q, r = random_spd(rng, DIM, 0.2), random_spd(rng, DIM, 1.5)
            args = (jnp.asarray(q), jnp.asarray(r))
            dense = (q, r)
        sequence.append(
            dict(
                kernel_noise=args,
                dense_noise=dense,
                drift=drift,
                observation=observation,
            )
        )
    return belief, flat(mean), cov, sequence


def dense_gain(info, structure, mean):
    if structure == "scalar":
        return float(info.gain) * np.eye(DIM)
    if structure == "diagonal":
        return np.diag(flat(info.gain))
    return np.asarray(info.gain)


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("structure", ["scalar", "diagonal", "dense"])
@pytest.mark.parametrize("form", ["joseph", "standard"])
def test_filter_matches_dense_numpy_reference(structure, form):
    rng = np.random.default_rng(1)
    belief, ref_mean, ref_cov, sequence = make_sequence(structure, rng)
    template = belief.mean
    for step in sequence:
        (q, r), (dense_q, dense_r) = step["kernel_noise"], step["dense_noise"]
        belief = predict(belief, process_noise=q, drift=unflatten_like(template, step["drift"]))
        ref_mean, ref_cov = reference_predict(ref_mean, ref_cov, dense_q, step["drift"])
        np.testing.assert_allclose(flat(belief.mean), ref_mean, rtol=1e-10)
        np.testing.assert_allclose(np.asarray(belief.dense_covariance()), ref_cov, rtol=1e-10)

        observation = unflatten_like(template, step["observation"])
        belief, info = condition(belief, observation, r, form=form)
        ref_mean, ref_cov, ref_gain, ref_ll = reference_condition(
            ref_mean, ref_cov, step["observation"], dense_r
        )
        assert belief.structure == structure
        assert isinstance(info, ConditionInfo)
        np.testing.assert_allclose(flat(belief.mean), ref_mean, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(
            np.asarray(belief.dense_covariance()), ref_cov, rtol=1e-9, atol=1e-12
        )
        np.testing.assert_allclose(dense_gain(info, structure, template), ref_gain, atol=1e-12)
        np.testing.assert_allclose(float(info.log_likelihood), ref_ll, rtol=1e-10)


@pytest.mark.parametrize("structure", ["scalar", "diagonal", "dense"])
def test_innovation_and_its_variance(structure):
    rng = np.random.default_rng(2)
    belief, mean, cov, sequence = make_sequence(structure, rng, steps=1)
    (_, r), (_, dense_r) = sequence[0]["kernel_noise"], sequence[0]["dense_noise"]
    y = sequence[0]["observation"]
    _, info = condition(belief, unflatten_like(belief.mean, y), r)
    np.testing.assert_allclose(flat(info.innovation), y - mean, rtol=1e-12)
    if structure == "scalar":
        total = float(info.innovation_variance) * np.eye(DIM)
    elif structure == "diagonal":
        total = np.diag(flat(info.innovation_variance))
    else:
        total = np.asarray(info.innovation_variance)
    np.testing.assert_allclose(total, cov + dense_r, rtol=1e-12)


def _run(belief, steps, form="joseph"):
    infos = []
    for q, r, d, y in steps:
        belief = predict(belief, process_noise=q, drift=d)
        belief, info = condition(belief, y, r, form=form)
        infos.append(info)
    return belief, infos


def test_scalar_equals_dense_with_isotropic_covariance():
    rng = np.random.default_rng(3)
    mean = pytree_mean(rng)
    p = 1.3
    steps = [
        (
            float(rng.uniform(0.01, 1)),
            float(rng.uniform(0.1, 2)),
            unflatten_like(mean, rng.normal(size=DIM)),
            unflatten_like(mean, rng.normal(size=DIM)),
        )
        for _ in range(5)
    ]
    scalar, scalar_infos = _run(
        GaussianBelief.scalar(mean, p), [(jnp.asarray(q), jnp.asarray(r), d, y) for q, r, d, y in steps]
    )
    dense, dense_infos = _run(GaussianBelief.dense(mean, p * jnp.eye(DIM)), steps)
    np.testing.assert_allclose(flat(scalar.mean), flat(dense.mean), rtol=1e-12)
    np.testing.assert_allclose(scalar.dense_covariance(), dense.variance, rtol=1e-12, atol=1e-15)
    for a, b in zip(scalar_infos, dense_infos):
        np.testing.assert_allclose(a.log_likelihood, b.log_likelihood, rtol=1e-12)
        np.testing.assert_allclose(a.gain * np.eye(DIM), b.gain, atol=1e-14)


def test_diagonal_equals_dense_with_diagonal_covariance():
    rng = np.random.default_rng(4)
    mean = pytree_mean(rng)
    var = rng.uniform(0.5, 2.0, DIM)
    steps = [
        (rng.uniform(0.01, 1, DIM), rng.uniform(0.1, 2, DIM), rng.normal(size=DIM), rng.normal(size=DIM))
        for _ in range(5)
    ]
    diagonal, diag_infos = _run(
        GaussianBelief.diagonal(mean, unflatten_like(mean, var)),
        [tuple(unflatten_like(mean, v) for v in step) for step in steps],
    )
    dense, dense_infos = _run(
        GaussianBelief.dense(mean, np.diag(var)),
        [(jnp.asarray(q), jnp.asarray(r), unflatten_like(mean, d), unflatten_like(mean, y)) for q, r, d, y in steps],
    )
    np.testing.assert_allclose(flat(diagonal.mean), flat(dense.mean), rtol=1e-12)
    np.testing.assert_allclose(diagonal.dense_covariance(), dense.variance, rtol=1e-12, atol=1e-15)
    for a, b in zip(diag_infos, dense_infos):
        np.testing.assert_allclose(a.log_likelihood, b.log_likelihood, rtol=1e-12)


@pytest.mark.parametrize("structure", ["scalar", "diagonal", "dense"])
def test_joseph_and_standard_forms_agree_for_the_optimal_gain(structure):
    rng = np.random.default_rng(5)
    belief, _, _, sequence = make_sequence(structure, rng, steps=4)
    joseph = standard = belief
    for step in sequence:
        q, r = step["kernel_noise"]
        y = unflatten_like(belief.mean, step["observation"])
        joseph, info_j = condition(predict(joseph, process_noise=q), y, r, form="joseph")
        standard, info_s = condition(predict(standard, process_noise=q), y, r, form="standard")
        np.testing.assert_allclose(joseph.dense_covariance(), standard.dense_covariance(), rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(flat(joseph.mean), flat(standard.mean), rtol=1e-12)
        np.testing.assert_allclose(info_j.log_likelihood, info_s.log_likelihood, rtol=1e-12)


@pytest.mark.parametrize("structure", ["scalar", "diagonal", "dense"])
def test_log_likelihood_matches_scipy(structure):
    rng = np.random.default_rng(6)
    belief, mean, cov, sequence = make_sequence(structure, rng, steps=1)
    (_, r), (_, dense_r) = sequence[0]["kernel_noise"], sequence[0]["dense_noise"]
    y = sequence[0]["observation"]
    _, info = condition(belief, unflatten_like(belief.mean, y), r)
    expected = stats.multivariate_normal(mean, cov + dense_r).logpdf(y)
    np.testing.assert_allclose(float(info.log_likelihood), expected, rtol=1e-12)


def test_predict_without_drift_keeps_the_mean():
    mean = {"w": jnp.arange(3.0)}
    out = predict(GaussianBelief.diagonal(mean, 1.0), process_noise=0.5)
    np.testing.assert_array_equal(out.mean["w"], mean["w"])
    np.testing.assert_allclose(out.variance["w"], 1.5)


def test_zero_total_variance_keeps_prediction():
    """The documented fallback: with P + R = 0 the gain is 0, not NaN."""
    belief = GaussianBelief.diagonal({"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([0.0, 1.0])})
    posterior, info = condition(belief, {"w": jnp.array([5.0, 4.0])}, {"w": jnp.array([0.0, 1.0])})
    np.testing.assert_allclose(info.gain["w"], [0.0, 0.5])
    np.testing.assert_allclose(posterior.mean["w"], [1.0, 3.0])
    assert np.all(np.isfinite(posterior.variance["w"]))


@pytest.mark.parametrize("structure", ["scalar", "diagonal", "dense"])
def test_jit_and_vmap_over_a_batch_of_beliefs(structure):
    rng = np.random.default_rng(7)
    n = 4
    items = [make_sequence(structure, rng, steps=1) for _ in range(n)]
    beliefs = [item[0] for item in items]
    qs = [item[3][0]["kernel_noise"][0] for item in items]
    rs = [item[3][0]["kernel_noise"][1] for item in items]
    ys = [unflatten_like(item[0].mean, item[3][0]["observation"]) for item in items]
    stack = lambda trees: jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)  # noqa: E731

    @jax.jit
    @jax.vmap
    def step(belief, q, r, y):
        posterior, info = condition(predict(belief, process_noise=q), y, r)
        return posterior, info.log_likelihood

    batched, lls = step(stack(beliefs), stack(qs), stack(rs), stack(ys))
    for i in range(n):
        expected, info = condition(predict(beliefs[i], process_noise=qs[i]), ys[i], rs[i])
        got = jax.tree_util.tree_map(lambda x: x[i], batched)
        np.testing.assert_allclose(flat(got.mean), flat(expected.mean), rtol=1e-10)
        np.testing.assert_allclose(got.dense_covariance(), expected.dense_covariance(), rtol=1e-10)
        np.testing.assert_allclose(lls[i], info.log_likelihood, rtol=1e-10)


@pytest.mark.parametrize("structure", ["scalar", "diagonal", "dense"])
@pytest.mark.parametrize("form", ["joseph", "standard"])
def test_float32_is_preserved(structure, form):
    mean = {"a": jnp.ones(3, jnp.float32), "b": jnp.zeros((2, 2), jnp.float32)}
    if structure == "scalar":
        belief = GaussianBelief.scalar(mean, jnp.float32(1.0))
    elif structure == "diagonal":
        belief = GaussianBelief.diagonal(mean, jax.tree_util.tree_map(jnp.ones_like, mean))
    else:
        belief = GaussianBelief.dense(mean, jnp.eye(DIM, dtype=jnp.float32))
    observation = jax.tree_util.tree_map(lambda x: x + 1, mean)
    belief = predict(belief, process_noise=0.1, drift=jax.tree_util.tree_map(jnp.ones_like, mean))
    posterior, info = jax.jit(lambda b, y: condition(b, y, 0.5, form=form))(belief, observation)
    for leaf in jax.tree_util.tree_leaves((belief, posterior, info)):
        assert leaf.dtype == jnp.float32, leaf.dtype


def test_bad_input_raises_value_error_naming_the_argument():
    mean = {"a": jnp.zeros(3)}
    diagonal = GaussianBelief.diagonal(mean, 1.0)
    scalar = GaussianBelief.scalar(mean, 1.0)
    dense = GaussianBelief.dense(mean, jnp.eye(3))
    with pytest.raises(ValueError, match="observation"):
        condition(diagonal, {"b": jnp.zeros(3)}, 1.0)
    with pytest.raises(ValueError, match="observation"):
        condition(diagonal, {"a": jnp.zeros(4)}, 1.0)
    with pytest.raises(ValueError, match="observation_noise"):
        condition(diagonal, mean, -1.0)
    with pytest.raises(ValueError, match="observation_noise"):
        condition(scalar, mean, jnp.ones(3))
    with pytest.raises(ValueError, match="observation_noise"):
        condition(dense, mean, jnp.ones((2, 2)))
    with pytest.raises(ValueError, match="observation_noise"):
        condition(diagonal, mean, {"a": jnp.ones(2)})
    with pytest.raises(ValueError, match="process_noise"):
        predict(scalar, process_noise=-0.1)
    with pytest.raises(ValueError, match="process_noise"):
        predict(dense, process_noise=jnp.ones(4))
    with pytest.raises(ValueError, match="drift"):
        predict(diagonal, process_noise=0.0, drift={"a": jnp.zeros(2)})
    with pytest.raises(ValueError, match="form"):
        condition(scalar, mean, 1.0, form="information")


# --------------------------------------------------------------------------- property


@st.composite
def kernel_inputs(draw):
    structure = draw(st.sampled_from(["scalar", "diagonal", "dense"]))
    dim = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    log_scales = [draw(st.floats(-6.0, 6.0)) for _ in range(3)]
    zero_prior = draw(st.booleans()) and structure != "dense"
    return structure, dim, seed, log_scales, zero_prior


def _spd(rng, dim, scale):
    a = rng.normal(size=(dim, dim))
    return scale * (a @ a.T + 1e-3 * np.eye(dim))


@settings(max_examples=50, deadline=None)
@given(kernel_inputs())
def test_kernels_keep_covariance_symmetric_psd(inputs):
    structure, dim, seed, log_scales, zero_prior = inputs
    rng = np.random.default_rng(seed)
    p_scale, q_scale, r_scale = (10.0**s for s in log_scales)
    mean = jnp.asarray(rng.normal(size=dim))
    if structure == "scalar":
        belief = GaussianBelief.scalar(mean, 0.0 if zero_prior else p_scale)
        q, r = jnp.asarray(q_scale * rng.uniform()), jnp.asarray(r_scale * rng.uniform())
    elif structure == "diagonal":
        prior = np.zeros(dim) if zero_prior else p_scale * rng.uniform(size=dim)
        belief = GaussianBelief.diagonal(mean, jnp.asarray(prior))
        q = jnp.asarray(q_scale * rng.uniform(size=dim))
        r = jnp.asarray(r_scale * rng.uniform(size=dim))
    else:
        belief = GaussianBelief.dense(mean, _spd(rng, dim, p_scale))
        q, r = jnp.asarray(_spd(rng, dim, q_scale)), jnp.asarray(_spd(rng, dim, r_scale))
    for form in ("joseph", "standard"):
        current = belief
        for _ in range(3):
            current = predict(current, process_noise=q)
            y = jnp.asarray(rng.normal(size=dim) * 10.0 ** rng.uniform(-3, 3))
            current, info = condition(current, y, r, form=form)
            cov = np.asarray(current.dense_covariance())
            assert np.all(np.isfinite(cov)) and np.all(np.isfinite(np.asarray(current.mean)))
            assert np.isfinite(float(info.log_likelihood))
            np.testing.assert_array_equal(cov, cov.T)
            assert np.all(np.diagonal(cov) >= 0)
            eigenvalues = np.linalg.eigvalsh(cov)
            assert eigenvalues.min() >= -1e-9 * max(1.0, np.abs(eigenvalues).max())


def test_dense_singular_innovation_covariance_falls_back_to_pseudo_inverse():
    # Coordinate 0 has P = R = 0: the prediction must be kept there, exactly as
    # the scalar/diagonal kernels do, while coordinate 1 is a normal update.
    belief = GaussianBelief.dense(jnp.zeros(2), jnp.diag(jnp.array([0.0, 2.0])))
    posterior, info = condition(belief, jnp.ones(2), jnp.diag(jnp.array([0.0, 2.0])))
    np.testing.assert_allclose(np.asarray(posterior.mean), [0.0, 0.5])
    np.testing.assert_allclose(np.asarray(posterior.variance), np.diag([0.0, 1.0]), atol=1e-12)
    assert np.isneginf(float(info.log_likelihood))
    diagonal = GaussianBelief.diagonal(jnp.zeros(2), jnp.array([0.0, 2.0]))
    diagonal_posterior, _ = condition(diagonal, jnp.ones(2), jnp.array([0.0, 2.0]))
    np.testing.assert_allclose(np.asarray(posterior.mean), np.asarray(diagonal_posterior.mean))
