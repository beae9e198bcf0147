r"""Cost of a Meka step with probabilistic step sizes relative to an SGD step, in one run.

Workload: the Meka paper's MNIST MLP 784-100-10 (ReLU), minibatch B=128,
float32, random inputs (timing does not depend on the data).  Every variant is
jit-compiled and warmed up, then timed with ``block_until_ready`` in rounds
that run the variants round-robin (so background load hits them alike); the
table reports medians over rounds and the ratio to SGD:

- ``sgd``: ``jax.grad`` of the mean loss, ``optax.sgd`` update (the baseline);
- ``meka (fixed lr)``: ``make_step(meka(0.1), ...)`` on the fast statistics path;
- ``meka + pi`` / ``meka + quadratic`` / ``meka + ei``: the same with
  ``learning_rate="pi"`` etc., i.e. additionally the value filter, the
  curvature average and the step-size solver.

Target (issue 5): Meka+PI step <= 3.5x an SGD step.  Measured on a shared
2-core CPU (other jobs running): sgd 1.04 ms, meka (fixed lr) 1.98x,
meka + pi 2.09x, meka + quadratic 1.92x, meka + ei 2.02x.

Run: ``python examples/bench_step_sizes.py`` (about a minute on two CPU cores).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from models.mlp import MLP, cross_entropy
from probopt.optimizers import make_step, meka


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
    parser.add_argument("--all", action="store_true", help="also time the quadratic and EI rules")
    args = parser.parse_args(argv)

    params = MLP((784, 100, 10), key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (args.batch_size, 784), jnp.float32)
    y = jax.random.randint(jax.random.key(2), (args.batch_size,), 0, 10)
    batch = (x, y)
    fast = {"method": "fast", "per_parameter": False}

    variants = {"sgd": (optax.sgd(0.1), None), "meka (fixed lr)": (meka(0.1), fast)}
    variants["meka + pi"] = (meka("pi"), fast)
    if args.all:
        variants["meka + quadratic"] = (meka("quadratic"), fast)
        variants["meka + ei"] = (meka("ei"), fast)

    runners = {}
    for name, (optimizer, options) in variants.items():
        if options is None:
            step = _sgd_step(optimizer)
        else:
            step = make_step(optimizer, cross_entropy, batch_stats_options=options)
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
    print(
        f"MLP 784-100-10, B={args.batch_size}, float32, {jax.devices()[0].platform}; "
        f"medians of {args.repeats} rounds x {args.inner} steps"
    )
    print("| variant | step time (ms) | ratio to SGD |\n|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {1e3 * median:.3f} | {median / base:.2f} |")


if __name__ == "__main__":
    main()
