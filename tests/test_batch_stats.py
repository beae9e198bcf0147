"""batch_stats (fast and generic paths) against an explicit per-example loop."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from models.cnn import CNN3c3d
from models.mlp import MLP, cross_entropy
from probopt.stats import (
    BatchStats,
    Conv1d,
    Conv2d,
    Embedding,
    GroupNorm,
    LayerNorm,
    Linear,
    batch_stats,
    instrument,
)

# ----------------------------------------------------------------------------- reference


def reference_stats(per_example_loss, params, batch, direction, also=None):
    """Explicit sequential loop (``lax.map``, no ``vmap``) over examples; NumPy moments.

    ``also(params, batch, direction)``, if given, is compiled together with the
    loop (one compilation per test keeps the suite fast) and its value returned too.
    """
    n = jax.tree_util.tree_leaves(batch)[0].shape[0]

    @jax.jit
    def run(params, batch, direction):
        def one(i):
            def single(p):
                example = jax.tree_util.tree_map(lambda x: jax.lax.dynamic_slice_in_dim(x, i, 1), batch)
                return per_example_loss(p, example)[0]

            loss, grad = jax.value_and_grad(single)(params)
            _, hvp = jax.jvp(jax.grad(single), (params,), (direction,))
            return loss, ravel_pytree(grad)[0], ravel_pytree(hvp)[0]

        rows = jax.lax.map(one, jnp.arange(n))
        return rows, (None if also is None else also(params, batch, direction))

    rows, extra = run(params, batch, direction)
    losses, grads, hvps = (np.asarray(r) for r in rows)

    def moments(x):
        var = x.var(axis=0, ddof=1) if n > 1 else np.zeros(x.shape[1:])
        return x.mean(axis=0), (x**2).sum(axis=0), var, var.mean()

    ref = dict(
        loss_mean=losses.mean(),
        loss_var=losses.var(ddof=1) if n > 1 else 0.0,
        grad=moments(grads),
        hvp=moments(hvps),
    )
    return ref if also is None else (ref, extra)


def assert_matches(stats, ref, rtol=1e-9, atol=1e-11):
    flat = lambda tree: np.asarray(ravel_pytree(tree)[0])  # noqa: E731
    np.testing.assert_allclose(stats.loss_mean, ref["loss_mean"], rtol=rtol, atol=atol)
    np.testing.assert_allclose(stats.loss_var, ref["loss_var"], rtol=rtol, atol=atol)
    for prefix in ("grad", "hvp"):
        mean, sq_sum, var, var_mean = ref[prefix]
        np.testing.assert_allclose(flat(getattr(stats, f"{prefix}_mean")), mean, rtol=rtol, atol=atol)
        np.testing.assert_allclose(flat(getattr(stats, f"{prefix}_sq_sum")), sq_sum, rtol=rtol, atol=atol)
        np.testing.assert_allclose(flat(getattr(stats, f"{prefix}_var")), var, rtol=rtol, atol=atol)
        np.testing.assert_allclose(getattr(stats, f"{prefix}_var_mean"), var_mean, rtol=rtol, atol=atol)


def random_like(tree, key):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def classification_batch(key, n, shape, classes=3, dtype=jnp.float64):
    kx, ky = jax.random.split(key)
    return jax.random.normal(kx, (n,) + shape, dtype), jax.random.randint(ky, (n,), 0, classes)


# ----------------------------------------------------------------------------- small models


class TinyCNN(eqx.Module):
    """Strided and same-padded convolutions (one with, one without bias), GroupNorm, dense head."""

    conv1: Conv2d
    norm: GroupNorm
    conv2: Conv2d
    head: Linear

    def __init__(self, key, use_bias=True):
        k = jax.random.split(key, 3)
        self.conv1 = Conv2d(2, 4, 3, padding="SAME", use_bias=use_bias, key=k[0])
        self.norm = GroupNorm(2, 4)
        self.conv2 = Conv2d(4, 3, 2, stride=2, use_bias=not use_bias, key=k[1])  # both bias settings in one model
        self.head = Linear(3 * 3 * 3, 3, use_bias=use_bias, key=k[2])

    def __call__(self, x):
        x = jnp.tanh(self.conv1(x))
        x = self.norm(x)
        x = jnp.tanh(self.conv2(x))
        return self.head(jnp.ravel(x))


class OtherLayers(eqx.Module):
    """Embedding, Conv1d, LayerNorm: every remaining instrumented layer."""

    embed: Embedding
    conv: Conv1d
    norm: LayerNorm
    head: Linear

    def __init__(self, key):
        k = jax.random.split(key, 4)
        self.embed = Embedding(5, 6, key=k[0])
        self.conv = Conv1d(1, 2, 3, padding=((1, 1),), key=k[1])
        self.norm = LayerNorm(12)
        self.norm = eqx.tree_at(lambda m: (m.weight, m.bias), self.norm, tuple(random_like((self.norm.weight, self.norm.bias), k[3])))
        self.head = Linear(12, 3, key=k[2])

    def __call__(self, inputs):
        token, signal = inputs
        h = self.conv(signal[None] * self.embed(token)[None])  # (2, 6)
        return self.head(jnp.tanh(self.norm(jnp.ravel(h))))


def tokens_batch(key, n):
    k1, k2, k3 = jax.random.split(key, 3)
    tokens = jax.random.randint(k1, (n,), 0, 5).at[0].set(2)
    if n > 1:
        tokens = tokens.at[1].set(2)  # a repeated row of the embedding table
    return (tokens, jax.random.normal(k2, (n, 6))), jax.random.randint(k3, (n,), 0, 3)


def mlp_case(key, n, use_bias):
    model = MLP((4, 5, 3), key=key, use_bias=use_bias, activation=jnp.tanh)
    return model, classification_batch(jax.random.fold_in(key, 1), n, (4,))


def cnn_case(key, n, use_bias):
    return TinyCNN(key, use_bias), classification_batch(jax.random.fold_in(key, 1), n, (2, 6, 6))


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize(
    "case, use_bias, n",
    [(mlp_case, True, 1), (mlp_case, False, 5), (cnn_case, True, 3)],
    ids=["mlp-bias-1", "mlp-nobias-5", "cnn-3"],
)
def test_both_paths_match_per_example_loop(case, use_bias, n):
    key = jax.random.key(n)
    model, batch = case(key, n, use_bias)
    direction = random_like(model, jax.random.fold_in(key, 2))

    def both(model, batch, direction):
        return [batch_stats(cross_entropy, model, batch, direction=direction, method=m) for m in ("fast", "generic")]

    ref, results = reference_stats(cross_entropy, model, batch, direction, also=both)
    for stats in results:
        assert int(stats.batch_size) == n
        assert_matches(stats, ref)
        if n == 1:
            leaves = jax.tree_util.tree_leaves((stats.loss_var, stats.grad_var, stats.hvp_var))
            assert all(np.all(np.asarray(x) == 0) for x in leaves)


def test_remaining_layers_match_per_example_loop():
    key = jax.random.key(3)
    model = OtherLayers(key)
    batch = tokens_batch(jax.random.fold_in(key, 1), 6)
    direction = random_like(model, jax.random.fold_in(key, 2))
    fast = lambda m, b, d: batch_stats(cross_entropy, m, b, direction=d, method="fast")  # noqa: E731
    ref, stats = reference_stats(cross_entropy, model, batch, direction, also=fast)
    assert_matches(stats, ref)


def test_hvp_matches_jax_hessian():
    key = jax.random.key(4)
    model = MLP((3, 4, 2), key=key, activation=jnp.tanh)
    inputs, labels = classification_batch(jax.random.fold_in(key, 1), 4, (3,), classes=2)
    direction = random_like(model, jax.random.fold_in(key, 2))
    flat, unravel = ravel_pytree(model)
    v = ravel_pytree(direction)[0]
    losses = lambda w: cross_entropy(unravel(w), (inputs, labels))  # noqa: E731
    hessians = jax.jit(jax.hessian(losses))(flat)  # (n, P, P): example i's Hessian H_i
    rows = np.asarray(hessians @ v)
    stats = batch_stats(cross_entropy, model, (inputs, labels), direction=direction, method="fast")
    np.testing.assert_allclose(ravel_pytree(stats.hvp_mean)[0], rows.mean(0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(ravel_pytree(stats.hvp_sq_sum)[0], (rows**2).sum(0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(ravel_pytree(stats.hvp_var)[0], rows.var(0, ddof=1), rtol=1e-9, atol=1e-12)


class Mixed(eqx.Module):
    """Instrumented, plain Equinox, free-parameter and weight-shared parts."""

    fast: Linear
    plain: eqx.nn.Linear
    shared: Linear
    temperature: jax.Array

    def __init__(self, key):
        k = jax.random.split(key, 3)
        self.fast = Linear(4, 3, key=k[0])
        self.plain = eqx.nn.Linear(3, 3, key=k[1])
        self.shared = Linear(3, 3, key=k[2])
        self.temperature = jnp.array(1.3)

    def __call__(self, x):
        h = jnp.tanh(self.plain(jnp.tanh(self.fast(x))))
        h = jnp.tanh(self.shared(h))
        return self.shared(h) / self.temperature  # `shared` used twice: not fast-path safe


def test_mixed_model_is_correct_and_fast_method_refuses():
    key = jax.random.key(5)
    model = Mixed(key)
    batch = classification_batch(jax.random.fold_in(key, 1), 5, (4,))
    direction = random_like(model, jax.random.fold_in(key, 2))

    def unchunked_and_chunked(model, batch, direction):
        return [batch_stats(cross_entropy, model, batch, direction=direction, chunk_size=c) for c in (None, 2)]

    ref, results = reference_stats(cross_entropy, model, batch, direction, also=unchunked_and_chunked)
    for stats in results:
        assert_matches(stats, ref)
    with pytest.raises(ValueError, match=r"not covered: .*plain.*shared.*temperature"):
        batch_stats(cross_entropy, model, batch, method="fast")


def test_unsupported_call_patterns_fall_back():
    """A layer mapped over an inner axis (nested vmap) is computed generically."""
    key = jax.random.key(6)
    layer = Linear(2, 3, key=key)

    def loss(p, batch):  # each example is a (4, 2) sequence; Linear applied per position
        return jnp.sum(jnp.tanh(jax.vmap(jax.vmap(p))(batch)) ** 2, axis=(1, 2))

    batch = jax.random.normal(jax.random.fold_in(key, 1), (4, 4, 2))
    direction = random_like(layer, jax.random.fold_in(key, 2))
    auto = lambda p, b, d: batch_stats(loss, p, b, direction=d)  # noqa: E731
    ref, stats = reference_stats(loss, layer, batch, direction, also=auto)
    assert_matches(stats, ref)
    with pytest.raises(ValueError, match="not covered"):
        batch_stats(loss, layer, batch, method="fast")


def test_instrument_swaps_equinox_layers():
    key = jax.random.key(7)
    plain = eqx.nn.MLP(4, 3, 5, 2, activation=jnp.tanh, key=key)
    model = instrument(plain)
    assert all(type(layer) is Linear for layer in model.layers)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    loss = lambda p, b: cross_entropy(eqx.combine(p, static), b)  # noqa: E731
    batch = classification_batch(jax.random.fold_in(key, 1), 4, (4,))
    np.testing.assert_array_equal(jax.vmap(model)(batch[0]), jax.vmap(plain)(batch[0]))
    direction = random_like(params, jax.random.fold_in(key, 2))
    fast = lambda p, b, d: batch_stats(loss, p, b, direction=d, method="fast")  # noqa: E731
    ref, stats = reference_stats(loss, params, batch, direction, also=fast)
    assert_matches(stats, ref)


def test_chunked_generic_equals_unchunked_and_scalar_mode():
    key = jax.random.key(8)
    model, batch = mlp_case(key, 7, True)
    direction = random_like(model, jax.random.fold_in(key, 2))

    @jax.jit  # one compilation for all variants keeps the test fast
    def variants(model, batch, direction):
        run = lambda **kw: batch_stats(cross_entropy, model, batch, **kw)  # noqa: E731
        return dict(
            whole=run(direction=direction, method="generic"),
            chunked=[run(direction=direction, method="generic", chunk_size=c) for c in (2, 3)],
            scalar=[run(direction=direction, method=m, per_parameter=False, chunk_size=3) for m in ("fast", "generic")],
            no_direction=run(),
        )

    out = variants(model, batch, direction)
    whole = out["whole"]
    for chunked in out["chunked"]:
        for a, b in zip(jax.tree_util.tree_leaves(chunked), jax.tree_util.tree_leaves(whole)):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)
    for scalar in out["scalar"]:
        assert scalar.grad_var is None and scalar.grad_sq_sum is None and scalar.hvp_var is None
        np.testing.assert_allclose(scalar.grad_var_mean, whole.grad_var_mean, rtol=1e-10)
        np.testing.assert_allclose(scalar.hvp_var_mean, whole.hvp_var_mean, rtol=1e-10)
    no_direction = out["no_direction"]
    assert no_direction.hvp_mean is None and no_direction.hvp_var_mean is None
    np.testing.assert_allclose(no_direction.grad_var_mean, whole.grad_var_mean, rtol=1e-10)


@pytest.mark.parametrize("per_parameter", [True, False])
def test_centred_square_sums_about_known_means_match_the_loop(per_parameter):
    """The fast path's fallback kernel: sum_i (x_i - mean)^2 in chunks (with a remainder)."""
    from probopt.stats._generic import centred_square_sums

    key = jax.random.key(11)
    model, batch = mlp_case(key, 7, True)
    direction = random_like(model, jax.random.fold_in(key, 2))
    ref = reference_stats(cross_entropy, model, batch, direction)
    leaves, unravel = ravel_pytree(model)
    means = tuple(jax.tree_util.tree_leaves(unravel(jnp.asarray(ref[k][0]))) for k in ("grad", "hvp"))
    select = list(range(len(means[0])))

    @jax.jit
    def sums(model, batch, direction, means):
        return [
            centred_square_sums(
                cross_entropy, model, batch, 7, means, select=select, direction=direction,
                chunk_size=c, per_parameter=per_parameter,
            )
            for c in (None, 1, 3)  # whole batch; one example at a time; 2 chunks + a remainder of 1
        ]

    for grad_sums, hvp_sums in sums(model, batch, direction, means):
        for got, prefix in ((grad_sums, "grad"), (hvp_sums, "hvp")):
            expected = ref[prefix][2] * 6  # (n - 1) * sample variance
            if per_parameter:
                np.testing.assert_allclose(np.concatenate([np.ravel(x) for x in got]), expected, rtol=1e-10)
            else:
                assert all(np.ndim(x) == 0 for x in got)
                np.testing.assert_allclose(sum(float(x) for x in got), expected.sum(), rtol=1e-10)


