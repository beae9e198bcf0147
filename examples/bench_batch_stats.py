"""Cost of per-example statistics relative to a plain gradient, in one run.

For each workload this times, after jit warm-up and with ``block_until_ready``
(medians over ``--repeats`` rounds, the variants interleaved round-robin so that
background load hits them alike):

- ``grad``: ``jax.grad`` of the mean loss (the baseline, ratio 1);
- ``grad+hvp``: ``jvp(grad)``, gradient and $H\\delta$ without any variance (the
  floor for every variant that needs an HVP);
- ``fast``: ``batch_stats(..., direction=d, method="fast")`` returning the
  gradient, per-parameter and scalar $\\sum_i g_i^2$, $H\\delta$ and
  $\\sum_i (H_i\\delta)^2$ (the issue's target quantities);
- ``fast all``: the same call returning the whole ``BatchStats`` (adds the two
  per-parameter variance pytrees);
- ``fast scalar``: the same with ``per_parameter=False`` (what Meka's
  scalar-noise variant needs);
- ``fast no-hvp``: gradient moments only;
- ``generic``: the same statistics by ``vmap`` of ``jvp(grad)`` (median of 3
  rounds, timed after the others).

Memory is XLA's estimate for the compiled function
(``compiled.memory_analysis()``): "peak" = arguments + outputs + temporaries
- aliased, "temp" = the working memory alone, and "floor" = arguments +
outputs, what any implementation of that variant must hold (the fast
variant takes a direction and returns four parameter-sized pytrees, so on a
small model whose parameters outweigh its activations its floor alone is
above 2x the gradient's peak).  All are ratios to the plain gradient step.
"min x" is the ratio of the fastest rounds, less sensitive to background load.

The batch-size sweep (compile only, nothing runs) shows where memory grows
with the batch: the slope "per example" of the peak between the smallest and
largest batch is about the activations' size for the gradient and the fast
path, and about the parameter count for the generic path without chunks.

Run: ``python examples/bench_batch_stats.py`` (a few minutes on two CPU cores;
``--skip-cnn`` for the MLP alone, ``--mnist-mlp`` adds DeepOBS' larger MLP).
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


def _memory(fn, *args) -> tuple[float, float, float]:
    """(peak, temporaries, arguments + outputs) in bytes from XLA's analysis of the compiled function."""
    analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
    if analysis is None:
        return float("nan"), float("nan"), float("nan")
    own = analysis.argument_size_in_bytes + analysis.output_size_in_bytes - analysis.alias_size_in_bytes
    return float(own + analysis.temp_size_in_bytes), float(analysis.temp_size_in_bytes), float(own)


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
    return {name: (statistics.median(s), min(s)) for name, s in samples.items()}


def _grad(m, b, d):
    """The baseline: a plain gradient of the mean loss (``d`` unused)."""
    return jax.grad(lambda m: jnp.mean(cross_entropy(m, b)))(m)


def _stats(method, per_parameter=True, use_direction=True, chunk_size=None, fields=None):
    """``(model, batch, direction) -> BatchStats`` (or the named ``fields`` of it)."""

    def f(m, b, d):
        s = batch_stats(
            cross_entropy, m, b, direction=d if use_direction else None,
            method=method, per_parameter=per_parameter, chunk_size=chunk_size,
        )
        return s if fields is None else tuple(getattr(s, name) for name in fields)

    return f


