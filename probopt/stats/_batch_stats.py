"""``batch_stats``: one pass for per-example loss, gradient and HVP moments."""

from __future__ import annotations

import warnings
from typing import Any, Callable

import equinox as eqx
import jax
import jax.numpy as jnp

from .._validation import check_bool, check_positive_int, check_same_structure
from ._fast import FastPlan, discover, fast_pass
from ._generic import batch_size_of, centred_square_sums, check_per_example_loss, generic_moments
from ._moments import sample_variance
from ._types import BatchStats

_METHODS = ("auto", "generic", "fast")


class GenericPathWarning(UserWarning):
    """``batch_stats(method="auto")`` sends some leaves of ``params`` through the slow generic path.

    Emitted once per traced call (i.e. once per compilation of a jitted step),
    never for ``method="generic"``.  Silence it with
    ``warnings.filterwarnings("ignore", category=GenericPathWarning)`` or by
    passing ``method="generic"`` explicitly.
    """


_SUPPORTED_LAYERS = "Linear, Conv1d, Conv2d, LayerNorm, GroupNorm, Embedding"


def _warn_generic(names: list[str], num_leaves: int) -> None:
    """Tell the user which leaves go generic, what it costs and how to avoid it."""
    shown = ", ".join(names[:10]) + (f", ... ({len(names) - 10} more)" if len(names) > 10 else "")
    warnings.warn(
        f"batch_stats(method='auto'): {len(names)} of {num_leaves} leaves of `params` take the generic "
        f"per-example path (vmap of per-example gradients, typically ~10-500x the cost of one "
        f"gradient): {shown}. They are not owned exclusively by an instrumented layer called under "
        "one jax.vmap over examples (or are also used elsewhere in the loss, e.g. a penalty or a tied "
        "weight). Fix: build the model from probopt.stats layers or pass it through "
        f"probopt.stats.instrument(model) (supported: {_SUPPORTED_LAYERS}); pass method='generic' "
        "to accept the generic path silently.",
        GenericPathWarning,
        stacklevel=2,
    )


def _check_params(params: Any, name: str) -> None:
    leaves = jax.tree_util.tree_leaves_with_path(params)
    if not leaves:
        raise ValueError(f"`{name}` has no array leaves to differentiate.")
    for path, leaf in leaves:
        if not (hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.inexact)):
            raise TypeError(
                f"`{name}` leaf {jax.tree_util.keystr(path)} must be a floating-point array, got "
                f"{type(leaf).__name__}; split non-trainable parts off first, e.g. with "
                "`equinox.partition(model, equinox.is_inexact_array)`."
            )


# Fast-path cancellation guard.  Computed in floating point, sum_i x_i^2 - n mean^2
# carries an absolute error of at most about 3 n eps sum_i x_i^2 (both terms are
# sums of n terms).  Where the result is below _CANCELLATION_FACTOR times that
# bound, i.e. M2 < 64 n eps sum_i x_i^2, it could be off by more than ~5%, so
# the variances of the covered leaves are recomputed as sum_i (x_i - mean)^2 from
# per-example gradients about the (accurate) fast means: a two-pass variance.
_CANCELLATION_FACTOR = 64
# Chunk size of that fallback when the caller gave none.  XLA reserves memory
# for the branch even when it is not taken, so it goes one example at a time
# (about two parameter-sized arrays per quantity, not n of them: the running
# sums and one example's gradient); it is rare, so its speed is not.
_FALLBACK_CHUNK = 1


def _cancels(m2: jax.Array, sq_sum: jax.Array, n: int) -> jax.Array:
    """Whether any coordinate of ``sq_sum - n mean^2`` may have lost its relative accuracy."""
    eps = jnp.finfo(jnp.result_type(sq_sum)).eps
    return jnp.any(m2 < _CANCELLATION_FACTOR * n * eps * sq_sum)


