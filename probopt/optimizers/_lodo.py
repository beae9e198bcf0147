r"""LODO: learning to optimize during optimization (Liao et al., 2023).

LODO is momentum SGD whose learning rate is a learned matrix: with the gradient
EMA $m_t = \beta m_{t-1} + (1-\beta) g_t$ (no bias correction, $m_0 = 0$) it
steps

$$x_{t+1} = x_t - G(\theta_t)\, m_t ,$$

and trains the preconditioner parameters $\theta$ online, by a meta-optimizer
(Adam) on the hypergradient of the *next* loss,

$$\frac{\partial \ell(x_{t+1})}{\partial \theta_t}
  = -\Big(\frac{\partial\, G(\theta) m_t}{\partial \theta}\Big|_{\theta_t}\Big)^{\!\top} g_{t+1},$$

a vector-Jacobian product of the step using the gradient observed at the next
point: no extra backward pass and no second derivatives.

In optax terms, ``update(g_{t+1}, state)`` first forms the hypergradient at the
stored $(\theta_t, m_t)$, meta-steps $\theta_t \to \theta_{t+1}$, then updates
$m_{t+1}$ and returns $-G(\theta_{t+1}) m_{t+1}$.  This is step for step the
authors' loop (their first step is zero because $m_0 = 0$; here the first
meta-step sees a zero hypergradient for the same reason).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from .._validation import is_concrete
from ..preconditioners import (
    DiagonalPreconditioner,
    LodoPreconditioner,
    Preconditioner,
    ResidualPreconditioner,
    ScalarPreconditioner,
    partition_trainable,
)
from ..preconditioners._base import check_key
from ._nonfinite import all_finite as _all_finite
from ._nonfinite import apply_nonfinite_policy as _apply_nonfinite_policy
from ._nonfinite import check_on_nonfinite as _check_on_nonfinite

PreconditionerFactory = Callable[[int, Any], Preconditioner]
"""``(dim, dtype) -> Preconditioner``: builds $G(\\theta_0)$ for a flat parameter vector."""


class LodoState(NamedTuple):
    r"""State of `lodo` and its ablations.

    **Attributes:**

    - ``count``: number of updates so far, int32 ``()``.
    - ``momentum``: the gradient EMA $m_t$, flat, shape ``(n,)``.
    - ``preconditioner``: the current $G(\theta_t)$ (an Equinox module; probe
      it with ``state.preconditioner(v)`` or ``.dense()``).
    - ``meta_state``: the meta-optimizer's state for $\theta$.
    - ``skipped_meta_updates``: how many meta-steps were skipped because the
      hypergradient was not finite (a skipped update, see ``skipped_updates``,
      counts here too), int32 ``()``.
    - ``skipped_updates``: how many updates were skipped because the gradient
      was not finite (``on_nonfinite="skip"``), int32 ``()``.  A skipped
      update returns zero updates and leaves every other field (``count``,
      momentum, $\theta$, meta-state) unchanged.
    """

    count: jax.Array
    momentum: jax.Array
    preconditioner: Preconditioner
    meta_state: optax.OptState
    skipped_meta_updates: jax.Array
    skipped_updates: jax.Array


def keras_adam(learning_rate: Any) -> optax.GradientTransformation:
    r"""Adam with Keras defaults ($\beta_1 = 0.9$, $\beta_2 = 0.999$, $\epsilon = 10^{-7}$): LODO's meta-optimizer."""
    return optax.adam(learning_rate, b1=0.9, b2=0.999, eps=1e-7)


def lodo_hypergradient(
    preconditioner: Preconditioner, momentum: jax.Array, next_gradient: jax.Array
) -> Any:
    r"""Hypergradient $\partial \ell(x_{t+1}) / \partial \theta_t$ of the next loss.

    The step is $x_{t+1} = x_t - G(\theta_t) m_t$, so by the chain rule the
    hypergradient is the VJP of $\theta \mapsto -G(\theta) m_t$ with cotangent
    $g_{t+1} = \nabla \ell(x_{t+1})$.

    **Arguments:**

    - ``preconditioner``: $G(\theta_t)$.
    - ``momentum``: $m_t$, shape ``(n,)``, the vector the step was made from.
    - ``next_gradient``: $g_{t+1}$, shape ``(n,)``.

    **Returns:** a pytree shaped like the trainable part of
    ``preconditioner`` (see [`partition_trainable`][probopt.preconditioners.partition_trainable]).
    """
    if not isinstance(preconditioner, Preconditioner):
        raise TypeError(
            "`preconditioner` must be a probopt Preconditioner; "
            f"got {type(preconditioner).__name__}."
        )
    hypergradient = preconditioner.hypergradient(momentum, next_gradient)
    return hypergradient