def bench(title: str, model, batch, repeats: int, generic_chunk: int | None, with_generic: bool = True):
    direction = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 0.01), model)
    grad, stats = _grad, _stats

    def grad_and_hvp(m, b, d):
        return jax.jvp(jax.grad(lambda m: jnp.mean(cross_entropy(m, b))), (m,), (d,))

    # The target quantities: gradient, scalar and per-parameter sum g^2,
    # H delta and sum (H_i delta)^2 (the *_var pytrees are then not formed).
    target = ("grad_mean", "grad_sq_sum", "grad_var_mean", "hvp_mean", "hvp_sq_sum", "hvp_var_mean")
    fns = {
        "grad": grad,
        "grad+hvp": grad_and_hvp,
        "fast": stats("fast", fields=target),
        "fast all": stats("fast"),
        "fast scalar": stats("fast", per_parameter=False),
        "fast no-hvp": stats("fast", use_direction=False),
    }
    args = (model, batch, direction)
    times = _time_round_robin(fns, args, repeats)
    if with_generic:  # hundreds of times slower: a few rounds suffice
        fns["generic"] = stats("generic", chunk_size=generic_chunk)
        times.update(_time_round_robin({"generic": fns["generic"]}, args, 3))
    memory = {name: _memory(fn, *args) for name, fn in fns.items()}
    base_t, base_peak, base_temp = times["grad"], memory["grad"][0], memory["grad"][1]
    width = max(len(name) for name in fns) + 2
    print(f"\n{title}")
    print(
        f"{'variant':<{width}}{'median ms':>11}{'x grad':>8}{'min x':>8}{'peak MB':>9}{'x grad':>8}"
        f"{'floor x':>9}{'temp MB':>9}{'x grad':>8}"
    )
    for name in fns:
        peak, temp, own = memory[name]
        print(
            f"{name:<{width}}{1e3 * times[name][0]:>11.2f}{times[name][0] / base_t[0]:>8.2f}"
            f"{times[name][1] / base_t[1]:>8.2f}{peak / 2**20:>9.2f}{peak / base_peak:>8.2f}"
            f"{own / base_peak:>9.2f}{temp / 2**20:>9.2f}{temp / base_temp:>8.2f}"
        )
    return times, memory


def memory_sweep(model, make_batch, batch_sizes) -> None:
    """Peak memory (compile only) against the batch size: what grows per example."""
    direction = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 0.01), model)
    variants = {
        "grad": _grad,
        "fast all": _stats("fast"),
        "fast scalar": _stats("fast", per_parameter=False),
        "generic": _stats("generic"),
    }
    peaks = {name: [_memory(fn, model, make_batch(n), direction)[0] for n in batch_sizes] for name, fn in variants.items()}
    print("\npeak MB against the batch size (XLA's estimate; compile only)")
    print(f"{'variant':<14}" + "".join(f"{'B=' + str(n):>10}" for n in batch_sizes) + f"{'KB/example':>12}")
    for name, values in peaks.items():
        slope = (values[-1] - values[0]) / (batch_sizes[-1] - batch_sizes[0])
        print(f"{name:<14}" + "".join(f"{v / 2**20:>10.2f}" for v in values) + f"{slope / 2**10:>12.1f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--skip-cnn", action="store_true")
    parser.add_argument("--mnist-mlp", action="store_true", help="also DeepOBS mnist_mlp (784-1000-500-100-10)")
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; float32; medians of {args.repeats} rounds")

    key = jax.random.key(0)
    k_model, k_x, k_y = jax.random.split(key, 3)

    def mnist_like(n):
        return jax.random.normal(k_x, (n, 784), jnp.float32), jax.random.randint(k_y, (n,), 0, 10)

    mlp = MLP((784, 100, 10), key=k_model)
    bench("MLP 784-100-10, B=128 (targets: fast <= 3.0x time, <= 2x memory)", mlp, mnist_like(128),
          args.repeats, generic_chunk=None)
    memory_sweep(mlp, mnist_like, (32, 128, 512, 2048))

    if args.mnist_mlp:
        bench("DeepOBS mnist_mlp 784-1000-500-100-10, B=128 (generic in chunks of 16)",
              MLP.deepobs_mnist_mlp(k_model), mnist_like(128), max(args.repeats // 4, 3), generic_chunk=16)

    if not args.skip_cnn:
        images = jax.random.normal(k_x, (32, 32, 32, 3), jnp.float32)
        labels = jax.random.randint(k_y, (32,), 0, 10)
        bench("DeepOBS 3c3d, 32x32x3, B=32 (targets: fast <= 4x time, <= 2x memory)",
              CNN3c3d(key=k_model), (images, labels), max(args.repeats // 5, 3), generic_chunk=8)


if __name__ == "__main__":
    main()
