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
        keys = jax.random.split(key, 2 * (len(widths) - 1))
        layers = []
        for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
            layer = Linear(fan_in, fan_out, use_bias=use_bias, key=keys[2 * i], dtype=dtype)
            if init_std is not None:
                weight = init_std * jax.random.truncated_normal(keys[2 * i + 1], -2.0, 2.0, layer.weight.shape, layer.weight.dtype)
                layer = eqx.tree_at(lambda l: l.weight, layer, weight)
                if use_bias:
                    layer = eqx.tree_at(lambda l: l.bias, layer, jnp.zeros_like(layer.bias))
            layers.append(layer)
        self.layers = tuple(layers)
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