def test_generic_variance_is_stable_in_float32():
    """Gradients 1000 +- 0.01: a raw sum-of-squares formula would return noise."""
    noise = jax.random.normal(jax.random.key(9), (64, 3))
    offsets = (1000.0 + 0.01 * noise).astype(jnp.float32)
    params = jnp.ones(3, jnp.float32)
    loss = lambda p, g: g @ p  # noqa: E731  per-example gradient = g_i
    stats = batch_stats(loss, params, offsets, method="generic", chunk_size=8)
    expected = np.var(np.asarray(offsets, np.float64), axis=0, ddof=1)
    np.testing.assert_allclose(stats.grad_var, expected, rtol=2e-2)
    assert stats.grad_var.dtype == jnp.float32


def test_float32_dtype_preserved():
    key = jax.random.key(10)
    model = MLP((4, 5, 3), key=key, dtype=jnp.float32)
    batch = classification_batch(jax.random.fold_in(key, 1), 3, (4,), dtype=jnp.float32)
    direction = random_like(model, jax.random.fold_in(key, 2))

    def both(model, batch, direction):
        return [batch_stats(cross_entropy, model, batch, direction=direction, method=m) for m in ("fast", "generic")]

    ref, results = reference_stats(cross_entropy, model, batch, direction, also=both)
    for stats in results:
        for leaf in jax.tree_util.tree_leaves(stats._replace(batch_size=None)):
            assert leaf.dtype == jnp.float32
        assert_matches(stats, ref, rtol=2e-4, atol=1e-6)


