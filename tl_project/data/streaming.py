"""LitData shards: data beyond one folder on one disk.

`python -m tl_project optimize --data.root FOLDER --output SHARDS` checks the folder (the
data check, `data.on_bad_image`), splits it as `fit` would (`seed`, `val_split`,
`test_split`) and writes one LitData dataset per split with `litdata.optimize`:
`SHARDS/{train,val,test}/` (and `SHARDS/predict/` with `--data.predict_dir`), each item
the image file's encoded bytes, its label, its index in the split and its path; plus
`SHARDS/tl_project.json` with the class names and the split sizes. SHARDS may be a
local folder or a URL LitData writes to (s3://, gs://, ...). The labelled splits are
written in a random order drawn from `seed`, so that every chunk mixes the classes: a
folder lists its images class by class, and LitData shuffles chunks and blocks of items
within a chunk, never items across chunks, so shards written in folder order train on
batches of one or two classes.

LitData is the `shards` extra (`pip install 'tl_project[shards]'`); without it both uses say so.

`--data.dataset litdata --data.root SHARDS` streams the training split with
`ShardDataset` (a `litdata.StreamingDataset`) through `ShardLoader` (a
`litdata.StreamingDataLoader`): LitData shares the chunks out between DDP processes and
loader workers and downloads remote ones ahead; images are decoded in the workers and
transformed as image folders are, and augmentation is drawn from `(seed, epoch, index)`.
Validation, test and predict read their split by index (`ShardItems`), with the image
folders' loaders and samplers: each image exactly once under DDP.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from tl_project.data.datasets import ImageDataset, multi_hot
from tl_project.data.images import decode_image_bytes
from tl_project.data.splits import permutation
from tl_project.errors import UserError

try:  # the optional shards extra
    from litdata import StreamingDataLoader, StreamingDataset, optimize

    # LitData 0.2.76: its one reader/writer of single files on object storage (private; pinned in
    # pyproject.toml and watched by tests/test_cli.py::test_private_lightning_members_in_use_still_exist).
    from litdata.streaming.fs_provider import _get_fs_provider

    INSTALLED = True
except ImportError:  # pragma: no cover - exercised by simulating the missing extra
    # The classes below still need bases; require_litdata() stops every use before they are made.
    StreamingDataset = StreamingDataLoader = object
    INSTALLED = False

LITDATA = "litdata"  # the data.dataset value of shards
INSTALL = "pip install 'tl_project[shards]'"
META = "tl_project.json"
# Chunk size of the shards: large enough to stream efficiently, small enough to share out.
CHUNK_BYTES = "64MB"
# How the items of the labelled splits are ordered (`tl_project.json`'s "order"); shards
# without it were written in folder order, class by class, and cannot train well.
ORDER = "shuffled"


def require_litdata(use: str) -> None:
    """A clear error naming the extra where LitData is missing; `use` says what needed it."""
    if not INSTALLED:
        raise UserError(f"{use} needs LitData, which is not installed. Fix: {INSTALL}")


def is_url(location: str) -> bool:
    return "://" in location


def join(location: str, *parts: str) -> str:
    """`location/part/...` for a local folder or a URL."""
    return "/".join([location.rstrip("/"), *parts]) if is_url(location) else str(Path(location, *parts))


def _item(job: tuple[str, int | str, int, str]) -> dict[str, Any]:
    """One shard item: the file's encoded bytes (decoded at load time), label (multi-label: its
    class indices as a string, `"0 2"`), index, path."""
    path, label, index, name = job
    return {"image": Path(path).read_bytes(), "label": label, "index": index, "path": name}


def write_shards(
    splits: Mapping[str, Sequence[tuple[str, int]]],
    class_names: Sequence[str],
    output: str,
    base: Path | None,
    workers: int,
    seed: int,
    settings: Mapping[str, Any],
    label_sets: Sequence[Sequence[int]] | None = None,
) -> dict[str, int]:
    """Write each split of `splits` as a LitData dataset under `output/<split>`, and the
    metadata; item paths are relative to `base` when under it. The labelled splits are
    written in a random order drawn from `seed` (predict keeps its order: predictions.csv
    lists the files as found). Multi-label (`label_sets`: the class indices of each sample
    label): items carry their classes. Returns the split sizes."""
    sizes = {}
    for split, samples in splits.items():
        if not samples:
            continue
        if split != "predict":
            samples = [samples[i] for i in permutation(len(samples), seed)]
        jobs = [
            (str(path), _label(label, label_sets, split), index, _relative(path, base))
            for index, (path, label) in enumerate(samples)
        ]
        optimize(
            fn=_item,
            inputs=jobs,
            output_dir=join(output, split),
            chunk_bytes=CHUNK_BYTES,
            num_workers=max(1, min(workers, len(jobs))),
            reorder_files=False,  # items keep their index order
            keep_data_ordered=True,
            mode="overwrite",
            start_method="fork",  # the workers need nothing re-imported: they read files
            verbose=False,
        )
        sizes[split] = len(jobs)
    meta: dict[str, Any] = {"classes": list(class_names), "splits": sizes, "order": ORDER, "seed": seed, **settings}
    meta["multi_label"] = label_sets is not None
    if "train" in splits:  # for data.balance loss (multi-label: the images holding each class)
        meta["train_counts"] = {name: 0 for name in class_names}
        for _, label in splits["train"]:
            for c in label_sets[label] if label_sets is not None else [label]:
                meta["train_counts"][class_names[c]] += 1
    if "predict" in splits:  # predictions.csv names the images
        meta["predict_paths"] = [_relative(path, base) for path, _ in splits["predict"]]
    _write_text(join(output, META), json.dumps(meta, indent=1) + "\n")
    return sizes


def _label(label: int, label_sets: Sequence[Sequence[int]] | None, split: str) -> int | str:
    """An item's label: the class index, or (multi-label) its classes' indices joined by spaces."""
    if label_sets is None or split == "predict":
        return label
    return " ".join(map(str, label_sets[label]))


def item_target(label: Any, num_classes: int | None) -> Any:
    """An item's target: the class index, or (multi-label: `num_classes` given) the multi-hot
    float vector of its classes."""
    if num_classes is None:
        return int(label)
    return multi_hot([int(c) for c in str(label).split()], num_classes)


def _relative(path: str, base: Path | None) -> str:
    prefix = os.path.join(str(base), "") if base is not None else ""
    return path[len(prefix) :] if prefix and path.startswith(prefix) else path


def _write_text(location: str, text: str) -> None:
    if not is_url(location):
        Path(location).write_text(text)
        return
    with tempfile.TemporaryDirectory() as folder:
        local = Path(folder, META)
        local.write_text(text)
        _get_fs_provider(location).upload_file(str(local), location)


def read_meta(shards: str) -> dict[str, Any]:
    """The metadata `optimize` wrote next to the shards (downloaded first for a URL)."""
    location = join(shards, META)
    try:
        if is_url(location):
            with tempfile.TemporaryDirectory() as folder:
                local = os.path.join(folder, META)
                _get_fs_provider(location).download_file(location, local)
                return json.loads(Path(local).read_text())
        return json.loads(Path(location).read_text())
    except (OSError, ValueError, RuntimeError) as error:
        raise UserError(
            f"No shards written by tl_project at {shards} ({META}: {error}). Write them with "
            f"python -m tl_project optimize --data.root FOLDER --output {shards}."
        ) from None


class ShardDataset(StreamingDataset):
    """A split of the shards whose items are (transformed uint8 image, label, index), like
    the folder datasets'; augmentation is drawn from `(seed, epoch, index)` alone."""

    def __init__(
        self,
        shards: str,
        split: str,
        transform: Callable,
        seed: int,
        shuffle: bool,
        drop_last: bool | None,
        num_classes: int | None = None,
    ) -> None:
        """`num_classes`: given for multi-label shards, whose targets are multi-hot vectors."""
        self.num_classes = num_classes
        # item_shuffle_window 0: a full permutation of the items within each chunk (LitData 0.2.76
        # shuffles blocks of 256 consecutive items by default), as the folders' sampler shuffles.
        super().__init__(join(shards, split), shuffle=shuffle, seed=seed, drop_last=drop_last, item_shuffle_window=0)
        self.image_transform = transform

    def __getitem__(self, index: Any) -> Any:
        item = super().__getitem__(index)
        if not isinstance(item, dict):  # a slice: LitData's own use
            return item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, self.current_epoch, item["index"])) & 0x7FFF_FFFF_FFFF_FFFF)
            image, label = self._decoded(item)
            return self.image_transform(image), label, item["index"]

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        """(decoded image, label) of item `index`, untransformed."""
        return self._decoded(StreamingDataset.__getitem__(self, index))

    def _decoded(self, item: dict[str, Any]) -> tuple[torch.Tensor, Any]:
        image = decode_image_bytes(torch.frombuffer(bytearray(item["image"]), dtype=torch.uint8), item["path"])
        return image, item_target(item["label"], self.num_classes)

    def describe(self, index: int) -> str:
        """The path of item `index` (relative to the folder `optimize` read)."""
        return str(StreamingDataset.__getitem__(self, index)["path"])


