"""The interface shared by every learned preconditioner.

A preconditioner is a symmetric linear map $G(\theta)$ on flat parameter
vectors of length $n$, applied by ``preconditioner(v)``.  Its arrays split in
two: the *trainable* entries $\theta$ that a meta-optimizer updates, and the
*structure* (fixed permutations, the initial learning rate $\alpha_0$) that
never changes.  [`partition_trainable`][probopt.preconditioners.partition_trainable]
makes that split with `equinox.partition`, so a meta-optimizer only ever sees
$\theta$ and the structure is carried as ordinary (integer) arrays that do not
cause retracing.
"""

from __future__ import annotations

import abc
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp


class Preconditioner(eqx.Module):
    r"""Abstract learned preconditioner $G(\theta)$ acting on vectors of length $n$.

    Subclasses implement ``__call__(vector) -> G @ vector`` and
    ``trainable_filter()``.  Every subclass stores the initial learning rate
    $\alpha_0$ as the array field ``scale``, which multiplies the whole map.
    """

    scale: eqx.AbstractVar[jax.Array]

    @property
    @abc.abstractmethod
    def dim(self) -> int:
        """The dimension $n$ of the vectors the preconditioner acts on."""

    @abc.abstractmethod
    def __call__(self, vector: jax.Array) -> jax.Array:
        """Return $G(\\theta)\\,v$ for ``vector`` of shape ``(n,)``; result shape ``(n,)``."""

    @abc.abstractmethod
    def trainable_filter(self) -> Any:
        """A pytree of booleans like ``self``: ``True`` on the entries of $\\theta$."""

    def hypergradient(self, vector: jax.Array, cotangent: jax.Array) -> Any:
        r"""VJP of $\theta \mapsto -G(\theta)\,v$ with cotangent $c$: $-\partial (c^\top G(\theta) v)/\partial\theta$.

        With $v = m_t$ and $c = g_{t+1}$ this is LODO's hypergradient
        $\partial \ell(x_{t+1})/\partial\theta_t$.  Returns a pytree like the
        trainable part of ``self`` (other leaves ``None``).  The default uses
        `jax.vjp`; subclasses may override it with a cheaper exact formula.
        """
        trainable, structure = eqx.partition(self, self.trainable_filter())

        def step(theta):
            return -eqx.combine(theta, structure)(vector)

        _, vjp = jax.vjp(step, trainable)
        (result,) = vjp(cotangent)
        return result

    def matmat(self, vectors: jax.Array) -> jax.Array:
        """Apply $G$ to each column of ``vectors`` (shape ``(n, k)``); returns ``(n, k)``."""
        return jax.vmap(self, in_axes=1, out_axes=1)(vectors)

    def dense(self) -> jax.Array:
        """The dense $n \\times n$ matrix $G$ (for small $n$: costs $n$ mat-vecs and $n^2$ memory)."""
        return _dense(self)


@eqx.filter_jit
def _dense(preconditioner: Preconditioner) -> jax.Array:
    return preconditioner.matmat(jnp.eye(preconditioner.dim, dtype=preconditioner.scale.dtype))


def _all_false(module: eqx.Module) -> Any:
    return jax.tree.map(lambda _: False, module)


def trainable_spec(module: eqx.Module, *fields: str) -> Any:
    """Filter spec marking the named array fields of ``module`` as trainable."""
    spec = _all_false(module)
    return eqx.tree_at(
        lambda m: tuple(getattr(m, name) for name in fields),
        spec,
        replace=(True,) * len(fields),
    )


def partition_trainable(preconditioner: Preconditioner) -> tuple[Any, Any]:
    r"""Split a preconditioner into ``(trainable, structure)``.

    ``trainable`` holds $\theta$ (other leaves are ``None``) and is what a
    meta-optimizer updates; ``structure`` holds everything else.  Recombine
    with ``equinox.combine(trainable, structure)``.

    **Arguments:**

    - ``preconditioner``: any [`Preconditioner`][probopt.preconditioners.Preconditioner].

    **Returns:** the pair ``(trainable, structure)`` of pytrees.
    """
    if not isinstance(preconditioner, Preconditioner):
        raise TypeError(
            "`preconditioner` must be a probopt Preconditioner; "
            f"got {type(preconditioner).__name__}."
        )
    return eqx.partition(preconditioner, preconditioner.trainable_filter())


def as_float_dtype(dtype: Any) -> Any:
    """Resolve ``dtype`` (``None`` means JAX's default float) and check it is floating."""
    resolved = jnp.result_type(float) if dtype is None else jnp.dtype(dtype)
    if not jnp.issubdtype(resolved, jnp.floating):
        raise TypeError(f"`dtype` must be a floating dtype; got {resolved}.")
    return resolved


def check_dim(dim: Any, name: str = "dim") -> int:
    """Check a positive Python integer dimension."""
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"`{name}` must be a positive integer; got {dim!r}.")
    return dim


def check_key(key: Any) -> jax.Array:
    """Check that ``key`` is a JAX PRNG key (typed or raw ``uint32[2]``)."""
    if key is None:
        raise TypeError("`key` must be a JAX PRNG key (e.g. `jax.random.key(0)`); got None.")
    arr = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jnp.issubdtype(arr.dtype, jax.dtypes.prng_key):
        return arr
    if arr.dtype == jnp.uint32 and arr.shape[-1:] == (2,):
        return arr
    raise TypeError(
        "`key` must be a JAX PRNG key (e.g. `jax.random.key(0)`); "
        f"got an array of dtype {arr.dtype} and shape {arr.shape}."
    )
