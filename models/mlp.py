"""Multilayer perceptrons for classification, built from instrumented layers.

``MLP((784, 100, 10), key=key)`` is the one-hidden-layer MNIST network of the
Meka paper; ``MLP.deepobs_mnist_mlp(key)`` is DeepOBS' ``mnist_mlp``
(784-1000-500-100-10).  Their layers are [`probopt.stats.Linear`][probopt.stats.Linear],
so [`probopt.stats.batch_stats`][probopt.stats.batch_stats] takes its fast path.
"""

from __future__ import annotations

from typing import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from probopt.stats import Linear


def cross_entropy(model: Callable, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Per-example softmax cross-entropy, shape ``(n,)``.

    **Arguments:**

    - `model`: maps one input to a vector of class logits.
    - `batch`: ``(inputs, labels)`` with inputs of shape ``(n, ...)`` and integer
      labels of shape ``(n,)``.

    This is the ``per_example_loss(params, batch)`` that probopt's optimizers and
    [`batch_stats`][probopt.stats.batch_stats] expect, with ``params = model``.
    """
    inputs, labels = batch
    logits = jax.vmap(model)(inputs)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(log_probs, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]


def accuracy(model: Callable, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Fraction of correctly classified examples, shape ``()``."""
    inputs, labels = batch
    predictions = jnp.argmax(jax.vmap(model)(inputs), axis=-1)
    return jnp.mean(predictions == labels)


def fill_leaves(abstract, key, scales, *, truncated=False):
    """Materialise an abstract module (``ShapeDtypeStruct`` leaves) from one random draw.

    Leaf ``j`` becomes ``scales[j] * u`` with ``u`` uniform on ``[-1, 1]`` (or a
    standard normal truncated at two standard deviations); ``scales[j] == 0``
    gives zeros.  A single draw compiles once, instead of one small program per
    layer and shape, which keeps model construction fast.
    """
    leaves, treedef = jax.tree_util.tree_flatten(abstract)
    dtype = leaves[0].dtype
    total = sum(leaf.size for leaf in leaves)
    if truncated:
        draw = jax.random.truncated_normal(key, -2.0, 2.0, (total,), dtype)
    else:
        draw = jax.random.uniform(key, (total,), dtype, -1.0, 1.0)
    offsets = np.cumsum([leaf.size for leaf in leaves])[:-1].tolist()
    pieces = jnp.split(draw, offsets)  # traceable, so models can be built under jit/vmap over seeds
    out = [(scale * piece).reshape(leaf.shape).astype(leaf.dtype) for piece, leaf, scale in zip(pieces, leaves, scales)]
    return jax.tree_util.tree_unflatten(treedef, out)


def _init_layers(key, widths, use_bias, init_std, dtype):
    def build():
        keys = jax.random.split(jax.random.key(0), len(widths) - 1)
        return tuple(
            Linear(fan_in, fan_out, use_bias=use_bias, key=k, dtype=dtype)
            for k, fan_in, fan_out in zip(keys, widths[:-1], widths[1:])
        )

    abstract = eqx.filter_eval_shape(build)
    scales = []
    for layer in abstract:
        fan_in = layer.weight.shape[1]
        if init_std is None:  # Equinox's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for W and b
            scales += [fan_in**-0.5] * (2 if use_bias else 1)
        else:  # DeepOBS: truncated normal weights, zero biases
            scales += [init_std] + ([0.0] if use_bias else [])
    return fill_leaves(abstract, key, scales, truncated=init_std is not None)


class MLP(eqx.Module):
    """Fully connected ReLU network ``widths[0] -> ... -> widths[-1]`` (logits).

    Inputs of any shape are flattened per example, so ``(28, 28)`` images work.
    All leaves are arrays, so the model itself is the ``params`` pytree.

    **Arguments:**

    - `widths`: layer widths including input and output, e.g. ``(784, 100, 10)``.
    - `key`: a ``jax.random`` key.
    - `use_bias`: whether the layers have biases.
    - `init_std`: if given, weights are drawn from a normal truncated at two
      standard deviations with this std and biases are zero (DeepOBS'
      ``mnist_mlp`` uses ``3e-2``); otherwise Equinox's default uniform init.
    - `dtype`: parameter dtype (default: JAX's default float).
    """

    layers: tuple[Linear, ...]
    activation: Callable = eqx.field(static=True)

    def __init__(
        self,
        widths: Sequence[int],
        *,
        key: jax.Array,
        use_bias: bool = True,
        init_std: float | None = None,
        activation: Callable = jax.nn.relu,
        dtype=None,
    ):
        widths = tuple(int(w) for w in widths)
        if len(widths) < 2 or min(widths) < 1:
            raise ValueError(f"`widths` must list at least two positive sizes; got {widths}.")
        layers = _init_layers(key, widths, use_bias, init_std, dtype)
        self.layers = layers
        self.activation = activation

    @classmethod
    def deepobs_mnist_mlp(cls, key: jax.Array, *, dtype=None) -> "MLP":
        """DeepOBS ``mnist_mlp``: 784-1000-500-100-10, truncated-normal(0.03) init."""
        return cls((784, 1000, 500, 100, 10), key=key, init_std=3e-2, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits of one example, shape ``(widths[-1],)``."""
        x = jnp.ravel(x)
        for layer in self.layers[:-1]:
            x = self.activation(layer(x))
        return self.layers[-1](x)
