r"""Meka on the noisy quadratic (Chen et al. 2020, Sec. 6, Fig. 4 and Proposition 1).

Problem: $\ell(\theta,\xi) = \frac12(\theta-\xi)^\top H(\theta-\xi)$, $\xi\sim\mathcal N(0,I)$,
$D = 20$, $\kappa(H) = 10^3$, $\lambda_{\max}(H) = L = 1$
(`probopt.problems.NoisyQuadraticFamily`).  Four runs per seed, all from
$\theta_0 = 5\cdot\mathbf 1$ with minibatches of ``--batch-size`` examples:

- SGD at the high step $\alpha = 1/L$ (diffuses around the optimum);
- SGD at a low step $\alpha = 0.02/L$ (converges slowly);
- GD (the exact gradient) at the high step;
- Meka at the same high constant step (tracks GD).

Every curve is the suboptimality $f(\theta_t) - f^\star$.  It also checks
Proposition 1's claim: with $Q = 0$ (every example has Hessian $H$, so the
per-example HVPs agree and $q_t = 0$) the filter variance is $p_t \approx
\sigma/(t+1)$, i.e. $(t+1)\,p_t/\sigma_t \to 1$.

Run: ``python examples/meka_noisy_quadratic.py`` (about 30 s on two CPU cores);
writes ``docs/figures/meka_noisy_quadratic.png``.
"""

from __future__ import annotations

import argparse
import pathlib

import jax
import numpy as np
import optax

from probopt.optimizers import make_step, meka
from probopt.problems import NoisyQuadraticFamily

jax.config.update("jax_enable_x64", True)

FIGURE = pathlib.Path(__file__).resolve().parent.parent / "docs" / "figures" / "meka_noisy_quadratic.png"


def run_seed(key, *, steps, batch_size, high, low, start_scale):
    """Suboptimality curves of the four methods and Meka's filter trace for one seed."""
    problem_key, data_key = jax.random.split(key)
    problem = NoisyQuadraticFamily(dim=20, condition_number=1e3).sample(problem_key)
    theta0 = start_scale * problem.start()
    keys = jax.random.split(data_key, steps)

    def suboptimality(theta):
        return problem.full_loss(theta) - problem.optimal_loss

    def run_optax(optimizer):
        step = make_step(optimizer, problem.loss)

        def body(carry, k):
            theta, state = carry
            theta, state, _ = step(theta, state, problem.sample_batch(k, batch_size))
            extra = (state.belief.variance, state.observation_noise, state.gain) if hasattr(state, "belief") else ()
            return (theta, state), (suboptimality(theta), extra)

        _, (curve, extra) = jax.lax.scan(body, (theta0, optimizer.init(theta0)), keys)
        return curve, extra

    def gd_body(theta, _):
        theta = theta - high * problem.full_grad(theta)
        return theta, suboptimality(theta)

    _, gd = jax.lax.scan(gd_body, theta0, None, length=steps)
    sgd_high, _ = run_optax(optax.sgd(high))
    sgd_low, _ = run_optax(optax.sgd(low))
    meka_curve, (p, sigma, gain) = run_optax(meka(high))
    return {"SGD (high step)": sgd_high, "SGD (low step)": sgd_low, "GD (high step)": gd,
            "Meka (high step)": meka_curve}, (p, sigma, gain)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--high", type=float, default=1.0)
    parser.add_argument("--low", type=float, default=0.02)
    parser.add_argument("--start-scale", type=float, default=5.0)
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)

    keys = jax.random.split(jax.random.key(0), args.seeds)
    run = jax.jit(jax.vmap(lambda k: run_seed(k, steps=args.steps, batch_size=args.batch_size,
                                             high=args.high, low=args.low, start_scale=args.start_scale)))
    curves, (p, sigma, gain) = jax.tree_util.tree_map(np.asarray, run(keys))
    final = {name: c[:, -1] for name, c in curves.items()}
    print(f"final f - f* after {args.steps} steps, mean over {args.seeds} seeds (per-seed values):")
    for name, values in final.items():
        per_seed = " ".join(f"{v:.3g}" for v in values)
        print(f"  {name:18s} {values.mean():.4g}   [{per_seed}]")
    meka_final, gd_final, sgd_final = final["Meka (high step)"], final["GD (high step)"], final["SGD (high step)"]
    print(f"Meka / GD        = {meka_final.mean() / gd_final.mean():.3f}  (bar: <= 1.2)")
    print(f"Meka / SGD(high) = {meka_final.mean() / sgd_final.mean():.4f}  (bar: <= 0.1)")

    t = np.arange(args.steps)
    ratio = (t + 1) * p / sigma  # Proposition 1: -> 1
    gain_ratio = (t + 1) * gain
    late = slice(10, None)
    print("Proposition 1, t >= 10: (t+1) p_t / sigma_t in "
          f"[{ratio[:, late].min():.4f}, {ratio[:, late].max():.4f}], "
          f"(t+1) k_t in [{gain_ratio[:, late].min():.4f}, {gain_ratio[:, late].max():.4f}]")

    if not args.no_plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
        for name, c in curves.items():
            median = np.median(c, axis=0)
            axes[0].semilogy(t + 1, median, label=name)
            axes[0].fill_between(t + 1, c.min(0), c.max(0), alpha=0.2)
        axes[0].set(xlabel="iteration", ylabel=r"$f(\theta_t) - f^\star$", xscale="log",
                    title=f"Noisy quadratic, D=20, $\\kappa=10^3$ ({args.seeds} seeds)")
        axes[0].legend(fontsize=8)
        axes[1].semilogx(t + 1, ratio.T, color="C1", alpha=0.6)
        axes[1].axhline(1.0, color="k", ls="--", label=r"Prop. 1: $p_t = \sigma/(t+1)$")
        axes[1].set(xlabel="iteration", ylabel=r"$(t+1)\,p_t / \sigma_t$", ylim=(0.5, 1.5),
                    title="Meka's filter variance (5 seeds)")
        axes[1].legend(fontsize=8)
        fig.tight_layout()
        FIGURE.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(FIGURE, dpi=80)
        print(f"wrote {FIGURE}")
    return curves, (p, sigma, gain)


if __name__ == "__main__":
    main()