def _uncovered_names(params: Any, plan: FastPlan) -> list[str]:
    covered = set(plan.covered)
    paths = jax.tree_util.tree_leaves_with_path(params)
    return [jax.tree_util.keystr(path) for i, (path, _) in enumerate(paths) if i not in covered]


def batch_stats(
    per_example_loss: Callable[[Any, Any], jax.Array],
    params: Any,
    batch: Any,
    *,
    direction: Any = None,
    chunk_size: int | None = None,
    method: str = "auto",
    per_parameter: bool = True,
    reproducible: bool = False,
) -> BatchStats:
    r"""Per-example loss, gradient and Hessian-vector-product moments of a minibatch.

    With $\ell_i(\theta)$ the loss of example $i$, $g_i=\nabla\ell_i$ and
    $h_i = H_i\delta = \nabla^2\ell_i\,\delta$, this returns (all in one pass)

    - ``loss_mean`` $=\frac1n\sum_i\ell_i$, ``loss_var`` $=\frac1{n-1}\sum_i(\ell_i-\bar\ell)^2$;
    - ``grad_mean`` $=\bar g=\frac1n\sum_i g_i$ (the minibatch gradient);
    - ``grad_sq_sum`` $=\sum_i g_i^2$ and ``grad_var`` $=\frac1{n-1}\sum_i(g_i-\bar g)^2$,
      per parameter;
    - ``grad_var_mean`` $=\frac1D\sum_{j=1}^D$ ``grad_var``$_j$, the scalar
      per-example variance averaged over all $D$ coordinates;
    - with ``direction``: ``hvp_mean`` $=\frac1n\sum_i h_i = H\delta$ and
      ``hvp_sq_sum``, ``hvp_var``, ``hvp_var_mean`` defined like the gradient ones.

    **Conventions.** Variances are of a *single example* (unbiased, divisor
    $n-1$); the variance of the minibatch mean, e.g. Meka's observation
    noise, is ``var / n``.  For ``n == 1`` the sample variance is undefined and
    every ``*_var`` field is reported as exactly ``0`` (never NaN); consumers
    then rely on their own documented noise floors.  All statistics are sums
    or means over the batch axis, so under data-parallel sharding XLA reduces
    them across devices.

    **Paths.**

    - *Fast* (``method="fast"``, or ``"auto"`` when the model has instrumented
      layers): layers from [`probopt.stats`][probopt.stats.instrument]
      (``Linear``, ``Conv1d``/``Conv2d``, ``LayerNorm``, ``GroupNorm``,
      ``Embedding``) reduce closed-form per-example factors; cost about one
      gradient (two with ``direction``) plus a few matmuls, memory
      $O(n\cdot\text{widths})$.  Leaves of ``params`` that no instrumented
      layer owns (other layers, free parameters, tied weights) are handled by
      the generic path **for those leaves only**, in the same call.  The fast
      path needs every $\ell_i$ to depend on example $i$ only (no BatchNorm),
      the model to be mapped over examples by one ``jax.vmap`` inside
      ``per_example_loss``, and an instrumented layer's parameters not to be
      used outside that layer.  Variances come from
      $M_2=\sum_i g_i^2-n\bar g^2$ clamped at $0$, which cancels when
      $|\bar g|$ dwarfs the spread (float32 gradients $10^3\pm0.1$).  Its
      rounding error is at most about $3n\epsilon\sum_i g_i^2$, so wherever
      $M_2 < 64\,n\,\epsilon\sum_i g_i^2$ in some coordinate ($\epsilon$ the
      dtype's machine epsilon; the total over coordinates when
      ``per_parameter=False``; same rule for the HVPs) the statistics of
      every covered leaf are recomputed under ``lax.cond`` as
      $\sum_i (g_i-\bar g)^2$ from per-example gradients about the fast
      (accurate) means, one example at a time (``chunk_size`` examples if
      given): a two-pass variance, with no cancellation.  Accepted fast
      values are thus within about 5% (in practice far better), and the
      usual cost is one comparison per leaf; the fallback's working memory
      (the running sums plus one example's gradient, about two
      parameter-sized arrays per quantity) is reserved even when not taken,
      and under ``jax.vmap`` with a batched predicate both branches run.
    - *Generic* (``method="generic"``, or ``"auto"`` without instrumented
      layers): ``vmap`` over examples of ``jvp(value_and_grad)``, in chunks of
      ``chunk_size`` examples reduced by ``lax.fori_loop`` with Chan's stable
      merge; memory $O(\text{chunk\_size}\cdot P)$, any JAX function.

    **Arguments:**

    - `per_example_loss`: ``per_example_loss(params, batch) -> losses`` of shape
      ``(n,)``, one loss per example (not their mean).
    - `params`: pytree of floating-point arrays (e.g. an Equinox model whose
      leaves are all arrays).
    - `batch`: pytree of arrays sharing a leading batch axis of size ``n``.
    - `direction`: optional pytree like ``params``, the vector $\delta$ of the HVPs.
    - `chunk_size`: examples per chunk of the generic path and of the fast
      path's fallback (``None``: all at once on the generic path, one at a
      time in the fallback).  Bounds their memory; does not change the result
      beyond rounding.
    - `method`: ``"auto"``, ``"fast"`` (raise ``ValueError`` if some leaf of
      ``params`` is not owned by an instrumented layer) or ``"generic"``.
    - `per_parameter`: if ``False``, only the scalar ``*_var_mean`` fields are
      computed and ``grad_sq_sum``, ``grad_var``, ``hvp_sq_sum``, ``hvp_var``
      are ``None`` (cheaper: the fast path then needs only per-example norms).
    - `reproducible`: if ``True``, the generic path's sums over examples
      (means and squared deviations of each chunk) are order-independent
      (Demmel & Nguyen pre-rounding), so its statistics are **bit-identical**
      whether the batch lives on one device or is sharded over many (and for
      any order of the examples within a chunk).  Costs 1.2-3x the generic
      path's time (extra max/sum passes over the per-example arrays), hence
      off by default; without it sharded results differ in the last bit or
      two.  The fast path's sums (matrix products inside backpropagation)
      are not affected and stay within a few ulps across shardings.

    **Returns:** a [`BatchStats`][probopt.stats.BatchStats] whose arrays have the
    dtype of ``params``.

    **Raises:** ``ValueError`` if the loss is not per-example (e.g. returns a
    scalar), the batch leaves disagree on their size, ``direction`` does not
    match ``params``, ``chunk_size`` is not positive or ``method`` is unknown;
    ``TypeError`` if a leaf of ``params`` is not a floating-point array.

    References: Demmel & Nguyen (2013), *Fast reproducible floating-point
    summation*, ARITH 21; Goodfellow (2015), *Efficient per-example gradient
    computations*, arXiv:1510.01799; Dangel et al. (2020), *BackPACK*,
    arXiv:1912.10985; Chan, Golub & LeVeque (1979), *Updating formulae and a
    pairwise algorithm for computing sample variances*.
    """
    if method not in _METHODS:
        raise ValueError(f"`method` must be one of {_METHODS}; got {method!r}.")
    if chunk_size is not None:
        chunk_size = check_positive_int(chunk_size, "chunk_size")  # NumPy integers too
    per_parameter = check_bool(per_parameter, "per_parameter")
    _check_params(params, "params")
    if direction is not None:
        check_same_structure(params, direction, "params", "direction")
    n = batch_size_of(batch)
    return _batch_stats_jit(
        per_example_loss, params, batch, direction, chunk_size, method, per_parameter, n, bool(reproducible)
    )


