"""Per-example classification losses for Equinox models.

probopt's optimizers need one loss per example (never the batch mean), so
every workload exposes ``per_example_loss(params, batch) -> (n,)``.  Equinox
models hold static pieces (activation functions, layer settings) next to their
arrays; [`split_model`][models.losses.split_model] separates the trainable
arrays (what optax sees as ``params``) from the rest.
"""

from __future__ import annotations

from typing import Any, Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

__all__ = ["cross_entropy_per_example", "accuracy", "split_model"]


def cross_entropy_per_example(model: Callable, batch: dict[str, jax.Array]) -> jax.Array:
    r"""Softmax cross-entropy of every example, shape ``(n,)``.

    $\ell_i = -\log \operatorname{softmax}(f(x_i))_{y_i}$, with the model
    applied to one example at a time (``jax.vmap``), so the losses of
    different examples never interact.

    **Arguments:**

    - ``model``: maps one input (no batch axis) to logits ``(num_classes,)``.
    - ``batch``: ``{"x": (n, *input_shape), "y": (n,) int}``.
    """
    logits = jax.vmap(model)(batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])


def accuracy(model: Callable, x: jax.Array, y: jax.Array) -> jax.Array:
    """Fraction of examples whose arg-max logit is the label, shape ``()``."""
    logits = jax.vmap(model)(x)
    return jnp.mean(jnp.argmax(logits, axis=-1) == y)


def split_model(
    model: eqx.Module, loss: Callable[[Callable, Any], jax.Array] = cross_entropy_per_example
) -> tuple[Any, Callable[[Any, Any], jax.Array], Callable[[Any], eqx.Module]]:
    """Separate a model's trainable arrays from its static part.

    **Arguments:**

    - ``model``: an Equinox module.
    - ``loss``: ``loss(model, batch) -> (n,)`` (default
      [`cross_entropy_per_example`][models.losses.cross_entropy_per_example]).

    **Returns:** ``(params, per_example_loss, rebuild)`` where ``params`` is
    the pytree of floating-point arrays, ``per_example_loss(params, batch)``
    the per-example loss of the rebuilt model and ``rebuild(params)`` the model.
    """
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def rebuild(p: Any) -> eqx.Module:
        return eqx.combine(p, static)

    def per_example_loss(p: Any, batch: Any) -> jax.Array:
        return loss(rebuild(p), batch)

    return params, per_example_loss, rebuild
