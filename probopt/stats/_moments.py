"""Running moments (count, mean, sum of squared deviations) and their merge.

Per-example quantities are reduced chunk by chunk.  Each chunk gives its own
mean and sum of squared deviations about that mean ($M_2$), computed in two
passes inside the chunk, and chunks are merged with the pairwise update of
Chan, Golub & LeVeque (1979):

$$
n = n_a + n_b,\\quad \\delta = \\bar x_b - \\bar x_a,\\quad
\\bar x = \\bar x_a + \\delta\\,\\frac{n_b}{n},\\quad
M_2 = M_{2,a} + M_{2,b} + \\delta^2\\,\\frac{n_a n_b}{n}.
$$

This never forms $\\sum x^2 - n\\bar x^2$, so it keeps its accuracy in float32
when the mean is large compared with the spread.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ._reproducible_sum import reproducible_sum


class Moments(NamedTuple):
    """Moments of a list of per-example arrays.

    - ``count``: number of examples, a float array of shape ``()``.
    - ``mean``: list of arrays, one per leaf, without the example axis.
    - ``m2``: list of arrays like ``mean`` (per-coordinate $M_2$), or of shape
      ``()`` arrays (the $M_2$ summed over the coordinates of each leaf) when
      only scalar statistics are wanted.
    """

    count: jax.Array
    mean: list
    m2: list


def chunk_moments(stacked: list, per_coordinate: bool, reproducible: bool = False) -> Moments:
    """Two-pass moments of arrays stacked along axis 0.

    With ``reproducible``, both batch-axis sums use `reproducible_sum`, so
    the result has the same bits however the axis is split across devices.
    """
    count = jnp.asarray(stacked[0].shape[0], dtype=jnp.result_type(stacked[0]))
    if reproducible:
        mean = [reproducible_sum(x, axis=0) / count for x in stacked]
        sq_dev = [reproducible_sum((x - m) ** 2, axis=0) for x, m in zip(stacked, mean)]
    else:
        mean = [jnp.mean(x, axis=0) for x in stacked]
        sq_dev = [jnp.sum((x - m) ** 2, axis=0) for x, m in zip(stacked, mean)]
    m2 = sq_dev if per_coordinate else [jnp.sum(s) for s in sq_dev]
    return Moments(count, mean, m2)


def merge_moments(a: Moments, b: Moments) -> Moments:
    """Chan's pairwise merge; ``a.count`` may be zero (an empty accumulator)."""
    count = a.count + b.count
    weight_b = b.count / count
    cross = a.count * b.count / count
    mean, m2 = [], []
    for mean_a, mean_b, m2_a, m2_b in zip(a.mean, b.mean, a.m2, b.m2):
        delta = mean_b - mean_a
        mean.append(mean_a + delta * weight_b)
        spread = delta**2 if jnp.ndim(m2_a) == jnp.ndim(delta) else jnp.sum(delta**2)
        m2.append(m2_a + m2_b + spread * cross)
    return Moments(count, mean, m2)


def sample_variance(m2: Any, n: int) -> Any:
    """$M_2/(n-1)$, clamped at zero; exactly zero when ``n == 1`` (undefined variance)."""
    if n <= 1:
        return jnp.zeros_like(m2)
    return jnp.maximum(m2, 0) / (n - 1)
