"""Fast path: per-example statistics from layer factors, without ``n x P`` arrays.

One ``value_and_grad`` of the mean loss with respect to ``(params, probes)``
gives the mean gradient and, through the zero probes that instrumented layers
add to their batched outputs, the per-example output gradients $d_i$ (the
probes' gradients times $n$); the
layers' inputs $a_i$ come back as auxiliary outputs.  With a direction, a
``jvp`` of that same function gives $H\\delta$ and the tangents
$(\\dot a_i, \\dot d_i)$.  Each layer then reduces its factors in closed form
(see ``_layers``).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.extend.core import Var

from ._tape import Tape, TapSpec, tap_index


class FastPlan(NamedTuple):
    """Which layer calls and which leaves of ``params`` the fast path covers.

    - ``specs``: every accepted instrumented call, in call order.
    - ``active``: per spec, whether its statistics are used (all its
      parameters are leaves of ``params`` used by this call only).
    - ``covered``: sorted indices of the leaves of ``params`` handled fast;
      every other leaf goes through the generic path.
    - ``record_depends``: per spec, whether the layer input may depend on
      ``params``; when it cannot (e.g. the first layer sees the data), its
      tangent is zero and the HVP terms in $\\dot a$ are skipped.
    """

    specs: tuple[TapSpec, ...]
    active: tuple[bool, ...]
    covered: tuple[int, ...]
    record_depends: tuple[bool, ...]


def _depends_on_params(closed_jaxpr: Any, num_param_inputs: int) -> list[bool]:
    """Per output of a jaxpr: may it depend on the first ``num_param_inputs`` inputs?"""
    jaxpr = closed_jaxpr.jaxpr
    dependent = set(jaxpr.invars[:num_param_inputs])
    for eqn in jaxpr.eqns:
        if any(isinstance(v, Var) and v in dependent for v in eqn.invars):
            dependent.update(eqn.outvars)
    return [isinstance(v, Var) and v in dependent for v in jaxpr.outvars]


def _param_users(closed_jaxpr: Any, num_param_inputs: int) -> list[set]:
    """Per parameter input of the discovery jaxpr: who uses it.

    Each use is the spec index of the tagged layer call (`Tape.tagged`) that
    consumes it, or ``None`` for any other use: an ordinary equation (e.g. the
    ``jnp.sum(w**2)`` of a penalty, the ``x @ w.T`` of a tied output head),
    a layer call that the tape did not accept, a nested ``jit``/``scan``/
    ``checkpoint``, or an output of the trace.  Every equation of the trace
    is kept (``make_jaxpr`` removes no dead code), so this lists *all* uses.
    """
    jaxpr = closed_jaxpr.jaxpr
    index = {v: i for i, v in enumerate(jaxpr.invars[:num_param_inputs])}
    users: list[set] = [set() for _ in range(num_param_inputs)]
    for eqn in jaxpr.eqns:
        tag = tap_index(eqn)
        for v in eqn.invars:
            if isinstance(v, Var) and v in index:
                users[index[v]].add(tag)
    for v in jaxpr.outvars:
        if isinstance(v, Var) and v in index:
            users[index[v]].add(None)
    return users


def discover(per_example_loss: Callable, params: Any, batch: Any, n: int) -> FastPlan:
    """Trace the loss once (abstractly) to find the instrumented layer calls.

    A call is active (its parameters handled fast) only if each of its
    parameters is a leaf of ``params`` whose **every** use in the traced loss
    is inside that one call, found by walking the jaxpr (`_param_users`);
    any other use, however small, sends the leaf to the generic path.
    """
    found: list[Tape] = []

    def trace(params, batch):
        tape = Tape(jax.tree_util.tree_leaves(params), n)
        with tape.recording():
            losses = per_example_loss(params, batch)
        found.append(tape)
        return tape.records, losses

    closed = jax.make_jaxpr(trace)(params, batch)
    tape = found[0]
    num_param_inputs = len(jax.tree_util.tree_leaves(params))
    num_records = len(tape.records)
    record_depends = tuple(_depends_on_params(closed, num_param_inputs)[:num_records])
    referenced = Counter(i for spec in tape.specs for i in spec.leaf_index.values())
    users = _param_users(closed, num_param_inputs)

    def owns_exclusively(k: int, spec: TapSpec) -> bool:
        return all(
            i >= 0 and tape.uses[i] == 1 and referenced[i] == 1 and users[i] == {k}
            for i in spec.leaf_index.values()
        )

    active = tuple(owns_exclusively(k, spec) for k, spec in enumerate(tape.specs))
    covered = sorted(i for spec, on in zip(tape.specs, active) if on for i in spec.leaf_index.values())
    return FastPlan(tuple(tape.specs), active, tuple(covered), record_depends)


class FastResult(NamedTuple):
    """Raw output of the fast pass: batch means and sums of squares."""

    losses: jax.Array  # (n,)
    grad_mean: list  # one entry per leaf of params: (1/n) sum_i g_i
    hvp_mean: list | None  # (1/n) sum_i H_i delta
    grad_sq: dict  # covered leaf index -> sum_i g_i^2 (empty if not per_parameter)
    hvp_sq: dict
    grad_norm2_sum: jax.Array  # sum_i ||g_i||^2 over covered leaves
    hvp_norm2_sum: jax.Array | None


def fast_pass(
    per_example_loss: Callable,
    params: Any,
    batch: Any,
    n: int,
    plan: FastPlan,
    *,
    direction: Any = None,
    per_parameter: bool = True,
) -> FastResult:
    """Run the instrumented forward/backward (and jvp) pass and reduce its factors."""
    active_specs = [spec for spec, on in zip(plan.specs, plan.active) if on]
    probes = [jnp.zeros(spec.out_shape, spec.out_dtype) for spec in active_specs]

    def objective(params, probes):
        tape = Tape(jax.tree_util.tree_leaves(params), n, probes=probes, active=list(plan.active))
        with tape.recording():
            losses = per_example_loss(params, batch)
        if len(tape.specs) != len(plan.specs):
            raise RuntimeError(
                "The model called a different number of instrumented layers than during "
                "discovery; the per-example loss must trace identically on every call."
            )
        # The mean, not the sum: then backpropagation writes the mean gradient
        # straight into its output (no extra parameter-sized division and buffer);
        # the probes' gradients are d_i / n and are rescaled below.
        return jnp.sum(losses) / n, (losses, tape.records)

    value_and_grad = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)
    if direction is None:
        (_, (losses, records)), (grad_mean, out_grads) = value_and_grad(params, probes)
        hvp_mean = record_dots = out_grad_dots = None
    else:
        primal, tangent = jax.jvp(lambda p: value_and_grad(p, probes), (params,), (direction,))
        (_, (losses, records)), (grad_mean, out_grads) = primal
        (_, (_, record_dots)), (hvp_mean, out_grad_dots) = tangent
        out_grad_dots = [n * d for d in out_grad_dots]
    out_grads = [n * d for d in out_grads]  # d_i, the gradient of loss i alone

    grad_sq: dict = {}
    hvp_sq: dict = {}
    grad_norm2_sum = jnp.zeros((), losses.dtype)
    hvp_norm2_sum = None if direction is None else jnp.zeros((), losses.dtype)
    active_depends = [dep for dep, on in zip(plan.record_depends, plan.active) if on]
    for k, spec in enumerate(active_specs):
        a_dot = None
        if record_dots is not None and active_depends[k] and jnp.issubdtype(jnp.result_type(records[k]), jnp.inexact):
            a_dot = record_dots[k]
        d_dot = None if out_grad_dots is None else out_grad_dots[k]
        stats = spec.skeleton._tap_stats(records[k], out_grads[k], a_dot, d_dot, per_parameter)
        grad_norm2_sum = grad_norm2_sum + jnp.sum(stats.grad_norm2)
        if stats.hvp_norm2 is not None:
            hvp_norm2_sum = hvp_norm2_sum + jnp.sum(stats.hvp_norm2)
        if per_parameter:
            for name, index in spec.leaf_index.items():
                grad_sq[index] = stats.grad_sq[name]
                if stats.hvp_sq is not None:
                    hvp_sq[index] = stats.hvp_sq[name]

    return FastResult(
        losses=losses,
        grad_mean=jax.tree_util.tree_leaves(grad_mean),
        hvp_mean=None if hvp_mean is None else jax.tree_util.tree_leaves(hvp_mean),
        grad_sq=grad_sq,
        hvp_sq=hvp_sq,
        grad_norm2_sum=grad_norm2_sum,
        hvp_norm2_sum=hvp_norm2_sum,
    )
