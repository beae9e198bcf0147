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
from .mlp import cross_entropy as cross_entropy


def _glorot(layer, key):
    """Glorot-uniform weights (fans include the receptive field) and zero bias."""
    shape = layer.weight.shape
    receptive = 1
    for size in shape[2:]:
        receptive *= size
    fan_out, fan_in = shape[0] * receptive, shape[1] * receptive
    limit = (6.0 / (fan_in + fan_out)) ** 0.5
    weight = jax.random.uniform(key, shape, layer.weight.dtype, -limit, limit)
    layer = eqx.tree_at(lambda l: l.weight, layer, weight)
    if layer.bias is not None:
        layer = eqx.tree_at(lambda l: l.bias, layer, jnp.zeros_like(layer.bias))
    return layer


def _max_pool(x: jax.Array) -> jax.Array:
    """3x3 max-pool, stride 2, TensorFlow ``SAME`` padding, on ``(C, H, W)``."""
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3), (1, 2, 2), "SAME")


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
        k = jax.random.split(key, 12)
        conv = lambda i, cin, cout, size, padding: _glorot(  # noqa: E731
            Conv2d(cin, cout, size, padding=padding, use_bias=use_bias, key=k[2 * i], dtype=dtype), k[2 * i + 1]
        )
        dense = lambda i, fin, fout: _glorot(  # noqa: E731
            Linear(fin, fout, use_bias=use_bias, key=k[2 * i], dtype=dtype), k[2 * i + 1]
        )
        self.conv1 = conv(0, 3, 64, 5, "VALID")
        self.conv2 = conv(1, 64, 96, 3, "VALID")
        self.conv3 = conv(2, 96, 128, 3, "SAME")
        self.fc1 = dense(3, 3 * 3 * 128, 512)
        self.fc2 = dense(4, 512, 256)
        self.fc3 = dense(5, 256, num_classes)
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
