r"""Instrumented Equinox layers: the opt-in to the fast per-example statistics path.

Each class here is a subclass of the Equinox layer of the same name, with the
same constructor, fields and output.  Outside
[`batch_stats`][probopt.stats.batch_stats] they *are* the Equinox layer.
Inside its fast path, when the model is mapped over the examples with
``jax.vmap``, they expose the per-example factors from which the per-example
gradients of their parameters follow in closed form:

| layer | per-example gradient $g_i$ | factors |
|---|---|---|
| `Linear` | $W$: $d_i a_i^\top$, $b$: $d_i$ | input $a_i$, output gradient $d_i$ |
| `Conv1d`, `Conv2d` | $W$: $\sum_p d_{i,p}\, u_{i,p}^\top$, $b$: $\sum_p d_{i,p}$ | im2col patches $u_{i,p}$ of the input |
| `LayerNorm` | $\gamma$: $d_i \odot \hat x_i$, $\beta$: $d_i$ | normalised input $\hat x_i$ |
| `GroupNorm` | $\gamma$: $\sum_{\text{space}} d_i \odot \hat x_i$, $\beta$: $\sum_{\text{space}} d_i$ | normalised input |
| `Embedding` | row $x_i$ of $W$: $d_i$ | the index $x_i$ |

The per-example HVP row is the tangent of $g_i$ along the direction, e.g.
$\dot d_i a_i^\top + d_i \dot a_i^\top$ for `Linear`, with $(\dot a_i, \dot d_i)$
from a ``jvp`` of the same pass.

[`instrument`][probopt.stats.instrument] swaps these in for the matching
Equinox layers anywhere in a model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

from ._tape import tapped_call

_NO_STATE = object()


class TapStats(NamedTuple):
    r"""Reduced statistics of one instrumented layer call.

    - ``grad_sq``: parameter name -> $\sum_i g_i^2$ shaped like the parameter
      (``None`` when only scalars were requested).
    - ``grad_norm2``: $\|g_i\|^2$ summed over the layer's parameters, shape ``(n,)``.
    - ``hvp_sq``, ``hvp_norm2``: the same for the per-example HVP rows, or ``None``.
    """

    grad_sq: dict | None
    grad_norm2: jax.Array
    hvp_sq: dict | None
    hvp_norm2: jax.Array | None


def _stats_from_per_example(per_example: dict, hvp_per_example: dict | None, per_parameter: bool) -> TapStats:
    """Reduce per-example gradients that are small (activation-sized) anyway."""

    def reduce(rows):
        if rows is None:
            return None, None
        sq = {k: jnp.sum(v**2, axis=0) for k, v in rows.items()} if per_parameter else None
        norm2 = sum(jnp.sum(v.reshape(v.shape[0], -1) ** 2, axis=1) for v in rows.values())
        return sq, norm2

    grad_sq, grad_norm2 = reduce(per_example)
    hvp_sq, hvp_norm2 = reduce(hvp_per_example)
    return TapStats(grad_sq, grad_norm2, hvp_sq, hvp_norm2)


def _plain(cls):
    return lambda layer, x: cls.__call__(layer, x)


def _params(layer: Any, names: tuple[str, ...]) -> dict[str, Any]:
    return {name: getattr(layer, name) for name in names if getattr(layer, name) is not None}


class Linear(eqx.nn.Linear):
    r"""[`equinox.nn.Linear`](https://docs.kidger.site/equinox/api/nn/linear/) with fast per-example statistics.

    Same constructor and call as the Equinox layer: ``Linear(in_features,
    out_features, use_bias=True, *, key)``, input shape ``(in_features,)``.

    Fast path: $\sum_i g_i^2 = (d\odot d)^\top (a\odot a)$ (one extra matmul) and
    $\|g_i\|^2 = \|a_i\|^2\|d_i\|^2$ (Goodfellow, 2015, arXiv:1510.01799).
    """

    def __call__(self, x, *, key=None):
        return tapped_call(self, x, _plain(eqx.nn.Linear), _params(self, ("weight", "bias")))

    def _tap_supported(self) -> bool:
        return True

    def _tap_input(self, x):
        return x

    def _tap_stats(self, a, d, a_dot, d_dot, per_parameter: bool) -> TapStats:
        n = a.shape[0]
        a = a.reshape(n, -1)
        d = d.reshape(n, -1)
        has_bias = self.bias is not None
        a2, d2 = a * a, d * d
        sum_a2, sum_d2 = jnp.sum(a2, axis=1), jnp.sum(d2, axis=1)
        grad_norm2 = sum_a2 * sum_d2 + (sum_d2 if has_bias else 0)
        grad_sq = {"bias": jnp.sum(d2, axis=0)} if per_parameter and has_bias else {}
        if d_dot is None:
            if per_parameter:
                grad_sq["weight"] = d2.T @ a2
            return TapStats(grad_sq if per_parameter else None, grad_norm2, None, None)
        d_dot = d_dot.reshape(n, -1)
        dd2 = d_dot * d_dot
        sum_dd2 = jnp.sum(dd2, axis=1)
        hvp_norm2 = sum_dd2 * sum_a2 + (sum_dd2 if has_bias else 0)
        hvp_sq = {"bias": jnp.sum(dd2, axis=0)} if per_parameter and has_bias else {}
        if a_dot is None:
            # The input cannot depend on params (e.g. the data): h_i = dd_i a_i^T.
            # Two matmuls rather than one on [d2, dd2]: each writes its output
            # in place, where slicing a stacked product costs a weight-sized copy.
            if per_parameter:
                grad_sq["weight"], hvp_sq["weight"] = d2.T @ a2, dd2.T @ a2
        else:
            # h_i = dd_i a_i^T + d_i da_i^T, so h_i^2 expands into three outer products,
            # summed over examples by one matmul over a stacked contraction axis.
            a_dot = a_dot.reshape(n, -1)
            ad2, cross_d, cross_a = a_dot * a_dot, d_dot * d, a_dot * a
            hvp_norm2 = hvp_norm2 + sum_d2 * jnp.sum(ad2, axis=1) + 2 * jnp.sum(cross_d, axis=1) * jnp.sum(cross_a, axis=1)
            if per_parameter:
                grad_sq["weight"] = d2.T @ a2
                left = jnp.concatenate([dd2, d2, 2 * cross_d], axis=0)
                hvp_sq["weight"] = left.T @ jnp.concatenate([a2, ad2, cross_a], axis=0)
        if not per_parameter:
            return TapStats(None, grad_norm2, None, hvp_norm2)
        return TapStats(grad_sq, grad_norm2, hvp_sq, hvp_norm2)


class _ConvMixin:
    """Per-example conv gradients by im2col: $G_i = \\sum_p d_{i,p} u_{i,p}^\\top$."""

    def __call__(self, x, *, key=None):
        return tapped_call(self, x, _plain(eqx.nn.Conv), _params(self, ("weight", "bias")))

    def _tap_supported(self) -> bool:
        return self.groups == 1 and self.padding_mode == "ZEROS"

    def _tap_input(self, x):
        return x

    def _patches(self, a):
        patches = jax.lax.conv_general_dilated_patches(
            a,
            filter_shape=self.kernel_size,
            window_strides=self.stride,
            padding=self.padding,
            rhs_dilation=self.dilation,
        )
        return patches.reshape(patches.shape[0], patches.shape[1], -1)  # (n, C*prod(k), positions)

    def _per_example(self, patches, d):
        n = d.shape[0]
        d = d.reshape(n, d.shape[1], -1)  # (n, O, positions)
        rows = {"weight": jnp.einsum("nop,nkp->nok", d, patches).reshape((n,) + self.weight.shape)}
        if self.bias is not None:
            rows["bias"] = jnp.sum(d, axis=2).reshape((n,) + self.bias.shape)
        return rows

    def _tap_stats(self, a, d, a_dot, d_dot, per_parameter: bool) -> TapStats:
        patches = self._patches(a)
        grads = self._per_example(patches, d)
        hvps = None
        if d_dot is not None:
            hvps = self._per_example(patches, d_dot)
            if a_dot is not None:
                hvps["weight"] = hvps["weight"] + self._per_example(self._patches(a_dot), d)["weight"]
        return _stats_from_per_example(grads, hvps, per_parameter)


class Conv1d(_ConvMixin, eqx.nn.Conv1d):
    """[`equinox.nn.Conv1d`](https://docs.kidger.site/equinox/api/nn/conv/) with fast per-example statistics.

    Supported on the fast path when ``groups == 1`` and ``padding_mode == "ZEROS"``;
    other configurations fall back to the generic path.  Memory of the fast
    path: ``n`` per-example weight gradients of this layer.
    """


class Conv2d(_ConvMixin, eqx.nn.Conv2d):
    """[`equinox.nn.Conv2d`](https://docs.kidger.site/equinox/api/nn/conv/) with fast per-example statistics.

    Input shape ``(in_channels, height, width)``.  Supported on the fast path
    when ``groups == 1`` and ``padding_mode == "ZEROS"``; other configurations
    fall back to the generic path.  The per-example weight gradients of this
    layer (``n x weight.size``, small for typical conv kernels) are formed by
    im2col and a batched matmul.
    """


def _normalised(x, axes_groups, eps):
    dtype = jnp.result_type(x.dtype, jnp.float32)
    x = x.astype(dtype)
    mean = jnp.mean(x, axis=axes_groups, keepdims=True)
    var = jnp.maximum(jnp.var(x, axis=axes_groups, keepdims=True), 0.0)
    return (x - mean) * jax.lax.rsqrt(var + eps)


class LayerNorm(eqx.nn.LayerNorm):
    """[`equinox.nn.LayerNorm`](https://docs.kidger.site/equinox/api/nn/normalisation/) with fast per-example statistics.

    Per-example gradients of the affine parameters are $d_i\\odot\\hat x_i$ and
    $d_i$, activation-sized, so they are formed directly.
    """

    def __call__(self, x, state=_NO_STATE, *, key=None):
        out = tapped_call(self, x, _plain(eqx.nn.LayerNorm), _params(self, ("weight", "bias")))
        return out if state is _NO_STATE else (out, state)

    def _tap_supported(self) -> bool:
        return True

    def _tap_input(self, x):
        axes = tuple(range(1, x.ndim))
        return _normalised(x, axes, self.eps)

    def _tap_stats(self, a, d, a_dot, d_dot, per_parameter: bool) -> TapStats:
        def rows(xhat, dd, xhat_dot, scale_d):
            out = {}
            if self.weight is not None:
                out["weight"] = dd * xhat if xhat_dot is None else dd * xhat + scale_d * xhat_dot
            if self.bias is not None:
                out["bias"] = dd
            return out

        d = d.astype(a.dtype)
        grads = rows(a, d, None, None)
        hvps = None if d_dot is None else rows(a, d_dot.astype(a.dtype), a_dot, d)
        return _stats_from_per_example(grads, hvps, per_parameter)


class GroupNorm(eqx.nn.GroupNorm):
    """[`equinox.nn.GroupNorm`](https://docs.kidger.site/equinox/api/nn/normalisation/) with fast per-example statistics.

    Input shape ``(channels, ...)``.  Per-example gradients of the channelwise
    affine parameters are spatial sums of $d_i\\odot\\hat x_i$ and $d_i$.
    """

    def __call__(self, x, state=_NO_STATE, *, key=None):
        out = tapped_call(self, x, _plain(eqx.nn.GroupNorm), _params(self, ("weight", "bias")))
        return out if state is _NO_STATE else (out, state)

    def _tap_supported(self) -> bool:
        return True

    def _tap_input(self, x):
        n, channels = x.shape[:2]
        grouped = x.reshape((n, self.groups, channels // self.groups) + x.shape[2:])
        axes = tuple(range(2, grouped.ndim))
        return _normalised(grouped, axes, self.eps).reshape(x.shape)

    def _tap_stats(self, a, d, a_dot, d_dot, per_parameter: bool) -> TapStats:
        n, channels = a.shape[:2]

        def space_sum(x):
            return jnp.sum(x.reshape(n, channels, -1), axis=2)

        d = d.astype(a.dtype)
        grads = {"weight": space_sum(d * a), "bias": space_sum(d)}
        hvps = None
        if d_dot is not None:
            d_dot = d_dot.astype(a.dtype)
            weight_rows = d_dot * a if a_dot is None else d_dot * a + d * a_dot
            hvps = {"weight": space_sum(weight_rows), "bias": space_sum(d_dot)}
        return _stats_from_per_example(grads, hvps, per_parameter)


class Embedding(eqx.nn.Embedding):
    """[`equinox.nn.Embedding`](https://docs.kidger.site/equinox/api/nn/embedding/) with fast per-example statistics.

    Fast when each example looks up **one** index through this layer (the call
    is vmapped over examples only).  A sequence of lookups per example (a
    nested ``vmap`` over tokens) is not on the fast path and falls back to the
    generic path.
    """

    def __call__(self, x, *, key=None):
        return tapped_call(self, x, _plain(eqx.nn.Embedding), _params(self, ("weight",)))

    def _tap_supported(self) -> bool:
        return True

    def _tap_input(self, x):
        return x

    def _tap_stats(self, a, d, a_dot, d_dot, per_parameter: bool) -> TapStats:
        def reduce(rows):
            norm2 = jnp.sum(rows**2, axis=1)
            sq = jnp.zeros(self.weight.shape, rows.dtype).at[a].add(rows**2) if per_parameter else None
            return ({"weight": sq} if per_parameter else None), norm2

        grad_sq, grad_norm2 = reduce(d)
        hvp_sq, hvp_norm2 = (None, None) if d_dot is None else reduce(d_dot)
        return TapStats(grad_sq, grad_norm2, hvp_sq, hvp_norm2)


_INSTRUMENTED = {
    eqx.nn.Linear: Linear,
    eqx.nn.Conv1d: Conv1d,
    eqx.nn.Conv2d: Conv2d,
    eqx.nn.LayerNorm: LayerNorm,
    eqx.nn.GroupNorm: GroupNorm,
    eqx.nn.Embedding: Embedding,
}


def instrument(model: Any) -> Any:
    """Replace every supported Equinox layer in ``model`` by its instrumented twin.

    Supported: ``eqx.nn.Linear``, ``Conv1d``, ``Conv2d``, ``LayerNorm``,
    ``GroupNorm`` and ``Embedding`` (exact types; subclasses are left alone).
    Parameters are shared, not copied, and the model computes exactly the
    same function; it only gains the fast path of
    [`batch_stats`][probopt.stats.batch_stats].

    **Arguments:**

    - `model`: any pytree, typically an ``equinox.Module``.

    **Returns:** the same pytree with the layers swapped.
    """

    def swap(node):
        cls = _INSTRUMENTED.get(type(node))
        if cls is None:
            return node
        new = object.__new__(cls)
        for field in dataclasses.fields(node):
            object.__setattr__(new, field.name, getattr(node, field.name))
        return new

    return jax.tree_util.tree_map(swap, model, is_leaf=lambda node: type(node) in _INSTRUMENTED)
