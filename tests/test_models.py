"""Benchmark workloads: ResNet-32 size, per-example losses, offline data."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.data import load_digits, minibatch_sampler, synthetic_images, train_test_split
from models.losses import accuracy, cross_entropy_per_example, split_model
from models.resnet import ResNet, resnet32


def _count(model):
    return sum(leaf.size for leaf in jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_inexact_array)))


def _abstract_count(build, **kwargs):
    """Parameter count from shapes only (no initialisation is run)."""
    model = eqx.filter_eval_shape(build, key=jax.random.key(0), **kwargs)
    return sum(leaf.size for leaf in jax.tree_util.tree_leaves(model) if hasattr(leaf, "dtype")
               and jnp.issubdtype(leaf.dtype, jnp.inexact))


def _expected_resnet_params(n, widths=(16, 32, 64), in_channels=3, classes=10):
    """Independent count: bias-free 3x3 convs, GroupNorm affine (2 per channel), option-A shortcuts."""
    total = 9 * in_channels * widths[0] + 2 * widths[0]
    channels = widths[0]
    for width in widths:
        for _ in range(n):
            total += 9 * channels * width + 9 * width * width + 4 * width
            channels = width
    return total + channels * classes + classes


def _filled(build, *args, scale=0.3, **kwargs):
    """A model with NumPy-random weights; eager Equinox init compiles one kernel per shape."""
    abstract = eqx.filter_eval_shape(build, *args, key=jax.random.key(0), **kwargs)
    rng = np.random.default_rng(0)
    return jax.tree_util.tree_map(
        lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), s.dtype)
        if isinstance(s, jax.ShapeDtypeStruct)
        else s,
        abstract,
    )


def test_resnet32_parameter_count():
    count = _abstract_count(resnet32)
    assert count == _expected_resnet_params(5)
    # He et al. (2016), Table 6: ResNet-32 has 0.46M parameters (464,154 with BN affine).
    assert count == 464_154
    assert _abstract_count(ResNet, blocks_per_stage=3) == _expected_resnet_params(3)


def test_resnet_per_example_loss_shape_and_independence():
    # A small ResNet-8 on 8x8 images keeps compilation short; same code path as ResNet-32.
    model = _filled(ResNet, 1, 4, 3, (8, 8, 16), 4)
    assert _count(model) == _expected_resnet_params(1, widths=(8, 8, 16), classes=4)
    params, per_example_loss, _ = split_model(model)
    x = jax.random.normal(jax.random.key(1), (3, 3, 8, 8))
    y = jnp.array([0, 3, 1])
    losses = jax.jit(per_example_loss)(params, {"x": x, "y": y})
    assert losses.shape == (3,)
    # GroupNorm normalises each example alone: changing example 2 leaves losses 0 and 1 unchanged
    # (BatchNorm would change them).
    x2 = x.at[2].set(10.0 * x[2] + 3.0)
    losses2 = jax.jit(per_example_loss)(params, {"x": x2, "y": y})
    np.testing.assert_allclose(losses2[:2], losses[:2], rtol=1e-12)
    assert not np.allclose(losses2[2], losses[2])


def test_cross_entropy_matches_log_softmax_by_hand():
    model = _filled(eqx.nn.MLP, 5, 3, 4, 1, scale=1.0)
    x = np.random.default_rng(1).standard_normal((6, 5))
    y = jnp.array([0, 1, 2, 2, 1, 0])
    losses = cross_entropy_per_example(model, {"x": jnp.asarray(x), "y": y})
    first, second = model.layers
    hidden = np.maximum(x @ np.asarray(first.weight).T + np.asarray(first.bias), 0.0)
    logits = hidden @ np.asarray(second.weight).T + np.asarray(second.bias)
    logz = np.log(np.sum(np.exp(logits - logits.max(1, keepdims=True)), 1)) + logits.max(1)
    np.testing.assert_allclose(losses, logz - logits[np.arange(6), np.asarray(y)], rtol=1e-10)
    assert losses.shape == (6,)
    np.testing.assert_allclose(accuracy(model, jnp.asarray(x), y), np.mean(logits.argmax(1) == np.asarray(y)))


def test_digits_loader_and_sampler():
    data = load_digits()
    assert data.x_train.shape[1:] == (64,) and data.x_train.shape[0] + data.x_test.shape[0] == 1797
    assert data.x_train.dtype == np.float32 and 0.0 <= data.x_train.min() and data.x_train.max() <= 1.0
    assert data.num_classes == 10 and set(np.unique(data.y_train)) == set(range(10))
    images = load_digits(flatten=False, seed=0)
    np.testing.assert_array_equal(images.x_train.reshape(-1, 64), data.x_train)
    sample = minibatch_sampler(data.x_train, data.y_train, 32)
    batch = jax.jit(sample)(jax.random.key(0))
    assert batch["x"].shape == (32, 64) and batch["y"].shape == (32,)
    # Every sampled (x, y) pair is a training example with its own label.
    index = [int(np.flatnonzero((data.x_train == np.asarray(r)).all(1))[0]) for r in batch["x"]]
    np.testing.assert_array_equal(data.y_train[index], np.asarray(batch["y"]))
    with pytest.raises(ValueError, match="batch_size"):
        minibatch_sampler(data.x_train, data.y_train, 0)


def test_split_and_synthetic_data():
    x = np.arange(20.0).reshape(10, 2)
    y = np.arange(10) % 3
    split = train_test_split(x, y, test_fraction=0.3, seed=1)
    assert split.x_test.shape == (3, 2) and split.x_train.shape == (7, 2)
    merged = np.sort(np.concatenate([split.x_train[:, 0], split.x_test[:, 0]]))
    np.testing.assert_array_equal(merged, x[:, 0])
    with pytest.raises(ValueError, match="test_fraction"):
        train_test_split(x, y, test_fraction=1.5, seed=0)
    fake = synthetic_images(8, 4)
    assert fake.x_train.shape == (8, 3, 32, 32) and fake.y_test.shape == (4,)
