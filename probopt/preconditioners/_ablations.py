r"""Simpler preconditioner parameterisations: LODO's ablations (Liao et al., 2023, §5.3.2).

Their exact forms follow the authors' code (``training/lodo.py``):

- LODO-Diagonal: $G = \alpha_0 \operatorname{diag}(w)$, $w_0 = \mathbf 1$.
- LODO-Global: $G = \alpha_0 w I$, scalar $w_0 = 1$ (hypergradient descent on
  a global learning rate, Baydin et al., 2018, when the meta-optimizer is SGD).
- LODO-Residuals: $G = \alpha_0 E^\top R^\top \operatorname{diag}(d) R E$ with
  $R = \prod_{i=L}^{1} (I + \operatorname{diag}(w_i) P_i)$.

[`DensePreconditioner`][probopt.preconditioners.DensePreconditioner] (a full
matrix, for small $n$) is the setting of the paper's §4.1 analysis.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax

from ._base import Preconditioner, as_float_dtype, check_dim, check_key, trainable_spec


def _check_vector(vector: jax.Array, dim: int) -> None:
    if vector.shape != (dim,):
        raise ValueError(f"`vector` must have shape ({dim},); got {vector.shape}.")


class DiagonalPreconditioner(Preconditioner):
    r"""LODO-Diagonal: $G = \alpha_0 \operatorname{diag}(w)$ with trainable $w$, initially all ones.

    Not guaranteed positive: entries of $w$ may become negative.

    **Fields:** ``weights`` ($w$, shape ``(n,)``, trainable) and ``scale`` ($\alpha_0$).
    """

    weights: jax.Array
    scale: jax.Array

    def __init__(self, dim: int, *, initial_learning_rate: Any = 1.0, dtype: Any = None):
        """**Arguments:** ``dim`` ($n$), ``initial_learning_rate`` ($\\alpha_0$), ``dtype``."""
        dim = check_dim(dim)
        dtype = as_float_dtype(dtype)
        self.weights = jnp.ones((dim,), dtype)
        self.scale = jnp.asarray(initial_learning_rate, dtype)

    @property
    def dim(self) -> int:
        return self.weights.shape[0]

    def trainable_filter(self) -> Any:
        return trainable_spec(self, "weights")

    def __call__(self, vector: jax.Array) -> jax.Array:
        _check_vector(vector, self.dim)
        return self.scale * self.weights * vector


class ScalarPreconditioner(Preconditioner):
    r"""LODO-Global: $G = \alpha_0 w I$ with one trainable scalar $w$, initially 1.

    **Fields:** ``weight`` ($w$, shape ``()``, trainable) and ``scale`` ($\alpha_0$).
    """

    weight: jax.Array
    scale: jax.Array
    input_dim: int = eqx.field(static=True)

    def __init__(self, dim: int, *, initial_learning_rate: Any = 1.0, dtype: Any = None):
        """**Arguments:** ``dim`` ($n$), ``initial_learning_rate`` ($\\alpha_0$), ``dtype``."""
        self.input_dim = check_dim(dim)
        dtype = as_float_dtype(dtype)
        self.weight = jnp.ones((), dtype)
        self.scale = jnp.asarray(initial_learning_rate, dtype)

    @property
    def dim(self) -> int:
        return self.input_dim

    def trainable_filter(self) -> Any:
        return trainable_spec(self, "weight")

    def __call__(self, vector: jax.Array) -> jax.Array:
        _check_vector(vector, self.dim)
        return self.scale * self.weight * vector


class ResidualPreconditioner(Preconditioner):
    r"""LODO-Residuals: $G = \alpha_0 E^\top R^\top \operatorname{diag}(d)\, R E$, $R = \prod_{i=L}^{1}(I + \operatorname{diag}(w_i) P_i)$.

    $P_i$ are fixed random permutations of $\tilde n$ indices ($P_i v$ is
    ``v[permutations[i]]``), $w_i \sim \mathcal N(0, s^2)$ with $s = 0.125$ and
    the middle diagonal $d$ starts at ones.  $G$ is symmetric but not
    guaranteed PSD (entries of $d$ may turn negative), and $G \ne \alpha_0 I$
    at initialisation.  Costs $O(L \tilde n)$ per mat-vec.

    **Fields:** ``layer_weights`` ($w_i$, ``(L, ñ)``, trainable),
    ``middle`` ($d$, ``(ñ,)``, trainable), ``permutations`` and
    ``inverse_permutations`` (int32 ``(L, ñ)``, fixed), ``scale`` ($\alpha_0$).
    """

    layer_weights: jax.Array
    middle: jax.Array
    permutations: jax.Array
    inverse_permutations: jax.Array
    scale: jax.Array
    input_dim: int = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        *,
        key: jax.Array,
        initial_learning_rate: Any = 1.0,
        depth: int = 64,
        hidden_dim: int | None = None,
        init_scale: float = 0.125,
        dtype: Any = None,
    ):
        r"""**Arguments:**

        - ``dim``: $n$.
        - ``key``: PRNG key for permutations and the initial $w_i$.
        - ``initial_learning_rate``: $\alpha_0$.
        - ``depth``: $L$ (default 64).
        - ``hidden_dim``: $\tilde n \ge n$ (default $2n$).
        - ``init_scale``: standard deviation $s$ of the initial $w_i$ (default 0.125).
        - ``dtype``: floating dtype.
        """
        dim = check_dim(dim)
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
            raise ValueError(f"`depth` must be a non-negative integer; got {depth!r}.")
        hidden_dim = 2 * dim if hidden_dim is None else check_dim(hidden_dim, "hidden_dim")
        if hidden_dim < dim:
            raise ValueError(f"`hidden_dim` must be >= dim ({dim}); got {hidden_dim}.")
        key = check_key(key)
        dtype = as_float_dtype(dtype)
        perm_key, weight_key = jax.random.split(key)
        perms = jax.vmap(lambda k: jax.random.permutation(k, hidden_dim))(
            jax.random.split(perm_key, depth)
        ).astype(jnp.int32).reshape(depth, hidden_dim)
        self.permutations = perms
        self.inverse_permutations = jnp.argsort(perms, axis=-1).astype(jnp.int32)
        self.layer_weights = init_scale * jax.random.normal(weight_key, (depth, hidden_dim), dtype)
        self.middle = jnp.ones((hidden_dim,), dtype)
        self.scale = jnp.asarray(initial_learning_rate, dtype)
        self.input_dim = dim

    @property
    def dim(self) -> int:
        return self.input_dim

    def trainable_filter(self) -> Any:
        return trainable_spec(self, "layer_weights", "middle")

    def __call__(self, vector: jax.Array) -> jax.Array:
        _check_vector(vector, self.dim)
        hidden_dim = self.middle.shape[0]
        h = jnp.pad(vector, (0, hidden_dim - self.dim))

        def forward(h, xs):  # h <- (I + diag(w) P) h
            w, perm = xs
            return h + w * h[perm], None

        def backward(h, xs):  # h <- (I + P^T diag(w)) h
            w, inv_perm = xs
            return h + (w * h)[inv_perm], None

        h, _ = lax.scan(forward, h, (self.layer_weights, self.permutations))
        h = self.middle * h
        h, _ = lax.scan(backward, h, (self.layer_weights, self.inverse_permutations), reverse=True)
        return self.scale * h[: self.dim]


class DensePreconditioner(Preconditioner):
    r"""A full matrix $G = \alpha_0 W$ with trainable $W$ (initially $I$); for small $n$ only.

    This is the idealised preconditioner of the paper's §4.1 analysis: with an
    SGD meta-step and no momentum, the meta-update is $G \leftarrow G + \eta\,
    g_{t+1} g_t^\top$ and $G$ drifts towards $H^{-1}$ on a noisy quadratic.
    $W$ is not constrained to be symmetric.

    **Fields:** ``matrix`` ($W$, ``(n, n)``, trainable) and ``scale`` ($\alpha_0$).
    """

    matrix: jax.Array
    scale: jax.Array

    def __init__(self, dim: int, *, initial_learning_rate: Any = 1.0, dtype: Any = None):
        """**Arguments:** ``dim`` ($n$), ``initial_learning_rate`` ($\\alpha_0$), ``dtype``."""
        dim = check_dim(dim)
        dtype = as_float_dtype(dtype)
        self.matrix = jnp.eye(dim, dtype=dtype)
        self.scale = jnp.asarray(initial_learning_rate, dtype)

    @property
    def dim(self) -> int:
        return self.matrix.shape[0]

    def trainable_filter(self) -> Any:
        return trainable_spec(self, "matrix")

    def __call__(self, vector: jax.Array) -> jax.Array:
        _check_vector(vector, self.dim)
        return self.scale * (self.matrix @ vector)