class ShardItems(ImageDataset):
    """A split of the shards read by index (LitData's random access into its chunks), for
    validation, test and predict: then the loaders and samplers of image folders apply, and
    under DDP every image is evaluated exactly once, whatever the number of chunks."""

    def __init__(self, shards: ShardDataset, size: int, transform: Callable) -> None:
        super().__init__(transform)
        self.shards, self.size = shards, size

    def __len__(self) -> int:
        return self.size

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        return self.shards.load(index)

    def target(self, index: int) -> Any:
        return item_target(StreamingDataset.__getitem__(self.shards, index)["label"], self.shards.num_classes)

    def describe(self, index: int) -> str:
        return self.shards.describe(index)


class ShardLoader(StreamingDataLoader):
    """LitData's loader, with its epoch (which orders the shuffle) taken from `epoch()` (the
    Trainer's) at the start of each epoch. LitData keeps its own count, which starts again at
    the first epoch when a run resumes from a checkpoint saved at the end of an epoch; this
    way the resumed epoch reads what it would have read in an uninterrupted run. A run
    resumed in the middle of an epoch continues from LitData's saved position. Under DDP
    each process trains the same number of whole batches (`__len__`)."""

    def __init__(
        self, dataset: ShardDataset, size: int, world: int = 1, epoch: Callable[[], int] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(dataset, **kwargs)
        self.size, self.world, self.epoch = size, world, epoch

    def __len__(self) -> int:
        """Batches per process. Under DDP every process must train the same number of batches:
        whole batches of an equal share, for all of them (LitData 0.2.76 counted one batch more
        on one process than it gave it, and the processes fell out of step)."""
        if self.world == 1:
            return super().__len__()
        assert self.batch_size is not None
        return (self.size // self.world) // self.batch_size

    def __iter__(self) -> Any:
        # A generator, as LitData's: the epoch is read when the first batch is drawn, not when
        # the iterator is made (Lightning makes it early when the number of steps is estimated,
        # before a resumed run's loops know their epoch).
        if self.epoch is not None and not self.restore:
            self.current_epoch = self.epoch()  # LitData counts from 1: its __iter__ adds it
        yield from super().__iter__()


def shard_split(shards: str, meta: dict[str, Any], split: str, transform: Callable, seed: int) -> Any:
    """`split` of `shards`: streamed (`ShardDataset`) for training, by index (`ShardItems`) else."""
    sizes = meta.get("splits", {})
    num_classes = len(meta["classes"]) if meta.get("multi_label") and split != "predict" else None
    if not sizes.get(split):
        hint = " --data.predict_dir DIR" if split == "predict" else ""
        raise UserError(
            f"The shards at {shards} have no {split} images (splits: {sizes}). "
            f"Write them with python -m tl_project optimize{hint} --output {shards}."
        )
    if split == "train":
        if meta.get("order") != ORDER:
            raise UserError(
                f"The shards at {shards} were written by an earlier tl_project in folder order, class by class: "
                "training batches from them hold one or two classes, which ruins accuracy. Write them again "
                f"(python -m tl_project optimize --data.root {meta.get('source', 'FOLDER')} --output NEW_FOLDER); "
                "test, validate and predict still read them."
            )
        return ShardDataset(shards, split, transform, seed, shuffle=True, drop_last=None, num_classes=num_classes)
    # By index, through the folders' loaders: each image evaluated exactly once under DDP.
    by_index = ShardDataset(shards, split, transform, seed, shuffle=False, drop_last=False, num_classes=num_classes)
    return ShardItems(by_index, int(sizes[split]), transform)


def shard_loader(dataset: ShardDataset, size: int, trainer: Any, batch_size: int, **kwargs: Any) -> ShardLoader:
    """LitData's loader for training (`ShardLoader`), its epoch from `trainer`'s (if any): it
    shares the chunks out between processes and workers, and its position in the epoch is
    saved in checkpoints (Lightning saves stateful loaders)."""
    world = trainer.world_size if trainer is not None else 1
    if world > 1 and size // world < batch_size:
        raise UserError(
            f"{size} training images are too few for {world} processes with batches of {batch_size}: "
            "lower --data.batch_size or --trainer.devices."
        )
    epoch = (lambda: epoch_to_train(trainer)) if trainer is not None else None
    return ShardLoader(dataset, size, world, epoch=epoch, batch_size=batch_size, drop_last=False, **kwargs)


def epoch_to_train(trainer: Any) -> int:
    """The epoch `trainer` is about to train. When it resumes from the end of an epoch, its
    loader is made before `current_epoch` (the completed epochs) counts that one: the fit
    loop's processed epochs do (Lightning 2.6)."""
    return max(trainer.current_epoch, trainer.fit_loop.epoch_progress.current.processed)
