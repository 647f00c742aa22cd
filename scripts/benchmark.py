"""Training and inference throughput of ResNet-50, side by side, on this machine.

Rows (same model, batch size, resolution and Fashion-MNIST images):
- seed loop: the recipe's plain PyTorch loop, fp32, default memory format, images
  made float per image in the loader workers (PIL, ToTensor, Normalize);
- plain loop, our settings: the same loop with tl_project's precision, memory format
  and input pipeline (uint8 batches, crops and normalisation batched on the device);
- plain loop, our settings + torch.compile (with --compile; compiling not timed);
- tl_project Trainer: Lightning `fit` steady state (first batch excluded);
- synthetic bound: our training step on one batch already in device memory;
- eval / predict: inference with our settings;
- frozen backbone (finetune head): the training step, and the epoch time of
  --cache_images images without and with model.cache_features;
- loaders alone (no model): in-memory images, and a folder of 500x375 JPEGs written
  for the run, each through the naive pipeline and through ours, ending in
  normalised float batches on the device.

Ratios: speed-up of the defaults over the seed loop; Lightning tax (Trainer / plain
loop with our settings); input-pipeline efficiency (Trainer / synthetic bound);
feature-cache and loader speed-ups.

    python scripts/benchmark.py                       # CPU: 224 px, batch 16, 2 rounds of 6 timed steps
    python scripts/benchmark.py --steps 50 --batch_size 128 --out benchmark.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torchvision
from lightning.pytorch.callbacks import Callback
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as v1

from tl_project.callbacks import FitSummary
from tl_project.data import ImageDataModule
from tl_project.data.datasets import FolderDataset, TensorImageDataset
from tl_project.data.images import list_images
from tl_project.model import TransferLearningModel
from tl_project.runtime import cpu_has_native_bf16, default_num_workers, fast_precision
from tl_project.transforms import IMAGENET_MEAN, IMAGENET_STD, CropSampler, train_transform

AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
Batch = Any


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
        cpu = names[0] if names else cpu
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    bf16 = cpu_has_native_bf16()
    return {
        "kind": gpu or f"{cpu}, {'with' if bf16 else 'without'} native bf16",
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "cpu_native_bf16": bf16,
        "gpu": gpu,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "lightning": L.__version__,
    }


def timed(step: Callable[[Batch], None], batches: Iterator[Batch], warmup: int, steps: int, device: str) -> float:
    """Images per second over `steps` batches after `warmup` batches; data loading included."""
    for _ in range(warmup):
        step(next(batches))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start, images = time.perf_counter(), 0
    for _ in range(steps):
        batch = next(batches)
        step(batch)
        images += len(batch[0])
    sync()
    return images / (time.perf_counter() - start)


def forever(loader: Callable[[], DataLoader], prepare: Callable[[Batch], Batch]) -> Iterator[Batch]:
    """Batches of fresh epochs of `loader()`, each passed through `prepare` (to the device, transforms)."""
    while True:
        for batch in loader():
            yield prepare(batch)


def naive_transform(image_size: int) -> v1.Compose:
    """The per-image pipeline of the seed recipe and of most tutorials: PIL in, float tensor out."""
    return v1.Compose(
        [
            v1.RandomResizedCrop(image_size),
            v1.RandomHorizontalFlip(),
            v1.ToTensor(),
            v1.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class NaiveInMemory(Dataset):
    """In-memory gray images through PIL and `naive_transform`, as torchvision's datasets do."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, image_size: int) -> None:
        self.images, self.labels, self.transform = images, labels, naive_transform(image_size)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = Image.fromarray(self.images[index].numpy()).convert("RGB")
        return self.transform(image), int(self.labels[index])


def train_step(model: torch.nn.Module, precision: str, channels_last: bool, device: str) -> Callable[[Batch], None]:
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.001, momentum=0.9)
    criterion = torch.nn.CrossEntropyLoss()
    dtype = AUTOCAST.get(precision)

    def step(batch: Batch) -> None:
        inputs, labels = batch[0], batch[1]
        if channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        optimizer.zero_grad()
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            loss = criterion(model(inputs), labels)
        loss.backward()
        optimizer.step()

    return step


