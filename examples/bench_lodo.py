"""Step-time and memory benchmark: LODO against Adam, measured in the same run.

Two workloads (Liao et al., 2023): the n=100 noisy quadratic bowl and the
94,696-parameter autoregressive MNIST CNN.  A "step" is one jitted training
step (sample data, loss and gradient, optimizer update, apply), timed with
`block_until_ready` after a warm-up call; Adam and LODO calls are interleaved
so that background load hits both alike, and we report medians.  For the bowl
we also report the per-step cost amortised inside one `lax.scan` of many
steps (no Python dispatch), which isolates the optimizer's arithmetic.

Memory: LODO's state holds theta (N * ñ * k = 16 * 2n * 4 = 128 n numbers)
plus Adam's two moments of it, i.e. O(n log n) with N ~ log n.

    python examples/bench_lodo.py                    # CNN at batch 32
    python examples/bench_lodo.py --cnn-batch-size 256
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from models.autoregressive_cnn import init_autoregressive_cnn, load_mnist_5k, loss, make_autoregressive_batch
from probopt.optimizers._lodo import lodo


def interleaved_medians(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds per call of each zero-argument function, calls interleaved."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def state_bytes(state) -> int:
    return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(state)))


def bench_bowl(repeats: int, scan_steps: int) -> None:
    n = 100
    k1, k2 = jax.random.split(jax.random.key(0))
    q, _ = jnp.linalg.qr(jax.random.normal(k1, (n, n)))
    hessian = (q * jnp.geomspace(1e-3, 1.0, n)) @ q.T
    optimizers = {
        "adam": optax.adam(1.164, b1=0.465, b2=0.9884),
        "lodo": lodo(9.6e-4, 0.270, 0.195, key=k2),
    }

    def make_step(opt):
        def step(x, centre, state, key):
            centre = centre + jax.random.normal(key, (n,))
            grad = hessian @ (x - centre)
            updates, state = opt.update(grad, state, x)
            return x + updates, centre, state

        return step

    per_call, per_scan = {}, {}
    for name, opt in optimizers.items():
        step = jax.jit(make_step(opt))
        carry = [jnp.zeros(n), jnp.zeros(n), opt.init(jnp.zeros(n))]
        key = jax.random.key(1)

        def call(step=step, carry=carry, key=key):
            carry[:] = step(*carry, key)
            return carry[0]

        per_call[name] = call

        @jax.jit
        def many(carry, keys, step=make_step(opt)):
            def body(c, k):
                return step(*c, k), None

            return jax.lax.scan(body, carry, keys)[0][0]

        per_scan[name] = lambda many=many, carry=tuple(carry): many(carry, jax.random.split(key, scan_steps))
    call_t = interleaved_medians(per_call, repeats)
    scan_t = interleaved_medians(per_scan, 5)
    print(f"noisy bowl, n = {n} (float32):")
    print(f"  jitted step per call : adam {call_t['adam'] * 1e6:8.1f} us   lodo {call_t['lodo'] * 1e6:8.1f} us"
          f"   ratio {call_t['lodo'] / call_t['adam']:.2f}")
    a, b = scan_t["adam"] / scan_steps, scan_t["lodo"] / scan_steps
    print(f"  inside lax.scan      : adam {a * 1e6:8.1f} us   lodo {b * 1e6:8.1f} us   ratio {b / a:.2f}")
    state = optimizers["lodo"].init(jnp.zeros(n))
    print(f"  state bytes          : adam {state_bytes(optimizers['adam'].init(jnp.zeros(n)))}"
          f"   lodo {state_bytes(state)}")


def bench_cnn(batch_size: int, repeats: int) -> None:
    images, _ = load_mnist_5k()
    images = jnp.asarray(images[:batch_size])
    params = init_autoregressive_cnn(jax.random.key(0))
    n = sum(x.size for x in jax.tree.leaves(params))
    optimizers = {
        "adam": optax.adam(9.554e-4, b1=0.9323, b2=0.99505, eps=1e-7),
        "lodo": lodo(7.946e-6, 0.08459, 0.9343, key=jax.random.key(1)),
    }
    train_steps, updates_only, states = {}, {}, {}
    grads = jax.tree.map(jnp.ones_like, params)
    for name, opt in optimizers.items():
        @jax.jit
        def step(params, state, key, opt=opt):
            batch = make_autoregressive_batch(images, key)
            value, g = jax.value_and_grad(loss)(params, batch)
            updates, state = opt.update(g, state, params)
            return optax.apply_updates(params, updates), state, value

        update = jax.jit(opt.update)
        state = opt.init(params)
        states[name] = state
        train_steps[name] = lambda step=step, state=state: step(params, state, jax.random.key(2))
        updates_only[name] = lambda update=update, state=state: update(grads, state, params)
    step_t = interleaved_medians(train_steps, repeats)
    update_t = interleaved_medians(updates_only, repeats)
    print(f"autoregressive CNN, {n} parameters, batch {batch_size} (float32):")
    print(f"  training step        : adam {step_t['adam'] * 1e3:8.1f} ms   lodo {step_t['lodo'] * 1e3:8.1f} ms"
          f"   ratio {step_t['lodo'] / step_t['adam']:.2f}")
    print(f"  optimizer update only: adam {update_t['adam'] * 1e3:8.1f} ms   lodo {update_t['lodo'] * 1e3:8.1f} ms")
    p = states["lodo"].preconditioner
    theta = p.blocks.size
    print(f"  LODO: n = {n}, hidden {p.hidden_dim}, theta {theta} numbers = {theta / n:.0f} n; "
          f"state {state_bytes(states['lodo']) / 2**20:.0f} MiB vs adam {state_bytes(states['adam']) / 2**20:.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--scan-steps", type=int, default=5000)
    parser.add_argument("--cnn-batch-size", type=int, default=32)
    parser.add_argument("--cnn-repeats", type=int, default=5)
    parser.add_argument("--skip-cnn", action="store_true")
    args = parser.parse_args()
    print(f"devices: {jax.devices()}  (other processes may be loading the CPU; see the load average)")
    bench_bowl(args.repeats, args.scan_steps)
    if not args.skip_cnn:
        bench_cnn(args.cnn_batch_size, args.cnn_repeats)


if __name__ == "__main__":
    main()
