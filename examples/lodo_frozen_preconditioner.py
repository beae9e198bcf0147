"""A LODO preconditioner trained on one bowl and then frozen diverges on a new bowl.

Liao et al. (2023), §5.1 "Pretrained and Frozen Preconditioner": after
training LODO on a noisy quadratic bowl, freeze theta (meta-learning rate 0)
and use it on a bowl with a new random rotation U.  The learned G is tuned to
the first Hessian H1 (large gains along H1's flat directions); on H2 the
iteration matrix I - G H2 has eigenvalues far outside the unit disc and the
loss explodes within a few steps.  As a control the same frozen G keeps
tracking the bowl it was trained on.

    python examples/lodo_frozen_preconditioner.py                # 20k training steps
    python examples/lodo_frozen_preconditioner.py --steps 100000 # the paper's length
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from probopt.optimizers._lodo import lodo
from probopt.problems import MovingQuadraticBowlFamily

jax.config.update("jax_enable_x64", True)

HYPERPARAMETERS = dict(meta_learning_rate=9.6e-4, initial_learning_rate=0.270, momentum=0.195)


def track(optimizer, state, problem, key, steps):
    """Run ``steps`` steps from ``problem.start()`` with the given initial optimizer state; returns losses."""

    def step(carry, k):
        x, bowl, state = carry
        batch = bowl.sample_batch(k, 1)
        loss, grad = jax.value_and_grad(lambda y: bowl.loss(y, batch)[0])(x)
        updates, state = optimizer.update(grad, state, x)
        return (x + updates, bowl.advance(batch), state), loss

    carry = (problem.start(), problem, state)
    (_, _, state), losses = jax.lax.scan(step, carry, jax.random.split(key, steps))
    return losses, state


def frozen_experiment(train_steps: int, test_steps: int, seed: int = 0):
    """Train on bowl 1, freeze, test on bowl 1 and a new bowl 2.

    Returns ``(train_losses, frozen_same_bowl_losses, frozen_new_bowl_losses,
    spectral_radius_same, spectral_radius_new)`` where the spectral radii are
    those of $I - G H$ (the frozen no-noise iteration, ignoring momentum).
    """
    family = MovingQuadraticBowlFamily()
    k1, k2, k3, k4, k5 = jax.random.split(jax.random.key(seed), 5)
    bowl1, bowl2 = family.sample(k1), family.sample(k2)
    learner = lodo(**HYPERPARAMETERS, key=k3)
    train_losses, trained = jax.jit(track, static_argnums=(0, 4))(
        learner, learner.init(bowl1.start()), bowl1, k4, train_steps
    )
    frozen = lodo(0.0, HYPERPARAMETERS["initial_learning_rate"], HYPERPARAMETERS["momentum"], key=k3)
    fresh = frozen.init(bowl1.start())._replace(preconditioner=trained.preconditioner)
    run = jax.jit(track, static_argnums=(0, 4))
    same, _ = run(frozen, fresh, bowl1, k5, test_steps)
    new, _ = run(frozen, fresh, bowl2, k5, test_steps)
    g = trained.preconditioner.dense()
    eye = jnp.eye(g.shape[0])
    radius = lambda h: float(jnp.max(jnp.abs(jnp.linalg.eigvals(eye - g @ h))))  # noqa: E731
    return train_losses, same, new, radius(bowl1.hessian_matrix), radius(bowl2.hessian_matrix)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20_000, help="training steps on the first bowl")
    parser.add_argument("--test-steps", type=int, default=20)
    args = parser.parse_args()
    train, same, new, radius_same, radius_new = frozen_experiment(args.steps, args.test_steps)
    train, same, new = map(np.asarray, (train, same, new))
    print(f"trained {args.steps} steps on bowl 1: late loss {train[-args.steps // 10:].mean():.3f} (Newton 7.41)")
    print(f"spectral radius of I - G H: bowl 1 {radius_same:.3g}, new bowl 2 {radius_new:.3g}")
    print("step   frozen G on bowl 1   frozen G on new bowl 2")
    for t in range(args.test_steps):
        print(f"{t:4d}   {same[t]:18.4g}   {new[t]:20.4g}")


if __name__ == "__main__":
    main()
