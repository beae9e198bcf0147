r"""The interface shared by probopt's test problems and their families.

A *problem* is one fixed instance (its Hessian, centre, ... are arrays held as
Equinox fields) that draws minibatches of observations and knows its own
truth.  A *family* is the random recipe that produces problems; its
``model`` is a NumPyro model whose sample sites are the random pieces of the
instance and, optionally, a batch of observations, so
``numpyro.infer.Predictive`` can draw both.

Every problem's loss is a mean of per-example losses,

$$f(\theta) = \mathbb E_\xi\, \ell(\theta, \xi),$$

and ``loss(params, batch)`` returns the vector $(\ell(\theta, \xi_i))_{i=1}^B$
(one loss per example, never averaged), which is the contract of
`probopt.batch_stats`.
"""

from __future__ import annotations

import abc
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from numpyro import handlers

from .._validation import check_shape


def haar_orthogonal(gaussian_matrix: jax.Array) -> jax.Array:
    r"""Map a matrix of iid standard normals to a uniform (Haar) orthogonal matrix.

    Takes the QR factorisation $G = QR$ and flips the sign of each column of
    $Q$ so that $\operatorname{diag}(R) > 0$; without that fix $Q$ is not
    uniformly distributed (Mezzadri 2007, *How to generate random matrices
    from the classical compact groups*).

    **Arguments:**

    - ``gaussian_matrix``: shape ``(n, n)``, iid $\mathcal N(0, 1)$ entries.

    **Returns:** an orthogonal matrix of shape ``(n, n)``.
    """
    q, r = jnp.linalg.qr(gaussian_matrix)
    signs = jnp.sign(jnp.diagonal(r))
    # A zero diagonal entry has probability zero; map it to +1 rather than 0.
    signs = jnp.where(signs == 0, 1.0, signs).astype(q.dtype)
    return q * signs[None, :]


def _float_dtype(params: Any) -> Any:
    dtype = jnp.result_type(params)
    return dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.result_type(float)


