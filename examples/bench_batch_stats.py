"""Cost of per-example statistics relative to a plain gradient, in one run.

For each workload this times, after jit warm-up and with ``block_until_ready``
(medians over ``--repeats`` rounds, the variants interleaved round-robin so that
background load hits them alike):

- ``grad``: ``jax.grad`` of the mean loss (the baseline, ratio 1);
- ``fast``: ``batch_stats(..., direction=d, method="fast")``: gradient,
  per-parameter and scalar $\\sum_i g_i^2$, $H\\delta$ and $\\sum_i (H_i\\delta)^2$;
- ``fast scalar``: the same with ``per_parameter=False`` (what Meka's
  scalar-noise variant needs);
- ``fast no-hvp``: gradient moments only;
- ``generic``: the same statistics by ``vmap`` of ``jvp(grad)``.

Peak memory is XLA's estimate for the compiled function
(``compiled.memory_analysis()``: arguments + outputs + temporaries - aliased),
reported as a ratio to the plain gradient step.

Run: ``python examples/bench_batch_stats.py`` (about a minute on two CPU cores).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from models.cnn import CNN3c3d
from models.mlp import MLP, cross_entropy
from probopt.stats import batch_stats


def _peak_bytes(fn, *args) -> float:
    analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
    if analysis is None:
        return float("nan")
    return float(
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        + analysis.temp_size_in_bytes
        - analysis.alias_size_in_bytes
    )


def _time_round_robin(fns: dict, args: tuple, repeats: int) -> dict:
    jitted = {name: jax.jit(fn) for name, fn in fns.items()}
    for f in jitted.values():  # compile and warm up
        jax.block_until_ready(f(*args))
        jax.block_until_ready(f(*args))
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, f in jitted.items():
            start = time.perf_counter()
            jax.block_until_ready(f(*args))
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


def bench(title: str, model, batch, repeats: int, generic_chunk: int | None, with_generic: bool = True):
    direction = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 0.01), model)

    def grad(m, b, d):
        return jax.grad(lambda m: jnp.mean(cross_entropy(m, b)))(m)

    def stats(method, per_parameter=True, use_direction=True, chunk_size=None):
        def f(m, b, d):
            return batch_stats(
                cross_entropy, m, b, direction=d if use_direction else None,
                method=method, per_parameter=per_parameter, chunk_size=chunk_size,
            )

        return f

    fns = {
        "grad": grad,
        "fast": stats("fast"),
        "fast scalar": stats("fast", per_parameter=False),
        "fast no-hvp": stats("fast", use_direction=False),
    }
    if with_generic:
        fns["generic"] = stats("generic", chunk_size=generic_chunk)
    args = (model, batch, direction)
    times = _time_round_robin(fns, args, repeats)
    peaks = {name: _peak_bytes(fn, *args) for name, fn in fns.items()}
    base_t, base_m = times["grad"], peaks["grad"]
    print(f"\n{title}")
    print(f"{'variant':<14}{'median ms':>11}{'x grad':>9}{'peak MB':>10}{'x grad':>9}")
    for name in fns:
        print(
            f"{name:<14}{1e3 * times[name]:>11.2f}{times[name] / base_t:>9.2f}"
            f"{peaks[name] / 2**20:>10.1f}{peaks[name] / base_m:>9.2f}"
        )
    return times, peaks


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--skip-cnn", action="store_true")
    parser.add_argument("--mnist-mlp", action="store_true", help="also DeepOBS mnist_mlp (784-1000-500-100-10)")
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; float32; medians of {args.repeats} rounds")

    key = jax.random.key(0)
    k_model, k_x, k_y = jax.random.split(key, 3)

    x = jax.random.normal(k_x, (128, 784), jnp.float32)
    y = jax.random.randint(k_y, (128,), 0, 10)
    bench("MLP 784-100-10, B=128 (targets: fast <= 3.0x time, <= 2x memory)",
          MLP((784, 100, 10), key=k_model), (x, y), args.repeats, generic_chunk=None)

    if args.mnist_mlp:
        bench("DeepOBS mnist_mlp 784-1000-500-100-10, B=128 (generic in chunks of 16)",
              MLP.deepobs_mnist_mlp(k_model), (x, y), max(args.repeats // 4, 3), generic_chunk=16)

    if not args.skip_cnn:
        images = jax.random.normal(k_x, (32, 32, 32, 3), jnp.float32)
        labels = jax.random.randint(k_y, (32,), 0, 10)
        bench("DeepOBS 3c3d, 32x32x3, B=32 (targets: fast <= 4x time, <= 2x memory)",
              CNN3c3d(key=k_model), (images, labels), max(args.repeats // 2, 3), generic_chunk=8)


if __name__ == "__main__":
    main()
