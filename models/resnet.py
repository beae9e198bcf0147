r"""ResNet-32 for 32×32 images with GroupNorm instead of BatchNorm (He et al. 2016, Sec. 4.2).

The CIFAR-style ResNet-$(6n+2)$: a 3×3 convolution to 16 channels, three
stages of $n$ basic blocks with 16, 32 and 64 channels (the first block of
stages 2 and 3 halves the resolution with stride 2), global average pooling
and a linear classifier.  $n = 5$ gives ResNet-32 with 464,154 parameters,
the "0.46M" of He et al.'s Table 6.

Differences from the original, both deliberate:

- **GroupNorm** (Wu & He 2018) replaces BatchNorm, as in the Meka paper:
  BatchNorm normalises each example with statistics of the whole batch, so
  example $i$'s loss depends on examples $j \ne i$ and per-example gradients
  (and their variance, which Meka filters on) stop being those of independent
  examples.  GroupNorm normalises each example on its own.  Its affine
  parameters have the same count as BatchNorm's.
- Shortcuts that change shape use He et al.'s **option A** (strided identity,
  zero-padded channels), so they add no parameters.

The model maps one image ``(3, 32, 32)`` (channel-first, no batch axis) to
``(num_classes,)`` logits; use ``jax.vmap`` (or
[`cross_entropy_per_example`][models.losses.cross_entropy_per_example]) for
batches.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

__all__ = ["ResNet", "resnet32", "BasicBlock"]


class BasicBlock(eqx.Module):
    """Two 3×3 convolutions with GroupNorm and an option-A shortcut.

    **Arguments:**

    - ``in_channels``, ``out_channels``: channel counts.
    - ``stride``: 1, or 2 to halve the resolution.
    - ``groups``: GroupNorm groups (must divide ``out_channels``).
    - ``key``: PRNG key.
    """

    conv1: eqx.nn.Conv2d
    norm1: eqx.nn.GroupNorm
    conv2: eqx.nn.Conv2d
    norm2: eqx.nn.GroupNorm
    stride: int = eqx.field(static=True)
    extra_channels: int = eqx.field(static=True)

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int, *, key: jax.Array):
        if out_channels % groups:
            raise ValueError(f"`groups` ({groups}) must divide the channel count {out_channels}.")
        if out_channels < in_channels:
            raise ValueError("`out_channels` must be at least `in_channels` for an option-A shortcut.")
        k1, k2 = jax.random.split(key)
        self.conv1 = eqx.nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, use_bias=False, key=k1)
        self.norm1 = eqx.nn.GroupNorm(groups, out_channels)
        self.conv2 = eqx.nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, use_bias=False, key=k2)
        self.norm2 = eqx.nn.GroupNorm(groups, out_channels)
        self.stride = int(stride)
        self.extra_channels = int(out_channels - in_channels)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x``: ``(C_in, H, W)`` -> ``(C_out, H / stride, W / stride)``."""
        y = jax.nn.relu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        shortcut = x[:, :: self.stride, :: self.stride]
        if self.extra_channels:
            half = self.extra_channels // 2
            shortcut = jnp.pad(shortcut, ((half, self.extra_channels - half), (0, 0), (0, 0)))
        return jax.nn.relu(y + shortcut)


class ResNet(eqx.Module):
    r"""CIFAR-style ResNet-$(6n+2)$ with GroupNorm.

    **Arguments:**

    - ``blocks_per_stage``: $n$ (5 for ResNet-32).
    - ``num_classes``: output size (10).
    - ``in_channels``: input channels (3).
    - ``widths``: channels of the three stages (``(16, 32, 64)``).
    - ``groups``: GroupNorm groups in every norm layer (8).
    - ``key``: PRNG key.
    """

    stem: eqx.nn.Conv2d
    stem_norm: eqx.nn.GroupNorm
    blocks: tuple
    head: eqx.nn.Linear

    def __init__(
        self,
        blocks_per_stage: int = 5,
        num_classes: int = 10,
        in_channels: int = 3,
        widths: tuple[int, int, int] = (16, 32, 64),
        groups: int = 8,
        *,
        key: jax.Array,
    ):
        if blocks_per_stage < 1:
            raise ValueError(f"`blocks_per_stage` must be >= 1; got {blocks_per_stage}.")
        keys = jax.random.split(key, 3 * blocks_per_stage + 2)
        self.stem = eqx.nn.Conv2d(in_channels, widths[0], 3, padding=1, use_bias=False, key=keys[0])
        self.stem_norm = eqx.nn.GroupNorm(groups, widths[0])
        blocks = []
        channels = widths[0]
        for stage, width in enumerate(widths):
            for i in range(blocks_per_stage):
                stride = 2 if (stage > 0 and i == 0) else 1
                blocks.append(BasicBlock(channels, width, stride, groups, key=keys[1 + len(blocks)]))
                channels = width
        self.blocks = tuple(blocks)
        self.head = eqx.nn.Linear(channels, num_classes, key=keys[-1])

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x``: one image ``(C, H, W)`` -> logits ``(num_classes,)``."""
        y = jax.nn.relu(self.stem_norm(self.stem(x)))
        for block in self.blocks:
            y = block(y)
        return self.head(jnp.mean(y, axis=(1, 2)))


def resnet32(num_classes: int = 10, *, groups: int = 8, key: jax.Array) -> ResNet:
    """ResNet-32 (``blocks_per_stage=5``) for ``(3, 32, 32)`` inputs; 464,154 parameters for 10 classes."""
    return ResNet(5, num_classes, 3, (16, 32, 64), groups, key=key)
