"""Run in a subprocess with 4 virtual CPU devices: sharded vs unsharded results.

Usage: ``python tests/_scripts/sharded_step.py [float64] [float32] [--quick]``
(both dtypes by default; ``--quick`` skips the MLP; ``--deterministic`` passes
``reproducible=True`` to every ``batch_stats`` call, the order-independent
batch reduction of the generic path).  Prints one JSON line
``{dtype: {quantity: max relative difference}}`` (per leaf,
``max|sharded - unsharded| / max|unsharded|``),
which ``tests/test_reliability.py`` asserts on.  A separate process is needed
because the device count is fixed when JAX starts.

For each dtype it compares, between a batch sharded over a 4-device
``Mesh(("data",))`` and the same batch on one device:

- ``stats_generic``: every field of ``batch_stats`` on a noisy quadratic
  (generic path, with a direction);
- ``stats_fast``: the same on a small ``MLP`` (instrumented layers, fast path);
- ``meka_params`` / ``meka_state``: parameters and every floating leaf of the
  optimizer state after 5 Meka steps through ``make_step``;
- ``adameka_params``: parameters after 5 AdaMeka steps on the MLP.

The sharded run is the same jitted function with differently placed inputs:
XLA's SPMD partitioner turns the batch reductions into per-device partial
sums followed by an all-reduce, which is the only source of difference.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
)

import jax  # noqa: E402

# float32 runs use explicit float32 arrays, so one process serves both dtypes.
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from probopt.optimizers._meka import adameka, make_step, meka  # noqa: E402
from probopt.problems import NoisyQuadraticFamily  # noqa: E402
from probopt.stats import batch_stats  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from models.mlp import MLP, cross_entropy  # noqa: E402

assert jax.device_count() == 4, jax.devices()
MESH = Mesh(np.array(jax.devices()), ("data",))
BATCH = NamedSharding(MESH, PartitionSpec("data"))
REPLICATED = NamedSharding(MESH, PartitionSpec())


def cast(tree, dtype):
    return jax.tree_util.tree_map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )


def floating_leaves(tree):
    return [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]


def max_rel(a, b):
    """Largest over leaves of max|a - b| / max|b| (relative to each leaf's scale)."""
    diffs = [0.0]
    for x, y in zip(floating_leaves(a), floating_leaves(b), strict=True):
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        scale = max(float(np.max(np.abs(y), initial=0.0)), 1e-300)
        diffs.append(float(np.max(np.abs(x - y), initial=0.0)) / scale)
    return max(diffs)


OPTIONS = {"reproducible": "--deterministic" in sys.argv[1:]}


def compare_stats(loss, params, batch, direction):
    fn = jax.jit(lambda p, b, d: batch_stats(loss, p, b, direction=d, **OPTIONS))
    unsharded = fn(params, batch, direction)
    sharded_batch = jax.device_put(batch, BATCH)
    assert len(jax.tree_util.tree_leaves(sharded_batch)[0].sharding.device_set) == 4
    sharded = fn(jax.device_put(params, REPLICATED), sharded_batch, jax.device_put(direction, REPLICATED))
    return max_rel(sharded, unsharded)


def compare_steps(optimizer, loss, params, batches):
    step = make_step(optimizer, loss, batch_stats_options=OPTIONS)
    p_u, s_u = params, optimizer.init(params)
    p_s, s_s = jax.device_put(params, REPLICATED), jax.device_put(optimizer.init(params), REPLICATED)
    for batch in batches:
        p_u, s_u, _ = step(p_u, s_u, batch)
        p_s, s_s, _ = step(p_s, s_s, jax.device_put(batch, BATCH))
    return max_rel(p_s, p_u), max_rel(s_s, s_u)


def run(dtype_name, quick=False):
    dtype = jnp.dtype(dtype_name)
    result = {}

    # Generic path: a noisy quadratic (the loss is a plain JAX function).
    problem = cast(NoisyQuadraticFamily(dim=8, condition_number=10.0).sample(jax.random.key(0)), dtype)
    params = problem.init_params().astype(dtype) + 1.0
    batch = cast(problem.sample_batch(jax.random.key(1), 16), dtype)
    direction = jnp.linspace(-1.0, 1.0, params.size, dtype=dtype)
    result["stats_generic"] = compare_stats(problem.loss, params, batch, direction)
    batches = [cast(problem.sample_batch(jax.random.key(10 + t), 16), dtype) for t in range(5)]
    result["meka_params"], result["meka_state"] = compare_steps(meka(0.05), problem.loss, params, batches)

    if quick:
        return result

    # Fast path: an MLP of instrumented Linear layers.
    model = MLP((6, 8, 3), key=jax.random.key(2), dtype=dtype)
    rng = np.random.default_rng(3)

    def mlp_batch(t):
        return (
            jnp.asarray(rng.normal(size=(16, 6)), dtype),
            jnp.asarray(rng.integers(0, 3, size=16), jnp.int32),
        )

    direction = jax.tree_util.tree_map(lambda x: 0.01 * jnp.ones_like(x), model)
    result["stats_fast"] = compare_stats(cross_entropy, model, mlp_batch(0), direction)
    result["adameka_params"], _ = compare_steps(
        adameka(1e-2), cross_entropy, model, [mlp_batch(t) for t in range(5)]
    )
    return result


if __name__ == "__main__":
    quick = "--quick" in sys.argv[1:]
    names = [a for a in sys.argv[1:] if not a.startswith("--")] or ["float64", "float32"]
    print(json.dumps({name: run(name, quick) for name in names}))
