r"""Cost of a Meka step relative to an SGD step, measured side by side in one run.

Workload: the Meka paper's MNIST MLP 784-100-10 (ReLU), minibatch B=128,
float32, random inputs (timing does not depend on the data).  Timed, after jit
warm-up and with ``block_until_ready``, as medians over ``--repeats`` rounds
in which the variants run round-robin (so background load hits them alike):

- ``sgd``: ``jax.grad`` of the mean loss, ``optax.sgd`` update, ``apply_updates``
  (the baseline, ratio 1);
- ``meka (fast, scalar)``: ``make_step(meka(0.1), ...)`` with
  ``batch_stats(method="fast", per_parameter=False)``: per-example loss and
  gradient moments, the HVP along the previous step and its variance, the
  scalar Kalman filter and the update;
- ``meka (fast, per-parameter)``: the same, computing per-parameter variances
  as well (what ``covariance="diagonal"`` needs);
- ``meka (generic)``, with ``--generic``: statistics by ``vmap`` of
  ``jvp(grad)`` (any model; materialises B per-example gradients, slow);
- ``adameka (fast, scalar)``;
- ``meka + pi`` (and, with ``--all``, ``meka + quadratic`` and ``meka + ei``):
  the probabilistic step-size rules on top of the scalar fast path.

Targets: Meka step <= 3.0x an SGD step (issue 4), Meka+PI <= 3.5x (issue 5).

Run: ``python examples/bench_meka.py`` (under a minute on two CPU cores).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from models.mlp import MLP, cross_entropy
from probopt.optimizers import adameka, make_step, meka


def _sgd_step(optimizer):
    def mean_loss(params, batch):
        return jnp.mean(cross_entropy(params, batch))

    @jax.jit
    def step(params, state, batch):
        grads = jax.grad(mean_loss)(params, batch)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, None

    return step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--inner", type=int, default=10, help="steps per timed round")
    parser.add_argument("--generic", action="store_true", help="also time the generic vmap path (slow)")
    parser.add_argument("--all", action="store_true", help="also time the quadratic and EI step-size rules")
    args = parser.parse_args(argv)

    key = jax.random.key(0)
    params = MLP((784, 100, 10), key=key)
    x = jax.random.normal(jax.random.key(1), (args.batch_size, 784), jnp.float32)
    y = jax.random.randint(jax.random.key(2), (args.batch_size,), 0, 10)
    batch = (x, y)

    variants = {"sgd": (optax.sgd(0.1), None)}
    variants["meka (fast, scalar)"] = (meka(0.1), {"method": "fast", "per_parameter": False})
    variants["meka (fast, per-parameter)"] = (meka(0.1), {"method": "fast", "per_parameter": True})
    if args.generic:
        variants["meka (generic)"] = (meka(0.1), {"method": "generic", "per_parameter": False})
    variants["adameka (fast, scalar)"] = (adameka(1e-3), {"method": "fast", "per_parameter": False})
    acquisitions = ("pi", "quadratic", "ei") if args.all else ("pi",)
    for acquisition in acquisitions:
        variants[f"meka + {acquisition}"] = (meka(acquisition), {"method": "fast", "per_parameter": False})

    runners = {}
    for name, (optimizer, options) in variants.items():
        step = _sgd_step(optimizer) if options is None else make_step(
            optimizer, cross_entropy, batch_stats_options=options)
        state = optimizer.init(params)
        p = params
        for _ in range(3):  # compile, then a few steps so the HVP direction and curvature are set
            p, state, _ = step(p, state, batch)
        jax.block_until_ready(p)
        runners[name] = [step, p, state]

    times = {name: [] for name in runners}
    for _ in range(args.repeats):
        for name, runner in runners.items():
            step, p, state = runner
            start = time.perf_counter()
            for _ in range(args.inner):
                p, state, _ = step(p, state, batch)
            jax.block_until_ready((p, state))
            times[name].append((time.perf_counter() - start) / args.inner)
            runner[1], runner[2] = p, state

    base = statistics.median(times["sgd"])
    print(f"MLP 784-100-10, B={args.batch_size}, float32, {jax.devices()[0].platform}; "
          f"medians of {args.repeats} rounds x {args.inner} steps")
    print(f"| variant | step time (ms) | ratio to SGD |\n|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {1e3 * median:.3f} | {median / base:.2f} |")


if __name__ == "__main__":
    main()
