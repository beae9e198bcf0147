"""Textbook line-up: GD, momentum, Adam, Newton, damped Newton and natural gradient
(true vs empirical Fisher) on ill-conditioned 2-D quadratics and on logistic
regression on sklearn's digits.

Prints an iterations-to-tolerance table and writes
``docs/figures/textbook_trajectories.png`` (quadratic trajectories) and
``docs/figures/textbook_digits.png`` (digits loss curves).

The quadratics follow Perone's talk: Hessian ``diag(2 kappa, 2)`` (lambda_min = 2,
lambda_max = 2 kappa) for kappa = 1, 1.5, 2, 2.5.  To give natural gradient a
probabilistic model, each quadratic is written as the mean negative
log-likelihood of a linear-Gaussian regression (unit noise) whose design has
second moment exactly H and whose least-squares solution is exactly 0, so the
loss is ``0.5 theta^T H theta + const``.  Learning rates of GD, momentum and
Adam are tuned on a grid per problem (best iteration count reported);
damped Newton uses lambda = 1 on the quadratics and 0.01 on digits; natural
gradient's damping is the L2 coefficient (so with the true Fisher it is exactly
Newton on the regularised digits loss).  A ">N (gap g)" entry did not reach the
tolerance in N steps and ended at relative gap g.

Run: ``python examples/textbook_comparison.py [--quick]`` (a few minutes on a
loaded 2-core CPU; ``--quick`` skips the digits part).
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax

from probopt.curvature import natural_gradient, negative_log_likelihood, newton

jax.config.update("jax_enable_x64", True)

FIG_DIR = os.path.join(os.path.dirname(__file__), "..", "docs", "figures")
KAPPAS = (1.0, 1.5, 2.0, 2.5)
REL_TOL = 1e-6


# ----------------------------------------------------------------------------- problems


def gaussian_quadratic(kappa: float, n: int = 200, seed: int = 0):
    """Linear-Gaussian regression with mean NLL = 0.5 theta^T diag(2 kappa, 2) theta + const."""
    rng = np.random.default_rng(seed)
    h = np.diag([2.0 * kappa, 2.0])
    z, _ = np.linalg.qr(rng.standard_normal((n, 2)))
    x = np.sqrt(n) * z @ np.sqrt(h)  # x^T x / n = H exactly
    noise = rng.standard_normal(n)
    noise -= z @ (z.T @ noise)  # orthogonal to the design: the least-squares solution is 0
    noise /= np.sqrt(np.mean(noise**2))  # unit residual variance at the optimum (well specified)
    inputs, targets = jnp.asarray(x), jnp.asarray(noise)

    def predictive(params, xs):
        return dist.Normal(xs @ params, 1.0)

    return predictive, inputs, targets


def digits_problem(l2: float = 1e-3):
    from sklearn.datasets import load_digits

    data = load_digits()
    x = data.data / 16.0
    x = (x - x.mean(0)) / (x.std(0) + 1e-8)
    inputs, targets = jnp.asarray(x), jnp.asarray(data.target)

    def predictive(params, xs):
        return dist.Categorical(logits=xs @ params["w"] + params["b"])

    params0 = {"w": jnp.zeros((64, 10)), "b": jnp.zeros(10)}
    return predictive, inputs, targets, params0, l2


# ----------------------------------------------------------------------------- runner


def run(opt, loss_fn, params0, num_steps, *, extra=lambda p: {}):
    """Full-batch optimisation; returns the loss trace and parameter trajectory."""

    def step(carry, _):
        params, state = carry
        loss, grad = jax.value_and_grad(loss_fn)(params)
        updates, state = opt.update(grad, state, params, **extra(params))
        return (optax.apply_updates(params, updates), state), (loss, params)

    _, (losses, path) = jax.lax.scan(step, (params0, opt.init(params0)), None, length=num_steps)
    return losses, path


def iterations_to_tol(losses, f_star, rel_tol=REL_TOL):
    gap = (losses - f_star) / max(losses[0] - f_star, 1e-300)
    hit = np.nonzero(gap <= rel_tol)[0]
    return int(hit[0]) if hit.size else None


def best_over_grid(make_opt, grid, loss_fn, params0, num_steps, f_star):
    """Run every hyperparameter in ``grid`` (rows of an array) in one vmapped jit; keep the best."""
    grid = jnp.atleast_2d(jnp.asarray(grid, float).T).T  # (G, k)
    losses, paths = jax.jit(jax.vmap(lambda hp: run(make_opt(*hp), loss_fn, params0, num_steps)))(grid)
    losses = np.asarray(losses)
    best, best_key = None, None
    for g in range(grid.shape[0]):
        if not np.all(np.isfinite(losses[g])):
            continue
        its = iterations_to_tol(losses[g], f_star)
        key = its if its is not None else num_steps + 1 + (losses[g, -1] - f_star)
        if best_key is None or key < best_key:
            best, best_key = g, key
    hp = tuple(float(v) for v in grid[best])
    return hp, losses[best], jax.tree.map(lambda a: a[best], paths)


def methods(predictive, kind_damping):
    """Optimizer factories: name -> (make_opt(lr), "grid" if lr is tuned, extra args needed)."""
    return {
        "GD": (lambda lr: optax.sgd(lr), "lr", None),
        "momentum": (lambda lr, beta: optax.sgd(lr, momentum=beta), "lr_beta", None),
        "Adam": (lambda lr: optax.adam(lr), "lr", None),
        "Newton": (lambda lr: newton(1.0), None, "value_fn"),
        "damped Newton": (lambda lr: newton(1.0, damping=kind_damping["damped"]), None, "value_fn"),
        "NG (Fisher)": (
            lambda lr: natural_gradient(
                1.0, predictive, kind="true", damping=kind_damping["ng"], num_samples=kind_damping["samples"]
            ),
            None,
            "batch",
        ),
        "NG (empirical F)": (
            lambda lr: natural_gradient(1.0, predictive, kind="empirical", damping=kind_damping["ng"]),
            None,
            "batch",
        ),
    }


def compare(
    predictive, inputs, targets, params0, *, l2, num_steps, second_order_steps, grid, betas, damping, f_star=None
):
    def loss_fn(p):
        reg = 0.5 * l2 * sum(jnp.sum(leaf**2) for leaf in jax.tree.leaves(p))
        return negative_log_likelihood(predictive, p, inputs, targets) + reg

    table, traces, paths = {}, {}, {}
    factories = methods(predictive, damping)
    batch = (inputs, targets)
    if f_star is None:  # reference optimum from 30 undamped Newton steps
        newton_opt = newton(1.0)
        losses, _ = jax.jit(lambda p: run(newton_opt, loss_fn, p, 30, extra=lambda q: {"value_fn": loss_fn}))(params0)
        f_star = float(np.min(losses))
    for name, (make, tune, needs) in factories.items():
        extra = {
            None: lambda p: {},
            "value_fn": lambda p: {"value_fn": loss_fn},
            "batch": lambda p: {"batch": batch},
        }[needs]
        t0 = time.perf_counter()
        if tune is not None:
            hp_grid = grid if tune == "lr" else [(lr, b) for lr in grid for b in betas]
            lr, losses, path = best_over_grid(make, hp_grid, loss_fn, params0, num_steps, f_star)
        else:
            lr = None
            # Second-order methods converge in a few steps and cost O(n P^2) each: run fewer.
            losses, path = jax.jit(lambda p: run(make(None), loss_fn, p, second_order_steps, extra=extra))(params0)
            losses = np.asarray(losses)
        its = iterations_to_tol(losses, f_star)
        gap = float((losses[-1] - f_star) / (losses[0] - f_star))
        table[name] = (its, lr, time.perf_counter() - t0, gap)
        print(f"  {name}: {its} iterations ({table[name][2]:.1f} s incl. compile)", flush=True)
        traces[name], paths[name] = losses, path
    return table, traces, paths, f_star


def fmt(entry, num_steps):
    its, hp, _, gap = entry
    limit = num_steps[0] if hp is not None else num_steps[1]
    s = f">{limit} (gap {gap:.0e})" if its is None else str(its)
    if hp is None:
        return s
    return s + (f" (lr {hp[0]:g})" if len(hp) == 1 else f" (lr {hp[0]:g}, beta {hp[1]:g})")


def main(quick: bool = False):
    os.makedirs(FIG_DIR, exist_ok=True)
    results, all_paths = {}, {}
    grid = list(np.round(np.geomspace(0.01, 1.0, 21), 4))
    for kappa in KAPPAS:
        print(f"quadratic kappa = {kappa:g}", flush=True)
        predictive, inputs, targets = gaussian_quadratic(kappa)
        params0 = jnp.array([2.0, 2.0])
        table, traces, paths, _ = compare(
            predictive, inputs, targets, params0, l2=0.0, num_steps=300, second_order_steps=100, grid=grid, betas=(0.1, 0.3, 0.5, 0.7, 0.9),
            damping={"damped": 1.0, "ng": 1e-8, "samples": 64},
            f_star=float(negative_log_likelihood(predictive, jnp.zeros(2), inputs, targets)),
        )
        results[f"quadratic k={kappa:g}"] = (table, (300, 100))
        all_paths[kappa] = paths

    if not quick:
        print("digits softmax regression", flush=True)
        predictive, inputs, targets, params0, l2 = digits_problem()
        table, traces, _, f_star = compare(
            predictive, inputs, targets, params0, l2=l2, num_steps=1000, second_order_steps=30,
            grid=[0.3, 1.0, 3.0, 10.0, 30.0], betas=(0.5, 0.9), damping={"damped": 1e-2, "ng": l2, "samples": 1},
        )
        results["digits logistic"] = (table, (1000, 30))
        plot_digits(traces, f_star)

    names = list(next(iter(results.values()))[0].keys())
    cols = list(results.keys())
    print(f"\nIterations until (f - f*) <= {REL_TOL:g} (f0 - f*), full batch:")
    header = "| method | " + " | ".join(cols) + " |"
    print(header)
    print("|" + "---|" * (len(cols) + 1))
    for name in names:
        print(f"| {name} | " + " | ".join(fmt(results[c][0][name], results[c][1]) for c in cols) + " |")
    plot_trajectories(all_paths)


def plot_trajectories(all_paths):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(KAPPAS), figsize=(4.2 * len(KAPPAS), 4.2))
    grid = np.linspace(-2.5, 2.5, 201)
    xx, yy = np.meshgrid(grid, grid)
    for ax, kappa in zip(axes, KAPPAS):
        ax.contour(xx, yy, 0.5 * (2 * kappa * xx**2 + 2 * yy**2), levels=15, colors="0.8", linewidths=0.6)
        for name, path in all_paths[kappa].items():
            p = np.asarray(path)[:25]
            ax.plot(p[:, 0], p[:, 1], ".-", ms=3, lw=1, label=name)
        ax.set_title(f"kappa = {kappa:g}  (H = diag({2 * kappa:g}, 2))")
        ax.set_xlim(-2.5, 2.5)
        ax.set_ylim(-2.5, 2.5)
        ax.set_aspect("equal")
    axes[0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    out = os.path.join(FIG_DIR, "textbook_trajectories.png")
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def plot_digits(traces, f_star):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, losses in traces.items():
        ax.semilogy(np.maximum(losses - f_star, 1e-16), label=name)
    ax.set_xlabel("iteration")
    ax.set_ylabel("f - f*")
    ax.set_title("L2-regularised softmax regression, sklearn digits")
    ax.set_xscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = os.path.join(FIG_DIR, "textbook_digits.png")
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the digits problem")
    main(parser.parse_args().quick)
