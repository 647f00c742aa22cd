"""Named torchvision datasets (MNIST, FashionMNIST, CIFAR10, CIFAR100): their class
lists, known before any download, and their images as uint8 tensors. (Fashion)MNIST
is read straight from the IDX files, also where Debian's `dataset-fashion-mnist`
installs them.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import torch
import torchvision

from tl_project.data.images import is_image_file
from tl_project.errors import UserError

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# The fine labels of CIFAR-100, in label order (they are also in the dataset's meta file,
# which only exists after the download; the class list must be known before it).
CIFAR100_CLASSES = """
apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel
can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur
dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion
lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree
pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea
seal shark shrew skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table
tank telephone television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman
worm
""".split()  # noqa: SIM905
NAMED_DATASETS: dict[str, list[str]] = {
    "MNIST": list(torchvision.datasets.MNIST.classes),
    "FashionMNIST": list(torchvision.datasets.FashionMNIST.classes),
    "CIFAR10": CIFAR10_CLASSES,
    "CIFAR100": CIFAR100_CLASSES,
}


def _idx_file(root: Path, name: str, stem: str) -> Path | None:
    for folder in (root, root / name / "raw"):
        for suffix in ("", ".gz"):
            if (folder / f"{stem}{suffix}").is_file():
                return folder / f"{stem}{suffix}"
    return None


def read_idx(path: Path) -> torch.Tensor:
    """An IDX file (the (Fashion)MNIST format), optionally gzipped, as a uint8 tensor."""
    with gzip.open(path) if path.suffix == ".gz" else open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return torch.frombuffer(bytearray(data[4 + 4 * ndim :]), dtype=torch.uint8).reshape(shape)


def _mnist_stems(train: bool) -> tuple[str, str]:
    prefix = "train" if train else "t10k"
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def _missing_dataset(name: str, root: Path, reason: str, tried_download: bool = False) -> UserError:
    hint = ""
    if name == "FashionMNIST":
        hint = (
            " Offline, Debian's package provides it: apt-get install dataset-fashion-mnist, "
            "then --data.root /usr/share/datasets/fashion-mnist."
        )
    fix = (
        "Check the network, or pass --data.root pointing at a copy."
        if tried_download
        else "Pass --data.download true to download it into --data.root, or --data.root pointing at a copy."
    )
    return UserError(f"{name} is not in {root} ({reason}). {fix}{hint}")


def missing_named(name: str | None, root: Path, download: bool) -> str | None:
    """Why the named dataset `name` cannot be read from `root` now (its files are not there),
    or None: what `fit` would meet after the problem at hand is fixed."""
    if name not in ("MNIST", "FashionMNIST"):
        return None  # the others are checked by torchvision itself, when they are read
    if all(_idx_file(root, name, stem) for train in (True, False) for stem in _mnist_stems(train)):
        return None
    reason = "not downloaded yet: the download needs the network" if download else "its IDX files were not found"
    return str(_missing_dataset(name, root, reason, tried_download=download))


def download_named(name: str, root: Path) -> None:
    """Download `name` into `root` with torchvision unless it is already there; never into a
    folder of the user's own images."""
    if name in ("MNIST", "FashionMNIST") and all(
        _idx_file(root, name, stem) for train in (True, False) for stem in _mnist_stems(train)
    ):
        return
    if (images := image_folder_in(root)) is not None:
        raise UserError(
            f"--data.root {root} holds your images ({images} has image files), and --data.dataset {name} would "
            f"download {name} into it. To train on your images pass --data.dataset null (or --config "
            f"configs/folder.yaml); for {name}, pass another --data.root. Nothing was written."
        )
    dataset_class = getattr(torchvision.datasets, name)
    try:
        for train in (True, False):
            dataset_class(str(root), train=train, download=True)
    except Exception as error:
        raise _missing_dataset(name, root, f"the download failed: {error}", tried_download=True) from None


def image_folder_in(root: Path, look: int = 50) -> Path | None:
    """A class folder of `root` (or a split's) with image files among its first `look` entries,
    if any: then `root` is an image folder, not a place for a download."""
    if not root.is_dir():
        return None
    folders = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    folders += [p for split in folders if split.name in ("train", "val", "test") for p in split.iterdir() if p.is_dir()]
    for folder in folders:
        with os.scandir(folder) as entries:
            for _, entry in zip(range(look), entries, strict=False):
                if entry.is_file() and is_image_file(Path(entry.path)):
                    return folder
    return None


def read_named(name: str, root: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (uint8, N x H x W or N x H x W x C) and labels of a named dataset split."""
    if name in ("MNIST", "FashionMNIST"):
        files = [_idx_file(root, name, stem) for stem in _mnist_stems(train)]
        if None in files:
            raise _missing_dataset(name, root, "its IDX files were not found")
        images, labels = (read_idx(f) for f in files if f is not None)
        return images, labels.long()
    try:
        dataset = getattr(torchvision.datasets, name)(str(root), train=train, download=False)
    except RuntimeError as error:
        raise _missing_dataset(name, root, str(error)) from None
    if list(dataset.classes) != NAMED_DATASETS[name]:
        raise UserError(f"{name} in {root} lists classes {dataset.classes}, not the expected ones.")
    return torch.from_numpy(dataset.data), torch.tensor(dataset.targets)
