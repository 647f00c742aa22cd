"""Datasets of labelled or unlabelled images (files or in-memory tensors) and the
sampler whose `(epoch, index)` items make augmentation reproducible.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import Dataset, DistributedSampler, Sampler

from tl_project.data.images import load_image
from tl_project.errors import UserError
from tl_project.transforms import CropSampler


class ImageDataset(Dataset):
    """Base of the datasets: `load(index)` gives (image, target), then `transform` applies;
    items are (image, target, index).

    An item is an index, or `(epoch, index)` from `EpochSampler`: then the random
    augmentation is drawn from `(seed, epoch, index)` alone, whatever the process,
    worker or RNG state, so a resumed run augments exactly as an uninterrupted one.
    """

    def __init__(self, transform: Callable, seed: int = 0) -> None:
        self.transform = transform
        self.seed = seed
        # An image that fails to load gives a placeholder item with index -1 - index, which
        # `ImageDataModule.on_before_batch_transfer` takes out of its batch (else: an error).
        self.skip_unreadable = False

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int) -> tuple[Any, int]:
        raise NotImplementedError

    def target(self, index: int) -> int:
        """The label of item `index`, without loading its image."""
        raise NotImplementedError

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[Any, ...]:
        """(transformed image, target, index); the index finds the file again (reports, predictions)."""
        if not isinstance(item, tuple):
            return self.item(item)
        epoch, index = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, epoch, index)) & 0x7FFF_FFFF_FFFF_FFFF)
            return self.item(index)

    def item(self, index: int) -> tuple[Any, ...]:
        try:
            image, target = self.load(index)
        except UserError:
            if not self.skip_unreadable:
                raise
            # Same shape as a real item, so the batch forms; its index marks it for removal.
            return self.transform(torch.zeros(3, 1, 1, dtype=torch.uint8)), self.target(index), -1 - index
        return self.transform(image), target, index

    def describe(self, index: int) -> str:
        """Where item `index` comes from, for people."""
        return f"#{index}"


class FolderDataset(ImageDataset):
    """(image, label) pairs from image files; labels are class indices."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Callable, seed: int = 0) -> None:
        super().__init__(transform, seed)
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return load_image(path), label

    def target(self, index: int) -> int:
        return self.samples[index][1]

    def describe(self, index: int) -> str:
        return str(self.samples[index][0])


def multi_hot(classes: Sequence[int], num_classes: int) -> torch.Tensor:
    """The float vector with 1 at `classes`, 0 elsewhere: a multi-label target."""
    target = torch.zeros(num_classes)
    target[list(classes)] = 1.0
    return target


class MultiLabelDataset(FolderDataset):
    """(image, targets) pairs of a multi-label table: a sample's label is the number of its
    label set in `label_sets`, its target (`load`, `target`) the multi-hot float vector of
    that set's classes."""

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        transform: Callable,
        seed: int,
        label_sets: Sequence[Sequence[int]],
        num_classes: int,
    ) -> None:
        super().__init__(samples, transform, seed)
        self.targets = torch.stack([multi_hot(classes, num_classes) for classes in label_sets])

    def load(self, index: int) -> tuple[torch.Tensor, Any]:
        path, code = self.samples[index]
        return load_image(path), self.targets[code]

    def target(self, index: int) -> Any:
        """The multi-hot target of item `index` (its label set's)."""
        return self.targets[self.samples[index][1]]


class PredictDataset(ImageDataset):
    """Unlabelled images (target -1); the index finds the path again."""

    def __init__(self, paths: Sequence[str], transform: Callable) -> None:
        super().__init__(transform)
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        return load_image(self.paths[index]), -1

    def target(self, index: int) -> int:
        return -1

    def describe(self, index: int) -> str:
        return str(self.paths[index])


class TensorImageDataset(ImageDataset):
    """(image, label) pairs from in-memory uint8 images, N x H x W (gray) or N x H x W x C.

    Items are (uint8 image, target, index, crop params): `transform` is a `CropSampler`,
    and `ImageDataModule.on_after_batch_transfer` crops, resizes and normalises the
    batch on the device.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        transform: CropSampler,
        seed: int = 0,
        names: Sequence[str] | None = None,
    ) -> None:
        super().__init__(transform, seed)
        self.images = images
        self.labels = labels
        self.names = list(names) if names is not None else None  # e.g. FashionMNIST/train/123

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        image = image.expand(3, *image.shape) if image.ndim == 2 else image.permute(2, 0, 1)
        return image, int(self.labels[index])

    def target(self, index: int) -> int:
        return int(self.labels[index])

    def describe(self, index: int) -> str:
        return self.names[index] if self.names is not None else f"#{index}"

    def item(self, index: int) -> tuple[Any, ...]:
        image, target = self.load(index)
        image, params = self.transform(image)
        return image.contiguous(), target, index, params


class LabelsOnly(Dataset):
    """`dataset`'s items without their images: (empty tensor, target, index), in the same order.

    For epochs that look features up by index (the feature cache): the same sampler and
    batches as the image epochs, and no image is read.
    """

    def __init__(self, dataset: ImageDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int, int]:
        index = item[1] if isinstance(item, tuple) else item
        return torch.empty(0, dtype=torch.uint8), self.dataset.target(index), index


class EpochSampler(DistributedSampler):
    """Shuffles by `(seed, epoch)` and yields `(epoch, index)`: see `ImageDataset`.

    A `DistributedSampler` (one replica when not distributed), so Lightning keeps it
    under DDP and calls `set_epoch` on it every epoch.
    """

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return ((epoch, index) for index in super().__iter__())


class BalancedEpochSampler(EpochSampler):
    """Like `EpochSampler`, but each epoch draws as many items as the dataset has, with
    replacement, every class equally likely (`data.balance sampler`): rare classes' images
    recur, common ones' are left out more. The draw depends on `(seed, epoch)` alone, and
    the processes take disjoint shares of it."""

    def __init__(self, dataset: Any, targets: Sequence[int], num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        counts = torch.bincount(torch.tensor(targets))
        self.weights = 1.0 / counts[torch.tensor(targets)].double()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        drawn = torch.multinomial(self.weights, self.total_size, replacement=True, generator=generator)
        epoch = self.epoch
        return ((epoch, index) for index in drawn[self.rank : self.total_size : self.num_replicas].tolist())


def split_sampler(
    dataset: Dataset, train: bool, balance: str, world: int, rank: int, seed: int, targets: Callable[[], list[int]]
) -> Sampler | None:
    """The sampler of a split's loader: training shuffles per epoch (every class equally often
    with `balance` sampler); evaluation shares the images out unrepeated among `world` processes."""
    if train and balance == "sampler":
        return BalancedEpochSampler(dataset, targets(), num_replicas=world, rank=rank, seed=seed)
    if train:
        return EpochSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    if world > 1 and len(dataset) >= world:  # type: ignore[arg-type]
        # Each image evaluated exactly once: no padding with repeats, as DistributedSampler would.
        return UnrepeatedDistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
    return None
