r"""K-FAC through kfac-jax's optax preconditioner interface.

K-FAC (Martens & Grosse, 2015) approximates each dense layer's block of the
Fisher by a Kronecker product $A \otimes G$ of the second moments of the
layer inputs $a$ (with a trailing one for the bias) and of the
back-propagated output gradients $g$, both averaged over the batch:
$A = \frac1n\sum_i a_i a_i^\top$, $G = \frac1n\sum_i \mathbb{E}_y[g_i g_i^\top]$.
The exact block is $\frac1n\sum_i a_i a_i^\top \otimes \mathbb{E}_y[g_i g_i^\top]$,
so the two coincide when all examples share one input (in particular for a
single example): K-FAC with exact factors and exact damping is then the
damped natural gradient $(F + \lambda I)^{-1}g$.

probopt does not reimplement K-FAC; this module wraps
``kfac_jax.OptaxPreconditioner`` into a self-contained optax transformation
that owns the preconditioner state and the PRNG key, so it chains like any
other transformation.  The model's loss must be registered inside
``value_func`` (e.g. ``kfac_jax.register_softmax_cross_entropy_loss(logits,
labels)``); dense layers are found by kfac-jax's graph matcher.

Compatibility note: kfac-jax 0.0.8's graph tracer unpacks
``Primitive.get_bind_params`` as a pair, but JAX 0.10 returns only the
parameter dict, so every curvature update fails with ``ValueError: too many
values to unpack``.  [`scale_by_kfac`][probopt.curvature.scale_by_kfac]
therefore installs, once and only when this incompatibility is detected, a
replacement for ``kfac_jax._src.tag_graph_matcher.eval_jaxpr_eqn`` that
accepts both return conventions.  Multi-device (pmap) distribution of
inverses is switched off: this wrapper is single-device.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, NamedTuple

import jax
import optax

_SHIM_INSTALLED = False


def _install_kfac_jax_shim() -> None:
    """Make kfac-jax 0.0.8's jaxpr evaluator work with JAX >= 0.10 (see module text)."""
    global _SHIM_INSTALLED
    if _SHIM_INSTALLED:
        return
    import jax.extend as jex
    from kfac_jax._src import tag_graph_matcher

    probe = jex.core.Primitive("probopt_probe").get_bind_params({})
    if isinstance(probe, tuple):  # old JAX convention: kfac-jax works as shipped
        _SHIM_INSTALLED = True
        return

    def eval_jaxpr_eqn(eqn, in_values):
        bind = eqn.primitive.get_bind_params(eqn.params)
        subfuns, bind_params = bind if isinstance(bind, tuple) else ((), bind)
        with jex.source_info_util.user_context(eqn.source_info.traceback):
            output = eqn.primitive.bind(*subfuns, *in_values, **bind_params)
        return list(output) if eqn.primitive.multiple_results else [output]

    tag_graph_matcher.eval_jaxpr_eqn = eval_jaxpr_eqn
    _SHIM_INSTALLED = True


def _import_kfac_jax():
    # kfac-jax pulls in tensorflow_probability's JAX substrate, which touches
    # deprecated jax.core names at import time; that noise is not ours to fix.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import kfac_jax
    return kfac_jax


class KfacState(NamedTuple):
    """State of [`scale_by_kfac`][probopt.curvature.scale_by_kfac].

    **Attributes:**

    - `preconditioner_state`: kfac-jax's ``OptaxPreconditionState`` (step
      count and Kronecker-factor moving averages / cached inverses).
    - `key`: PRNG key for kfac-jax's sampled labels; split at every update.
    """

    preconditioner_state: Any
    key: jax.Array


_RESERVED = ("distributed_inverses", "distributed_precon_apply", "value_func", "damping_schedule")


