"""The optimizers ``probopt compare`` knows, built lazily by name.

Every entry names a factory that imports its module only when the optimizer
is built, so a missing or broken optional module (an optimizer still being
written, say) makes *that* name unavailable without breaking the others or
the CLI.

Baselines use the settings below (documented defaults, or the Meka paper's
tuned values where the workload gives them; see ``Workload.hyperparameters``):

| name | optimizer | settings |
|---|---|---|
| ``sgd`` | ``optax.sgd`` | workload's SGD learning rate |
| ``momentum`` | ``optax.sgd(momentum=0.9)`` | workload's momentum learning rate |
| ``adam`` | ``optax.adam`` | workload's Adam learning rate |
| ``prodigy`` | ``optax.contrib.prodigy`` | optax defaults (lr 1) |
| ``dog`` | ``optax.contrib.dog`` | optax defaults |
| ``dowg`` | ``optax.contrib.dowg`` | optax defaults |
| ``cocob`` | ``optax.contrib.cocob`` | optax defaults |
| ``mechanic`` | ``optax.contrib.mechanize(optax.adam)`` | workload's Adam lr |
| ``schedule-free`` | ``optax.contrib.schedule_free_adamw`` | workload's Adam lr, other optax defaults; scored at its averaged point |
| ``meka`` | ``probopt.optimizers.meka`` | workload's SGD learning rate (paper, E.3) |
| ``adameka`` | ``probopt.optimizers.adameka`` | workload's Adam learning rate (paper, E.3) |
| ``meka-pi`` | ``meka(learning_rate="pi")`` | probabilistic step size |
| ``adameka-pi`` | ``adameka(learning_rate="pi")`` | probabilistic step size |
| ``lodo`` | ``probopt.optimizers.lodo`` | workload's (meta-lr, α₀, β) from LODO's Table 6, ``key=0`` |
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

__all__ = [
    "OptimizerSpec",
    "OPTIMIZERS",
    "UnknownNameError",
    "UnavailableError",
    "get_optimizer",
    "parse_names",
    "build_optimizer",
]


class UnknownNameError(ValueError):
    """A name that no registry entry has."""


class UnavailableError(RuntimeError):
    """A registered optimizer whose module cannot be imported or built here."""


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """One entry of the optimizer registry.

    **Attributes:**

    - ``name``: the CLI name.
    - ``description``: one line for ``--help`` and the docs.
    - ``needs_stats``: ``True`` for Meka-type optimizers, which take
      ``stats=BatchStats`` (with the HVP along the previous step); ``False``
      for optimizers that take plain minibatch gradients.
    - ``factory``: ``factory(hyperparameters) -> optax transformation``;
      imports its module itself.
    - ``eval_params``: optional ``eval_params(opt_state, params) -> params``,
      the point at which the objective is measured (Schedule-Free evaluates
      its averaged iterate).
    """

    name: str
    description: str
    needs_stats: bool
    factory: Callable[[Mapping[str, Any]], Any]
    eval_params: Callable[[Any, Any], Any] | None = None


# ----------------------------------------------------------------- factories
def _sgd(h):
    import optax

    return optax.sgd(h["sgd_lr"])


def _momentum(h):
    import optax

    return optax.sgd(h["momentum_lr"], momentum=0.9)


def _adam(h):
    import optax

    return optax.adam(h["adam_lr"])


def _contrib(name):
    def factory(h):
        import optax

        return getattr(optax.contrib, name)()

    return factory


def _mechanic(h):
    import optax

    return optax.contrib.mechanize(optax.adam(h["adam_lr"]))


def _schedule_free(h):
    import optax

    return optax.contrib.schedule_free_adamw(learning_rate=h["adam_lr"])


def _schedule_free_eval(state, params):
    import optax

    return optax.contrib.schedule_free_eval_params(state, params)


def _meka(learning_rate_key, adaptive):
    def factory(h):
        from probopt.optimizers._meka import adameka, meka

        build = adameka if adaptive else meka
        lr = "pi" if learning_rate_key == "pi" else h[learning_rate_key]
        return build(lr)

    return factory


def _lodo(h):
    import jax

    from probopt.optimizers._lodo import lodo

    meta_lr, alpha0, beta = h["lodo"]
    return lodo(meta_lr, alpha0, beta, key=jax.random.key(0))


OPTIMIZERS: dict[str, OptimizerSpec] = {
    spec.name: spec
    for spec in [
        OptimizerSpec("meka", "Meka: Kalman-filtered gradient, constant step (SGD lr)", True, _meka("sgd_lr", False)),
        OptimizerSpec("adameka", "AdaMeka: Adam-like direction from the gradient posterior (Adam lr)", True, _meka("adam_lr", True)),
        OptimizerSpec("meka-pi", "Meka with probability-of-improvement step sizes", True, _meka("pi", False)),
        OptimizerSpec("adameka-pi", "AdaMeka with probability-of-improvement step sizes", True, _meka("pi", True)),
        OptimizerSpec("lodo", "LODO: learned preconditioner meta-trained online (Table 6 settings)", False, _lodo),
        OptimizerSpec("sgd", "optax.sgd at the workload's SGD learning rate", False, _sgd),
        OptimizerSpec("momentum", "optax.sgd with momentum 0.9", False, _momentum),
        OptimizerSpec("adam", "optax.adam at the workload's Adam learning rate", False, _adam),
        OptimizerSpec("prodigy", "optax.contrib.prodigy (defaults)", False, _contrib("prodigy")),
        OptimizerSpec("dog", "optax.contrib.dog (defaults)", False, _contrib("dog")),
        OptimizerSpec("dowg", "optax.contrib.dowg (defaults)", False, _contrib("dowg")),
        OptimizerSpec("cocob", "optax.contrib.cocob (defaults)", False, _contrib("cocob")),
        OptimizerSpec("mechanic", "optax.contrib.mechanize around Adam", False, _mechanic),
        OptimizerSpec(
            "schedule-free",
            "optax.contrib.schedule_free_adamw (Adam lr), scored at its averaged point",
            False,
            _schedule_free,
            _schedule_free_eval,
        ),
    ]
}


def parse_names(text: str | None, known: Mapping[str, Any], what: str) -> list[str]:
    """Split a comma-separated list and check every name against ``known``.

    **Raises:** `UnknownNameError` naming the unknown entries and the valid ones.
    """
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    if not names:
        raise UnknownNameError(f"no {what} given; choose from: {', '.join(known)}.")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UnknownNameError(
            f"unknown {what} {', '.join(repr(n) for n in unknown)}; choose from: {', '.join(known)}."
        )
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UnknownNameError(f"{what} listed more than once: {', '.join(duplicates)}.")
    return names


def get_optimizer(name: str) -> OptimizerSpec:
    """The registry entry for ``name``; raises `UnknownNameError` otherwise."""
    if name not in OPTIMIZERS:
        raise UnknownNameError(f"unknown optimizer {name!r}; choose from: {', '.join(OPTIMIZERS)}.")
    return OPTIMIZERS[name]


def build_optimizer(name: str, hyperparameters: Mapping[str, Any]) -> Any:
    """Build the optax transformation for ``name`` with a workload's hyperparameters.

    **Raises:** `UnavailableError` when the optimizer's module is missing or
    fails to build here (the message says why).
    """
    spec = get_optimizer(name)
    try:
        return spec.factory(hyperparameters)
    except (ImportError, AttributeError) as error:
        raise UnavailableError(f"optimizer {name!r} is not available in this installation: {error}") from error
