"""ImageDataModule: train/val/test/predict loaders from a named dataset, an image folder or shards.

Where the labelled images come from is a source (`sources.py`): a torchvision dataset by
name, an image folder (`dataset: null`), or LitData shards (`dataset: litdata`); each
validates its own options and builds its splits. A split without its own folder is carved
out of train by `val_split` / `test_split`, stratified by class and deterministic from
`seed`, so `test` evaluates exactly the images `fit` held out. This module keeps what every
source shares: the options, the loaders, the batch hooks, the data check, the predict folder.

The class list is known right after `__init__` (the CLI links it into the model).
Images of any mode become RGB, EXIF orientation applied; files without an image
extension are ignored.

Batches leave the loader as uint8 images; `on_after_batch_transfer` makes the
normalised floats on the device (and, for the in-memory datasets, the crops too:
see `tl_project.transforms`). Code that iterates a loader itself calls it as well.
The resize, interpolation, mean and std are the model's (`model.preprocessing`, from
its weights), taken in `setup()` from the Trainer's model.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.accelerators import CUDAAccelerator
from torch.utils.data import DataLoader, Subset

from tl_project.data.checks import DataReport, Unreadable, check_images
from tl_project.data.datasets import LabelsOnly, PredictDataset, split_sampler
from tl_project.data.exclude import Exclusion
from tl_project.data.folders import Splits
from tl_project.data.manifest import Manifest
from tl_project.data.sources import STAGE_SPLITS, FolderSource, ShardSource, make_source, predict_folder
from tl_project.errors import UserError
from tl_project.runtime import default_num_workers, usable_cores, warn
from tl_project.transforms import IMAGENET, Preprocessing, eval_transform, normalize, resized_crops, train_transform

# The split a Trainer stage (`RunningStage`) reads.
# Options renamed, old name -> new: the old names still work (with a deprecation message), and
# checkpoints saved under them load (`lightning_cli.checkpoint_defaults`).
RENAMED = {"check": "verify"}
STAGE_SPLIT = {"train": "train", "sanity_check": "val", "validate": "val", "test": "test", "predict": "predict"}


def check_options(
    val_split: float, test_split: float, batch_size: int, image_size: int, min_crop_scale: float, folds: int, fold: int
) -> None:
    """The rules of the options every source shares, with the fix in each message."""
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
    if not 0.0 < min_crop_scale <= 1.0:
        raise UserError(f"data.min_crop_scale is {min_crop_scale}; it must be in (0, 1].")
    if folds and not (folds >= 2 and 0 <= fold < folds):
        raise UserError(f"data.folds {folds} and data.fold {fold}: folds must be at least 2, fold in 0..{folds - 1}.")


class ImageDataModule(L.LightningDataModule):
    """Loaders for a named torchvision dataset or a folder of labelled images."""

    def __init__(
        self,
        dataset: str | None = None,
        root: str | None = "data",
        download: bool = True,
        batch_size: int = 32,
        num_workers: int | None = None,
        image_size: int = 224,
        min_crop_scale: float = 0.08,
        augment: bool | None = None,
        val_split: float = 0.1,
        test_split: float = 0.1,
        seed: int = 42,
        predict_dir: str | None = None,
        classes: list[str] | None = None,
        on_bad_image: Literal["error", "skip"] = "error",
        max_image_pixels: int = 89_478_485,
        verify: Literal["full", "header", "off"] = "full",
        cache_dir: str | None = None,
        balance: Literal["none", "sampler", "loss"] = "none",
        folds: int = 0,
        fold: int = 0,
        exclude: str | None = None,
        labels: str | None = None,
        multi_label: bool = False,
        label_delimiter: str = " ",
        check: Literal["full", "header", "off"] | None = None,
    ) -> None:
        """
        Args:
            dataset: A torchvision dataset name (MNIST, FashionMNIST, CIFAR10, CIFAR100), or null (the default) for an image folder: --data.root is then yours, never a place for a download.
            root: The image folder, or where a named dataset is stored or downloaded; null for none (predict only).
            download: Download a named dataset into root when it is not there.
            batch_size: Images per batch and per device.
            num_workers: Loader worker processes per device; null picks one on a CPU, the usable cores (at most 8) on a GPU.
            image_size: Side of the square images the model sees, in pixels.
            min_crop_scale: Smallest area fraction of a random training crop: 0.08 as for ImageNet; raise it for small or centred objects.
            augment: Random crops and flips for training; false trains on the evaluation view (model.cache_features needs it). null: true, except with multi_label (a crop can cut an object out and make its labels wrong).
            val_split: Fraction of each class held out for validation when there is no val folder.
            test_split: Fraction of each class held out for testing when there is no test folder (folders only).
            seed: Seed of the stratified split; keep it to evaluate the same held-out images later.
            predict_dir: A folder (searched recursively) or one image file, for predict.
            classes: The expected class names (set from the checkpoint for test/predict); null reads them from the data.
            on_bad_image: Unusable images (corrupt, empty, too large): error stops before training listing all; skip leaves them out.
            max_image_pixels: Images with more pixels are refused unread (decompression bombs).
            verify: Before use, decode every image (full), read only headers (header), or trust the files (off: images that fail to load are skipped then, with a summary). Results are kept in a manifest.
            cache_dir: Where the data check keeps its manifest; null for $XDG_CACHE_HOME/tl_project or ~/.cache/tl_project.
            balance: For imbalanced classes: sampler draws every class equally often in training; loss weights each class's loss by its rarity; none.
            folds: Cross-validation: split train and validation images together into this many stratified folds (from seed); 0 for none. The test set is never touched.
            fold: With folds: the fold that validates; the others train.
            exclude: A file listing images to leave out of training and validation, never out of test: a label_issues.csv from cv, a CSV with a path column, or one path per line. The checkpoint records which were left out.
            labels: A CSV of images and labels instead of class folders: columns path (or file_name; relative to root), label, and optionally split (train/val/test, used instead of the random split). Needs dataset null.
            multi_label: Each image may have several classes (the label cell of --data.labels lists them): one sigmoid output per class.
            label_delimiter: With multi_label: what separates the classes in a label cell.
            check: Deprecated: the old name of verify (same values).
        """
        super().__init__()
        if check is not None:
            warn(f"data.check is deprecated: it is now data.verify (--data.verify {check}); the old name will go.")
            verify = check
        self.save_hyperparameters(ignore=list(RENAMED))
        self.hparams["verify"] = verify  # (the CLI hands save_hyperparameters the values it was given)
        check_options(val_split, test_split, batch_size, image_size, min_crop_scale, folds, fold)
        self.source = make_source(
            dataset, root, download, balance, folds, exclude, labels, multi_label, label_delimiter
        )
        self.multi_label = multi_label  # the task, linked into the model
        self.dataset, self.predict_dir = dataset, predict_dir
        self.root = Path(root).expanduser() if root is not None else None
        self.batch_size, self._num_workers, self.balance = batch_size, num_workers, balance  # the loaders
        # The view. Multi-label trains on the evaluation view unless asked: on the measured task
        # (docs/benchmarks.md, "Multi-label") crops cost mAP.
        augment = (not multi_label) if augment is None else augment
        self.image_size, self.min_crop_scale, self.augment = image_size, min_crop_scale, augment
        self.val_split, self.test_split, self.seed = val_split, test_split, seed  # the splits
        self.folds, self.fold = folds, fold
        self.on_bad_image, self.max_image_pixels, self.verify = on_bad_image, max_image_pixels, verify
        self.exclusion = Exclusion(exclude)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
        # Images that failed to load and were left out of their batch, by split (data.verify header/off).
        self.unreadable = Unreadable()
        self.class_names = self.source.classes(classes)
        self.datasets: dict[str, Any] = {}  # ImageDataset, or ShardDataset for shards
        # The model's (its weights' preset), taken in setup(); set it before setup() without a Trainer.
        self.preprocessing = IMAGENET
        # Training batches without images (the model looks their features up): set by the model.
        self.train_labels_only = False
        # Predict images that already have a row (a continued predict): set by the prediction writer.
        self.predict_skip: set[int] = set()

    @property
    def num_workers(self) -> int:
        """Loader workers per process: --data.num_workers, else chosen for the device (`runtime.py`)."""
        if self._num_workers is not None:
            return self._num_workers
        return default_num_workers(self._on_gpu)

    @property
    def _on_gpu(self) -> bool:
        return self.trainer is not None and isinstance(self.trainer.accelerator, CUDAAccelerator)

    @property
    def class_counts(self) -> list[int]:
        """Training images per class (multi-label: holding the class), in class order (after setup)."""
        if isinstance(self.source, ShardSource):
            return self.source.class_counts(self.class_names)
        if self.multi_label:  # images holding each class
            targets: list[Any] = self._targets("train")  # multi-hot vectors
            return torch.stack(targets).sum(dim=0).int().tolist()
        return torch.bincount(torch.tensor(self._targets("train")), minlength=self.num_classes).tolist()

    @property
    def train_size(self) -> int:
        """Training images (after setup)."""
        return len(self.datasets["train"])

    def _targets(self, split: str) -> list[int]:
        """The label of every item of `split`, in index order, without reading an image."""
        dataset = self.datasets[split]
        return [dataset.target(i) for i in range(len(dataset))]

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)

    # -- data, built in setup() --

    def prepare_data(self) -> None:
        """Download a named dataset once per node."""
        self.source.prepare()

    def setup(self, stage: str) -> None:
        """Build the datasets `stage` needs, with the preprocessing of the model's weights."""
        model = self.trainer.lightning_module if self.trainer is not None else None
        preprocessing = getattr(model, "preprocessing", None)
        if isinstance(preprocessing, Preprocessing):
            self.preprocessing = preprocessing
        if stage == "predict" and not isinstance(self.source, ShardSource):
            self.datasets["predict"] = predict_folder(self)
            return
        needed = ["predict"] if stage == "predict" else list(STAGE_SPLITS[stage])
        if missing := [split for split in needed if split not in self.datasets]:
            self.datasets.update(self.source.build(self, missing, stage))
        for split in needed:
            if split != "predict" and len(self.datasets[split]) == 0:
                raise UserError(
                    f"The {split} set is empty. Raise --data.{split}_split, add {self.root}/{split}/<class>/ "
                    "folders, or add images."
                )

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints: which images `--data.exclude` left out of training and validation."""
        return self.exclusion.record()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The record is for people; a resumed run excludes by its own --data.exclude."""

    def transform(self, split: str) -> Any:
        """The transform of a split's images: random crops and flips for train (`augment`), else
        the evaluation view, with the model's preprocessing."""
        if split == "train" and self.augment:
            return train_transform(self.image_size, self.min_crop_scale, self.preprocessing)
        return eval_transform(self.image_size, self.preprocessing)

    def folder_splits(self) -> Splits:
        """(path, label) samples of train, val and test from the image folder; with `folds`,
        train and val are the cross-validation fold's."""
        if not isinstance(self.source, FolderSource):
            raise UserError("This needs an image folder: pass --data.dataset null --data.root FOLDER.")
        return self.source.splits(self)

    def check(
        self,
        splits: Splits,
        class_names: list[str],
        base: Path | None = None,
        only: list[str] | None = None,
    ) -> DataReport:
        """Check the images of `splits` (those in `only`, by default all) at `data.verify`'s level
        and report problems, warnings and class counts; `base` is the folder whose manifest
        remembers the results."""
        level = "full" if self.verify == "off" else self.verify
        manifest = Manifest(base, self.cache_dir) if base is not None else None
        devices = self.trainer.num_devices if self.trainer is not None else 1
        workers = max(1, usable_cores() // devices)
        return check_images(splits, class_names, self.max_image_pixels, level, workers, manifest, only)

    @property
    def predict_paths(self) -> list[str]:
        """The image paths of the predict set, in dataset-index order."""
        if isinstance(self.source, ShardSource):
            return self.source.predict_paths
        dataset = self.datasets["predict"]
        assert isinstance(dataset, PredictDataset)
        return dataset.paths

    # -- loaders --

    def _loader(self, split: str, train: bool = False) -> DataLoader:
        if isinstance(self.source, ShardSource) and train:
            return self.source.train_loader(self, split, self._on_gpu)
        dataset: Any = self.datasets[split]
        if split == "predict" and self.predict_skip:
            dataset = Subset(dataset, [i for i in range(len(dataset)) if i not in self.predict_skip])
        labels_only = train and self.train_labels_only
        if labels_only:
            dataset = LabelsOnly(self.datasets[split])  # same sampler and batches, no image read
        workers = 0 if labels_only else self.num_workers
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        targets = lambda: self._targets(split)  # noqa: E731
        sampler = split_sampler(dataset, train, self.balance, world, rank, self.seed, targets)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            # A last training batch of one image breaks BatchNorm: drop the remainder.
            drop_last=train and math.ceil(len(dataset) / world) > self.batch_size,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=self._on_gpu,
        )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int = 0) -> Any:
        """Items of images that failed to load (data.verify header/off) leave the batch here,
        noted for the summary at the end of the command (`teardown`)."""
        stage = self.trainer.state.stage if self.trainer is not None else None
        return self.unreadable.drop(batch, STAGE_SPLIT.get(str(stage.value) if stage is not None else "", "predict"))

    def teardown(self, stage: str) -> None:
        """Say which images failed to load and were skipped during `stage`, if any."""
        if summary := self.unreadable.summary(self.datasets, self.verify):
            warn(summary)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int = 0) -> tuple[torch.Tensor, ...]:
        """uint8 images on the device to normalised floats; in-memory images are cropped,
        resized and flipped here too, by the params their item carries."""
        images, targets, indices, *params = batch
        if images.ndim == 2:  # LabelsOnly items: nothing to prepare
            return images, targets, indices
        if params:
            return resized_crops(images, params[0], self.image_size, self.preprocessing), targets, indices
        return normalize(images, self.preprocessing), targets, indices

    def feature_loader(self, split: str, indices: Sequence[int]) -> DataLoader:
        """The items `indices` of `split` once, in that order, in the split's view (unshuffled):
        what the feature cache (`model.cache_features`) computes the frozen backbone's features of."""
        subset = Subset(self.datasets[split], list(indices))
        return DataLoader(subset, batch_size=self.batch_size, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")


def device_batches(data: Any, loader: Iterable[Any], device: torch.device) -> Iterator[tuple[torch.Tensor, ...]]:
    """(images, targets, indices) of `loader`'s batches, prepared on `device` by `data`'s hooks as
    the Trainer prepares them (`on_before_batch_transfer`, then `on_after_batch_transfer`), for
    code that iterates a loader itself; batches whose images all failed to load are left out."""
    for batch in loader:
        batch = data.on_before_batch_transfer(batch, 0)  # unreadable images out
        prepared = data.on_after_batch_transfer(move_data_to_device(batch, device), 0)
        if len(prepared[2]):
            yield prepared


def saved_settings(saved: Mapping[str, Any]) -> dict[str, Any]:
    """`ImageDataModule`'s arguments from a checkpoint's saved data settings: those it still
    takes, an option saved under its old name given under its new one."""
    values = dict(saved)
    for old, new in RENAMED.items():
        if old in values:
            values.setdefault(new, values.pop(old))
    params = inspect.signature(ImageDataModule.__init__).parameters
    return {key: value for key, value in values.items() if key in params and key != "self"}
