r"""LODO's moving quadratic bowl (Liao et al. 2023, App. F.1)."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist

from .._validation import check_nonnegative, check_shape
from ._base import Problem, ProblemFamily, haar_orthogonal
from ._noisy_quadratic import _log_spaced, _square_dim


class MovingQuadraticBowl(Problem):
    r"""A quadratic bowl whose centre does a Gaussian random walk (LODO, App. F.1).

    Before every evaluation the centre moves, $c_t = c_{t-1} + n_t$ with
    $n_t\sim\mathcal N(0,\sigma^2 I)$, and the loss is

    $$\ell(x, c_t) = \tfrac12 (x - c_t)^\top H (x - c_t).$$

    **State.** The problem is immutable and holds the current centre
    $c_{t-1}$ in ``centre``.  ``sample_batch(key, B)`` draws ``B``
    independent moves $c^{(i)} = c_{t-1} + n^{(i)}$ (batch
    ``{"centre": (B, D)}``), and ``advance(batch)`` returns the problem whose
    centre is the *first* example's, $c_t = c^{(1)}$.  With ``B = 1`` this is
    exactly LODO's bowl; for ``B > 1`` the extra examples are further
    independent draws of the same move, so per-example statistics are those of
    iid samples while the walk keeps LODO's law.  A training loop is

    ```python
    batch = problem.sample_batch(key, 1)
    loss = problem.loss(x, batch)          # evaluated at the moved centre
    problem = problem.advance(batch)
    ```

    **Truth** (conditional on the current centre $c = c_{t-1}$, i.e. the
    expectation over the next move):

    - $f(x) = \tfrac12 (x-c)^\top H (x-c) + \tfrac12\sigma^2\operatorname{tr}H$;
    - $\nabla f = H(x-c)$, $\nabla^2 f = H$, per-example gradient covariance
      $\sigma^2 H^2$;
    - $x^\star = c$ and $f^\star = \tfrac12\sigma^2\operatorname{tr}H$, the
      expected loss of Newton's method ($x_t = c_{t-1}$), which is the best any
      optimizer can do in expectation: **7.41** for LODO's $H$ and $\sigma^2=1$.

    **Attributes:**

    - ``hessian_matrix``: $H$, shape ``(D, D)``.
    - ``centre``: the current centre $c_{t-1}$, shape ``(D,)``.
    - ``centre_noise_scale``: $\sigma$, shape ``()``.

    The documented start is $x_0 = c_0 = 0$.
    """

    hessian_matrix: jax.Array
    centre: jax.Array
    centre_noise_scale: jax.Array = eqx.field(converter=jnp.asarray)

    def __check_init__(self):
        dim = _square_dim(self.hessian_matrix, "hessian_matrix")
        check_shape(self.centre, (dim,), "centre")
        check_shape(self.centre_noise_scale, (), "centre_noise_scale")
        check_nonnegative(self.centre_noise_scale, "centre_noise_scale")

    @property
    def dim(self) -> int:
        return self.hessian_matrix.shape[0]

    @property
    def batch_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"centre": (self.dim,)}

    def start(self) -> jax.Array:
        return jnp.zeros(self.dim, self.hessian_matrix.dtype)

    def model(self, batch_size: int) -> None:
        """``centre`` ~ $\\mathcal N(c_{t-1}, \\sigma^2 I)$, ``batch_size`` times (plate ``"batch"``)."""
        with numpyro.plate("batch", batch_size):
            numpyro.sample("centre", dist.Normal(self.centre, self.centre_noise_scale).to_event(1))

    def advance(self, batch: dict[str, jax.Array]) -> "MovingQuadraticBowl":
        """The problem after the move: its centre becomes ``batch["centre"][0]``."""
        batch = self.check_batch(batch, self.centre.dtype)
        return eqx.tree_at(lambda problem: problem.centre, self, batch["centre"][0])

    def loss(self, params, batch):
        params = self.check_params(params)
        centres = self.check_batch(batch, params.dtype)["centre"]
        residual = params[None, :] - centres
        hessian = self.hessian_matrix.astype(params.dtype)
        return 0.5 * jnp.einsum("bi,ij,bj->b", residual, hessian, residual)

    def full_loss(self, params):
        params = self.check_params(params)
        residual = params - self.centre.astype(params.dtype)
        hessian = self.hessian_matrix.astype(params.dtype)
        return 0.5 * residual @ hessian @ residual + self.optimal_loss.astype(params.dtype)

    def full_grad(self, params):
        params = self.check_params(params)
        residual = params - self.centre.astype(params.dtype)
        return self.hessian_matrix.astype(params.dtype) @ residual

    def hessian(self, params):
        params = self.check_params(params)
        return self.hessian_matrix.astype(params.dtype)

    def gradient_noise_covariance(self, params):
        params = self.check_params(params)
        hessian = self.hessian_matrix.astype(params.dtype)
        return self.centre_noise_scale.astype(params.dtype) ** 2 * (hessian @ hessian)

    def optimum(self):
        return self.centre

    @property
    def optimal_loss(self):
        return 0.5 * self.centre_noise_scale**2 * jnp.trace(self.hessian_matrix)

    @property
    def newton_optimum(self) -> jax.Array:
        r"""Expected loss of Newton's method, $\tfrac12\sigma^2\operatorname{tr}H$ (= ``optimal_loss``)."""
        return self.optimal_loss