def _check_hyperparameters(meta_learning_rate, initial_learning_rate, momentum) -> None:
    for name, value in (
        ("meta_learning_rate", meta_learning_rate),
        ("initial_learning_rate", initial_learning_rate),
        ("momentum", momentum),
    ):
        if value is None:
            raise TypeError(f"`{name}` must be a number; got None.")
        if jnp.ndim(value) != 0:
            raise ValueError(f"`{name}` must be a scalar; got shape {jnp.shape(value)}.")
    if is_concrete(meta_learning_rate) and not float(meta_learning_rate) >= 0:
        raise ValueError(f"`meta_learning_rate` must be >= 0; got {meta_learning_rate!r}.")
    if is_concrete(initial_learning_rate) and not float(initial_learning_rate) > 0:
        raise ValueError(f"`initial_learning_rate` must be > 0; got {initial_learning_rate!r}.")
    if is_concrete(momentum) and not 0.0 <= float(momentum) < 1.0:
        raise ValueError(f"`momentum` must lie in [0, 1); got {momentum!r}.")



def _build_with_default_meta_optimizer(
    make, meta_learning_rate, initial_learning_rate, momentum, meta_optimizer, on_nonfinite
):
    """Every LODO variant's meta-optimizer defaults to Keras-default Adam (the paper's)."""
    if meta_optimizer is None:
        meta_optimizer = keras_adam(meta_learning_rate)
    return meta_learned_preconditioner(
        make, meta_optimizer, initial_learning_rate, momentum, on_nonfinite=on_nonfinite
    )