class EpochTimer(Callback):
    """Seconds of each training epoch."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seconds.append(time.perf_counter() - self.start)


def write_jpegs(images: torch.Tensor, labels: torch.Tensor, folder: Path, count: int) -> None:
    """`count` images as 500x375 JPEGs (photo-sized) in folder/<label>/."""
    for i in range(count):
        target = folder / str(int(labels[i]))
        target.mkdir(parents=True, exist_ok=True)
        picture = Image.fromarray(images[i].numpy()).convert("RGB").resize((500, 375), Image.Resampling.BICUBIC)
        picture.save(target / f"{i}.jpg", quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="/usr/share/datasets/fashion-mnist", help="Fashion-MNIST IDX files")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per row and round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before each row")
    parser.add_argument("--num_workers", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=2, help="rounds of the model rows; the best is kept")
    parser.add_argument("--compile", action="store_true", help="add a row with torch.compile")
    parser.add_argument("--cache_images", type=int, default=256, help="images of the feature-cache epochs")
    parser.add_argument("--loader_images", type=int, default=512, help="images of the loader-alone rows")
    parser.add_argument("--out", type=Path, default=Path("benchmark.json"))
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision, why = fast_precision("auto")
    data = ImageDataModule(
        dataset="FashionMNIST",
        root=args.root,
        download=False,
        image_size=args.image_size,
        batch_size=args.batch_size,
        num_workers=default_num_workers(device == "cuda") if args.num_workers is None else args.num_workers,
    )
    data.setup("fit")
    data.setup("test")
    train = data.datasets["train"]
    assert isinstance(train, TensorImageDataset)
    workers = data.num_workers

    def ours(batch: Batch) -> Batch:
        return data.on_after_batch_transfer(L.fabric.utilities.move_data_to_device(batch, device))

    def to_device(batch: Batch) -> Batch:
        return L.fabric.utilities.move_data_to_device(batch, device)

    def naive_loader(dataset: Dataset) -> Callable[[], DataLoader]:
        return lambda: DataLoader(dataset, args.batch_size, shuffle=True, num_workers=workers, drop_last=True)

    seed_batches = forever(naive_loader(NaiveInMemory(train.images, train.labels, args.image_size)), to_device)
    our_batches = forever(data.train_dataloader, ours)

    def model(finetune: str = "full", **kwargs: Any) -> TransferLearningModel:
        return TransferLearningModel(num_classes=10, weights=None, finetune=finetune, **kwargs)  # type: ignore[arg-type]

    def trainer(**kwargs: Any) -> L.Trainer:
        quiet = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False}
        return L.Trainer(accelerator=device, devices=1, precision=precision, limit_val_batches=0, **quiet, **kwargs)  # type: ignore[arg-type]

    print(f"Machine: {machine()}\nOur settings: precision {precision} ({why}), channels_last\n")
    fixed = next(our_batches)
    evaluated = model().to(device).to(memory_format=torch.channels_last).eval()
    dtype = AUTOCAST.get(precision)

    def eval_step(batch: Batch) -> None:
        with torch.inference_mode(), torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            evaluated(batch[0].contiguous(memory_format=torch.channels_last))

    def fit_rate() -> float:
        summary = FitSummary()
        trainer(max_epochs=1, limit_train_batches=args.warmup + args.steps, callbacks=[summary]).fit(
            model(), datamodule=data
        )
        return summary.images_per_second or float("nan")

    results: dict[str, float] = {}
    rows: dict[str, tuple[Callable[[Batch], None], Iterator[Batch]] | Callable[[], float]] = {
        "seed loop (fp32, contiguous)": (train_step(model(), "32-true", False, device), seed_batches),
        "plain loop, our settings": (train_step(model(), precision, True, device), our_batches),
    }
    if args.compile:
        compiled = model()
        compiled.backbone.compile()
        step = train_step(compiled, precision, True, device)
        start = time.perf_counter()
        step(next(our_batches))  # compiles
        results["torch.compile: first step, seconds"] = time.perf_counter() - start
        rows["plain loop, our settings + torch.compile"] = (step, our_batches)
    rows["tl_project Trainer (fit)"] = fit_rate
    rows["synthetic bound (batch in memory)"] = (
        train_step(model(), precision, True, device),
        iter(lambda: fixed, None),
    )
    rows["eval / predict"] = (eval_step, forever(data.test_dataloader, ours))
    rows["frozen backbone (finetune head) step"] = (train_step(model("head"), precision, True, device), our_batches)
    # Rows take turns, --repeats rounds, best round kept: a slow spell of a shared machine
    # then hits every row alike instead of one.
    rates: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(args.repeats):
        for name, row in rows.items():
            rate = row() if callable(row) else timed(*row, args.warmup, args.steps, device)
            rates[name].append(rate)
    results.update({name: max(values) for name, values in rates.items()})

    # Frozen-backbone epochs of `cache_images` images, recomputed and from the cache.
    eval_crop = CropSampler(args.image_size, train=False)
    data.datasets["train"] = TensorImageDataset(
        train.images[: args.cache_images], train.labels[: args.cache_images], eval_crop
    )
    data.augment = False
    for cache, epochs in ((False, 1), (True, 2)):
        timer = EpochTimer()
        trainer(max_epochs=epochs, callbacks=[timer]).fit(model("head", cache_features=cache), datamodule=data)
        label = "feature cache" if cache else "recomputed"
        results[f"frozen backbone epoch of {args.cache_images} images, {label}, seconds"] = timer.seconds[-1]
    data.datasets["train"] = train

    # Loaders alone: batches of normalised floats on the device, no model.
    def loader_rate(batches: Iterator[Batch]) -> float:
        return timed(lambda batch: None, batches, 1, args.loader_images // args.batch_size, device)

    results["loader alone: in-memory, naive (PIL + ToTensor in workers)"] = loader_rate(seed_batches)
    results["loader alone: in-memory, ours (uint8 + batched on device)"] = loader_rate(our_batches)
    with tempfile.TemporaryDirectory() as folder:
        write_jpegs(train.images, train.labels, Path(folder), args.loader_images)
        naive_folder = torchvision.datasets.ImageFolder(folder, transform=naive_transform(args.image_size))
        results["loader alone: JPEG folder, naive (ImageFolder + PIL + ToTensor)"] = loader_rate(
            forever(naive_loader(naive_folder), to_device)
        )
        samples = [(path, int(Path(path).parent.name)) for path in list_images(Path(folder))]
        our_folder = FolderDataset(samples, train_transform(args.image_size))
        results["loader alone: JPEG folder, ours (decode_image + v2 on uint8)"] = loader_rate(
            forever(naive_loader(our_folder), ours)
        )

    trainer_rate = results["tl_project Trainer (fit)"]
    cache_rows = [v for k, v in results.items() if k.startswith("frozen backbone epoch")]
    loader = {k.removeprefix("loader alone: "): v for k, v in results.items() if k.startswith("loader alone")}
    ratios = {
        "defaults / seed loop": trainer_rate / results["seed loop (fp32, contiguous)"],
        "Lightning tax (Trainer / plain loop, our settings)": trainer_rate / results["plain loop, our settings"],
        "input-pipeline efficiency (Trainer / synthetic)": trainer_rate / results["synthetic bound (batch in memory)"],
        "feature cache: epoch speed-up": cache_rows[0] / cache_rows[1],
        "in-memory loader: ours / naive": loader["in-memory, ours (uint8 + batched on device)"]
        / loader["in-memory, naive (PIL + ToTensor in workers)"],
        "JPEG folder loader: ours / naive": loader["JPEG folder, ours (decode_image + v2 on uint8)"]
        / loader["JPEG folder, naive (ImageFolder + PIL + ToTensor)"],
    }
    if args.compile:
        ratios["torch.compile speed-up (plain loop)"] = (
            results["plain loop, our settings + torch.compile"] / results["plain loop, our settings"]
        )
    width = max(map(len, [*results, *ratios]))
    print(
        f"\n{machine()['kind']}: ResNet-50, {args.image_size} px, batch {args.batch_size}, "
        f"{args.steps} timed steps, {device}, {workers} workers"
    )
    for name, value in results.items():
        unit = "" if "seconds" in name else " images/s"
        print(f"  {name:<{width}}  {value:8.2f}{unit}")
    for name, value in ratios.items():
        print(f"  {name:<{width}}  {value:8.2f}x")
    report = {
        "machine": machine(),
        "settings": {**vars(args), "out": str(args.out), "precision": precision, "num_workers": workers},
        "results": results,
        "rounds": rates,
        "ratios": ratios,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"Written to {args.out}")


if __name__ == "__main__":
    main()
