r"""Meka's noisy quadratic (Chen et al., Meka paper, Sec. 6, Eq. 14)."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist

from .._validation import check_shape
from ._base import Problem, ProblemFamily, haar_orthogonal


class NoisyQuadratic(Problem):
    r"""A quadratic whose minimiser is jittered per example (Meka, Eq. 14).

    $$\ell(\theta, \xi) = \tfrac12 (\theta-\xi)^\top H (\theta-\xi),\qquad
      \xi \sim \mathcal N(0, \Sigma_\xi).$$

    Truth, in closed form:

    - $f(\theta) = \tfrac12\theta^\top H\theta + \tfrac12\operatorname{tr}(H\Sigma_\xi)$,
      minimised at $\theta^\star = 0$ with $f^\star = \tfrac12\operatorname{tr}(H\Sigma_\xi)$;
    - $\nabla f(\theta) = H\theta$, $\nabla^2 f = H$;
    - per-example gradient covariance $H\Sigma_\xi H$, independent of $\theta$;
    - every example has Hessian exactly $H$, so Hessian-vector products are
      noise-free (Meka's $Q = 0$).

    **Attributes:**

    - ``hessian_matrix``: $H$, symmetric positive definite, shape ``(D, D)``.
    - ``noise_covariance``: $\Sigma_\xi$, symmetric positive definite, shape ``(D, D)``.

    The documented start is $\theta_0 = (1, \dots, 1)$.  Batches are
    ``{"xi": (B, D)}``.  Build random instances with
    [`NoisyQuadraticFamily`][probopt.problems.NoisyQuadraticFamily].
    """

    hessian_matrix: jax.Array
    noise_covariance: jax.Array

    def __check_init__(self):
        dim = _square_dim(self.hessian_matrix, "hessian_matrix")
        check_shape(self.noise_covariance, (dim, dim), "noise_covariance")

    @property
    def dim(self) -> int:
        return self.hessian_matrix.shape[0]

    @property
    def batch_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"xi": (self.dim,)}

    def start(self) -> jax.Array:
        return jnp.ones(self.dim, self.hessian_matrix.dtype)

    def model(self, batch_size: int) -> None:
        """``xi`` ~ $\\mathcal N(0, \\Sigma_\\xi)$, ``batch_size`` times (plate ``"batch"``)."""
        scale_tril = jnp.linalg.cholesky(self.noise_covariance)
        with numpyro.plate("batch", batch_size):
            numpyro.sample(
                "xi", dist.MultivariateNormal(jnp.zeros(self.dim), scale_tril=scale_tril)
            )

    def loss(self, params, batch):
        params = self.check_params(params)
        xi = self.check_batch(batch, params.dtype)["xi"]
        residual = params[None, :] - xi
        hessian = self.hessian_matrix.astype(params.dtype)
        return 0.5 * jnp.einsum("bi,ij,bj->b", residual, hessian, residual)

    def full_loss(self, params):
        params = self.check_params(params)
        hessian = self.hessian_matrix.astype(params.dtype)
        noise = self.noise_covariance.astype(params.dtype)
        return 0.5 * params @ hessian @ params + 0.5 * jnp.sum(hessian * noise.T)

    def full_grad(self, params):
        params = self.check_params(params)
        return self.hessian_matrix.astype(params.dtype) @ params

    def hessian(self, params):
        params = self.check_params(params)
        return self.hessian_matrix.astype(params.dtype)

    def gradient_noise_covariance(self, params):
        params = self.check_params(params)
        hessian = self.hessian_matrix.astype(params.dtype)
        return hessian @ self.noise_covariance.astype(params.dtype) @ hessian

    def optimum(self):
        return jnp.zeros(self.dim, self.hessian_matrix.dtype)

    @property
    def optimal_loss(self):
        return 0.5 * jnp.sum(self.hessian_matrix * self.noise_covariance.T)


def _square_dim(matrix, name: str) -> int:
    shape = jnp.shape(matrix)
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(f"`{name}` must be a square (D, D) matrix; got shape {shape}.")
    return shape[0]


def _log_spaced(low: float, high: float, num: int) -> jax.Array:
    return jnp.exp(jnp.linspace(jnp.log(low), jnp.log(high), num))


class NoisyQuadraticFamily(ProblemFamily):
    r"""Random [`NoisyQuadratic`][probopt.problems.NoisyQuadratic] instances (Meka, Sec. 6).

    $H = U^\top \operatorname{diag}(\lambda) U$ with $U$ uniform on the
    orthogonal group and eigenvalues $\lambda$ log-spaced from
    ``max_eigenvalue / condition_number`` to ``max_eigenvalue``, so
    $\kappa(H)$ equals ``condition_number`` exactly.  The noise is isotropic,
    $\Sigma_\xi = \text{noise\_scale}^2 I$.

    NumPyro sites of ``model``: ``"gaussian_matrix"`` (``(D, D)`` iid
    $\mathcal N(0,1)$), deterministic ``"rotation"`` ($U$, by
    [`haar_orthogonal`][probopt.problems.haar_orthogonal]) and ``"hessian"``,
    then ``"xi"`` when a ``batch_size`` is given.

    **Arguments:**

    - ``dim``: $D$ (default 20, as in Meka's Fig. 4).
    - ``condition_number``: $\kappa$ (default $10^3$).
    - ``noise_scale``: standard deviation of each coordinate of $\xi$ (default 1).
    - ``max_eigenvalue``: largest eigenvalue of $H$ (default 1).
    """

    dim: int = eqx.field(static=True, default=20)
    condition_number: float = 1e3
    noise_scale: float = 1.0
    max_eigenvalue: float = 1.0

    def __check_init__(self):
        if not isinstance(self.dim, int) or self.dim < 1:
            raise ValueError(f"`dim` must be a positive int; got {self.dim!r}.")
        if isinstance(self.condition_number, (int, float)) and self.condition_number < 1:
            raise ValueError(f"`condition_number` must be >= 1; got {self.condition_number!r}.")
        if isinstance(self.noise_scale, (int, float)) and self.noise_scale <= 0:
            raise ValueError(f"`noise_scale` must be positive; got {self.noise_scale!r}.")
        if isinstance(self.max_eigenvalue, (int, float)) and self.max_eigenvalue <= 0:
            raise ValueError(f"`max_eigenvalue` must be positive; got {self.max_eigenvalue!r}.")

    def eigenvalues(self) -> jax.Array:
        """The spectrum of $H$, increasing, shape ``(D,)``."""
        return _log_spaced(self.max_eigenvalue / self.condition_number, self.max_eigenvalue, self.dim)

    def model(self, batch_size: int | None = None) -> NoisyQuadratic:
        gaussian = numpyro.sample(
            "gaussian_matrix", dist.Normal(0.0, 1.0).expand((self.dim, self.dim)).to_event(2)
        )
        rotation = numpyro.deterministic("rotation", haar_orthogonal(gaussian))
        hessian = rotation.T @ (self.eigenvalues()[:, None] * rotation)
        hessian = numpyro.deterministic("hessian", 0.5 * (hessian + hessian.T))
        noise = jnp.asarray(self.noise_scale, hessian.dtype) ** 2 * jnp.eye(self.dim, dtype=hessian.dtype)
        problem = NoisyQuadratic(hessian_matrix=hessian, noise_covariance=noise)
        if batch_size is not None:
            problem.model(batch_size)
        return problem
