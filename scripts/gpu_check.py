"""Everything the open GPU questions need, in one command that fits in about 8 minutes on
one GPU: one JSON file and a table. On a machine without a GPU it runs the CPU rows at
the same settings (or --quick ones) and marks the GPU rows as skipped.

Rows (each through the real command line where there is one, on a generated JPEG folder
of --images photo-sized images, ResNet-50 at --image_size from random weights: nothing is
downloaded):

- fit: training images/s as `fit` prints it (first batch of each epoch excluded), for
  `--trainer.precision` bf16-mixed and 32-true, and bf16-mixed with `--model.compile`
  (GPU only: compiling on a 2-core CPU takes minutes);
- loader: the training loader alone, images/s to normalised batches on the device: CPU
  decoding in worker processes (the data module's loader) against
  `torchvision.io.decode_jpeg(device="cuda")` on batches of file bytes (GPU only);
- predict: `predict` over the folder, images/s of the command with its start-up taken
  out (a `predict` of one image is timed too);
- serve: `serve` of the checkpoint, requests/s and latency at --clients concurrent clients;
- feature cache: `fit --model.finetune head --data.augment false` for 3 epochs, without
  and with `--model.cache_features` (epochs 2 and 3 read cached features).

    python scripts/gpu_check.py                      # on the GPU machine: about 8 minutes
    python scripts/gpu_check.py --quick              # anywhere: tiny settings, to try it
    python scripts/gpu_check.py --only fit loader    # some rows

Rows stop being started once --budget seconds have passed (they are marked as skipped).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

# From scripts/: the machine record of the other benchmarks, and their photo-like generated JPEGs.
from benchmark import machine
from data_benchmark import make_folder

ROWS = ("fit", "loader", "predict", "serve", "feature_cache")


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "tl_project", *args]


def run(arguments: list[str], cwd: Path) -> tuple[float, str]:
    """Wall time and output of a command; its output tail in the error if it fails."""
    started = time.perf_counter()
    done = subprocess.run(
        arguments, cwd=cwd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}
    )
    wall = time.perf_counter() - started
    output = done.stdout + done.stderr
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(arguments[2:])} failed ({done.returncode}):\n{output[-2000:]}")
    return wall, output


def throughput(output: str) -> float:
    """The images/s that `fit` printed."""
    found = re.search(r"Training throughput: ([0-9.]+) images/s", output)
    if not found:
        raise RuntimeError(f"fit printed no throughput:\n{output[-2000:]}")
    return float(found.group(1))


class Check:
    """The settings, the folder, the rows measured so far and the time budget."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args, self.work = args, work
        self.gpu = torch.cuda.is_available()
        self.started = time.perf_counter()
        self.rows: list[dict[str, Any]] = []
        self.folder = work / "images"  # set by main once written
        self.checkpoint: Path | None = None

    def data_options(self, batch_size: int | None = None) -> list[str]:
        a = self.args
        return [
            *("--data.dataset", "null", "--data.root", str(self.folder), "--data.image_size", str(a.image_size)),
            *("--data.batch_size", str(batch_size or a.batch_size), "--data.num_workers", str(a.workers)),
            *("--data.verify", "off"),
        ]

    def fit_options(self, *extra: str) -> list[str]:
        a = self.args
        return [
            "fit",
            *("--model.backbone", a.backbone, "--model.weights", "null"),
            *self.data_options(),
            *("--trainer.max_epochs", "1", "--trainer.limit_train_batches", str(a.train_batches)),
            *("--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false"),
            *("--trainer.enable_model_summary", "false", "--trainer.default_root_dir", str(self.work / "runs")),
            *extra,
        ]

    def add(self, row: str, variant: str, measure: Callable[[], dict[str, Any]], gpu_only: bool = False) -> None:
        """Measure one row, or mark it skipped (no GPU, out of budget) or failed, and print it."""
        entry: dict[str, Any] = {"row": row, "variant": variant}
        elapsed = time.perf_counter() - self.started
        if gpu_only and not self.gpu:
            entry["status"] = "skipped: needs a CUDA GPU"
        elif elapsed > self.args.budget:
            entry["status"] = f"skipped: the budget of {self.args.budget} s was spent"
        else:
            try:
                began = time.perf_counter()
                entry |= measure()
                entry["status"] = "measured"
                entry["seconds"] = round(time.perf_counter() - began, 1)
            except Exception as error:  # one failed row does not lose the others
                entry["status"] = f"failed: {str(error)[-1500:]}"
        self.rows.append(entry)
        shown = {k: v for k, v in entry.items() if k not in ("row", "variant")}
        print(f"{row:<14} {variant:<34} {json.dumps(shown)[:300]}", flush=True)

    # -- rows --

    def fit(self) -> None:
        def one(*extra: str) -> Callable[[], dict[str, Any]]:
            def measure() -> dict[str, Any]:
                wall, output = run(command(*self.fit_options(*extra)), self.work)
                return {"images_per_s": throughput(output), "command_s": round(wall, 1)}

            return measure

        accelerator = "gpu" if self.gpu else "cpu"
        self.add("fit", "fp32 (32-true)", one("--trainer.precision", "32-true", "--trainer.accelerator", accelerator))
        self.add("fit", "bf16-mixed", one("--trainer.precision", "bf16-mixed", "--trainer.accelerator", accelerator))
        self.add(
            "fit",
            "bf16-mixed, --model.compile true",
            one("--trainer.precision", "bf16-mixed", "--model.compile", "true"),
            gpu_only=True,
        )

    def loader(self) -> None:
        from tl_project.data import ImageDataModule
        from tl_project.data.module import device_batches

        device = torch.device("cuda" if self.gpu else "cpu")
        count = self.args.train_batches * self.args.batch_size

        def cpu_decode() -> dict[str, Any]:
            data = ImageDataModule(
                dataset=None,
                root=str(self.folder),
                image_size=self.args.image_size,
                batch_size=self.args.batch_size,
                num_workers=self.args.workers,
                verify="off",
            )
            data.setup("fit")
            images, started = 0, 0.0
            for index, batch in enumerate(device_batches(data, data.train_dataloader(), device)):
                if index == 0:  # from the first batch on: worker start-up excluded
                    started = time.perf_counter()
                    continue
                images += len(batch[0])
                if images >= count:
                    break
            if device.type == "cuda":
                torch.cuda.synchronize()
            return {"images_per_s": round(images / (time.perf_counter() - started), 1), "images": images}

        def gpu_decode() -> dict[str, Any]:
            from torchvision.io import decode_jpeg, read_file
            from torchvision.transforms.v2 import functional as F

            files = sorted(self.folder.rglob("*.jpg"))[: count + self.args.batch_size]
            size = self.args.image_size
            mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
            std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)
            images, started = 0, 0.0
            for index in range(0, len(files), self.args.batch_size):
                raw = [read_file(str(f)) for f in files[index : index + self.args.batch_size]]
                decoded = decode_jpeg(raw, device="cuda")
                crops = [F.resized_crop(F.hflip(d), 0, 0, d.shape[1], d.shape[2], [size, size]) for d in decoded]
                batch = (torch.stack(crops).float() / 255 - mean) / std
                if index == 0:
                    torch.cuda.synchronize()
                    started = time.perf_counter()
                    continue
                images += len(batch)
            torch.cuda.synchronize()
            return {"images_per_s": round(images / (time.perf_counter() - started), 1), "images": images}

        self.add("loader", f"CPU decode, {self.args.workers} workers", cpu_decode)
        self.add("loader", "decode_jpeg(device='cuda')", gpu_decode, gpu_only=True)

    def ensure_checkpoint(self) -> Path:
        if self.checkpoint is None:
            runs = self.work / "ckpt"
            options = self.fit_options("--trainer.limit_train_batches", "1", "--trainer.default_root_dir", str(runs))
            run(command(*options), self.work)
            self.checkpoint = next(runs.glob("version_*/checkpoints/last.ckpt"))
        return self.checkpoint

    def predict(self) -> None:
        def measure() -> dict[str, Any]:
            checkpoint = str(self.ensure_checkpoint())
            one_image = str(next(self.folder.rglob("*.jpg")))
            common = ["--ckpt_path", checkpoint, "--data.batch_size", str(self.args.batch_size)]
            common += ["--data.num_workers", str(self.args.workers), "--trainer.enable_progress_bar", "false"]
            one = ["--data.predict_dir", one_image, "--output", str(self.work / "one.csv")]
            start_up, _ = run(command("predict", *common, *one), self.work)
            every = ["--data.predict_dir", str(self.folder), "--output", str(self.work / "all.csv")]
            wall, _ = run(command("predict", *common, *every), self.work)
            count = self.args.images
            return {
                "images": count,
                "command_s": round(wall, 1),
                "start_up_s": round(start_up, 1),
                "images_per_s": round(count / max(wall - start_up, 1e-9), 1),
            }

        self.add("predict", "checkpoint, default precision", measure)

    def serve(self) -> None:
        def measure() -> dict[str, Any]:
            import serve_benchmark as bench

            checkpoint = self.ensure_checkpoint()
            paths = sorted(self.folder.rglob("*.jpg"))[: self.args.serve_images]
            _, expected = bench.model_path_speed(checkpoint, paths)  # each file's class, in this process
            process, url = bench.start_server(checkpoint, self.work / "serve.log", str(self.args.serve_batch), "0.01")
            try:
                return bench.drive(url, paths, self.args.clients, self.args.serve_requests, expected)
            finally:
                process.terminate()
                process.wait(timeout=60)

        self.add("serve", f"checkpoint, max_batch_size {self.args.serve_batch}", measure)

    def feature_cache(self) -> None:
        def one(cache: str) -> Callable[[], dict[str, Any]]:
            def measure() -> dict[str, Any]:
                options = self.fit_options("--model.finetune", "head", "--data.augment", "false")
                options += ["--model.cache_features", cache, "--trainer.max_epochs", "3"]
                wall, output = run(command(*options), self.work)
                return {"images_per_s": throughput(output), "command_s": round(wall, 1)}

            return measure

        self.add("feature_cache", "head only, 3 epochs, no cache", one("false"))
        self.add("feature_cache", "head only, 3 epochs, cache_features", one("true"))


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| row | variant | images/s (requests/s for serve) | status |", "| --- | --- | --- | --- |"]
    for row in rows:
        value = row.get("images_per_s", row.get("requests_per_s", ""))
        lines.append(f"| {row['row']} | {row['variant']} | {value} | {row['status'].splitlines()[0][:120]} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--quick", action="store_true", help="tiny settings (ResNet-18, 64 px, 64 images)")
    parser.add_argument("--images", type=int, default=4096, help="JPEGs in the generated folder")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--train_batches", type=int, default=20, help="training batches of each fit row")
    parser.add_argument("--workers", type=int, default=min(8, len(os.sched_getaffinity(0))))
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--serve_images", type=int, default=64)
    parser.add_argument("--serve_requests", type=int, default=512)
    parser.add_argument("--serve_batch", type=int, default=32)
    parser.add_argument("--budget", type=float, default=420, help="seconds after which no row is started")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    args = parser.parse_args()
    if args.quick:
        args.images, args.image_size, args.backbone, args.batch_size = 64, 64, "resnet18", 16
        args.train_batches, args.workers, args.serve_images, args.serve_requests = 3, 0, 8, 16
        args.clients, args.serve_batch = 4, 4

    work = Path(tempfile.mkdtemp(prefix="tl_project-gpu-check-"))
    try:
        check = Check(args, work)
        check.folder = make_folder(work, args.images, 500, 375)
        print(json.dumps(machine()), flush=True)
        for row in args.only:
            getattr(check, row)()
        result = {"machine": machine(), "settings": vars(args) | {"out": str(args.out)}, "rows": check.rows}
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"\n{table(check.rows)}\n\nWritten: {args.out} ({time.perf_counter() - check.started:.0f} s in all)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