class Problem(eqx.Module):
    r"""Abstract stochastic test problem with a known truth.

    Parameters are a single 1-D array of shape ``(D,)``.  Batches are dicts of
    arrays whose leading axis is the batch size ``B`` (the names and
    per-example shapes are given by ``batch_shapes``).

    Subclasses implement the per-example ``loss``, the NumPyro observation
    ``model`` and the truth queries (``full_loss``, ``full_grad``, ``hvp``,
    ``hessian``, ``optimum``, ``optimal_loss``,
    ``gradient_noise_covariance``) in closed form; the tests compare these
    against ``jax.grad``/``jax.hessian`` and Monte Carlo.

    Every method computes in the dtype of ``params``, so float32 parameters
    give float32 losses and gradients even when the problem's arrays are
    float64.
    """

    # ----------------------------------------------------------- to implement
    @property
    @abc.abstractmethod
    def dim(self) -> int:
        """Number of parameters ``D``."""

    @property
    @abc.abstractmethod
    def batch_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-example shape of every batch entry, e.g. ``{"xi": (D,)}``."""

    @abc.abstractmethod
    def start(self) -> jax.Array:
        """The documented deterministic starting point, shape ``(D,)``."""

    @abc.abstractmethod
    def model(self, batch_size: int) -> None:
        """NumPyro model with one sample site per batch entry, inside a plate ``"batch"``."""

    @abc.abstractmethod
    def loss(self, params: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
        """Per-example losses $\\ell(\\theta, \\xi_i)$, shape ``(B,)``."""

    @abc.abstractmethod
    def full_loss(self, params: jax.Array) -> jax.Array:
        """The expected loss $f(\\theta) = \\mathbb E_\\xi \\ell(\\theta,\\xi)$, shape ``()``."""

    @abc.abstractmethod
    def full_grad(self, params: jax.Array) -> jax.Array:
        """The true gradient $\\nabla f(\\theta)$, shape ``(D,)``."""

    @abc.abstractmethod
    def hessian(self, params: jax.Array) -> jax.Array:
        """The true Hessian $\\nabla^2 f(\\theta)$, shape ``(D, D)``."""

    @abc.abstractmethod
    def gradient_noise_covariance(self, params: jax.Array) -> jax.Array:
        r"""Per-example gradient covariance $\operatorname{Cov}_\xi[\nabla\ell(\theta,\xi)]$, ``(D, D)``.

        The covariance of a minibatch-mean gradient of ``B`` independent
        examples is this divided by ``B``.
        """

    @abc.abstractmethod
    def optimum(self) -> jax.Array:
        """The minimiser $\\theta^\\star$ of ``full_loss``, shape ``(D,)``."""

    @property
    @abc.abstractmethod
    def optimal_loss(self) -> jax.Array:
        """$f(\\theta^\\star)$, shape ``()``."""

    # -------------------------------------------------------------- provided
    def hvp(self, params: jax.Array, vector: jax.Array) -> jax.Array:
        r"""The true Hessian-vector product $\nabla^2 f(\theta)\, v$, shape ``(D,)``."""
        params = self.check_params(params)
        check_shape(vector, (self.dim,), "vector")
        return self.hessian(params) @ jnp.asarray(vector, params.dtype)

    def init_params(self, key: jax.Array | None = None, *, scale: float = 1.0) -> jax.Array:
        r"""A starting point, shape ``(D,)``.

        **Arguments:**

        - ``key``: ``None`` returns the problem's documented start
          (``start()``); a PRNG key returns
          $\theta_0 = \text{start} + \text{scale}\cdot z$, $z\sim\mathcal N(0, I)$.
        - ``scale``: standard deviation of the random perturbation.
        """
        start = self.start()
        if key is None:
            return start
        return start + scale * jax.random.normal(key, start.shape, start.dtype)

    def sample_batch(self, key: jax.Array, batch_size: int) -> dict[str, jax.Array]:
        """Draw ``batch_size`` independent examples by running ``model``.

        **Returns:** a dict of arrays shaped ``(batch_size, *batch_shapes[name])``.
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive int; got {batch_size!r}.")
        return _sample_batch(self, key, batch_size)

    # ------------------------------------------------------------ validation
    def check_params(self, params: Any) -> jax.Array:
        """Return ``params`` as an array after checking it has shape ``(D,)``."""
        try:
            params = jnp.asarray(params)
        except TypeError as error:
            raise TypeError(
                f"`params` must be an array of shape ({self.dim},); got {type(params).__name__}."
            ) from error
        params = params.astype(_float_dtype(params))
        check_shape(params, (self.dim,), "params")
        return params

    def check_batch(self, batch: Any, dtype: Any) -> dict[str, jax.Array]:
        """Check names and shapes of ``batch``; return it cast to ``dtype``."""
        expected = self.batch_shapes
        if not isinstance(batch, dict) or set(batch) != set(expected):
            got = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
            raise ValueError(f"`batch` must be a dict with keys {sorted(expected)}; got {got}.")
        sizes = set()
        for name, event_shape in expected.items():
            shape = jnp.shape(batch[name])
            if len(shape) != 1 + len(event_shape) or tuple(shape[1:]) != tuple(event_shape):
                raise ValueError(
                    f"`batch['{name}']` must have shape (batch_size, "
                    f"{', '.join(map(str, event_shape))}); got {shape}."
                )
            sizes.add(shape[0])
        if len(sizes) != 1:
            raise ValueError(
                f"every entry of `batch` must share the same leading batch size; got {sorted(sizes)}."
            )
        return {name: jnp.asarray(value, dtype) for name, value in batch.items()}


class ProblemFamily(eqx.Module):
    """Abstract random recipe for problems of one kind.

    ``model(batch_size=None)`` is a NumPyro model whose sample sites are the
    random pieces of an instance (with ``numpyro.deterministic`` sites for
    the derived arrays, e.g. ``"hessian"``) followed, when ``batch_size`` is
    given, by the instance's observation model.  It returns the problem.
    ``sample(key)`` runs exactly that model, so the NumPyro model *is* the
    generator.
    """

    @abc.abstractmethod
    def model(self, batch_size: int | None = None) -> Problem:
        """NumPyro model of an instance (and, with ``batch_size``, a batch); returns the problem."""

    def sample(self, key: jax.Array) -> Problem:
        """Draw one problem instance; works under ``jit`` and ``vmap`` over keys."""
        return _sample_problem(self, key)


# Compiled once per problem/family type and shape, so eager calls are cheap.
@eqx.filter_jit
def _sample_problem(family: ProblemFamily, key: jax.Array) -> Problem:
    return handlers.seed(family.model, rng_seed=key)()


@eqx.filter_jit
def _sample_batch(problem: Problem, key: jax.Array, batch_size: int) -> dict[str, jax.Array]:
    trace = handlers.trace(handlers.seed(problem.model, rng_seed=key)).get_trace(batch_size)
    return {name: trace[name]["value"] for name in problem.batch_shapes}
