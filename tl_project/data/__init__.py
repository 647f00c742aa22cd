"""The data: `ImageDataModule` (module.py) and what it is built from.

- images.py: which files are images, and decoding them;
- datasets.py: the datasets and the epoch sampler;
- splits.py: stratified, seeded splits;
- folders.py: image folders (split folders, classes, samples, the images to predict);
- named.py: MNIST, FashionMNIST, CIFAR10, CIFAR100.
"""

from tl_project.data.module import ImageDataModule

__all__ = ["ImageDataModule"]