class MovingQuadraticBowlFamily(ProblemFamily):
    r"""Random [`MovingQuadraticBowl`][probopt.problems.MovingQuadraticBowl] instances (LODO, App. F.1).

    $H = U^\top\operatorname{diag}(\lambda) U$ with $U$ uniform on the
    orthogonal group (QR of a Gaussian matrix with the sign fix) and
    $\lambda$ geometric from ``min_eigenvalue`` to ``max_eigenvalue``.  The
    walk starts at $c_0 = 0$.  With the defaults ($n = 100$, $10^{-3}\dots 1$,
    $\sigma = 1$), $\operatorname{tr} H = 14.82$ and the Newton optimum is
    $7.41$.

    NumPyro sites of ``model``: ``"gaussian_matrix"``, deterministic
    ``"rotation"`` and ``"hessian"``, then ``"centre"`` (the first move) when a
    ``batch_size`` is given.

    **Arguments:**

    - ``dim``: $n$ (default 100).
    - ``min_eigenvalue``, ``max_eigenvalue``: ends of the geometric spectrum
      (defaults $10^{-3}$ and 1).
    - ``centre_noise_scale``: $\sigma$, the standard deviation of each move
      per coordinate (default 1).
    """

    dim: int = eqx.field(static=True, default=100)
    min_eigenvalue: float = 1e-3
    max_eigenvalue: float = 1.0
    centre_noise_scale: float = 1.0

    def __check_init__(self):
        if not isinstance(self.dim, int) or self.dim < 1:
            raise ValueError(f"`dim` must be a positive int; got {self.dim!r}.")
        lo, hi = self.min_eigenvalue, self.max_eigenvalue
        if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and not 0 < lo <= hi:
            raise ValueError(
                f"`min_eigenvalue` and `max_eigenvalue` must satisfy 0 < min <= max; got {lo!r}, {hi!r}."
            )
        if isinstance(self.centre_noise_scale, (int, float)) and self.centre_noise_scale <= 0:
            raise ValueError(
                f"`centre_noise_scale` must be positive; got {self.centre_noise_scale!r}."
            )

    def eigenvalues(self) -> jax.Array:
        """The spectrum of $H$, increasing geometric, shape ``(n,)``."""
        return _log_spaced(self.min_eigenvalue, self.max_eigenvalue, self.dim)

    def model(self, batch_size: int | None = None) -> MovingQuadraticBowl:
        gaussian = numpyro.sample(
            "gaussian_matrix", dist.Normal(0.0, 1.0).expand((self.dim, self.dim)).to_event(2)
        )
        rotation = numpyro.deterministic("rotation", haar_orthogonal(gaussian))
        hessian = rotation.T @ (self.eigenvalues()[:, None] * rotation)
        hessian = numpyro.deterministic("hessian", 0.5 * (hessian + hessian.T))
        problem = MovingQuadraticBowl(
            hessian_matrix=hessian,
            centre=jnp.zeros(self.dim, hessian.dtype),
            centre_noise_scale=jnp.asarray(self.centre_noise_scale, hessian.dtype),
        )
        if batch_size is not None:
            problem.model(batch_size)
        return problem