class _Accumulated:
    """Per-leaf mean, sum of squares and sample variance of one per-example quantity.

    Also holds ``m2_total``, the $M_2$ summed over every coordinate, from which
    the scalar ``*_var_mean`` field follows.  ``sq_sum`` and ``var`` stay
    ``None`` in scalar-only mode.
    """

    def __init__(self, num_leaves: int, dtype: Any):
        self.mean: list = [None] * num_leaves
        self.sq_sum: list = [None] * num_leaves
        self.var: list = [None] * num_leaves
        self.m2_total = jnp.zeros((), dtype)

    def add_moments(self, indices, moments, n: int, per_parameter: bool, *, with_mean: bool) -> None:
        """Take the leaves ``indices`` from generic-path `Moments` (one entry per index)."""
        for k, j in enumerate(indices):
            if with_mean:
                self.mean[j] = moments.mean[k]
            m2 = moments.m2[k]
            self.m2_total = self.m2_total + jnp.sum(m2)
            if per_parameter:
                self.sq_sum[j] = m2 + n * moments.mean[k] ** 2
                self.var[j] = sample_variance(m2, n)


def _fast_moments(
    per_example_loss, params, batch, n, plan, direction, chunk_size, per_parameter, reproducible, grad, hvp, dtype
):
    """Fill ``grad`` and ``hvp`` (`_Accumulated`) for the covered leaves; return the loss mean and M2.

    One instrumented pass gives the means and sums of squares; the variances
    are ``sum x^2 - n mean^2`` unless that may have cancelled (`_cancels`), in
    which case a two-pass recomputation about the same means replaces them.
    """
    covered = list(plan.covered)
    with_hvp = direction is not None
    fast = fast_pass(
        per_example_loss, params, batch, n, plan, direction=direction, per_parameter=per_parameter
    )
    losses = fast.losses
    loss_mean = jnp.mean(losses)
    loss_m2 = jnp.sum((losses - loss_mean) ** 2)
    grad.mean = list(fast.grad_mean)
    quantities = [(grad, fast.grad_sq, fast.grad_norm2_sum)]
    if with_hvp:
        hvp.mean = list(fast.hvp_mean)
        quantities.append((hvp, fast.hvp_sq, fast.hvp_norm2_sum))
    if per_parameter:
        for acc, sq, _ in quantities:
            for j in covered:
                acc.sq_sum[j] = sq[j]

    def m2_from_squares(acc, sq, norm2_sum):
        """Per-leaf M2 = sum_i x_i^2 - n mean^2 (clamped at 0), their total and the cancellation flags."""
        if per_parameter:
            m2 = [jnp.maximum(sq[j] - n * acc.mean[j] ** 2, 0) for j in covered]
            return m2, sum(jnp.sum(m) for m in m2), [_cancels(m, sq[j], n) for m, j in zip(m2, covered)]
        mean_sq = sum(jnp.sum(acc.mean[j] ** 2) for j in covered)
        total = jnp.maximum(norm2_sum - n * mean_sq, 0)
        return [], total, [_cancels(total, norm2_sum, n)]

    def finished(leaf_m2, total):
        """(per-leaf sample variances, total M2) in the output dtype: what both branches return."""
        return [jnp.asarray(sample_variance(m, n), dtype) for m in leaf_m2], jnp.asarray(total, dtype)

    def from_fast():
        return [finished(*m2_from_squares(*quantity)[:2]) for quantity in quantities]

    def two_pass_fallback():
        # The fast means are accurate (sums, not differences), so only the
        # squared deviations about them are summed, one chunk at a time.
        means = ([grad.mean[j] for j in covered], [hvp.mean[j] for j in covered] if with_hvp else None)
        sums = centred_square_sums(
            per_example_loss, params, batch, n, means,
            select=covered, direction=direction,
            chunk_size=_FALLBACK_CHUNK if chunk_size is None else chunk_size,
            per_parameter=per_parameter, reproducible=reproducible,
        )
        return [
            finished(m2 if per_parameter else [], sum(jnp.sum(m) for m in m2)) for m2 in sums[: len(quantities)]
        ]

    if n > 1:
        # The flags reduce M2 on the fly; each branch then writes the variances
        # straight into the outputs, so no M2 array is kept in between.  Only
        # the taken branch runs (outside vmap): usually one comparison per leaf.
        suspect = [flag for quantity in quantities for flag in m2_from_squares(*quantity)[2]]
        variances = jax.lax.cond(jnp.any(jnp.stack(suspect)), two_pass_fallback, from_fast)
    else:  # with one example every variance is reported as 0 anyway
        variances = from_fast()
    for (acc, _, _), (leaf_vars, total) in zip(quantities, variances):
        acc.m2_total = acc.m2_total + total
        for j, var in zip(covered, leaf_vars):
            acc.var[j] = var
    return loss_mean, loss_m2


