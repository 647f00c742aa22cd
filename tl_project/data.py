"""ImageDataModule: train/val/test/predict loaders from a named dataset or an image folder.

Two sources:

- a torchvision dataset by name (`MNIST`, `FashionMNIST`, `CIFAR10`, `CIFAR100`):
  the official test split is the test set, and `val_split` of the official train
  split (stratified, from `seed`) is the validation set. (Fashion)MNIST is also
  read from a folder holding the four raw IDX files, as Debian's
  `dataset-fashion-mnist` installs them in `/usr/share/datasets/fashion-mnist/`.
- an image folder (`dataset: null`): `root/<class>/*` or
  `root/{train,val,test}/<class>/*`. A split without its own folder is carved
  out of train by `val_split` / `test_split`, stratified by class and
  deterministic from `seed`, so `test` evaluates exactly the images `fit` held out.

The class list is known right after `__init__` (the CLI links it into the model).
Images of any mode become RGB, EXIF orientation applied; files without an image
extension are ignored.

Batches leave the loader as uint8 images; `on_after_batch_transfer` makes the
normalised floats on the device (and, for the in-memory datasets, the crops too:
see `tl_project.transforms`). Code that iterates a loader itself calls it as well.
"""

from __future__ import annotations

import gzip
import math
import os
import random
import struct
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import torchvision
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.functional import pil_to_tensor

from tl_project.checks import DataReport, check_images
from tl_project.errors import UserError
from tl_project.transforms import CropSampler, eval_transform, normalize, resized_crops, train_transform

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
SPLITS = ("train", "val", "test")

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


# --- image files -----------------------------------------------------------------


def is_image_file(path: Path) -> bool:
    """An image by extension, and not a hidden file (`.DS_Store`, macOS `._x.jpg`)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_images(folder: Path) -> list[Path]:
    """Image files under `folder`, recursively, in sorted order."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p))


def load_image(path: Path) -> torch.Tensor:
    """Decode `path` as a uint8 RGB tensor (3 x H x W): EXIF orientation applied, any mode converted.

    JPEGs and 8/16-bit PNGs without a palette go through torchvision.io's decoders
    (libjpeg-turbo, libpng; no PIL round trip); other formats and PNG variants, and
    the rare files those decoders refuse, through PIL, to the same pixels.
    """
    try:
        data = torchvision.io.read_file(str(path))
        mode = _torchvision_mode(data)
        if mode is not None:
            try:
                return _rgb_tensor(decode_image(data, mode=mode, apply_exif_orientation=True))
            except RuntimeError:
                pass  # e.g. a JPEG variant libjpeg-turbo does not read: PIL below
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened)
            image.load()
            return pil_to_tensor(to_rgb(image))
    except Exception as error:
        raise UserError(f"Cannot decode image {path}: {error}. Remove or replace that file.") from None


def _torchvision_mode(data: torch.Tensor) -> ImageReadMode | None:
    """How torchvision.io decodes these file bytes to match PIL's pixels, or None to use PIL."""
    head = bytes(data[:26].tolist())
    if head.startswith(b"\xff\xd8\xff"):
        return ImageReadMode.RGB  # JPEG: gray and CMYK converted by libjpeg-turbo
    if head.startswith(b"\x89PNG\r\n\x1a\n") and len(head) == 26:
        bit_depth, color_type = head[24], head[25]
        # Palette and 1/2/4-bit PNGs come back as indices or unscaled values: PIL reads them.
        if bit_depth in (8, 16) and color_type in (0, 2):
            return ImageReadMode.RGB
        if bit_depth in (8, 16) and color_type in (4, 6):
            return ImageReadMode.RGB_ALPHA
    return None


