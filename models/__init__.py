"""Benchmark workloads: networks and datasets with per-example losses.

No workload uses BatchNorm: it couples the examples of a batch, so
per-example gradients (and every statistic probopt computes from them) would
no longer be independent.  ResNet-32 uses GroupNorm instead, as in Meka.
"""

from .cnn import CNN3c3d as CNN3c3d
from .data import Dataset as Dataset
from .data import load_digits as load_digits
from .data import load_mnist1d as load_mnist1d
from .data import load_mnist5k as load_mnist5k
from .data import minibatch_sampler as minibatch_sampler
from .data import synthetic_images as synthetic_images
from .data import train_test_split as train_test_split
from .losses import cross_entropy_per_example as cross_entropy_per_example
from .losses import split_model as split_model
from .mlp import MLP as MLP
from .resnet import BasicBlock as BasicBlock
from .resnet import ResNet as ResNet
from .resnet import resnet32 as resnet32