@eqx.filter_jit
def _batch_stats_jit(per_example_loss, params, batch, direction, chunk_size, method, per_parameter, n, reproducible):
    check_per_example_loss(per_example_loss, params, batch)  # at trace time only
    leaves, treedef = jax.tree_util.tree_flatten(params)
    num_leaves = len(leaves)
    plan = None if method == "generic" else discover(per_example_loss, params, batch, n)
    if method == "fast" and len(plan.covered) < num_leaves:
        raise ValueError(
            "`method='fast'` needs every leaf of `params` to be owned by an instrumented "
            "layer (see `probopt.stats.instrument`) called under one `jax.vmap` over "
            f"examples; not covered: {', '.join(_uncovered_names(params, plan))}. "
            "Use method='auto' to handle these leaves generically."
        )
    with_hvp = direction is not None
    dtype = jnp.result_type(*leaves)
    grad = _Accumulated(num_leaves, dtype)
    hvp = _Accumulated(num_leaves, dtype)

    if plan is not None and plan.covered:
        loss_mean, loss_m2 = _fast_moments(
            per_example_loss, params, batch, n, plan, direction, chunk_size, per_parameter, reproducible,
            grad, hvp, dtype,
        )
        rest = [j for j in range(num_leaves) if j not in set(plan.covered)]
        if rest:
            _, grad_mom, hvp_mom = generic_moments(
                per_example_loss, params, batch, n, direction=direction,
                chunk_size=chunk_size, per_parameter=per_parameter, select=rest,
                reproducible=reproducible,
            )
            grad.add_moments(rest, grad_mom, n, per_parameter, with_mean=False)
            if with_hvp:
                hvp.add_moments(rest, hvp_mom, n, per_parameter, with_mean=False)
    else:
        loss_mom, grad_mom, hvp_mom = generic_moments(
            per_example_loss, params, batch, n, direction=direction,
            chunk_size=chunk_size, per_parameter=per_parameter, reproducible=reproducible,
        )
        loss_mean, loss_m2 = loss_mom.mean[0], loss_mom.m2[0]
        everything = list(range(num_leaves))
        grad.add_moments(everything, grad_mom, n, per_parameter, with_mean=True)
        if with_hvp:
            hvp.add_moments(everything, hvp_mom, n, per_parameter, with_mean=True)

    num_coords = sum(leaf.size for leaf in leaves)
    cast = lambda x: jnp.asarray(x, dtype)  # noqa: E731

    def tree(xs):
        return jax.tree_util.tree_unflatten(treedef, [cast(x) for x in xs])

    def fields(acc):
        return dict(
            mean=tree(acc.mean),
            sq_sum=tree(acc.sq_sum) if per_parameter else None,
            var=tree(acc.var) if per_parameter else None,
            var_mean=cast(sample_variance(acc.m2_total, n) / num_coords),
        )

    g = fields(grad)
    stats = BatchStats(
        batch_size=jnp.asarray(n),
        loss_mean=cast(loss_mean),
        loss_var=cast(sample_variance(loss_m2, n)),
        grad_mean=g["mean"],
        grad_sq_sum=g["sq_sum"],
        grad_var=g["var"],
        grad_var_mean=g["var_mean"],
    )
    if with_hvp:
        h = fields(hvp)
        stats = stats._replace(
            hvp_mean=h["mean"], hvp_sq_sum=h["sq_sum"], hvp_var=h["var"], hvp_var_mean=h["var_mean"]
        )
    return stats
