r"""The noisy quadratic model (NQM) of Zhang et al. (2019)."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist

from .._validation import check_nonnegative, check_shape
from ._base import Problem, ProblemFamily


class DiagonalNoisyQuadratic(Problem):
    r"""Diagonal quadratic with gradient noise proportional to the curvature.

    The noisy quadratic model of Zhang et al., *Which algorithmic choices
    matter at which batch sizes?* (NeurIPS 2019): $f(\theta) = \tfrac12
    \sum_i h_i\theta_i^2$ with $h_i = 1/i$, observed through minibatch
    gradients with covariance $C/B = s^2 H/B$.  Per example,

    $$\ell(\theta, \xi) = \tfrac12 \theta^\top H\theta + \xi^\top\theta,\qquad
      \xi\sim\mathcal N(0, s^2 H),\quad H = \operatorname{diag}(h),$$

    so that $\mathbb E\,\ell = f$ exactly, every per-example gradient
    $H\theta + \xi$ is unbiased with covariance $s^2 H$, and a minibatch mean
    of $B$ examples has covariance $s^2 H / B$.  Every example's Hessian is
    exactly $H$.

    Truth: $\nabla f = H\theta$, $\nabla^2 f = H$, $\theta^\star = 0$,
    $f^\star = 0$.

    **Attributes:**

    - ``curvatures``: $h$, positive, shape ``(D,)``.
    - ``gradient_noise_scale``: $s$, shape ``()``.

    The documented start is $\theta_0 = (1,\dots,1)$.  Batches are
    ``{"xi": (B, D)}``.  ``hessian`` and ``gradient_noise_covariance`` build
    dense ``(D, D)`` matrices: use them for small ``D`` only
    (``curvatures`` is the diagonal).
    """

    curvatures: jax.Array
    gradient_noise_scale: jax.Array = eqx.field(converter=jnp.asarray)

    def __check_init__(self):
        if jnp.ndim(self.curvatures) != 1:
            raise ValueError(
                f"`curvatures` must be a vector of shape (D,); got shape {jnp.shape(self.curvatures)}."
            )
        check_shape(self.gradient_noise_scale, (), "gradient_noise_scale")
        check_nonnegative(self.gradient_noise_scale, "gradient_noise_scale")

    @property
    def dim(self) -> int:
        return self.curvatures.shape[0]

    @property
    def batch_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"xi": (self.dim,)}

    def start(self) -> jax.Array:
        return jnp.ones(self.dim, self.curvatures.dtype)

    def model(self, batch_size: int) -> None:
        """``xi`` ~ $\\mathcal N(0, s^2 H)$, ``batch_size`` times (plate ``"batch"``)."""
        scale = self.gradient_noise_scale * jnp.sqrt(self.curvatures)
        with numpyro.plate("batch", batch_size):
            numpyro.sample("xi", dist.Normal(jnp.zeros_like(scale), scale).to_event(1))

    def loss(self, params, batch):
        params = self.check_params(params)
        xi = self.check_batch(batch, params.dtype)["xi"]
        return self.full_loss(params) + xi @ params

    def full_loss(self, params):
        params = self.check_params(params)
        return 0.5 * jnp.sum(self.curvatures.astype(params.dtype) * params**2)

    def full_grad(self, params):
        params = self.check_params(params)
        return self.curvatures.astype(params.dtype) * params

    def hvp(self, params, vector):
        params = self.check_params(params)
        check_shape(vector, (self.dim,), "vector")
        return self.curvatures.astype(params.dtype) * jnp.asarray(vector, params.dtype)

    def hessian(self, params):
        params = self.check_params(params)
        return jnp.diag(self.curvatures.astype(params.dtype))

    def gradient_noise_covariance(self, params):
        params = self.check_params(params)
        scale = self.gradient_noise_scale.astype(params.dtype)
        return scale**2 * jnp.diag(self.curvatures.astype(params.dtype))

    def optimum(self):
        return jnp.zeros(self.dim, self.curvatures.dtype)

    @property
    def optimal_loss(self):
        return jnp.zeros((), self.curvatures.dtype)


class DiagonalNoisyQuadraticFamily(ProblemFamily):
    r"""The [`DiagonalNoisyQuadratic`][probopt.problems.DiagonalNoisyQuadratic] of Zhang et al. (2019).

    The instance is deterministic ($h_i = 1/i$, $i = 1..D$), so ``sample``
    ignores its key (it takes one for a uniform interface with the other
    families) and ``model`` has no instance sites, only ``"xi"`` when a
    ``batch_size`` is given.

    **Arguments:**

    - ``dim``: $D$ (default $10^4$, as in Zhang et al.).
    - ``gradient_noise_scale``: $s$; the per-example gradient covariance is
      $s^2 H$ (default 1, i.e. $C = H$).
    """

    dim: int = eqx.field(static=True, default=10_000)
    gradient_noise_scale: float = 1.0

    def __check_init__(self):
        if not isinstance(self.dim, int) or self.dim < 1:
            raise ValueError(f"`dim` must be a positive int; got {self.dim!r}.")
        if isinstance(self.gradient_noise_scale, (int, float)) and self.gradient_noise_scale <= 0:
            raise ValueError(
                f"`gradient_noise_scale` must be positive; got {self.gradient_noise_scale!r}."
            )

    def model(self, batch_size: int | None = None) -> DiagonalNoisyQuadratic:
        curvatures = 1.0 / jnp.arange(1, self.dim + 1, dtype=jnp.result_type(float))
        problem = DiagonalNoisyQuadratic(
            curvatures=curvatures,
            gradient_noise_scale=jnp.asarray(self.gradient_noise_scale, curvatures.dtype),
        )
        if batch_size is not None:
            problem.model(batch_size)
        return problem