def _check_structure(block_size, depth, hidden_dim) -> None:
    for name, value, low in (("block_size", block_size, 1), ("depth", depth, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"`{name}` must be an integer >= {low}; got {value!r}.")
    if hidden_dim is not None and (
        isinstance(hidden_dim, bool) or not isinstance(hidden_dim, int) or hidden_dim % block_size
    ):
        raise ValueError(
            f"`hidden_dim` must be a positive multiple of block_size ({block_size}); got {hidden_dim!r}."
        )


def meta_learned_preconditioner(
    make_preconditioner: PreconditionerFactory,
    meta_optimizer: optax.GradientTransformation,
    initial_learning_rate: Any,
    momentum: Any,
    *,
    on_nonfinite: str = "skip",
) -> optax.GradientTransformationExtraArgs:
    r"""Momentum descent with any learned preconditioner, meta-trained online (LODO's Algorithm 1).

    All parameters are flattened to one vector of length $n$ (with
    `jax.flatten_util.ravel_pytree`); the returned updates have the structure
    and dtypes of the gradients.

    **Arguments:**

    - ``make_preconditioner``: ``(n, dtype) -> Preconditioner`` building $G(\theta_0)$
      (called once, in ``init``).
    - ``meta_optimizer``: optax transformation applied to $\theta$ (only the
      trainable leaves; see [`partition_trainable`][probopt.preconditioners.partition_trainable]).
    - ``initial_learning_rate``: $\alpha_0$; overrides the preconditioner's
      ``scale`` at every update (so `optax.inject_hyperparams` can schedule it).
    - ``momentum``: $\beta \in [0, 1)$ of the gradient EMA.
    - ``on_nonfinite``: what to do when the gradient contains NaN or infinity
      (as in [`meka`][probopt.optimizers.meka]).  ``"skip"`` (default):
      return zero updates, keep the whole state (momentum, $\theta$,
      meta-state, ``count``) and count the skip in ``skipped_updates`` (and
      ``skipped_meta_updates``).  ``"raise"``: raise at run time through
      ``equinox.error_if`` when the gradient or the step is not finite.

    **Returns:** an `optax.GradientTransformationExtraArgs` with state
    `LodoState`.

    **Numerical fallback:** if the hypergradient of a finite gradient contains
    NaN or infinity, the meta-step is skipped ($\theta$ kept; the momentum
    and the step are still updated) and ``skipped_meta_updates`` counts it.
    """
    if not callable(make_preconditioner):
        raise TypeError("`make_preconditioner` must be a callable `(dim, dtype) -> Preconditioner`.")
    if not hasattr(meta_optimizer, "init") or not hasattr(meta_optimizer, "update"):
        raise TypeError("`meta_optimizer` must be an optax GradientTransformation.")
    _check_on_nonfinite(on_nonfinite)

    def init_fn(params):
        flat, _ = ravel_pytree(params)
        if flat.size == 0:
            raise ValueError("`params` must contain at least one array entry.")
        if not jnp.issubdtype(flat.dtype, jnp.floating):
            raise TypeError(f"`params` must be floating point; got dtype {flat.dtype}.")
        preconditioner = make_preconditioner(flat.size, flat.dtype)
        if not isinstance(preconditioner, Preconditioner) or preconditioner.dim != flat.size:
            raise ValueError(
                f"`make_preconditioner` must return a Preconditioner of dim {flat.size}."
            )
        trainable, _ = partition_trainable(preconditioner)
        return LodoState(
            count=jnp.zeros((), jnp.int32),
            momentum=jnp.zeros_like(flat),
            preconditioner=preconditioner,
            meta_state=meta_optimizer.init(trainable),
            skipped_meta_updates=jnp.zeros((), jnp.int32),
            skipped_updates=jnp.zeros((), jnp.int32),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        gradient, unravel = ravel_pytree(updates)
        gradient = gradient.astype(state.momentum.dtype)
        if on_nonfinite == "raise":
            step, new_state = _step(gradient, state)
            finite = _all_finite(gradient, step)
            step, new_state = _apply_nonfinite_policy("raise", finite, step, new_state, state, "LODO")
            return unravel(step), new_state

        def skip(gradient, state):
            return jnp.zeros_like(gradient), state._replace(
                skipped_meta_updates=optax.safe_increment(state.skipped_meta_updates),
                skipped_updates=optax.safe_increment(state.skipped_updates),
            )

        # `lax.cond`, not `where(finite, new, old)` on the whole state (see below).
        step, new_state = jax.lax.cond(_all_finite(gradient), _step, skip, gradient, state)
        return unravel(step), new_state

    def _step(gradient, state):
        """The LODO update for a finite gradient: ``(flat step, new state)``."""
        dtype = state.momentum.dtype
        preconditioner = eqx.tree_at(
            lambda p: p.scale,
            state.preconditioner,
            jnp.asarray(initial_learning_rate, dtype),
        )
        hypergradient = lodo_hypergradient(preconditioner, state.momentum, gradient)
        trainable, structure = partition_trainable(preconditioner)

        def meta_step(operands):
            trainable, meta_state = operands
            meta_updates, meta_state = meta_optimizer.update(hypergradient, meta_state, trainable)
            return optax.apply_updates(trainable, meta_updates), meta_state

        # `lax.cond` rather than `where(finite, new, old)` on theta and the
        # meta-state: on CPU those selects cost an extra pass and copies of the
        # moments (about half an Adam step); under vmap cond becomes a select.
        # (Not isfinite(max|h|): XLA's vectorised max drops NaNs on CPU.)
        finite = jax.tree.reduce(
            jnp.logical_and,
            jax.tree.map(lambda h: jnp.all(jnp.isfinite(h)), hypergradient),
            jnp.asarray(True),
        )
        trainable, meta_state = jax.lax.cond(
            finite, meta_step, lambda operands: operands, (trainable, state.meta_state)
        )
        preconditioner = eqx.combine(trainable, structure)
        beta = jnp.asarray(momentum, dtype)
        new_momentum = beta * state.momentum + (1 - beta) * gradient
        step = -preconditioner(new_momentum)
        new_state = LodoState(
            count=optax.safe_increment(state.count),
            momentum=new_momentum,
            preconditioner=preconditioner,
            meta_state=meta_state,
            skipped_meta_updates=state.skipped_meta_updates + (~finite).astype(jnp.int32),
            skipped_updates=state.skipped_updates,
        )
        return step, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def lodo(
    meta_learning_rate: Any,
    initial_learning_rate: Any,
    momentum: Any,
    *,
    key: jax.Array,
    block_size: int = 4,
    depth: int = 16,
    hidden_dim: int | None = None,
    meta_optimizer: optax.GradientTransformation | None = None,
    unroll: int | bool = True,
    on_nonfinite: str = "skip",
) -> optax.GradientTransformationExtraArgs:
    r"""LODO (Liao et al., 2023, Algorithm 1) as an optax transformation.

    Steps $x_{t+1} = x_t - G(\theta_t) m_t$ with the gradient EMA
    $m_t = \beta m_{t-1} + (1-\beta) g_t$ and the
    [`LodoPreconditioner`][probopt.preconditioners.LodoPreconditioner]
    $G(\theta) = \alpha_0 E^\top \tilde G^\top \tilde G E$ (so $G = \alpha_0 I$
    at start: LODO begins as momentum SGD with learning rate
    $\alpha_0 (1-\beta)$), trained online by Adam on the hypergradient of the
    next loss (see `lodo_hypergradient`).

    Memory: the state holds $N \tilde n k \approx 128 n$ numbers for $\theta$
    plus the meta-optimizer's two moments, i.e. $O(n \log n)$ for $N \sim \log n$.

    Tuned values from the paper's Table 6 (meta-LR, $\alpha_0$, $\beta$):
    noisy quadratic bowl (9.6e-4, 0.270, 0.195), Rosenbrock (1.394e-4,
    0.2946, 0.897), MNIST image generation (7.946e-6, 0.08459, 0.9343).

    **Arguments:**

    - ``meta_learning_rate``: learning rate of the meta-optimizer on $\theta$.
    - ``initial_learning_rate``: $\alpha_0 > 0$.
    - ``momentum``: $\beta \in [0, 1)$.
    - ``key``: PRNG key for the permutations and initial orthogonal blocks
      (used in ``init``; vmap over keys to run several seeds).
    - ``block_size``: $k$ (default 4).
    - ``depth``: $N$ (default 16).
    - ``hidden_dim``: $\tilde n$ (default: smallest multiple of $k$ that is $\ge 2n$).
    - ``meta_optimizer``: overrides the default Adam
      (``keras_adam(meta_learning_rate)``: $\beta_1=0.9$, $\beta_2=0.999$, $\epsilon=10^{-7}$).
    - ``unroll``: `lax.scan` unrolling of the preconditioner's layers.
    - ``on_nonfinite``: ``"skip"`` (default) or ``"raise"``, for a non-finite
      gradient; see `meta_learned_preconditioner`.

    **Returns:** `optax.GradientTransformationExtraArgs` with state
    `LodoState`.

    With `optax.inject_hyperparams`, mark the structural arguments static:
    ``optax.inject_hyperparams(lodo, static_args=("key", "block_size", "depth", "unroll"))``;
    ``meta_learning_rate``, ``initial_learning_rate`` and ``momentum`` can then
    be scheduled.

    Reference: I. Liao, R. Dangovski, J. Foerster, M. Soljačić, *Learning to
    Optimize Quasi-Newton Methods*, TMLR 2023 (arXiv:2210.06171).
    """
    _check_hyperparameters(meta_learning_rate, initial_learning_rate, momentum)
    key = check_key(key)
    _check_structure(block_size, depth, hidden_dim)

    def make(dim, dtype):
        return LodoPreconditioner(
            dim,
            key=key,
            initial_learning_rate=initial_learning_rate,
            block_size=block_size,
            depth=depth,
            hidden_dim=hidden_dim,
            dtype=dtype,
            unroll=unroll,
        )

    return _build_with_default_meta_optimizer(
        make, meta_learning_rate, initial_learning_rate, momentum, meta_optimizer, on_nonfinite
    )


def lodo_no_momentum(
    meta_learning_rate: Any, initial_learning_rate: Any, *, key: jax.Array, **kwargs: Any
) -> optax.GradientTransformationExtraArgs:
    r"""LODO-No-Momentum: `lodo` with $\beta = 0$, i.e. $x_{t+1} = x_t - G(\theta_t) g_t$ (Eq. 1).

    Keyword arguments are passed on to `lodo`.
    """
    return lodo(meta_learning_rate, initial_learning_rate, 0.0, key=key, **kwargs)


def lodo_sgd(
    meta_learning_rate: Any,
    initial_learning_rate: Any,
    momentum: Any,
    *,
    key: jax.Array,
    **kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
    r"""LODO-SGD: `lodo` with plain SGD as meta-optimizer, $\theta \leftarrow \theta - \eta\, \partial\ell(x_{t+1})/\partial\theta$.

    Keyword arguments are passed on to `lodo`.
    """
    if "meta_optimizer" in kwargs:
        raise TypeError("`lodo_sgd` fixes `meta_optimizer`; use `lodo` to pass your own.")
    return lodo(
        meta_learning_rate,
        initial_learning_rate,
        momentum,
        key=key,
        meta_optimizer=optax.sgd(meta_learning_rate),
        **kwargs,
    )


def lodo_diagonal(
    meta_learning_rate: Any,
    initial_learning_rate: Any,
    momentum: Any,
    *,
    meta_optimizer: optax.GradientTransformation | None = None,
    on_nonfinite: str = "skip",
) -> optax.GradientTransformationExtraArgs:
    r"""LODO-Diagonal: $G = \alpha_0 \operatorname{diag}(w)$, $w_0 = \mathbf 1$ (a [`DiagonalPreconditioner`][probopt.preconditioners.DiagonalPreconditioner]).

    The hypergradient is $-\alpha_0\, g_{t+1} \odot m_t$.  Meta-optimizer:
    Keras-default Adam unless given.  ``on_nonfinite``: see
    `meta_learned_preconditioner`.
    """
    _check_hyperparameters(meta_learning_rate, initial_learning_rate, momentum)

    def make(dim, dtype):
        return DiagonalPreconditioner(dim, initial_learning_rate=initial_learning_rate, dtype=dtype)

    return _build_with_default_meta_optimizer(
        make, meta_learning_rate, initial_learning_rate, momentum, meta_optimizer, on_nonfinite
    )


def lodo_global(
    meta_learning_rate: Any,
    initial_learning_rate: Any,
    momentum: Any,
    *,
    meta_optimizer: optax.GradientTransformation | None = None,
    on_nonfinite: str = "skip",
) -> optax.GradientTransformationExtraArgs:
    r"""LODO-Global: $G = \alpha_0 w I$ with one scalar $w_0 = 1$ (a [`ScalarPreconditioner`][probopt.preconditioners.ScalarPreconditioner]).

    The hypergradient is $-\alpha_0\, g_{t+1}^\top m_t$; with
    ``meta_optimizer=optax.sgd(eta)`` this is hypergradient descent (Baydin
    et al., 2018) on the learning rate of momentum SGD.  Meta-optimizer:
    Keras-default Adam unless given.  (The authors' code maps this name to
    the diagonal class by mistake; this is the scalar form the paper describes.)
    ``on_nonfinite``: see `meta_learned_preconditioner`.
    """
    _check_hyperparameters(meta_learning_rate, initial_learning_rate, momentum)

    def make(dim, dtype):
        return ScalarPreconditioner(dim, initial_learning_rate=initial_learning_rate, dtype=dtype)

    return _build_with_default_meta_optimizer(
        make, meta_learning_rate, initial_learning_rate, momentum, meta_optimizer, on_nonfinite
    )


def lodo_residuals(
    meta_learning_rate: Any,
    initial_learning_rate: Any,
    momentum: Any,
    *,
    key: jax.Array,
    depth: int = 64,
    hidden_dim: int | None = None,
    init_scale: float = 0.125,
    meta_optimizer: optax.GradientTransformation | None = None,
    on_nonfinite: str = "skip",
) -> optax.GradientTransformationExtraArgs:
    r"""LODO-Residuals: $G = \alpha_0 E^\top R^\top \operatorname{diag}(d) R E$, $R = \prod_{i=L}^{1}(I + \operatorname{diag}(w_i) P_i)$.

    See [`ResidualPreconditioner`][probopt.preconditioners.ResidualPreconditioner]
    ($L = 64$, $\tilde n = 2n$, $w_i \sim \mathcal N(0, 0.125^2)$, $d_0 = \mathbf 1$).
    Meta-optimizer: Keras-default Adam unless given.  ``on_nonfinite``: see
    `meta_learned_preconditioner`.
    """
    _check_hyperparameters(meta_learning_rate, initial_learning_rate, momentum)
    key = check_key(key)

    def make(dim, dtype):
        return ResidualPreconditioner(
            dim,
            key=key,
            initial_learning_rate=initial_learning_rate,
            depth=depth,
            hidden_dim=hidden_dim,
            init_scale=init_scale,
            dtype=dtype,
        )

    return _build_with_default_meta_optimizer(
        make, meta_learning_rate, initial_learning_rate, momentum, meta_optimizer, on_nonfinite
    )
