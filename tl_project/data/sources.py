"""Where ImageDataModule's labelled images come from: one class per source.

Each source validates its own options, knows its classes before `setup()`, and builds the
datasets of the splits a stage needs; the data module (`module.py`) keeps what every source
shares: the loaders, the batch hooks and the data check; the check's bad-image policy and
the predict folder are here (`usable_samples`, `predict_folder`).

- `NamedSource`: a torchvision dataset by name, held in memory; its official test split.
- `FolderSource`: `root/<class>/*` or `root/{train,val,test}/<class>/*`, checked first.
- `TableSource`: the images and labels a CSV lists (`--data.labels`, `table.py`), checked as a
  folder's are.
- `ShardSource`: LitData shards written by `python -m tl_project optimize`, streamed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from tl_project.data.checks import usable
from tl_project.data.datasets import (
    FolderDataset,
    ImageDataset,
    MultiLabelDataset,
    PredictDataset,
    TensorImageDataset,
)
from tl_project.data.exclude import image_key, without_excluded
from tl_project.data.folders import Splits, carve, folder_classes, folder_splits, predict_paths
from tl_project.data.named import NAMED_DATASETS, download_named, read_named
from tl_project.data.splits import SPLITS, fold_split, stratified_split
from tl_project.data.streaming import (
    LITDATA,
    ShardDataset,
    ShardItems,
    is_url,
    read_meta,
    require_litdata,
    shard_loader,
    shard_split,
)
from tl_project.data.table import Row, check_training_images, read_table, table_classes
from tl_project.errors import UserError, class_mismatch
from tl_project.transforms import CropSampler

# The ImageDataModule whose options and checks a source uses (module.py imports this module,
# so it is not imported here).
ImageDataModule = Any

# The splits each stage uses (only these are built), and those it checks: fit checks the
# test images too, so that problems and leakage show before training, not after it.
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "optimize": SPLITS}
STAGE_CHECKS = {"fit": SPLITS, "validate": ("val",), "test": ("test",), "optimize": SPLITS}


def checked_classes(expected: list[str] | None, found: list[str], where: str = "") -> list[str]:
    """`found`, after checking it is the `expected` class list (e.g. a checkpoint's), if given."""
    if expected is not None and list(expected) != found:
        raise class_mismatch(list(expected), found, where)
    return found


class NamedSource:
    """A torchvision dataset by name: the official test split is the test set, and `val_split`
    of the official train split (stratified, or the cross-validation fold) validates."""

    def __init__(self, name: str, root: Path | None, download: bool) -> None:
        self.name, self.download = name, download
        self._root = root

    @property
    def root(self) -> Path:
        """Where the dataset is stored."""
        if self._root is None:
            raise UserError(f"--data.dataset {self.name} needs --data.root: where it is stored or goes.")
        return self._root

    def classes(self, expected: list[str] | None) -> list[str]:
        return checked_classes(expected, NAMED_DATASETS[self.name], f" in {self._root}")

    def prepare(self) -> None:
        """Download the dataset once per node."""
        if self.download:
            download_named(self.name, self.root)

    def build(self, data: ImageDataModule, splits: list[str], stage: str) -> dict[str, Any]:
        """All three splits at once (they are carved from the same arrays); `--data.exclude`
        leaves its images out of the official train split before it is divided."""
        images, labels = read_named(self.name, self.root, train=True)
        names = [f"{self.name}/train/{i}" for i in range(len(labels))]
        pool = list(range(len(labels)))
        if data.exclusion and data.exclusion.keys:
            pool, dropped = without_excluded(names, data.exclusion.keys)
            data.exclusion.note([names[i] for i in dropped], [int(labels[i]) for i in dropped], in_test=0)
        pool_labels = labels[pool].tolist()
        if data.folds:
            rest, val = fold_split(pool_labels, data.folds, data.fold, data.seed)
        else:
            rest, val = stratified_split(pool_labels, [data.val_split], data.seed)
        rest, val = [pool[i] for i in rest], [pool[i] for i in val]
        test_images, test_labels = read_named(self.name, self.root, train=False)
        eval_crop = CropSampler(data.image_size, train=False, preprocessing=data.preprocessing)
        train_crop = CropSampler(data.image_size, data.min_crop_scale) if data.augment else eval_crop
        test_names = [f"{self.name}/test/{i}" for i in range(len(test_labels))]
        return {
            "train": TensorImageDataset(images[rest], labels[rest], train_crop, data.seed, [names[i] for i in rest]),
            "val": TensorImageDataset(images[val], labels[val], eval_crop, names=[names[i] for i in val]),
            "test": TensorImageDataset(test_images, test_labels, eval_crop, names=test_names),
        }


class FolderSource:
    """An image folder: a split without its own folder is carved out of train by `val_split` /
    `test_split`, stratified by class and deterministic from `seed`."""

    def __init__(self, root: Path | None) -> None:
        self.root = root

    def classes(self, expected: list[str] | None) -> list[str]:
        if (self.root is None or not self.root.is_dir()) and expected is not None:
            return list(expected)  # e.g. predict on another machine: the folder is checked in setup
        return checked_classes(expected, folder_classes(self.root), f" in {self.root}")

    def prepare(self) -> None:
        pass

    def samples(self, data: ImageDataModule) -> Splits:
        """(path, label) samples of train, val and test, before folds and exclusions."""
        return folder_splits(self.root, data.class_names, data.val_split, data.test_split, data.seed)

    def splits(self, data: ImageDataModule, exclude: bool = True) -> Splits:
        """(path, label) samples of train, val and test; with `folds`, train and val are the
        cross-validation fold's; without the images of `--data.exclude` in train and val."""
        splits = self.samples(data)
        if exclude and data.exclusion and data.exclusion.keys:  # after the test split is carved: it stays
            dropped: list[tuple[str, int]] = []
            for split in ("train", "val"):
                kept, out = without_excluded([p for p, _ in splits[split]], data.exclusion.keys)
                dropped += [splits[split][i] for i in out]
                splits[split] = [splits[split][i] for i in kept]
            in_test = sum(image_key(p) in data.exclusion.keys for p, _ in splits["test"])
            data.exclusion.note([p for p, _ in dropped], [label for _, label in dropped], in_test)
        if data.folds:
            pool = splits["train"] + splits["val"]
            rest, val = fold_split([label for _, label in pool], data.folds, data.fold, data.seed)
            splits["train"], splits["val"] = [pool[i] for i in rest], [pool[i] for i in val]
        return splits

    def build(self, data: ImageDataModule, splits: list[str], stage: str) -> dict[str, Any]:
        """The datasets of `splits`: the whole folder is listed (the split assignment needs it),
        and the splits of `STAGE_CHECKS` checked."""
        checked = [split for split in SPLITS if split in splits or split in STAGE_CHECKS[stage]]
        chosen = self.splits(data, exclude=bool({"train", "val"} & set(splits)))
        names = self.check_names(data.class_names)
        samples = usable_samples(data, chosen, names, stage, self.root, only=checked)
        return {split: tolerant(data, self.dataset(data, samples[split], split)) for split in splits}

    def check_names(self, class_names: list[str]) -> list[str]:
        """The names of the sample labels, for the data check's counts."""
        return class_names

    def dataset(self, data: ImageDataModule, samples: list[tuple[str, int]], split: str) -> ImageDataset:
        """The dataset of one split's samples."""
        return FolderDataset(samples, data.transform(split), data.seed)


class TableSource(FolderSource):
    """The images and labels of a CSV (`table.py`): its split column, where it has one, decides
    the splits; a split with no row is carved out of train, as for a folder.

    Multi-label (a `delimiter`): a sample's label is the number of its label set
    (`label_sets`, in order of appearance), so that splits are stratified by label set, the
    data check's counts are per label set, and one image under two label sets conflicts;
    its dataset gives multi-hot targets."""

    def __init__(self, labels: str, root: Path | None, delimiter: str | None = None) -> None:
        super().__init__(root)
        self.file = Path(labels).expanduser()
        self.delimiter = delimiter
        self.label_sets: list[tuple[int, ...]] = []
        self._rows: list[Row] | None = None

    @property
    def rows(self) -> list[Row]:
        """The table's rows, read and checked once (every row's file is looked at)."""
        if self._rows is None:
            self._rows = read_table(self.file, self.root, self.delimiter)
        return self._rows

    def classes(self, expected: list[str] | None) -> list[str]:
        if not self.file.is_file() and expected is not None:
            return list(expected)  # predict where the training table is gone: checked when read
        found = table_classes(self.rows, self.delimiter)
        check_training_images(self.rows, found, self.file, self.delimiter)
        return checked_classes(expected, found, f" in {self.file}")

    def samples(self, data: ImageDataModule) -> Splits:
        index = {name: label for label, name in enumerate(data.class_names)}
        codes = {labels: code for code, labels in enumerate(self.label_sets)}
        grouped: Splits = {}
        for row in self.rows:
            if self.delimiter is None:
                label = index[row.label]
            else:
                label = codes.setdefault(tuple(index[name] for name in row.labels(self.delimiter)), len(codes))
            grouped.setdefault(row.split or "train", []).append((row.path, label))
        self.label_sets = list(codes)
        grouped.setdefault("train", [])
        return carve(grouped, data.val_split, data.test_split, data.seed)

    def check_names(self, class_names: list[str]) -> list[str]:
        if self.delimiter is None:
            return class_names
        return [" + ".join(class_names[c] for c in label_set) for label_set in self.label_sets]

    def dataset(self, data: ImageDataModule, samples: list[tuple[str, int]], split: str) -> ImageDataset:
        if self.delimiter is None:
            return super().dataset(data, samples, split)
        return MultiLabelDataset(samples, data.transform(split), data.seed, self.label_sets, len(data.class_names))


class ShardSource:
    """LitData shards (a local folder or a URL) and the record optimize wrote next to them."""

    def __init__(
        self, root: str | None, balance: str, folds: int, exclude: str | None = None, multi_label: bool = False
    ) -> None:
        require_litdata(f"--data.dataset {LITDATA} (shards)")
        if not root:
            raise UserError(f"--data.dataset {LITDATA} needs --data.root: the folder or URL optimize wrote.")
        if balance == "sampler":
            raise UserError("data.balance sampler needs random access; LitData shards stream: use data.balance loss.")
        if folds:
            raise UserError(
                "Cross-validation (and its out-of-fold predictions) re-splits the images; LitData shards hold "
                "fixed splits: run cv on the image folder."
            )
        if exclude:
            raise UserError("--data.exclude leaves images out of the splits; LitData shards hold fixed splits: "
                            "pass it to the image folder (and optimize again if you need shards).")  # fmt: skip
        self.root = root if is_url(root) else str(Path(root).expanduser())
        self.meta = read_meta(self.root)
        if bool(self.meta.get("multi_label")) != multi_label:
            held = "several classes" if self.meta.get("multi_label") else "one class"
            raise UserError(
                f"The shards at {self.root} hold {held} per image: pass --data.multi_label "
                f"{str(bool(self.meta.get('multi_label'))).lower()}."
            )

    def classes(self, expected: list[str] | None) -> list[str]:
        return checked_classes(expected, list(self.meta["classes"]), f" in {self.root}")

    def prepare(self) -> None:
        pass

    def build(self, data: ImageDataModule, splits: list[str], stage: str) -> dict[str, ShardDataset | ShardItems]:
        return {split: shard_split(self.root, self.meta, split, data.transform(split), data.seed) for split in splits}

    def class_counts(self, class_names: list[str]) -> list[int]:
        counts = self.meta.get("train_counts") or {}
        return [int(counts.get(name, 0)) for name in class_names]

    @property
    def predict_paths(self) -> list[str]:
        return list(self.meta["predict_paths"])

    def train_loader(self, data: ImageDataModule, split: str, pin_memory: bool) -> DataLoader:
        if data.train_labels_only:
            raise UserError("model.cache_features needs an image folder or a named dataset, not litdata shards.")
        return shard_loader(
            data.datasets[split],
            int(self.meta["splits"][split]),
            data.trainer,
            batch_size=data.batch_size,
            num_workers=data.num_workers,
            pin_memory=pin_memory,
        )


def usable_samples(
    data: ImageDataModule,
    splits: Splits,
    class_names: list[str],
    stage: str,
    base: Path | None,
    only: list[str] | None = None,
) -> Splits:
    """`splits` (those in `only`) without unusable images, by `on_bad_image` (see `checks.usable`);
    with data.verify off, all of them, unchecked."""
    report = data.check(splits, class_names, base, only) if data.verify != "off" else None
    if only is not None:
        splits = {split: splits[split] for split in only}
    return usable(splits, report, data.on_bad_image, stage) if report else splits


def tolerant(data: ImageDataModule, dataset: ImageDataset) -> ImageDataset:
    """Unless every image was decoded by the check, loading failures are skipped, not fatal."""
    dataset.skip_unreadable = data.verify != "full"
    return dataset


def predict_folder(data: ImageDataModule) -> ImageDataset:
    """The images of `--data.predict_dir` (a folder, searched recursively, or one file), checked."""
    paths = predict_paths(data.predict_dir)
    base = Path(data.predict_dir or ".").expanduser()
    found = usable_samples(
        data, {"predict": [(p, 0) for p in paths]}, ["images"], "predict", base if base.is_dir() else None
    )
    return tolerant(data, PredictDataset([p for p, _ in found["predict"]], data.transform("predict")))


Source = NamedSource | FolderSource | TableSource | ShardSource


def make_source(
    dataset: str | None,
    root: str | None,
    download: bool,
    balance: str,
    folds: int,
    exclude: str | None = None,
    labels: str | None = None,
    multi_label: bool = False,
    label_delimiter: str = " ",
) -> Source:
    """The source `--data.dataset` names: a torchvision name, litdata, or null for a folder
    (or the CSV of `--data.labels`, single- or multi-label)."""
    if multi_label:
        check_multi_label(labels if dataset != LITDATA else "shards", balance, label_delimiter)
    if labels is not None:
        if dataset is not None:
            raise UserError(
                f"--data.labels reads images and labels from a CSV; pass --data.dataset null with it (not {dataset})."
            )
        path = Path(root).expanduser() if root is not None else None
        return TableSource(labels, path, label_delimiter if multi_label else None)
    if dataset == LITDATA:
        return ShardSource(root, balance, folds, exclude, multi_label)
    path = Path(root).expanduser() if root is not None else None
    if dataset is None:
        return FolderSource(path)
    if dataset in NAMED_DATASETS:
        return NamedSource(dataset, path, download)
    raise UserError(
        f"Unknown dataset {dataset!r}. Choose one of {', '.join(NAMED_DATASETS)}, {LITDATA} for shards "
        "written by python -m tl_project optimize, or null for an image folder given by --data.root."
    )


def check_multi_label(labels: str | None, balance: str, delimiter: str) -> None:
    """What multi-label data needs, and what it cannot do yet, with the fix in each message."""
    if labels is None:
        raise UserError(
            "--data.multi_label true reads several classes per image from a CSV: pass --data.labels FILE "
            "(columns path, label, optionally split; classes in the label cell separated by --data.label_delimiter)."
        )
    if not delimiter:
        raise UserError("--data.label_delimiter is empty: pass the character between classes, e.g. ' ' or ';'.")
    if balance == "sampler":
        raise UserError(
            "--data.balance sampler draws single classes; with --data.multi_label true use --data.balance loss "
            "(each class's positives weighted by its negatives over its positives)."
        )
