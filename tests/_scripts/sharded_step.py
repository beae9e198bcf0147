"""Run in a subprocess with 4 virtual CPU devices: sharded vs unsharded results.

Prints a JSON line with the largest differences found, which
``tests/test_reliability.py`` asserts on.  A separate process is needed because
the device count is fixed when JAX starts.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
)

import jax  # noqa: E402

dtype_name = sys.argv[1] if len(sys.argv) > 1 else "float64"
if dtype_name == "float64":
    jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

import probopt  # noqa: E402
from probopt.optimizers._meka import make_step, meka  # noqa: E402
from probopt.problems import NoisyQuadraticFamily  # noqa: E402

dtype = jnp.dtype(dtype_name)
assert jax.device_count() == 4, jax.devices()
mesh = Mesh(np.array(jax.devices()), ("data",))
batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
replicated = NamedSharding(mesh, PartitionSpec())

problem = NoisyQuadraticFamily(dim=8, condition_number=10.0).sample(jax.random.key(0))
problem = jax.tree_util.tree_map(
    lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, problem
)
params = problem.init_params().astype(dtype) + 1.0
batch = jax.tree_util.tree_map(
    lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
    problem.sample_batch(jax.random.key(1), 16),
)
direction = jnp.linspace(-1.0, 1.0, params.size, dtype=dtype)

def stats_fn(p, b, d):
    return probopt.batch_stats(problem.loss, p, b, direction=d)

unsharded = jax.jit(stats_fn)(params, batch, direction)
sharded_batch = jax.device_put(batch, batch_sharding)
sharded = jax.jit(stats_fn)(
    jax.device_put(params, replicated), sharded_batch, jax.device_put(direction, replicated)
)


def max_rel(a, b):
    diffs = [0.0]
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        diffs.append(float(np.max(np.abs(x - y) / np.maximum(np.abs(y), 1e-30))))
    return max(diffs)


result = {"stats": max_rel(sharded, unsharded), "sharded_batch_devices": len(jax.tree_util.tree_leaves(sharded_batch)[0].sharding.device_set)}

optimizer = meka(learning_rate=0.05)
step = make_step(optimizer, problem.loss)
state = optimizer.init(params)
p_u, s_u = params, state
p_s, s_s = jax.device_put(params, replicated), jax.device_put(state, replicated)
for t in range(5):
    b = problem.sample_batch(jax.random.key(10 + t), 16)
    b = jax.tree_util.tree_map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, b)
    p_u, s_u, _ = step(p_u, s_u, b)
    p_s, s_s, _ = step(p_s, s_s, jax.device_put(b, batch_sharding))
result["meka_params"] = max_rel(p_s, p_u)
result["meka_state"] = max_rel(
    [x for x in jax.tree_util.tree_leaves(s_s) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)],
    [x for x in jax.tree_util.tree_leaves(s_u) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)],
)
print(json.dumps(result))
