"""Fast path never silently wrong: a leaf used outside its layer goes generic (issue 15)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from probopt.stats import Linear, batch_stats


class _Net(eqx.Module):
    l1: Linear
    l2: Linear


def test_l2_penalty_on_layer_weight_matches_generic():
    with jax.enable_x64(True):
        k = jax.random.split(jax.random.PRNGKey(0), 3)
        model = _Net(Linear(3, 4, key=k[0]), Linear(4, 2, key=k[1]))
        model = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64) if eqx.is_array(x) else x, model)
        x, y = jax.random.normal(k[2], (5, 3), jnp.float64), jnp.arange(5) % 2

        def loss(m, b):
            x, y = b
            out = jax.vmap(lambda xi: m.l2(jnp.tanh(m.l1(xi))))(x)
            return -jax.nn.log_softmax(out)[jnp.arange(x.shape[0]), y] + 0.1 * jnp.sum(m.l1.weight**2)

        d = jax.tree_util.tree_map(jnp.ones_like, model)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            auto = batch_stats(loss, model, (x, y), direction=d, method="auto")
        ref = batch_stats(loss, model, (x, y), direction=d, method="generic")
        for field in ("grad_sq_sum", "hvp_sq_sum", "grad_var", "hvp_var"):
            for a, r in zip(jax.tree_util.tree_leaves(getattr(auto, field)), jax.tree_util.tree_leaves(getattr(ref, field))):
                np.testing.assert_allclose(a, r, rtol=1e-10, atol=1e-14)
