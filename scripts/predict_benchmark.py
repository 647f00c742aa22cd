"""End-to-end `predict` speed from a checkpoint, by runtime, against the model alone.

    python scripts/predict_benchmark.py --out docs/predict-cpu.json

Makes a ResNet-50 checkpoint at 224 px (random weights: the speed does not depend on them;
one training step of `fit` on a small folder) and --width x --height JPEGs, then times
`python -m tl_project predict --output` (a fresh process each, as a user runs it) on two
counts of images, --images SMALL LARGE, for each row:

- `checkpoint, --runtime torch`: PyTorch fp32 channels-last;
- `checkpoint, --runtime auto`: the default (ONNX Runtime on a CPU; the conversion is cached
  by a first, untimed run);
- `exported .onnx`: `predict --ckpt_path best.onnx` after `export`;
- `exported int8 .onnx`: after `export --quantize int8` (calibrated on the small folder's
  validation images: the speed only, its accuracy means nothing here).

images/s at the margin = (LARGE - SMALL) / (time LARGE - time SMALL): start-up, the model's
loading and the conversion's cache lookup cancel out. The reference: the same ONNX file in
ONNX Runtime in one process on already-decoded, already-normalised images of the same size
(batch --batch_size), images/s. Each row's ratio to it is printed.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmark.py
from benchmark import machine


def make_images(folder: Path, count: int, width: int, height: int, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        base = rng.integers(0, 255, (height // 8, width // 8, 3), dtype=np.uint8)  # smooth-ish, JPEG-like content
        Image.fromarray(base).resize((width, height), Image.BILINEAR).save(folder / f"{i:05d}.jpg", quality=90)
    return folder


def tool(*args: str, env: dict[str, str]) -> float:
    """Seconds of `python -m tl_project ARGS`, which must succeed."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "tl_project", *args], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode:
        raise SystemExit(f"tl_project {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return seconds


def read_answers(path: Path) -> dict[str, tuple[str, float]]:
    with open(path, newline="") as f:
        return {row["path"]: (row["prediction"], float(row["probability"])) for row in csv.DictReader(f)}


def model_alone(onnx: Path, batch_size: int, image_size: int, batches: int = 8) -> float:
    """images/s of ONNX Runtime on ready tensors, in this process (best of two rounds)."""
    from tl_project.runtime import usable_cores
    from tl_project.runtimes import onnx_session

    session = onnx_session(onnx, usable_cores())
    data = np.random.default_rng(0).standard_normal((batch_size, 3, image_size, image_size), dtype=np.float32)
    session.run(None, {"images": data})  # warm-up
    best = 0.0
    for _ in range(2):
        start = time.perf_counter()
        for _ in range(batches):
            session.run(None, {"images": data})
        best = max(best, batches * batch_size / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs=2, default=[32, 160], metavar=("SMALL", "LARGE"))
    parser.add_argument("--width", type=int, default=300)
    parser.add_argument("--height", type=int, default=300)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--num_workers", type=int, default=1)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tl_project-predict-benchmark"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    env = os.environ | {"XDG_CACHE_HOME": str(work / "cache")}
    try:
        train = work / "train"
        for name in ("a", "b"):
            make_images(train / name, 8, args.width, args.height, seed=ord(name))
        tool("fit", "--model.backbone", args.backbone, "--model.weights", "null", "--data.dataset", "null",
             "--data.root", str(train), "--data.image_size", "224", "--data.batch_size", "4",
             "--trainer.max_steps", "1", "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0",
             "--trainer.default_root_dir", str(work / "runs"), "--trainer.enable_progress_bar", "false",
             env=env)  # fmt: skip
        ckpt = next((work / "runs").glob("version_*/checkpoints/last.ckpt"))
        onnx = work / "model.onnx"
        tool("export", "--ckpt_path", str(ckpt), "--output", str(onnx), env=env)
        int8 = work / "model.int8.onnx"
        tool("export", "--ckpt_path", str(ckpt), "--output", str(int8), "--quantize", "int8", env=env)
        small, large = (make_images(work / f"predict{n}", n, args.width, args.height, seed=n) for n in args.images)
        common = ["--data.batch_size", str(args.batch_size), "--data.num_workers", str(args.num_workers),
                  "--trainer.enable_progress_bar", "false"]  # fmt: skip
        rows_spec = {
            "checkpoint, --runtime torch": [str(ckpt), "--runtime", "torch"],
            "checkpoint, --runtime auto": [str(ckpt)],
            "exported .onnx": [str(onnx)],
            "exported int8 .onnx": [str(int8)],
        }
        tool("predict", "--ckpt_path", str(ckpt), "--data.predict_dir", str(small), "--output",
             str(work / "warm.csv"), *common, env=env)  # fmt: skip  # the conversion, into the cache
        alone = model_alone(onnx, args.batch_size, 224)
        print(f"ONNX Runtime alone, ready tensors, batch {args.batch_size}: {alone:.2f} images/s", flush=True)
        rows = []
        for name, spec in rows_spec.items():
            seconds = []
            for folder in (small, large):
                output = work / f"{len(rows)}-{folder.name}.csv"
                predict = [
                    "predict",
                    "--ckpt_path",
                    spec[0],
                    "--data.predict_dir",
                    str(folder),
                    "--output",
                    str(output),
                ]
                seconds.append(tool(*predict, *spec[1:], *common, env=env))
            margin = (args.images[1] - args.images[0]) / (seconds[1] - seconds[0])
            answers = read_answers(work / f"{len(rows)}-{large.name}.csv")
            reference = answers if not rows else read_answers(work / f"0-{large.name}.csv")
            differ = sum(answers[path][0] != reference[path][0] for path in reference)
            largest = max(abs(answers[path][1] - reference[path][1]) for path in reference)
            rows.append({"row": name, "seconds": seconds, "images_per_s_margin": margin, "of_model_alone": margin / alone,
                         "top1_differs_from_torch": differ, "largest_probability_difference": largest})  # fmt: skip
            print(f"{name:<30} {seconds[0]:6.1f} s / {seconds[1]:6.1f} s: {margin:6.2f} images/s at the margin, "
                  f"{margin / alone:.2f}x the model alone; against torch: {differ} top-1 differ, "
                  f"probabilities within {largest:.2g}", flush=True)  # fmt: skip
        result = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}, "model_alone": alone,
                  "rows": rows}  # fmt: skip
        if args.out:
            args.out.write_text(json.dumps(result, indent=1) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
