"""Training and inference throughput of ResNet-50, side by side, on this machine.

Rows (same model, batch size, resolution and data):
- seed loop: the recipe's plain PyTorch loop, fp32, default memory format;
- plain loop, our settings: the same loop with tl_project's precision and memory format;
- tl_project Trainer: Lightning `fit` steady state (first batch excluded);
- synthetic bound: our training step on one batch already in device memory;
- eval: inference with our settings;
- frozen backbone: the training step with `finetune="head"`.

Ratios: speed-up of the defaults over the seed loop; Lightning tax (Trainer / plain
loop with our settings); input-pipeline efficiency (Trainer / synthetic bound).

    python scripts/benchmark.py                       # CPU: 224 px, batch 16, 8 timed steps
    python scripts/benchmark.py --steps 50 --batch_size 128 --out benchmark.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torchvision

from tl_project.callbacks import FitSummary
from tl_project.cli import cpu_has_native_bf16, fast_precision
from tl_project.data import ImageDataModule
from tl_project.model import TransferLearningModel

AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "lightning": L.__version__,
    }


def timed(step: Callable[[Any], None], batches: Iterator[Any], warmup: int, steps: int, device: str) -> float:
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


def train_step(model: torch.nn.Module, precision: str, channels_last: bool, device: str) -> Callable[[Any], None]:
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.001, momentum=0.9)
    criterion = torch.nn.CrossEntropyLoss()
    dtype = AUTOCAST.get(precision)

    def step(batch: Any) -> None:
        inputs, labels = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        if channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        optimizer.zero_grad()
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            loss = criterion(model(inputs), labels)
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="/usr/share/datasets/fashion-mnist", help="Fashion-MNIST IDX files")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before each row")
    parser.add_argument("--num_workers", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmark.json"))
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision, why = fast_precision("auto")
    data = ImageDataModule(
        root=args.root,
        download=False,
        image_size=args.image_size,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
    )
    data.setup("fit")
    data.setup("test")
    needed = args.warmup + args.steps

    def batches(split: str) -> Iterator[Any]:
        while True:
            yield from (data.train_dataloader() if split == "train" else data.test_dataloader())

    def model(finetune: str = "full") -> TransferLearningModel:
        return TransferLearningModel(num_classes=10, weights=None, finetune=finetune)  # type: ignore[arg-type]

    results: dict[str, float] = {}
    print(f"Machine: {machine()}\nOur settings: precision {precision} ({why}), channels_last\n")
    results["seed loop (fp32, contiguous)"] = timed(
        train_step(model(), "32-true", False, device), batches("train"), args.warmup, args.steps, device
    )
    results["plain loop, our settings"] = timed(
        train_step(model(), precision, True, device), batches("train"), args.warmup, args.steps, device
    )

    summary = FitSummary()
    trainer = L.Trainer(
        accelerator=device,
        devices=1,
        precision=precision,
        max_epochs=1,
        limit_train_batches=needed,  # type: ignore[arg-type]
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[summary],
    )
    trainer.fit(model(), datamodule=data)
    results["tl_project Trainer (fit)"] = summary.images_per_second or float("nan")

    fixed = next(batches("train"))
    results["synthetic bound (batch in memory)"] = timed(
        train_step(model(), precision, True, device), iter(lambda: fixed, None), args.warmup, args.steps, device
    )

    evaluated = model().to(device).to(memory_format=torch.channels_last).eval()
    dtype = AUTOCAST.get(precision)

    def eval_step(batch: Any) -> None:
        with torch.inference_mode(), torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            evaluated(batch[0].to(device).contiguous(memory_format=torch.channels_last))

    results["eval / predict"] = timed(eval_step, batches("test"), args.warmup, args.steps, device)
    results["frozen backbone (finetune head) step"] = timed(
        train_step(model("head"), precision, True, device), batches("train"), args.warmup, args.steps, device
    )

    ratios = {
        "defaults / seed loop": results["tl_project Trainer (fit)"] / results["seed loop (fp32, contiguous)"],
        "Lightning tax (Trainer / plain loop, our settings)": results["tl_project Trainer (fit)"]
        / results["plain loop, our settings"],
        "input-pipeline efficiency (Trainer / synthetic)": results["tl_project Trainer (fit)"]
        / results["synthetic bound (batch in memory)"],
    }
    width = max(map(len, [*results, *ratios]))
    print(f"ResNet-50, {args.image_size} px, batch {args.batch_size}, {args.steps} timed steps, {device}")
    for name, value in results.items():
        print(f"  {name:<{width}}  {value:8.2f} images/s")
    for name, value in ratios.items():
        print(f"  {name:<{width}}  {value:8.2f}")
    report = {
        "machine": machine(),
        "settings": {**vars(args), "out": str(args.out), "precision": precision},
        "images_per_second": results,
        "ratios": ratios,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"Written to {args.out}")


if __name__ == "__main__":
    main()