def test_jit_and_vmap_over_seeds():
    keys = jax.random.split(jax.random.key(11), 3)
    batch = classification_batch(jax.random.key(12), 4, (4,))

    @jax.jit
    def run(key):
        model = MLP((4, 5, 3), key=key)
        direction = random_like(model, jax.random.fold_in(key, 2))
        return batch_stats(cross_entropy, model, batch, direction=direction, method="fast")

    batched = jax.vmap(run)(keys)
    for s, key in enumerate(keys):
        single = run(key)
        for a, b in zip(jax.tree_util.tree_leaves(batched), jax.tree_util.tree_leaves(single)):
            np.testing.assert_allclose(a[s], b, rtol=1e-10, atol=1e-13)


def test_cnn3c3d_architecture():
    model = CNN3c3d(key=jax.random.key(13))
    assert sum(leaf.size for leaf in jax.tree_util.tree_leaves(model)) == 895_210  # DeepOBS 3c3d
    shapes = jax.eval_shape(jax.vmap(model), jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float64))
    assert shapes.shape == (2, 10)


@pytest.mark.slow
def test_cnn3c3d_fast_equals_generic():
    key = jax.random.key(13)
    model = CNN3c3d(key=key, dtype=jnp.float32)
    batch = classification_batch(jax.random.fold_in(key, 1), 2, (32, 32, 3), classes=10, dtype=jnp.float32)
    direction = random_like(model, jax.random.fold_in(key, 2))
    fast = batch_stats(cross_entropy, model, batch, direction=direction, method="fast")
    generic = batch_stats(cross_entropy, model, batch, direction=direction, method="generic")
    for a, b in zip(jax.tree_util.tree_leaves(fast), jax.tree_util.tree_leaves(generic)):
        scale = float(jnp.max(jnp.abs(b))) + 1e-30
        np.testing.assert_allclose(a / scale, b / scale, atol=2e-4)


def test_bad_inputs_raise():
    key = jax.random.key(14)
    model, batch = mlp_case(key, 3, True)
    with pytest.raises(ValueError, match="one loss per example"):
        batch_stats(lambda p, b: jnp.mean(cross_entropy(p, b)), model, batch)
    with pytest.raises(ValueError, match="`method`"):
        batch_stats(cross_entropy, model, batch, method="magic")
    with pytest.raises(ValueError, match="`chunk_size`"):
        batch_stats(cross_entropy, model, batch, chunk_size=0)
    with pytest.raises(ValueError, match="`direction`"):
        batch_stats(cross_entropy, model, batch, direction=jnp.ones(3))
    with pytest.raises(ValueError, match="`batch`"):
        batch_stats(cross_entropy, model, (batch[0], batch[1][:2]))
    with pytest.raises(TypeError, match="floating-point"):
        batch_stats(lambda p, b: p["w"] * b, {"w": jnp.ones(3), "n": jnp.arange(3)}, jnp.ones(3))
    assert isinstance(batch_stats(cross_entropy, model, batch), BatchStats)