def _rgb_tensor(image: torch.Tensor) -> torch.Tensor:
    """uint8 RGB from torchvision's RGB or RGBA output: 16 bits scaled, transparency on white."""
    if image.dtype != torch.uint8:
        image = (image.to(torch.float32) / 257).round().to(torch.uint8)
    if image.shape[0] == 4:
        alpha = image[3:].to(torch.float32) / 255
        image = (image[:3] * alpha + 255 * (1 - alpha)).round().to(torch.uint8)
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB from any PIL mode: 16/32-bit scaled to 8 bits, transparency composited on white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit grayscale (PIL opens 16-bit PNGs as I;16 or I): scale 0..65535 to 0..255.
        scale = 1.0 if image.mode == "F" else 257.0
        pixels = np.asarray(image, dtype=np.float64) / scale
        image = Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


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

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int) -> tuple[Any, int]:
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
        image, target = self.load(index)
        return self.transform(image), target, index

    def describe(self, index: int) -> str:
        """Where item `index` comes from, for people."""
        return f"#{index}"


class FolderDataset(ImageDataset):
    """(image, label) pairs from image files; labels are class indices."""

    def __init__(self, samples: Sequence[tuple[Path, int]], transform: Callable, seed: int = 0) -> None:
        super().__init__(transform, seed)
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return load_image(path), label

    def describe(self, index: int) -> str:
        return str(self.samples[index][0])


class PredictDataset(ImageDataset):
    """Unlabelled images (target -1); the index finds the path again."""

    def __init__(self, paths: Sequence[Path], transform: Callable) -> None:
        super().__init__(transform)
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        return load_image(self.paths[index]), -1

    def describe(self, index: int) -> str:
        return str(self.paths[index])