def scale_by_kfac(
    value_func: Callable[[Any, Any], jax.Array],
    example_batch: Any,
    *,
    damping: float = 1e-3,
    key: jax.Array | None = None,
    estimation_mode: str = "fisher_gradients",
    curvature_ema: float = 0.95,
    inverse_update_period: int = 5,
    use_exact_inverses: bool = False,
    **kfac_kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
    r"""Precondition the updates by kfac-jax's K-FAC inverse, $(\hat F + \lambda)^{-1}g$.

    Each ``update`` refreshes the Kronecker factors on the current batch
    (``maybe_update``), applies the (cached) inverse, and advances kfac-jax's
    counter.

    **Arguments:**

    - `value_func`: ``(params, batch) -> scalar`` loss with the loss registered
      via ``kfac_jax.register_*_loss`` inside.
    - `example_batch`: a batch with the shapes used in training; kfac-jax
      traces the model on it at ``init`` to find the layers.
    - `damping`: $\lambda > 0$.
    - `key`: PRNG key (default ``jax.random.key(0)``).
    - `estimation_mode`: kfac-jax's curvature estimator, e.g.
      ``"fisher_gradients"`` (sampled labels, the true Fisher),
      ``"fisher_empirical"`` (data labels), ``"fisher_exact"``, ``"ggn_exact"``.
    - `curvature_ema`: decay of the factor moving averages (0 uses only the
      current batch).
    - `inverse_update_period`: steps between recomputing the inverses.
    - `use_exact_inverses`: ``True`` inverts $A\otimes G + \lambda I$ exactly
      by eigendecomposition; ``False`` uses kfac-jax's factored (π-adjusted)
      damping $(A + \pi\sqrt\lambda I)\otimes(G + \sqrt\lambda/\pi\, I)$.
    - `kfac_kwargs`: forwarded to ``kfac_jax.OptaxPreconditioner`` (except the
      multi-device options, which are fixed to single-device).

    **Extra arguments of `update` (keyword-only, required):**

    - `batch`: the current batch, passed to ``value_func``; ``params`` is
      required too.

    **References:** Martens & Grosse, "Optimizing neural networks with
    Kronecker-factored approximate curvature", ICML 2015; kfac-jax.
    """
    kfac_jax = _import_kfac_jax()
    for name in _RESERVED:
        if name in kfac_kwargs:
            raise TypeError(f"scale_by_kfac sets `{name}` itself; do not pass it.")
    if not damping > 0:
        raise ValueError(f"`damping` must be positive; got {damping!r}.")
    _install_kfac_jax_shim()
    preconditioner = kfac_jax.OptaxPreconditioner(
        value_func,
        damping=damping,
        estimation_mode=estimation_mode,
        curvature_ema=curvature_ema,
        inverse_update_period=inverse_update_period,
        use_exact_inverses=use_exact_inverses,
        distributed_inverses=False,
        distributed_precon_apply=False,
        **kfac_kwargs,
    )

    def init_fn(params):
        k = jax.random.key(0) if key is None else key
        init_key, state_key = jax.random.split(k)
        return KfacState(
            preconditioner_state=preconditioner.init((params, example_batch), init_key), key=state_key
        )

    def update_fn(updates, state, params=None, *, batch, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("scale_by_kfac.update needs `params` (the curvature is estimated at them).")
        next_key, step_key = jax.random.split(state.key)
        precond_state = preconditioner.maybe_update(state.preconditioner_state, (params, batch), step_key)
        direction = preconditioner.apply(updates, precond_state)
        precond_state = preconditioner.increment_count(precond_state)
        return direction, KfacState(preconditioner_state=precond_state, key=next_key)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def kfac(
    learning_rate: optax.ScalarOrSchedule,
    value_func: Callable[[Any, Any], jax.Array],
    example_batch: Any,
    *,
    damping: float = 1e-3,
    momentum: float | None = None,
    key: jax.Array | None = None,
    **kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
    r"""K-FAC-preconditioned SGD: $\theta \leftarrow \theta - \eta\,(\hat F + \lambda)^{-1}g$.

    A chain of [`scale_by_kfac`][probopt.curvature.scale_by_kfac], optional
    heavy-ball momentum (``optax.trace``) and the learning rate.  Pass
    ``batch=`` to ``update``.

    **Arguments:**

    - `learning_rate`: $\eta$, float or schedule.
    - `value_func`, `example_batch`, `damping`, `key`, `kwargs`: see
      [`scale_by_kfac`][probopt.curvature.scale_by_kfac].
    - `momentum`: decay of ``optax.trace`` (``None``: no momentum).
    """
    parts = [scale_by_kfac(value_func, example_batch, damping=damping, key=key, **kwargs)]
    if momentum is not None:
        parts.append(optax.trace(decay=momentum))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)
