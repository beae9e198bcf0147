"""DeepOBS' ``3c3d`` convolutional network, built from instrumented layers.

Architecture (Schneider et al., 2019, DeepOBS; also the CIFAR-10 model of the
Meka paper): conv 5x5/64 valid, conv 3x3/96 valid, conv 3x3/128 same, each
followed by ReLU and a 3x3 stride-2 max-pool with TensorFlow ``SAME``
padding; then dense 512 and 256 with ReLU, then 10 logits; 895,210
parameters.  Weights use Glorot-uniform initialisation and biases zero, as in
DeepOBS.  Layers are [`probopt.stats.Conv2d`][probopt.stats.Conv2d] and
[`probopt.stats.Linear`][probopt.stats.Linear], so
[`batch_stats`][probopt.stats.batch_stats] takes its fast path.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from probopt.stats import Conv2d, Linear

from .mlp import accuracy as accuracy
from .mlp import fill_leaves
from .mlp import cross_entropy as cross_entropy


def _glorot_limit(weight) -> float:
    """Glorot-uniform limit $\\sqrt{6/(\\text{fan-in}+\\text{fan-out})}$, fans including the receptive field."""
    receptive = 1
    for size in weight.shape[2:]:
        receptive *= size
    fan_out, fan_in = weight.shape[0] * receptive, weight.shape[1] * receptive
    return (6.0 / (fan_in + fan_out)) ** 0.5


def _max_pool(x: jax.Array) -> jax.Array:
    """3x3 max-pool, stride 2, TensorFlow ``SAME`` padding, on ``(C, H, W)``."""
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3), (1, 2, 2), "SAME")


def _init_layers(key, num_classes, use_bias, dtype):
    def build():
        k = jax.random.split(jax.random.key(0), 6)
        return (
            Conv2d(3, 64, 5, padding="VALID", use_bias=use_bias, key=k[0], dtype=dtype),
            Conv2d(64, 96, 3, padding="VALID", use_bias=use_bias, key=k[1], dtype=dtype),
            Conv2d(96, 128, 3, padding="SAME", use_bias=use_bias, key=k[2], dtype=dtype),
            Linear(3 * 3 * 128, 512, use_bias=use_bias, key=k[3], dtype=dtype),
            Linear(512, 256, use_bias=use_bias, key=k[4], dtype=dtype),
            Linear(256, num_classes, use_bias=use_bias, key=k[5], dtype=dtype),
        )

    abstract = eqx.filter_eval_shape(build)
    scales = []
    for layer in abstract:  # Glorot-uniform weights, zero biases (DeepOBS)
        scales += [_glorot_limit(layer.weight)] + ([0.0] if use_bias else [])
    return fill_leaves(abstract, key, scales)


class CNN3c3d(eqx.Module):
    """DeepOBS ``cifar10_3c3d`` network for ``(32, 32, 3)`` images (channels last).

    **Arguments:**

    - `key`: a ``jax.random`` key.
    - `num_classes`: number of logits (10 for CIFAR-10, 100 for CIFAR-100).
    - `use_bias`: whether the layers have biases.
    - `dtype`: parameter dtype (default: JAX's default float).

    Call on one image of shape ``(32, 32, 3)`` (or ``(3, 32, 32)`` with
    ``channels_last=False``); returns logits of shape ``(num_classes,)``.
    """

    conv1: Conv2d
    conv2: Conv2d
    conv3: Conv2d
    fc1: Linear
    fc2: Linear
    fc3: Linear
    channels_last: bool = eqx.field(static=True)

    def __init__(self, *, key: jax.Array, num_classes: int = 10, use_bias: bool = True, channels_last: bool = True, dtype=None):
        self.conv1, self.conv2, self.conv3, self.fc1, self.fc2, self.fc3 = _init_layers(key, num_classes, use_bias, dtype)
        self.channels_last = channels_last

    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits of one image."""
        if self.channels_last:
            x = jnp.transpose(x, (2, 0, 1))
        x = _max_pool(jax.nn.relu(self.conv1(x)))  # 64 x 14 x 14
        x = _max_pool(jax.nn.relu(self.conv2(x)))  # 96 x 6 x 6
        x = _max_pool(jax.nn.relu(self.conv3(x)))  # 128 x 3 x 3
        x = jnp.ravel(x)
        x = jax.nn.relu(self.fc1(x))
        x = jax.nn.relu(self.fc2(x))
        return self.fc3(x)
