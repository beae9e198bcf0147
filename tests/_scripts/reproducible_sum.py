r"""Prototype: a sum whose result does not depend on how the terms are grouped.

Proposed for ``probopt/stats/_moments.py`` (see ``docs/reliability.md``,
"Data parallel"); used by ``sharded_step.py --deterministic`` to show that it
makes sharded and unsharded batch statistics bit-identical.

Floating-point addition is not associative, so a batch sum reduced as four
per-device partial sums plus an all-reduce rounds differently from one
sequential sum.  Pre-rounding (Demmel & Nguyen, *Fast Reproducible
Floating-Point Summation*, ARITH 2013; the idea behind ReproBLAS) removes the
dependence: with $M = \max_i |x_i|$ (a max is exact in any order) and
$\sigma = 1.5\cdot 2^K$, $2^{K-1} > nM$, every

$$q_i = (\sigma + x_i) - \sigma$$

is $x_i$ rounded to a multiple of $\operatorname{ulp}(\sigma)$, and
$\sum_i q_i$ is **exact** in every order (all partial sums are multiples of
$\operatorname{ulp}(\sigma)$ below $2^{K+1}$).  The remainders
$r_i = x_i - q_i$ are exact too and are summed the same way, ``folds`` times;
the fold sums are then added in a fixed order.  Cost: ``folds`` extra max-
and sum-reductions (each an all-reduce under sharding).
"""

from __future__ import annotations

import jax.numpy as jnp


def reproducible_sum(x, axis: int = 0, folds: int = 2):
    """Sum of ``x`` over ``axis``, bit-identical for any grouping or order of the terms.

    **Arguments:**

    - ``x``: floating array.
    - ``axis``: the axis to reduce (the batch axis).
    - ``folds``: number of pre-rounding passes; each captures about
      ``nmant - log2(n) - 2`` bits, so 2 is ample in float32 and float64.

    **Returns:** the sum, shape ``x.shape`` without ``axis``.  Non-finite
    terms propagate (the result is NaN/inf).  Terms near the dtype's maximum
    overflow $\\sigma$; keep $n\\max|x| < \\text{finfo.max}/4$.
    """
    x = jnp.asarray(x)
    n = x.shape[axis]
    headroom = max(int(n - 1).bit_length(), 0) + 2
    remainder = x
    fold_sums = []
    for _ in range(folds):
        largest = jnp.max(jnp.abs(remainder), axis=axis, keepdims=True)
        _, exponent = jnp.frexp(largest)  # largest < 2**exponent
        sigma = 1.5 * jnp.ldexp(jnp.ones_like(largest), exponent + headroom)
        high = (sigma + remainder) - sigma
        fold_sums.append(jnp.sum(high, axis=axis))
        remainder = remainder - high
    total = fold_sums[-1]
    for partial in reversed(fold_sums[:-1]):
        total = partial + total
    return total


def reproducible_chunk_moments(stacked: list, per_coordinate: bool):
    """Drop-in for ``probopt.stats._moments.chunk_moments`` using `reproducible_sum`."""
    from probopt.stats._moments import Moments

    count = jnp.asarray(stacked[0].shape[0], dtype=jnp.result_type(stacked[0]))
    mean = [reproducible_sum(x, axis=0) / count for x in stacked]
    sq_dev = [reproducible_sum((x - m) ** 2, axis=0) for x, m in zip(stacked, mean)]
    m2 = sq_dev if per_coordinate else [jnp.sum(s) for s in sq_dev]
    return Moments(count, mean, m2)
