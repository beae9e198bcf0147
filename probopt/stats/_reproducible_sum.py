r"""A sum over the batch axis whose bits do not depend on how the terms are grouped.

Floating-point addition is not associative, so a batch sum reduced as
per-device partial sums plus an all-reduce (data-parallel sharding) rounds
differently from one sum on one device.  Pre-rounding (Demmel & Nguyen,
*Fast Reproducible Floating-Point Summation*, ARITH 2013; the idea behind
ReproBLAS) removes that dependence.  With $M = \max_i |x_i|$ (a max is exact
in any order), $M < 2^e$, and $\sigma = 1.5\cdot 2^{e+h}$ with $2^h \ge 4n$,

$$q_i = (\sigma + x_i) - \sigma$$

is $x_i$ rounded to a multiple of $\operatorname{ulp}(\sigma)$; every partial
sum of the $q_i$ is a multiple of $\operatorname{ulp}(\sigma)$ below
$2^{e+h+1}$, hence exact, so $\sum_i q_i$ is the same in every order.  The
remainders $r_i = x_i - q_i$ are exact too and are summed the same way on the
next *fold*; the fold sums are added in a fixed order.  Each fold captures
about $p - 1 - h$ bits of the largest term ($p$ = the dtype's significand
bits), so enough folds are taken for $p + 2$ bits.  Cost per fold: one
max- and one sum-reduction (each an all-reduce under sharding).
"""

from __future__ import annotations

import math

import jax.numpy as jnp


def default_folds(n: int, dtype) -> int:
    """Folds needed for ``n`` terms of ``dtype``: enough for ``nmant + 3`` bits, at least 2."""
    bits = jnp.finfo(dtype).nmant + 1  # significand bits, with the implicit one
    headroom = max(int(n - 1).bit_length(), 0) + 2
    per_fold = bits - 1 - headroom
    if per_fold < 1:
        raise ValueError(f"reproducible_sum: {n} terms are too many for {jnp.dtype(dtype).name}.")
    return max(2, math.ceil((bits + 2) / per_fold))


def reproducible_sum(x, axis: int = 0, folds: int | None = None):
    """Sum of ``x`` over ``axis``, bit-identical for any grouping or order of the terms.

    **Arguments:**

    - `x`: floating array.
    - `axis`: the axis to reduce (the batch axis).
    - `folds`: number of pre-rounding passes (``None``: `default_folds`, 2 for
      float64 and for float32 up to a few hundred terms).

    **Returns:** the sum, shape ``x.shape`` without ``axis``, dtype of ``x``;
    within about one rounding of the exact sum.  Non-finite terms propagate
    (NaN/inf).  If $\\sigma$ overflows (terms within a factor ~$8n$ of the
    dtype's maximum) that column falls back to a plain, order-dependent sum
    rather than returning NaN.
    """
    x = jnp.asarray(x)
    n = x.shape[axis]
    folds = default_folds(n, x.dtype) if folds is None else int(folds)
    headroom = max(int(n - 1).bit_length(), 0) + 2
    remainder = x
    fold_sums = []
    for _ in range(folds):
        largest = jnp.max(jnp.abs(remainder), axis=axis, keepdims=True)
        _, exponent = jnp.frexp(largest)  # largest < 2**exponent
        sigma = 1.5 * jnp.ldexp(jnp.ones_like(largest), exponent + headroom)
        # An overflowing sigma would turn the column into NaN; keep it finite
        # (and order-dependent) instead by taking the whole remainder here.
        high = jnp.where(jnp.isfinite(sigma), (sigma + remainder) - sigma, remainder)
        fold_sums.append(jnp.sum(high, axis=axis))
        remainder = remainder - high
    total = fold_sums[-1]
    for partial in reversed(fold_sums[:-1]):
        total = partial + total
    return total
