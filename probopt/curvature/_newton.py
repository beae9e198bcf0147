r"""Newton, damped Newton and Hessian-free (conjugate-gradient) directions.

The damped Newton direction solves $(H + \lambda I)\,d = g$.  At $\lambda = 0$
it is Newton's method, which minimises a quadratic in one step; as
$\lambda \to \infty$, $\lambda d \to g$ and the step becomes gradient descent
with learning rate $1/\lambda$ (Perone, "Gradient-based Optimization", the
damped-Hessian slide).  Dense solves materialise the $P\times P$ Hessian and
suit small problems; the Hessian-free variant (Martens, 2010) only needs
Hessian-vector products and runs conjugate gradients on them.

Fallback (documented, counted in the state): when the solve is not finite or
its result is not a descent direction ($g^\top d \le 0$, i.e. $H + \lambda I$
is not positive definite along $g$), the transformation returns the gradient
$g$ itself, i.e. a gradient-descent step, and increments ``fallback_count``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
from jax.scipy.sparse.linalg import cg

from .._validation import check_same_structure, is_concrete


def _check_damping(damping: Any) -> None:
    if is_concrete(damping) and not np.all(np.asarray(damping) >= 0):
        raise ValueError(f"`damping` must be non-negative; got {damping!r}.")


def hessian_vector_product(value_fn: Callable[[Any], jax.Array], params: Any, vector: Any) -> Any:
    r"""$H v$ by forward-over-reverse differentiation, ``jvp(grad(value_fn))``.

    **Arguments:**

    - `value_fn`: ``params -> scalar`` loss.
    - `params`: point $\theta$ at which $H = \nabla^2 f(\theta)$.
    - `vector`: $v$, pytree like `params`.

    **Returns:** $Hv$, pytree like `params`.
    """
    return jax.jvp(jax.grad(value_fn), (params,), (vector,))[1]


def hessian_matrix(value_fn: Callable[[Any], jax.Array], params: Any) -> jax.Array:
    r"""Dense Hessian of ``value_fn`` over the flattened parameters, shape ``(P, P)``.

    The flattening is ``jax.flatten_util.ravel_pytree(params)``.
    """
    flat, unravel = ravel_pytree(params)
    return jax.hessian(lambda v: value_fn(unravel(v)))(flat)


def _descent_or_gradient(direction: jax.Array, grad: jax.Array) -> tuple[jax.Array, jax.Array]:
    ok = jnp.all(jnp.isfinite(direction)) & (jnp.vdot(grad, direction) > 0)
    ok = ok | jnp.all(grad == 0)
    return jnp.where(ok, direction, grad), ~ok


def damped_newton_solve(hessian: jax.Array, grad: jax.Array, damping: Any = 0.0) -> jax.Array:
    r"""Solve $(H + \lambda I)d = g$ for flat arrays (``hessian`` symmetrised first).

    **Arguments:**

    - `hessian`: $H$, shape ``(P, P)``.
    - `grad`: $g$, shape ``(P,)``.
    - `damping`: $\lambda \ge 0$.
    """
    _check_damping(damping)
    p = grad.shape[0]
    if hessian.shape != (p, p):
        raise ValueError(f"`hessian` must have shape ({p}, {p}) to match `grad`; got {hessian.shape}.")
    sym = 0.5 * (hessian + hessian.T)
    return jnp.linalg.solve(sym + jnp.asarray(damping, sym.dtype) * jnp.eye(p, dtype=sym.dtype), grad)


def newton_direction(value_fn: Callable[[Any], jax.Array], params: Any, *, damping: Any = 0.0) -> Any:
    r"""Damped Newton direction $(\nabla^2 f + \lambda I)^{-1}\nabla f$ at ``params`` (dense).

    The step is ``params - direction``.  No fallback is applied here: with an
    indefinite Hessian the result may be an ascent direction.

    **Arguments:**

    - `value_fn`: ``params -> scalar`` loss.
    - `params`: pytree $\theta$.
    - `damping`: $\lambda \ge 0$.

    **Returns:** pytree like `params`.
    """
    flat, unravel = ravel_pytree(params)
    grad = jax.grad(lambda v: value_fn(unravel(v)))(flat)
    return unravel(damped_newton_solve(hessian_matrix(value_fn, params), grad, damping))


def hessian_free_direction(
    hvp: Callable[[Any], Any],
    grad: Any,
    *,
    damping: Any = 0.0,
    maxiter: int | None = None,
    tol: float = 1e-10,
) -> Any:
    r"""Approximately solve $(H + \lambda I)d = g$ by conjugate gradients on HVPs.

    Uses ``jax.scipy.sparse.linalg.cg`` (pytree-aware), started at zero.
    CG assumes $H + \lambda I$ is positive definite; on non-convex problems
    use enough damping.

    **Arguments:**

    - `hvp`: ``v -> H v`` on pytrees like `grad` (e.g. ``lambda v:
      hessian_vector_product(value_fn, params, v)``).
    - `grad`: $g$, pytree.
    - `damping`: $\lambda \ge 0$.
    - `maxiter`: CG iterations (default: the number of parameters).
    - `tol`: relative residual tolerance.

    **Returns:** pytree like `grad`.
    """
    _check_damping(damping)

    def matvec(v):
        return jax.tree.map(lambda hv, x: hv + jnp.asarray(damping, x.dtype) * x, hvp(v), v)

    solution, _ = cg(matvec, grad, tol=tol, maxiter=maxiter)
    return solution


class NewtonState(NamedTuple):
    """State of the Newton-type transformations.

    **Attributes:**

    - `fallback_count`: number of updates that fell back to the gradient
      because the solve failed or was not a descent direction, shape ``()``.
    """

    fallback_count: jax.Array  # shape=()


def scale_by_newton(*, damping: float = 0.0) -> optax.GradientTransformationExtraArgs:
    r"""Precondition the updates by $(H + \lambda I)^{-1}$ with a dense Hessian.

    Returns $d = (H + \lambda I)^{-1} g$ (gradient sign convention; chain a
    negative learning rate, or use [`newton`][probopt.curvature.newton]).

    **Arguments:**

    - `damping`: $\lambda \ge 0$.

    **Extra arguments of `update` (keyword-only, exactly one required):**

    - `value_fn`: ``params -> scalar``, the loss whose Hessian is taken at
      ``params`` (which is then required too); or
    - `hessian`: the dense Hessian, shape ``(P, P)`` over
      ``ravel_pytree(updates)``.
    """
    _check_damping(damping)

    def init_fn(params):
        del params
        return NewtonState(fallback_count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None, *, value_fn=None, hessian=None, **extra_args):
        del extra_args
        if (value_fn is None) == (hessian is None):
            raise TypeError("scale_by_newton.update needs exactly one of `value_fn=` or `hessian=`.")
        if value_fn is not None:
            if params is None:
                raise ValueError("scale_by_newton.update with `value_fn=` needs `params`.")
            check_same_structure(params, updates, "params", "updates")
            hessian = hessian_matrix(value_fn, params)
        grad, unravel = ravel_pytree(updates)
        direction = damped_newton_solve(hessian.astype(grad.dtype), grad, damping)
        direction, fell_back = _descent_or_gradient(direction, grad)
        return unravel(direction), NewtonState(state.fallback_count + fell_back.astype(jnp.int32))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def newton(learning_rate: optax.ScalarOrSchedule = 1.0, *, damping: float = 0.0) -> optax.GradientTransformationExtraArgs:
    r"""(Damped) Newton's method: $\theta \leftarrow \theta - \eta\,(H + \lambda I)^{-1} g$.

    Pass ``value_fn=`` (or ``hessian=``) to ``update``; see
    [`scale_by_newton`][probopt.curvature.scale_by_newton].

    **Arguments:**

    - `learning_rate`: $\eta$ (1 for the pure Newton step).
    - `damping`: $\lambda \ge 0$.
    """
    return optax.chain(scale_by_newton(damping=damping), optax.scale_by_learning_rate(learning_rate))


def scale_by_hessian_free(
    *, damping: float = 1e-3, maxiter: int | None = None, tol: float = 1e-10
) -> optax.GradientTransformationExtraArgs:
    r"""Precondition by $(H + \lambda I)^{-1}$ using conjugate gradients on HVPs.

    **Arguments:**

    - `damping`: $\lambda \ge 0$.
    - `maxiter`, `tol`: conjugate-gradient budget, see
      [`hessian_free_direction`][probopt.curvature.hessian_free_direction].

    **Extra arguments of `update` (keyword-only, exactly one required):**

    - `value_fn`: ``params -> scalar`` (``params`` then required); HVPs are
      taken by ``jvp(grad(value_fn))``; or
    - `hvp`: ``v -> H v`` on pytrees like ``updates``.
    """
    _check_damping(damping)

    def init_fn(params):
        del params
        return NewtonState(fallback_count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None, *, value_fn=None, hvp=None, **extra_args):
        del extra_args
        if (value_fn is None) == (hvp is None):
            raise TypeError("scale_by_hessian_free.update needs exactly one of `value_fn=` or `hvp=`.")
        if value_fn is not None:
            if params is None:
                raise ValueError("scale_by_hessian_free.update with `value_fn=` needs `params`.")
            check_same_structure(params, updates, "params", "updates")
            hvp = lambda v: hessian_vector_product(value_fn, params, v)  # noqa: E731
        direction = hessian_free_direction(hvp, updates, damping=damping, maxiter=maxiter, tol=tol)
        flat_dir, unravel = ravel_pytree(direction)
        flat_grad, _ = ravel_pytree(updates)
        flat_dir, fell_back = _descent_or_gradient(flat_dir, flat_grad)
        return unravel(flat_dir), NewtonState(state.fallback_count + fell_back.astype(jnp.int32))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def hessian_free_newton(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    *,
    damping: float = 1e-3,
    maxiter: int | None = None,
    tol: float = 1e-10,
) -> optax.GradientTransformationExtraArgs:
    r"""Hessian-free Newton: $\theta \leftarrow \theta - \eta\,\mathrm{CG}(H + \lambda I, g)$.

    Pass ``value_fn=`` (or ``hvp=``) to ``update``; see
    [`scale_by_hessian_free`][probopt.curvature.scale_by_hessian_free].
    """
    return optax.chain(
        scale_by_hessian_free(damping=damping, maxiter=maxiter, tol=tol),
        optax.scale_by_learning_rate(learning_rate),
    )
