"""The tape through which instrumented layers expose per-example factors.

The fast path of [`batch_stats`][probopt.stats.batch_stats] needs, for every
supported layer, the layer input $a_i$ of each example and the gradient
$d_i = \\partial \\ell_i / \\partial y_i$ of its own loss with respect to the
layer output.  Per-example losses are written with ``jax.vmap`` over examples,
so inside a layer only one example is visible.  Instrumented layers therefore
wrap their computation in ``jax.custom_batching.custom_vmap``: when the model is
vmapped over the batch, the batching rule sees the whole batch at once, records
the batched input on the active tape and adds a zero *probe* of shape
``(n, *out_shape)`` to the batched output.  The gradient of the summed loss with
respect to that probe is exactly the stack of $d_i$, and a ``jvp`` of the same
pass gives their tangents.

The tape only accepts a layer call when

- a tape is active (otherwise the layer is the plain Equinox layer),
- the call is vmapped over the example axis directly below the trace in which
  the tape was opened (nested ``vmap``/``jit``/``scan`` inside the loss are not),
- the layer's parameters are unbatched and are leaves of ``params``,
- the layer configuration is supported (e.g. ungrouped, zero-padded conv).

Anything else is computed exactly as the plain layer and its parameters fall
back to the generic path.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from typing import Any, Callable, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.extend.core import get_opaque_trace_state

_ACTIVE = threading.local()

# Name prefix of the ``jax.jit`` that wraps the ``k``-th accepted layer call in
# the discovery trace, so that its uses of the parameters are identifiable as
# one equation of the jaxpr (see `tap_index`).
TAG_PREFIX = "_probopt_stats_tapped_call_"


def active_tape() -> "Tape | None":
    """The tape of the innermost fast-path pass being traced, or ``None``."""
    return getattr(_ACTIVE, "tape", None)


class TapSpec(NamedTuple):
    """What one accepted layer call looks like (found in the discovery trace)."""

    skeleton: Any  # the layer with arrays replaced by ShapeDtypeStructs (static config only)
    leaf_index: dict[str, int]  # parameter attribute name -> index among the leaves of params
    out_shape: tuple[int, ...]
    out_dtype: Any


class Tape:
    """Records accepted layer calls of one traced fast-path pass.

    In *discovery* mode (``probes is None``) it only records the
    `TapSpec` of every accepted call and how
    often every parameter leaf is used by instrumented layers.  In *run* mode
    it adds ``probes[k]`` to the output of the ``k``-th accepted call whose
    spec is marked active and records that call's input factor.
    """

    def __init__(
        self,
        params_leaves: list[Any],
        batch_size: int,
        *,
        probes: list[Any] | None = None,
        active: list[bool] | None = None,
    ):
        self.leaf_ids = {id(leaf): i for i, leaf in enumerate(params_leaves)}
        self.batch_size = batch_size
        self.trace_state = get_opaque_trace_state()
        self.probes = probes
        self.active = active
        self.specs: list[TapSpec] = []
        self.uses: Counter[int] = Counter()
        self.records: list[Any] = []

    @contextlib.contextmanager
    def recording(self):
        previous = active_tape()
        _ACTIVE.tape = self
        try:
            yield self
        finally:
            _ACTIVE.tape = previous

    def note_use(self, params: dict[str, Any]) -> None:
        """Count one call of an instrumented layer owning these parameter arrays."""
        for value in params.values():
            index = self.leaf_ids.get(id(value))
            if index is not None:
                self.uses[index] += 1

    def accepts(self, axis_size: int, params_batched: bool) -> bool:
        same_trace = get_opaque_trace_state() == self.trace_state
        return same_trace and axis_size == self.batch_size and not params_batched

    def tagged(self, fn: Callable[[Any, Any], Any], layer: Any, x: Any) -> Any:
        """``fn(layer, x)``; in discovery mode as one named ``jit`` equation of the traced jaxpr.

        Its name carries the index the call's `TapSpec` will get, so that
        `tap_index` recognises exactly the uses of the parameters made inside
        this accepted layer call.
        """
        if self.probes is not None:
            return fn(layer, x)
        arrays, static = eqx.partition(layer, eqx.is_array)

        def body(arrays, x):
            return fn(eqx.combine(arrays, static), x)

        body.__name__ = body.__qualname__ = f"{TAG_PREFIX}{len(self.specs)}"
        return jax.jit(body)(arrays, x)

    def tap(self, layer: Any, params: dict[str, Any], y: jax.Array, record: Callable[[], Any]) -> jax.Array:
        """Register an accepted call; in run mode add its probe and record its input factor."""
        leaf_index = {name: self.leaf_ids.get(id(value), -1) for name, value in params.items()}
        k = len(self.specs)
        skeleton = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), layer)
        spec = TapSpec(skeleton, leaf_index, tuple(y.shape), y.dtype)
        self.specs.append(spec)
        if self.probes is None:
            # Discovery also records the input factor, to learn whether it depends on params.
            self.records.append(record())
            return y
        if k >= len(self.active):
            raise RuntimeError(
                "The model called more instrumented layers than during discovery; "
                "the per-example loss must trace identically on every call."
            )
        if not self.active[k]:
            return y
        self.records.append(record())
        return y + self.probes[sum(self.active[:k])]


def tap_index(eqn: Any) -> int | None:
    """The spec index of a discovery-trace equation made by `Tape.tagged`, else ``None``."""
    name = eqn.params.get("name") if eqn.primitive.name in ("jit", "pjit") else None
    if isinstance(name, str) and name.startswith(TAG_PREFIX) and name[len(TAG_PREFIX) :].isdigit():
        return int(name[len(TAG_PREFIX) :])
    return None


def tapped_call(layer: Any, x: Any, plain: Callable[[Any, Any], Any], params: dict[str, Any]) -> Any:
    """Evaluate ``plain(layer, x)``, exposing per-example factors to an active tape.

    **Arguments:**

    - `layer`: the instrumented Equinox layer (a pytree).
    - `x`: its input for one example.
    - `plain`: ``plain(layer, x)``, the layer's own computation for one example.
    - `params`: the layer's trainable arrays by attribute name (``None`` entries dropped).
    """
    tape = active_tape()
    if tape is None or not params:
        return plain(layer, x)
    tape.note_use(params)

    @jax.custom_batching.custom_vmap
    def call(layer, x):
        return plain(layer, x)

    @call.def_vmap
    def rule(axis_size, in_batched, layer, x):
        layer_batched, x_batched = in_batched
        params_batched = any(jax.tree_util.tree_leaves(layer_batched))
        in_axes = (jax.tree_util.tree_map(lambda b: 0 if b else None, layer_batched), 0 if x_batched else None)
        batched_plain = jax.vmap(plain, in_axes=in_axes)
        if not (x_batched and tape.accepts(axis_size, params_batched) and layer._tap_supported()):
            return batched_plain(layer, x), True
        y = tape.tagged(batched_plain, layer, x)
        # The arrays of `layer` here are the very objects held by the caller, so
        # their identity tells which leaves of `params` they are.
        layer_params = {name: getattr(layer, name) for name in params}
        y = tape.tap(layer, layer_params, y, lambda: layer._tap_input(x))
        return y, True

    return call(layer, x)
