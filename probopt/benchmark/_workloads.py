r"""The problems ``probopt compare`` runs, each with per-example losses.

| name | what | objective reported |
|---|---|---|
| ``noisy-quadratic`` | Meka's noisy quadratic (Sec. 6): $D=20$, condition number $10^3$, $\lambda_{\max}=1$, instance drawn with key 0, start $\mathbf 1$ | $f(\theta)-f^\star$ (closed form) |
| ``bowl`` | isotropic noisy bowl $\ell(\theta,\xi)=\frac12\lVert\theta-\xi\rVert^2$, $\xi\sim\mathcal N(0,I_{10})$, start $3\cdot\mathbf 1$ | $f(\theta)-f^\star = \frac12\lVert\theta\rVert^2$ |
| ``rosenbrock`` | Rosenbrock with additive gradient noise $\ell(\theta,\xi)=r(\theta)+\xi^\top\theta$, $\xi\sim\mathcal N(0, I_2)$, start $(-1.2, 1)$ | $r(\theta)$ ($r^\star=0$) |
| ``digits-mlp`` | MLP 64-100-10 (ReLU) on scikit-learn digits (1438 train images) | full training-set cross-entropy |
| ``mnist1d-mlp`` | MLP 40-100-100-10 (ReLU) on locally generated MNIST-1D (4000 train) | full training-set cross-entropy |

Learning rates of the hand-tuned baselines are part of each workload
(``hyperparameters``): for the synthetic problems they are set from the
largest curvature ($\alpha = 0.5/L$ for SGD); for the networks they are the
Meka paper's tuned MNIST values (SGD 0.1, momentum 0.01, Adam 1e-3; App. E.3).
LODO uses its paper's Table 6 settings (quadratic bowl, Rosenbrock, MNIST).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

__all__ = ["Workload", "WORKLOADS", "make_workload"]


@dataclasses.dataclass(frozen=True)
class Workload:
    r"""A benchmark problem as the compare runner sees it.

    **Attributes:**

    - ``name``, ``description``: for tables and help.
    - ``init_params``: ``key -> params`` (seeds may or may not change it).
    - ``per_example_loss``: ``(params, batch) -> (n,)``.
    - ``sample_batch``: ``(key, batch_size) -> batch``, jit-compatible.
    - ``objective``: ``params -> ()``, the reported quantity (suboptimality
      or full training loss), evaluated after every step.
    - ``objective_name``: label of ``objective``.
    - ``default_batch_size``, ``default_steps``: CLI defaults.
    - ``default_target``: objective value for "steps to target".
    - ``hyperparameters``: learning rates of the tuned baselines (keys
      ``sgd_lr``, ``momentum_lr``, ``adam_lr``, ``lodo``).
    """

    name: str
    description: str
    init_params: Callable[[Any], Any]
    per_example_loss: Callable[[Any, Any], Any]
    sample_batch: Callable[[Any, int], Any]
    objective: Callable[[Any], Any]
    objective_name: str
    default_batch_size: int
    default_steps: int
    default_target: float
    hyperparameters: dict


LODO_BOWL = (9.6e-4, 0.270, 0.195)
LODO_ROSENBROCK = (1.394e-4, 0.2946, 0.897)
LODO_MNIST = (7.946e-6, 0.08459, 0.9343)


def _noisy_quadratic() -> Workload:
    import jax

    from probopt.problems._noisy_quadratic import NoisyQuadraticFamily

    problem = NoisyQuadraticFamily().sample(jax.random.key(0))
    start = problem.start()
    f_star = problem.optimal_loss
    initial_gap = float(problem.full_loss(start) - f_star)
    return Workload(
        name="noisy-quadratic",
        description="Meka's noisy quadratic, D=20, condition number 1e3",
        init_params=lambda key: problem.start(),
        per_example_loss=problem.loss,
        sample_batch=problem.sample_batch,
        objective=lambda p: problem.full_loss(p) - f_star.astype(p.dtype),
        objective_name="f(θ) − f*",
        default_batch_size=16,
        default_steps=400,
        default_target=1e-2 * initial_gap,
        hyperparameters={"sgd_lr": 0.5, "momentum_lr": 0.05, "adam_lr": 0.05, "lodo": LODO_BOWL},
    )


def _bowl() -> Workload:
    import jax
    import jax.numpy as jnp

    dim = 10

    def loss(params, batch):
        return 0.5 * jnp.sum((params[None, :] - batch["xi"]) ** 2, axis=-1)

    def sample(key, batch_size):
        return {"xi": jax.random.normal(key, (batch_size, dim))}

    return Workload(
        name="bowl",
        description="isotropic noisy bowl, D=10, unit noise",
        init_params=lambda key: 3.0 * jnp.ones((dim,)),
        per_example_loss=loss,
        sample_batch=sample,
        objective=lambda p: 0.5 * jnp.sum(p**2),
        objective_name="f(θ) − f*",
        default_batch_size=16,
        default_steps=200,
        default_target=0.45,  # 1% of the initial gap 45
        hyperparameters={"sgd_lr": 0.5, "momentum_lr": 0.05, "adam_lr": 0.1, "lodo": LODO_BOWL},
    )


def _rosenbrock() -> Workload:
    import jax
    import jax.numpy as jnp

    def rosen(p):
        return (1.0 - p[0]) ** 2 + 100.0 * (p[1] - p[0] ** 2) ** 2

    def loss(params, batch):
        return rosen(params) + batch["xi"] @ params

    def sample(key, batch_size):
        return {"xi": jax.random.normal(key, (batch_size, 2))}

    return Workload(
        name="rosenbrock",
        description="2-D Rosenbrock with additive unit gradient noise",
        init_params=lambda key: jnp.array([-1.2, 1.0]),
        per_example_loss=loss,
        sample_batch=sample,
        objective=rosen,
        objective_name="r(θ)",
        default_batch_size=16,
        default_steps=1000,
        default_target=0.1,
        hyperparameters={"sgd_lr": 5e-4, "momentum_lr": 5e-5, "adam_lr": 2e-2, "lodo": LODO_ROSENBROCK},
    )


def _mlp_workload(name: str, description: str, data, hidden: tuple[int, ...], steps: int, target: float) -> Workload:
    import jax
    import jax.numpy as jnp

    # models.mlp.MLP is built from probopt.stats' instrumented layers, so
    # batch_stats takes its fast per-example path; the model is its own params.
    from models.mlp import MLP, cross_entropy

    widths = (int(data.x_train.shape[1]), *hidden, data.num_classes)

    def per_example_loss(params, batch):
        return cross_entropy(params, (batch["x"], batch["y"]))

    x_all, y_all = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    n_train = int(x_all.shape[0])

    def sample(key, batch_size):
        # Same scheme as models.data.minibatch_sampler: distinct examples within a batch.
        index = jax.random.choice(key, n_train, (batch_size,), replace=False)
        return {"x": x_all[index], "y": y_all[index]}

    return Workload(
        name=name,
        description=description,
        init_params=lambda key: MLP(widths, key=key),
        per_example_loss=per_example_loss,
        sample_batch=sample,
        objective=lambda p: jnp.mean(per_example_loss(p, {"x": x_all, "y": y_all})),
        objective_name="train loss",
        default_batch_size=64,
        default_steps=steps,
        default_target=target,
        hyperparameters={"sgd_lr": 0.1, "momentum_lr": 0.01, "adam_lr": 1e-3, "lodo": LODO_MNIST},
    )


def _digits_mlp() -> Workload:
    from models.data import load_digits

    return _mlp_workload("digits-mlp", "MLP 64-100-10 on sklearn digits", load_digits(), (100,), 300, 0.3)


def _mnist1d_mlp() -> Workload:
    from models.data import load_mnist1d

    return _mlp_workload("mnist1d-mlp", "MLP 40-100-100-10 on MNIST-1D", load_mnist1d(), (100, 100), 500, 1.0)


WORKLOADS: dict[str, Callable[[], Workload]] = {
    "noisy-quadratic": _noisy_quadratic,
    "bowl": _bowl,
    "rosenbrock": _rosenbrock,
    "digits-mlp": _digits_mlp,
    "mnist1d-mlp": _mnist1d_mlp,
}


def make_workload(name: str) -> Workload:
    """Build the workload called ``name`` (see the table above).

    **Raises:** ``ValueError`` for an unknown name.
    """
    if name not in WORKLOADS:
        raise ValueError(f"unknown problem {name!r}; choose from: {', '.join(WORKLOADS)}.")
    return WORKLOADS[name]()
