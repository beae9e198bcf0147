r"""The rescaled Rosenbrock function of the LODO paper (Liao et al. 2023)."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist

from .._validation import check_nonnegative, check_shape
from ._base import Problem, ProblemFamily


class Rosenbrock(Problem):
    r"""The rescaled two-dimensional Rosenbrock function of LODO, with optional noise.

    $$f(x, y) = a(1-x)^2 + (y - x^2)^2,\qquad a = 0.01,$$

    started at $(-0.5, 2)$ and minimised at $(1, 1)$ with $f^\star = 0$.
    Per example an additive linear term gives unbiased noisy gradients,

    $$\ell(\theta, \xi) = f(\theta) + \xi^\top\theta,\qquad
      \xi\sim\mathcal N(0, s^2 I),$$

    so the per-example gradient covariance is $s^2 I$.  With the default
    $s = 0$ every example's loss equals $f$ (the deterministic benchmark of
    the LODO paper).

    **Attributes:**

    - ``valley_weight``: $a$, shape ``()`` (default 0.01).
    - ``gradient_noise_scale``: $s$, shape ``()`` (default 0).

    Batches are ``{"xi": (B, 2)}``.
    """

    valley_weight: jax.Array = eqx.field(converter=jnp.asarray, default=0.01)
    gradient_noise_scale: jax.Array = eqx.field(converter=jnp.asarray, default=0.0)

    def __check_init__(self):
        check_shape(self.valley_weight, (), "valley_weight")
        check_shape(self.gradient_noise_scale, (), "gradient_noise_scale")
        check_nonnegative(self.gradient_noise_scale, "gradient_noise_scale")

    @property
    def dim(self) -> int:
        return 2

    @property
    def batch_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"xi": (2,)}

    def start(self) -> jax.Array:
        return jnp.array([-0.5, 2.0], dtype=self.valley_weight.dtype)

    def model(self, batch_size: int) -> None:
        """``standard_noise`` ~ $\\mathcal N(0, I)$ and the deterministic site ``xi`` (its multiple by $s$).

        Both sit in the plate ``"batch"``; ``xi`` is written as a deterministic
        transform so that $s = 0$ (no noise) stays a valid model.
        """
        with numpyro.plate("batch", batch_size):
            standard = numpyro.sample(
                "standard_noise", dist.Normal(0.0, 1.0).expand((2,)).to_event(1)
            )
            numpyro.deterministic("xi", self.gradient_noise_scale * standard)

    def loss(self, params, batch):
        params = self.check_params(params)
        xi = self.check_batch(batch, params.dtype)["xi"]
        return self.full_loss(params) + xi @ params

    def full_loss(self, params):
        params = self.check_params(params)
        x, y = params[0], params[1]
        weight = self.valley_weight.astype(params.dtype)
        return weight * (1 - x) ** 2 + (y - x**2) ** 2

    def full_grad(self, params):
        params = self.check_params(params)
        x, y = params[0], params[1]
        weight = self.valley_weight.astype(params.dtype)
        return jnp.stack([-2 * weight * (1 - x) - 4 * x * (y - x**2), 2 * (y - x**2)])

    def hessian(self, params):
        params = self.check_params(params)
        x, y = params[0], params[1]
        weight = self.valley_weight.astype(params.dtype)
        xx = 2 * weight - 4 * y + 12 * x**2
        xy = -4 * x
        return jnp.stack([jnp.stack([xx, xy]), jnp.stack([xy, jnp.full_like(x, 2.0)])])

    def gradient_noise_covariance(self, params):
        params = self.check_params(params)
        return self.gradient_noise_scale.astype(params.dtype) ** 2 * jnp.eye(2, dtype=params.dtype)

    def optimum(self):
        return jnp.ones(2, self.valley_weight.dtype)

    @property
    def optimal_loss(self):
        return jnp.zeros((), self.valley_weight.dtype)


class RosenbrockFamily(ProblemFamily):
    r"""The [`Rosenbrock`][probopt.problems.Rosenbrock] problem as a (deterministic) family.

    The instance has no random pieces, so ``sample`` ignores its key (it takes
    one for a uniform interface) and ``model`` only has the observation sites
    ``"standard_noise"`` and ``"xi"`` when a ``batch_size`` is given.

    **Arguments:**

    - ``valley_weight``: $a$ (default 0.01, LODO's rescaling).
    - ``gradient_noise_scale``: $s$ (default 0: noise-free).
    """

    valley_weight: float = 0.01
    gradient_noise_scale: float = 0.0

    def __check_init__(self):
        if isinstance(self.valley_weight, (int, float)) and self.valley_weight <= 0:
            raise ValueError(f"`valley_weight` must be positive; got {self.valley_weight!r}.")
        if isinstance(self.gradient_noise_scale, (int, float)) and self.gradient_noise_scale < 0:
            raise ValueError(
                f"`gradient_noise_scale` must be non-negative; got {self.gradient_noise_scale!r}."
            )

    def model(self, batch_size: int | None = None) -> Rosenbrock:
        dtype = jnp.result_type(float)
        problem = Rosenbrock(
            valley_weight=jnp.asarray(self.valley_weight, dtype),
            gradient_noise_scale=jnp.asarray(self.gradient_noise_scale, dtype),
        )
        if batch_size is not None:
            problem.model(batch_size)
        return problem
