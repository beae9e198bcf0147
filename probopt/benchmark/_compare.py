"""Run several optimizers on one workload over seeds and compare them.

Each optimizer is run for all seeds at once (``jax.vmap`` over seeds of a
``lax.scan`` over a chunk of steps, jitted and warmed up on a discarded first
call), so the timing excludes compilation.  The wall time per step is the median chunk time
divided by the chunk length (all seeds together), and is reported as a ratio
to SGD timed in the same run on the same workload.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Sequence

import numpy as np

from ._registry import UnavailableError, build_optimizer, get_optimizer
from ._workloads import Workload

__all__ = ["RunResult", "CompareResult", "run_optimizer", "compare", "steps_to_target"]


@dataclasses.dataclass
class RunResult:
    """One optimizer's run over all seeds.

    **Attributes:**

    - ``name``: optimizer name.
    - ``objective``: the workload's objective, shape ``(S, T + 1)`` (column 0
      is the start).
    - ``batch_loss``: minibatch mean loss at every step, shape ``(S, T)``.
    - ``trace``: the optimizer state stacked as ``(S, T, ...)``; parts with
      more than ``max_trace_size`` numbers per step are dropped (``None``):
      parameter-shaped subtrees whole, beliefs down to a scalar variance.
    - ``seconds_per_step``: wall time per step (all seeds), the median over
      chunks of the chunk time divided by its length, after one discarded
      warm-up call (compilation excluded).
    - ``compile_seconds``: time of the first (discarded) chunk call, which
      includes compilation.
    """

    name: str
    objective: np.ndarray
    batch_loss: np.ndarray
    trace: Any
    seconds_per_step: float
    compile_seconds: float


@dataclasses.dataclass
class CompareResult:
    """All runs of a comparison plus the SGD timing reference.

    **Attributes:**

    - ``workload``: the `Workload`.
    - ``runs``: the `RunResult` of every optimizer, in the order given.
    - ``sgd_seconds_per_step``: SGD's time per step in the same session.
    - ``target``: objective value used for "steps to target".
    - ``skipped``: ``(name, reason)`` of optimizers that could not be run.
    """

    workload: Workload
    runs: list
    sgd_seconds_per_step: float
    target: float
    skipped: list


def _chunk_length(steps: int, max_chunks: int = 20) -> int:
    """Largest divisor of ``steps`` not above ``ceil(steps / max_chunks)``."""
    limit = max(1, math.ceil(steps / max_chunks))
    return max(d for d in range(1, limit + 1) if steps % d == 0)


def _trim(node: Any, params_structure: Any, max_size: int) -> Any:
    """Drop the parts of a state with more than ``max_size`` numbers per step.

    Parameter-shaped subtrees are kept or dropped whole (never a subset of
    the layers); a large belief keeps only a scalar variance.
    """
    import equinox as eqx
    import jax

    from ..filters import GaussianBelief

    leaves = jax.tree_util.tree_leaves(node)
    if sum(int(leaf.size) for leaf in leaves) <= max_size:
        return node
    if isinstance(node, GaussianBelief):
        variance = node.variance if node.structure == "scalar" else None
        return GaussianBelief(None, variance, node.structure)
    if isinstance(node, eqx.Module) or jax.tree_util.tree_structure(node) == params_structure:
        return None
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        return type(node)(*(_trim(child, params_structure, max_size) for child in node))
    if isinstance(node, dict):
        return {k: _trim(v, params_structure, max_size) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return type(node)(_trim(child, params_structure, max_size) for child in node)
    return None


def run_optimizer(
    workload: Workload,
    name: str,
    *,
    steps: int,
    seeds: int,
    batch_size: int,
    max_trace_size: int = 4096,
    progress: Callable[[int], None] | None = None,
) -> RunResult:
    """Run optimizer ``name`` on ``workload`` for ``steps`` steps and ``seeds`` seeds.

    **Arguments:**

    - ``workload``: the problem.
    - ``name``: a registry name (see ``probopt compare --help``).
    - ``steps``, ``seeds``, ``batch_size``: positive ints.
    - ``max_trace_size``: state leaves with more numbers than this per step are
      not recorded in the trace.
    - ``progress``: called with the number of steps done after every chunk.

    **Raises:** `UnknownNameError` / `UnavailableError` from the registry.
    """
    import jax
    import jax.numpy as jnp
    import optax

    spec = get_optimizer(name)
    optimizer = build_optimizer(name, workload.hyperparameters)
    loss_fn = workload.per_example_loss

    if spec.needs_stats:
        try:
            from probopt.optimizers._meka import make_step
        except ImportError as error:
            raise UnavailableError(f"optimizer {name!r} needs probopt.optimizers._meka.make_step: {error}") from error
        stats_step = make_step(optimizer, loss_fn)

        def update(params, state, batch):
            params, state, stats = stats_step(params, state, batch)
            return params, state, stats.loss_mean

    else:

        def update(params, state, batch):
            loss, grads = jax.value_and_grad(lambda p: jnp.mean(loss_fn(p, batch)))(params)
            updates, state = optimizer.update(grads, state, params)
            return optax.apply_updates(params, updates), state, loss

    def evaluate(state, params):
        point = spec.eval_params(state, params) if spec.eval_params is not None else params
        return workload.objective(point)

    def init(key):
        init_key, run_key = jax.random.split(key)
        params = workload.init_params(init_key)
        state = optimizer.init(params)
        return (params, state, run_key), evaluate(state, params)

    def body(carry, _):
        params, state, key = carry
        key, batch_key = jax.random.split(key)
        batch = workload.sample_batch(batch_key, batch_size)
        params, state, loss = update(params, state, batch)
        record = (evaluate(state, params), loss, _trim(state, params_structure, max_trace_size))
        return (params, state, key), record

    params_structure = jax.tree_util.tree_structure(workload.init_params(jax.random.key(0)))
    chunk = _chunk_length(steps)

    def run_chunk(carry):
        return jax.lax.scan(body, carry, None, length=chunk)

    keys = jax.random.split(jax.random.key(0), seeds)
    carry, objective0 = jax.jit(jax.vmap(init))(keys)
    compiled = jax.jit(jax.vmap(run_chunk))
    # One discarded call first: it compiles and pays one-off allocation costs.
    start = time.perf_counter()
    jax.block_until_ready(compiled(carry))
    compile_seconds = time.perf_counter() - start
    records = []
    chunk_seconds = []
    for _ in range(steps // chunk):
        start = time.perf_counter()
        carry, record = compiled(carry)
        record = jax.block_until_ready(record)
        chunk_seconds.append(time.perf_counter() - start)
        records.append(jax.device_get(record))
        if progress is not None:
            progress(chunk)

    def concat(*parts):
        return np.concatenate(parts, axis=1)

    objective, batch_loss, trace = jax.tree_util.tree_map(concat, *records)
    objective = np.concatenate([np.asarray(objective0)[:, None], objective], axis=1)
    # Median over chunks: robust to load spikes from other processes.
    seconds_per_step = float(np.median(chunk_seconds)) / chunk
    return RunResult(name, objective, np.asarray(batch_loss), trace, seconds_per_step, compile_seconds)


def steps_to_target(objective: np.ndarray, target: float) -> np.ndarray:
    """First step at which each seed's objective is ``<= target`` (``inf`` if never).

    **Arguments:**

    - ``objective``: shape ``(S, T + 1)``, column 0 the start.

    **Returns:** float array of shape ``(S,)``.
    """
    reached = np.asarray(objective) <= target
    first = np.argmax(reached, axis=1).astype(float)
    first[~reached.any(axis=1)] = np.inf
    return first


def compare(
    workload: Workload,
    names: Sequence[str],
    *,
    steps: int,
    seeds: int,
    batch_size: int,
    target: float | None = None,
    skip_unavailable: bool = False,
    progress_bar: bool = True,
    max_trace_size: int = 4096,
) -> CompareResult:
    """Run every optimizer in ``names`` on ``workload`` and time SGD alongside.

    **Arguments:**

    - ``workload``: from `make_workload`.
    - ``names``: registry names.
    - ``steps``, ``seeds``, ``batch_size``: positive ints.
    - ``target``: objective value for "steps to target" (default: the
      workload's ``default_target``).
    - ``skip_unavailable``: skip optimizers whose module is missing (recorded
      in ``skipped``) instead of raising `UnavailableError`.
    - ``progress_bar``: show a tqdm bar on stderr.
    - ``max_trace_size``: see `run_optimizer`.
    """
    for value, label in ((steps, "steps"), (seeds, "seeds"), (batch_size, "batch_size")):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"`{label}` must be a positive int; got {value!r}.")
    for name in names:
        get_optimizer(name)
    target = workload.default_target if target is None else float(target)
    run_names = list(names) if "sgd" in names else list(names) + ["sgd"]

    from tqdm.auto import tqdm

    bar = tqdm(total=steps * len(run_names), disable=not progress_bar, unit="step", leave=False)
    runs, skipped = [], []
    sgd_time = math.nan
    try:
        for name in run_names:
            bar.set_description(name)
            try:
                result = run_optimizer(
                    workload,
                    name,
                    steps=steps,
                    seeds=seeds,
                    batch_size=batch_size,
                    max_trace_size=max_trace_size,
                    progress=bar.update,
                )
            except UnavailableError as error:
                if not skip_unavailable:
                    raise
                skipped.append((name, str(error)))
                bar.update(steps)
                continue
            if name == "sgd":
                sgd_time = result.seconds_per_step
            if name in names:
                runs.append(result)
    finally:
        bar.close()
    return CompareResult(workload, runs, sgd_time, target, skipped)
