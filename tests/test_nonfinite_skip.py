"""``on_nonfinite`` of LODO (and its ablations), snr_sgd and simplified_adam.

A non-finite gradient must not poison the state: with ``"skip"`` the update is
zero and the state is unchanged except ``skipped_updates``, so a run with one
NaN gradient inserted ends exactly where the run without it ends; with
``"raise"`` it raises at run time.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from probopt.optimizers import (
    lodo,
    lodo_diagonal,
    lodo_global,
    lodo_no_momentum,
    lodo_residuals,
    lodo_sgd,
    meta_learned_preconditioner,
    scale_by_simplified_adam,
    scale_by_snr,
    simplified_adam,
    snr_sgd,
)

DIM = 3
STEPS = 20
BAD_STEP = 5
CURVATURE = jnp.array([1.0, 2.0, 0.5])
KEY = jax.random.key(0)

OPTIMIZERS = {
    "lodo": lambda **kw: lodo(1e-2, 0.3, 0.5, key=KEY, depth=2, **kw),
    "lodo_no_momentum": lambda **kw: lodo_no_momentum(1e-2, 0.3, key=KEY, depth=2, **kw),
    "lodo_sgd": lambda **kw: lodo_sgd(1e-2, 0.3, 0.5, key=KEY, depth=2, **kw),
    "lodo_diagonal": lambda **kw: lodo_diagonal(1e-2, 0.3, 0.5, **kw),
    "lodo_global": lambda **kw: lodo_global(1e-2, 0.3, 0.5, **kw),
    "lodo_residuals": lambda **kw: lodo_residuals(1e-2, 0.3, 0.5, key=KEY, depth=4, **kw),
    "snr_sgd": lambda **kw: snr_sgd(warmup_steps=2, **kw),
    "simplified_adam": lambda **kw: simplified_adam(0.1, **kw),
}


def _skip_counters(state):
    """The ``skipped_*`` counters anywhere in an (optax-chained) state, by name."""
    leaves = []
    for part in state if isinstance(state, tuple) and not hasattr(state, "_fields") else (state,):
        for name in ("skipped_updates", "skipped_meta_updates"):
            if hasattr(part, name):
                leaves.append((name, int(getattr(part, name))))
    return dict(leaves)


def _without_counters(state):
    def clear(part):
        fields = {n: 0 for n in ("skipped_updates", "skipped_meta_updates") if hasattr(part, n)}
        return part._replace(**fields) if fields else part

    if isinstance(state, tuple) and not hasattr(state, "_fields"):
        return tuple(clear(part) for part in state)
    return clear(state)


def _assert_trees_equal(a, b):
    a_leaves, a_def = jax.tree.flatten(a)
    b_leaves, b_def = jax.tree.flatten(b)
    assert a_def == b_def
    for x, y in zip(a_leaves, b_leaves):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _noise(t):
    return 0.1 * jax.random.normal(jax.random.key(100 + t), (DIM,))


def _run(optimizer, bad_gradient=None):
    """``STEPS`` steps on ``0.5 x^T diag(c) x`` plus fixed noise; optionally one bad gradient before step ``BAD_STEP``."""
    update = jax.jit(optimizer.update)
    params = jnp.array([1.0, -2.0, 0.5])
    state = optimizer.init(params)
    around_bad = None
    for t in range(STEPS):
        if t == BAD_STEP and bad_gradient is not None:
            before = state
            updates, state = update(jnp.full((DIM,), 1.0).at[1].set(bad_gradient), state, params)
            around_bad = (before, updates, state)
            params = optax.apply_updates(params, updates)
        updates, state = update(CURVATURE * params + _noise(t), state, params)
        params = optax.apply_updates(params, updates)
    return params, state, around_bad


@pytest.mark.parametrize(
    "name, bad",
    [(name, np.nan) for name in sorted(OPTIMIZERS)]
    + [(name, np.inf) for name in ("lodo_diagonal", "snr_sgd", "simplified_adam")],
)
def test_a_nonfinite_gradient_is_skipped_as_if_it_never_came(name, bad):
    make = OPTIMIZERS[name]
    clean_params, clean_state, _ = _run(make())
    params, state, (before, updates, after) = _run(make(), bad_gradient=bad)
    # The bad step itself: zero update, state unchanged except the counters.
    np.testing.assert_array_equal(np.asarray(updates), np.zeros(DIM))
    counters = _skip_counters(after)
    assert counters["skipped_updates"] == 1
    assert set(counters.values()) == {1}  # LODO counts the skipped meta-step too
    _assert_trees_equal(_without_counters(after), _without_counters(before))
    # The whole run: finite, and the same as the run without the bad gradient.
    assert np.all(np.isfinite(np.asarray(params)))
    assert not np.allclose(np.asarray(params), [1.0, -2.0, 0.5])  # it did optimise
    np.testing.assert_allclose(np.asarray(params), np.asarray(clean_params), rtol=1e-6, atol=1e-7)
    assert _skip_counters(clean_state)["skipped_updates"] == 0
    assert _skip_counters(state)["skipped_updates"] == 1
    for x, y in zip(jax.tree.leaves(_without_counters(state)), jax.tree.leaves(_without_counters(clean_state))):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_on_nonfinite_raise_raises_and_is_otherwise_the_same(name):
    make = OPTIMIZERS[name]
    raising = make(on_nonfinite="raise")
    params = jnp.array([1.0, -2.0, 0.5])
    gradient = CURVATURE * params
    expected, _ = make().update(gradient, make().init(params), params)
    got, _ = jax.jit(raising.update)(gradient, raising.init(params), params)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-6)
    with pytest.raises(Exception, match="non-finite"):
        jax.block_until_ready(jax.jit(raising.update)(gradient.at[0].set(jnp.nan), raising.init(params), params))
    with pytest.raises(eqx.EquinoxRuntimeError, match="non-finite"):
        jax.block_until_ready(
            eqx.filter_jit(raising.update)(gradient.at[2].set(jnp.inf), raising.init(params), params)
        )


@pytest.mark.parametrize(
    "build",
    [
        lambda p: lodo(1e-2, 0.3, 0.5, key=KEY, on_nonfinite=p),
        lambda p: lodo_diagonal(1e-2, 0.3, 0.5, on_nonfinite=p),
        lambda p: lodo_global(1e-2, 0.3, 0.5, on_nonfinite=p),
        lambda p: lodo_residuals(1e-2, 0.3, 0.5, key=KEY, on_nonfinite=p),
        lambda p: meta_learned_preconditioner(lambda n, d: None, optax.sgd(1.0), 0.3, 0.5, on_nonfinite=p),
        lambda p: snr_sgd(on_nonfinite=p),
        lambda p: scale_by_snr(on_nonfinite=p),
        lambda p: simplified_adam(0.1, on_nonfinite=p),
        lambda p: scale_by_simplified_adam(on_nonfinite=p),
    ],
)
def test_bad_on_nonfinite_is_a_value_error(build):
    with pytest.raises(ValueError, match="on_nonfinite"):
        build("ignore")