class TensorImageDataset(ImageDataset):
    """(image, label) pairs from in-memory uint8 images, N x H x W (gray) or N x H x W x C.

    Items are (uint8 image, target, index, crop params): `transform` is a `CropSampler`,
    and `ImageDataModule.on_after_batch_transfer` crops, resizes and normalises the
    batch on the device.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: CropSampler, seed: int = 0) -> None:
        super().__init__(transform, seed)
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        image = image.expand(3, *image.shape) if image.ndim == 2 else image.permute(2, 0, 1)
        return image, int(self.labels[index])

    def item(self, index: int) -> tuple[Any, ...]:
        image, target = self.load(index)
        image, params = self.transform(image)
        return image.contiguous(), target, index, params


class EpochSampler(DistributedSampler):
    """Shuffles by `(seed, epoch)` and yields `(epoch, index)`: see `ImageDataset`.

    A `DistributedSampler` (one replica when not distributed), so Lightning keeps it
    under DDP and calls `set_epoch` on it every epoch.
    """

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return ((epoch, index) for index in super().__iter__())


# --- splits ----------------------------------------------------------------------


def stratified_split(labels: Sequence[int], fractions: Sequence[float], seed: int) -> list[list[int]]:
    """Split indices into `[rest, *parts]`, each part taking its fraction of every class.

    Deterministic from `seed`; every class keeps at least one index in `rest`.
    """
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    generator = random.Random(seed)
    parts: list[list[int]] = [[] for _ in range(len(fractions) + 1)]
    for label in sorted(by_class):
        indices = by_class[label]
        generator.shuffle(indices)
        start = 0
        for part, fraction in zip(parts[1:], fractions, strict=True):
            take = min(round(len(indices) * fraction), len(indices) - start - 1)
            part.extend(indices[start : start + max(take, 0)])
            start += max(take, 0)
        parts[0].extend(indices[start:])
    return [sorted(part) for part in parts]


# --- named datasets --------------------------------------------------------------


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


def _missing_dataset(name: str, root: Path, reason: str) -> UserError:
    hint = ""
    if name == "FashionMNIST":
        hint = (
            " Offline, Debian's package provides it: apt-get install dataset-fashion-mnist, "
            "then --data.root /usr/share/datasets/fashion-mnist."
        )
    return UserError(
        f"{name} is not in {root} ({reason}). Pass --data.download true to download it "
        f"into --data.root, or --data.root pointing at a copy.{hint}"
    )


def download_named(name: str, root: Path) -> None:
    """Download `name` into `root` with torchvision unless it is already there."""
    if name in ("MNIST", "FashionMNIST") and all(
        _idx_file(root, name, stem) for train in (True, False) for stem in _mnist_stems(train)
    ):
        return
    dataset_class = getattr(torchvision.datasets, name)
    try:
        for train in (True, False):
            dataset_class(str(root), train=train, download=True)
    except Exception as error:
        raise _missing_dataset(name, root, f"the download failed: {error}") from None


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


# --- the data module -------------------------------------------------------------


def default_num_workers() -> int:
    """Loader workers per process: the usable cores, at most 8."""
    return min(8, len(os.sched_getaffinity(0)))


class ImageDataModule(L.LightningDataModule):
    """Loaders for a named torchvision dataset or a folder of labelled images."""

    def __init__(
        self,
        dataset: str | None = "FashionMNIST",
        root: str | None = "data",
        download: bool = True,
        batch_size: int = 32,
        num_workers: int | None = None,
        image_size: int = 224,
        min_crop_scale: float = 0.08,
        augment: bool = True,
        val_split: float = 0.1,
        test_split: float = 0.1,
        seed: int = 42,
        predict_dir: str | None = None,
        classes: list[str] | None = None,
        on_bad_image: Literal["error", "skip"] = "error",
        max_image_pixels: int = 89_478_485,
    ) -> None:
        """
        Args:
            dataset: A torchvision dataset name (MNIST, FashionMNIST, CIFAR10, CIFAR100), or null for an image folder.
            root: The image folder, or where a named dataset is stored or downloaded; null for none (predict only).
            download: Download a named dataset into root when it is not there.
            batch_size: Images per batch and per device.
            num_workers: Loader worker processes per device; null picks the usable cores (at most 8).
            image_size: Side of the square images the model sees, in pixels.
            min_crop_scale: Smallest area fraction of a random training crop: 0.08 as for ImageNet; raise it for small or centred objects.
            augment: Random crops and flips for training; false trains on the evaluation view (model.cache_features needs it).
            val_split: Fraction of each class held out for validation when there is no val folder.
            test_split: Fraction of each class held out for testing when there is no test folder (folders only).
            seed: Seed of the stratified split; keep it to evaluate the same held-out images later.
            predict_dir: A folder (searched recursively) or one image file, for predict.
            classes: The expected class names (set from the checkpoint for test/predict); null reads them from the data.
            on_bad_image: Unusable images (corrupt, empty, too large): error stops before training listing all; skip leaves them out.
            max_image_pixels: Images with more pixels are refused unread (decompression bombs).
        """
        super().__init__()
        self.save_hyperparameters()
        if dataset is not None and dataset not in NAMED_DATASETS:
            raise UserError(
                f"Unknown dataset {dataset!r}. Choose one of {', '.join(NAMED_DATASETS)}, "
                "or null for an image folder given by --data.root."
            )
        for option, value in (("val_split", val_split), ("test_split", test_split)):
            if not 0.0 <= value < 1.0:
                raise UserError(f"data.{option} is {value}; it must be a fraction in [0, 1).")
        if val_split + test_split >= 1.0:
            raise UserError(
                f"data.val_split + data.test_split is {val_split + test_split:g}; "
                "it must stay below 1 to leave images for training."
            )
        if batch_size < 1 or image_size < 1:
            raise UserError("data.batch_size and data.image_size must be positive integers.")
        self.dataset = dataset
        self.root = Path(root).expanduser() if root is not None else None
        self.download = download
        self.batch_size = batch_size
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.image_size = image_size
        if not 0.0 < min_crop_scale <= 1.0:
            raise UserError(f"data.min_crop_scale is {min_crop_scale}; it must be in (0, 1].")
        self.min_crop_scale = min_crop_scale
        self.augment = augment
        self.val_split = val_split
        self.test_split = test_split
        self.seed = seed
        self.predict_dir = predict_dir
        self.on_bad_image = on_bad_image
        self.max_image_pixels = max_image_pixels
        self.class_names = self._resolve_class_names(classes)
        self.datasets: dict[str, ImageDataset] = {}

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)

    # -- classes, known before setup() --

    def _resolve_class_names(self, expected: list[str] | None) -> list[str]:
        if self.dataset is not None:
            found = NAMED_DATASETS[self.dataset]
        elif (self.root is None or not self.root.is_dir()) and expected is not None:
            return list(expected)  # e.g. predict on another machine: the folder is checked in setup
        else:
            found = self._folder_classes()
        if expected is not None and list(expected) != found:
            raise UserError(
                f"The checkpoint's classes do not match the data in {self.root}.\n"
                f"  checkpoint ({len(expected)}): {list(expected)}\n"
                f"  data       ({len(found)}): {found}\n"
                "Pass the data the model was trained on (--data.root, --data.dataset), "
                "or fine-tune a new model on this data with fit --model.weights CHECKPOINT."
            )
        return found

    @property
    def named_root(self) -> Path:
        """Where the named dataset is stored."""
        if self.root is None:
            raise UserError(f"--data.dataset {self.dataset} needs --data.root: where it is stored or goes.")
        return self.root

    def _split_dirs(self) -> dict[str, Path]:
        """The folders of the splits that have one: `root/train` etc., or `root` alone as train."""
        if self.root is None or not self.root.is_dir():
            raise UserError(
                f"Image folder {self.root} does not exist. Pass --data.root DIR with "
                "DIR/<class>/*.jpg or DIR/{train,val,test}/<class>/*.jpg, or a named --data.dataset."
            )
        if (self.root / "train").is_dir():
            return {s: self.root / s for s in SPLITS if (self.root / s).is_dir()}
        return {"train": self.root}

    def _folder_classes(self) -> list[str]:
        train = self._split_dirs()["train"]
        names = sorted(p.name for p in train.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not names:
            raise UserError(
                f"No class folders in {train}. Put each class's images in its own folder: {train}/<class>/*.jpg."
            )
        return names

    # -- data, built in setup() --

    def prepare_data(self) -> None:
        """Download a named dataset once per node."""
        if self.dataset is not None and self.download:
            download_named(self.dataset, self.named_root)

    def setup(self, stage: str) -> None:
        """Build the datasets `stage` needs."""
        if stage == "predict":
            paths = self._usable({"predict": [(p, 0) for p in self._predict_paths()]}, ["images"])["predict"]
            self.datasets["predict"] = PredictDataset([p for p, _ in paths], eval_transform(self.image_size))
            return
        if "train" not in self.datasets:
            self._build_labelled()
        needed = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}[stage]
        for split in needed:
            if len(self.datasets[split]) == 0:
                raise UserError(
                    f"The {split} set is empty. Raise --data.{split}_split, add {self.root}/{split}/<class>/ "
                    "folders, or add images."
                )

    def _build_labelled(self) -> None:
        if self.dataset is not None:
            images, labels = read_named(self.dataset, self.named_root, train=True)
            rest, val = stratified_split(labels.tolist(), [self.val_split], self.seed)
            test_images, test_labels = read_named(self.dataset, self.named_root, train=False)
            eval_crop = CropSampler(self.image_size, train=False)
            train_crop = CropSampler(self.image_size, self.min_crop_scale) if self.augment else eval_crop
            self.datasets = {
                "train": TensorImageDataset(images[rest], labels[rest], train_crop, self.seed),
                "val": TensorImageDataset(images[val], labels[val], eval_crop),
                "test": TensorImageDataset(test_images, test_labels, eval_crop),
            }
            return
        samples = self._usable(self.folder_splits(), self.class_names)
        eval_tf = eval_transform(self.image_size)
        train_tf = train_transform(self.image_size, self.min_crop_scale) if self.augment else eval_tf
        self.datasets = {
            split: FolderDataset(samples[split], train_tf if split == "train" else eval_tf, self.seed)
            for split in SPLITS
        }

    def folder_splits(self) -> dict[str, list[tuple[Path, int]]]:
        """(path, label) samples of train, val and test from the image folder."""
        dirs = self._split_dirs()
        samples = {split: self._folder_samples(folder, split == "train") for split, folder in dirs.items()}
        # Splits without a folder of their own are carved out of train.
        carve = [s for s in ("val", "test") if s not in samples]
        fractions = [self.val_split if s == "val" else self.test_split for s in carve]
        train = samples["train"]
        parts = stratified_split([label for _, label in train], fractions, self.seed)
        samples["train"] = [train[i] for i in parts[0]]
        for split, indices in zip(carve, parts[1:], strict=True):
            samples[split] = [train[i] for i in indices]
        return samples

    def check(self, splits: dict[str, list[tuple[Path, int]]], class_names: list[str]) -> DataReport:
        """Decode every image of `splits` once and report problems, warnings and class counts."""
        return check_images(splits, class_names, self.max_image_pixels, workers=max(1, self.num_workers))

    def _usable(
        self, splits: dict[str, list[tuple[Path, int]]], class_names: list[str]
    ) -> dict[str, list[tuple[Path, int]]]:
        """`splits` without unusable images, by `on_bad_image`: stop on any, or skip them and say which."""
        report = self.check(splits, class_names)
        if report.problems and self.on_bad_image == "error":
            raise UserError(
                f"{len(report.problems)} unusable images; nothing was trained:\n"
                + "\n".join(map(str, report.problems))
                + "\nRemove or replace them, or pass --data.on_bad_image skip to leave them out."
            )
        notes = []
        if report.problems:
            notes += [f"Skipping {len(report.problems)} unusable images (--data.on_bad_image skip):"]
            notes += [str(finding) for finding in report.problems]
        if report.warnings:
            kinds = sorted({f.kind for f in report.warnings})
            notes.append(
                f"{len(report.warnings)} data warnings ({', '.join(kinds)}); "
                "python -m tl_project check with the same --data options lists them."
            )
        if notes and (self.trainer is None or self.trainer.is_global_zero):
            print("\n".join(notes), file=sys.stderr)
        bad = report.bad_paths
        return {split: [(p, label) for p, label in samples if p not in bad] for split, samples in splits.items()}

    def _folder_samples(self, folder: Path, is_train: bool) -> list[tuple[Path, int]]:
        known = set(self.class_names)
        extra = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name not in known and p.name[0] != ".")
        if extra:
            raise UserError(
                f"{folder} has class folders {extra} that are not among the classes {self.class_names}. "
                "Every split must use the class folders of train."
            )
        samples = []
        for label, name in enumerate(self.class_names):
            class_dir = folder / name
            images = list_images(class_dir) if class_dir.is_dir() else []
            if not images and is_train:
                raise UserError(
                    f"Class folder {class_dir} has no images (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))}). "
                    "Add images or remove the folder."
                )
            samples += [(path, label) for path in images]
        return samples

    def _predict_paths(self) -> list[Path]:
        if self.predict_dir is None:
            raise UserError("predict needs images: pass --data.predict_dir DIR (or one image file).")
        target = Path(self.predict_dir).expanduser()
        if target.is_file():
            if not is_image_file(target):
                raise UserError(f"{target} is not an image file ({', '.join(sorted(IMAGE_EXTENSIONS))}).")
            return [target]
        if not target.is_dir():
            raise UserError(f"predict_dir {target} does not exist. Pass an existing folder or image file.")
        paths = list_images(target)
        if not paths:
            raise UserError(f"No images in {target} (searched recursively for {', '.join(sorted(IMAGE_EXTENSIONS))}).")
        return paths

    @property
    def predict_paths(self) -> list[Path]:
        """The image paths of the predict set, in dataset-index order."""
        dataset = self.datasets["predict"]
        assert isinstance(dataset, PredictDataset)
        return dataset.paths

    # -- loaders --

    def _loader(self, split: str, train: bool = False) -> DataLoader:
        dataset = self.datasets[split]
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler: Sampler | None = None
        if train:
            sampler = EpochSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.seed)
        elif world > 1 and len(dataset) >= world:
            # Each image evaluated exactly once: no padding with repeats, as DistributedSampler would.
            sampler = UnrepeatedDistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            # A last training batch of one image breaks BatchNorm: drop the remainder.
            drop_last=train and math.ceil(len(dataset) / world) > self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=trainer is not None and isinstance(trainer.accelerator, CUDAAccelerator),
        )

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int = 0) -> tuple[torch.Tensor, ...]:
        """uint8 images on the device to normalised floats; in-memory images are cropped,
        resized and flipped here too, by the params their item carries."""
        images, targets, indices, *params = batch
        if params:
            return resized_crops(images, params[0], self.image_size), targets, indices
        return normalize(images), targets, indices

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")
