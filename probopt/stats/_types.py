"""The record of per-example statistics that every probopt optimizer consumes."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax


class BatchStats(NamedTuple):
    r"""Per-example statistics of one minibatch, all reduced (never ``B x P``).

    Conventions (``n`` is the batch size, $\ell_i$, $g_i$, $h_i$ the
    per-example loss, gradient and Hessian-vector product $H_i\delta$):

    - ``*_mean`` fields are sample means $\frac1n\sum_i x_i$.
    - ``*_sq_sum`` fields are per-parameter sums of squares $\sum_i x_i^2$.
    - ``*_var`` fields are the **per-example** sample variances
      $\frac{1}{n-1}\sum_i (x_i-\bar x)^2$ (unbiased).  The variance of the
      *mean*, which Meka's observation noise needs, is ``var / n``.  For
      ``n == 1`` the sample variance is undefined and is reported as ``0``;
      the filters then fall back to their documented noise floors.
    - ``*_var_mean`` fields are the average of the per-parameter variance over
      all $D$ coordinates, the scalar that Meka uses for $\Sigma=\sigma I$.

    **Attributes:**

    - ``batch_size``: ``n``, shape ``()``.
    - ``loss_mean``, ``loss_var``: shape ``()``.
    - ``grad_mean``: pytree like ``params``.
    - ``grad_sq_sum``, ``grad_var``: pytrees like ``params``, or ``None`` when
      only scalar statistics were requested.
    - ``grad_var_mean``: shape ``()``.
    - ``hvp_mean``: $\frac1n\sum_i H_i\delta$, pytree like ``params``, or
      ``None`` without a ``direction``.
    - ``hvp_sq_sum``, ``hvp_var``: like the gradient fields, or ``None``.
    - ``hvp_var_mean``: shape ``()``, or ``None`` without a ``direction``.
    """

    batch_size: jax.Array
    loss_mean: jax.Array
    loss_var: jax.Array
    grad_mean: Any
    grad_sq_sum: Any
    grad_var: Any
    grad_var_mean: jax.Array
    hvp_mean: Any = None
    hvp_sq_sum: Any = None
    hvp_var: Any = None
    hvp_var_mean: Any = None
