"""Big data, measured on generated JPEG folders: the data check's wait (`check`) and the
loader's speed from shards vs from the folder (`loader`).

`check`: for each folder size it runs, as a user would, in a fresh data-check cache:
  1. `fit` (first: every image checked, the manifest written),
  2. `fit` again (unchanged folder: the manifest answers), --repeat times (median),
  3. `test --ckpt_path` (only the test split, from the manifest), --repeat times,
each with one training step (ResNet-18, random init, 32 px), and reports the wall time of
the command, its peak memory, and how busy the cores were (CPU time of the command and
its worker processes / wall time / cores). The difference between two folder sizes is
what the size costs.

    python scripts/data_benchmark.py check --images 200 100000 --size 64 64
    python scripts/data_benchmark.py check --images 200 50000 --size 400 350

`loader`: one training epoch of the loader alone (decode, random resized crop to
--image-size, flip; no model; timed from its first batch) over the folder's train split, from the folder and from
its LitData shards (written by `optimize` first, timed too), in images/s:

    python scripts/data_benchmark.py loader --images 20000 --size 400 350 --workers 2

`predict`: `predict --output FILE` of a tiny checkpoint (ResNet-18, random init, 32 px) over
each folder, with the wall time, the peak memory and the rows written: the memory of a
streaming predict should not grow with the number of images.

    python scripts/data_benchmark.py predict --images 10000 100000 --verify off --workers 2

The folders are generated once under --workdir (JPEG, quality 90, 4 classes) and reused.
Files just written are in the page cache: the first check is not slowed by the disk here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = 4


def _write(args: tuple[Path, int, int, int, int]) -> None:
    folder, start, stop, width, height = args
    rng = np.random.default_rng(start)
    # Smooth gradients plus noise: JPEGs of about a photo's size per pixel.
    y, x = np.mgrid[0:height, 0:width]
    for i in range(start, stop):
        base = (x * rng.uniform(0.2, 1) + y * rng.uniform(0.2, 1)) % 256
        pixels = np.stack([base, base[::-1], base[:, ::-1]], axis=-1) + rng.normal(0, 12, (height, width, 3))
        path = folder / f"c{i % CLASSES}" / f"{i:07d}.jpg"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)


def make_folder(root: Path, count: int, width: int, height: int) -> Path:
    folder = root / f"jpeg-{count}-{width}x{height}"
    if (folder / ".complete").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    for c in range(CLASSES):
        (folder / f"c{c}").mkdir(parents=True)
    step = 500
    jobs = [(folder, s, min(s + step, count), width, height) for s in range(0, count, step)]
    started = time.perf_counter()
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_write, jobs))
    (folder / ".complete").touch()
    size = sum(p.stat().st_size for p in folder.rglob("*.jpg"))
    print(f"  wrote {count} JPEGs ({size / 2**20:.0f} MiB) in {time.perf_counter() - started:.0f} s", flush=True)
    return folder


def run(command: list[str], env: dict[str, str]) -> dict[str, float]:
    """Wall time, peak memory (MiB) and CPU time (s) of `command` and its children."""
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    stderr = process.stderr.read() if process.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{stderr[-3000:]}")
    return {"wall_s": wall, "peak_mib": usage.ru_maxrss / 1024, "cpu_s": usage.ru_utime + usage.ru_stime}


def check(args: argparse.Namespace) -> list[dict[str, object]]:
    cores = len(os.sched_getaffinity(0))
    results = []
    for count in args.images:
        folder = make_folder(args.workdir, count, *args.size)
        cache, runs = args.workdir / f"cache-{count}", args.workdir / f"runs-{count}"
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(runs, ignore_errors=True)
        env = {**os.environ, "XDG_CACHE_HOME": str(cache), "PYTHONWARNINGS": "ignore"}
        common = ["--data.verify", args.verify, "--trainer.default_root_dir", str(runs)]
        common += ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
        fit = [sys.executable, "-m", "tl_project", "fit", "--model.backbone", "resnet18", "--model.weights", "null"]
        fit += ["--data.dataset", "null", "--data.root", str(folder), "--data.image_size", "32"]
        fit += ["--data.batch_size", "16", "--trainer.max_steps", "1", "--trainer.limit_val_batches", "1", *common]
        row: dict[str, object] = {"images": count, "size": args.size, "verify": args.verify}
        row["first fit"] = run(fit, env)
        print(f"  {count:>7} images, first fit: {json.dumps(row['first fit'])}", flush=True)
        row["manifest_mib"] = round(sum(f.stat().st_size for f in cache.rglob("checks/*")) / 2**20, 2)
        best = sorted(runs.glob("version_*/checkpoints/last.ckpt"))[-1]
        test = [sys.executable, "-m", "tl_project", "test", "--ckpt_path", str(best), "--data.root", str(folder)]
        test += ["--trainer.limit_test_batches", "1", *common]
        # The later commands, each --repeat times (the median), so that a start-up slowed by
        # the disk (libraries pushed out of the page cache by the images) does not decide.
        for name, command in (("second fit", fit), ("test", test)):
            runs_of = [run(command, env) for _ in range(args.repeat)]
            row[name] = {key: statistics.median(r[key] for r in runs_of) for key in runs_of[0]}
            print(f"  {count:>7} images, {name} (median of {args.repeat}): {json.dumps(row[name])}", flush=True)
        first = row["first fit"]
        assert isinstance(first, dict)
        row["first_fit_cores_busy"] = round(first["cpu_s"] / first["wall_s"] / cores, 2)
        results.append(row)
    return results


def loader(args: argparse.Namespace) -> list[dict[str, object]]:
    from tl_project import ImageDataModule

    folder = make_folder(args.workdir, args.images[0], *args.size)
    shards = args.workdir / f"shards-{args.images[0]}-{args.size[0]}x{args.size[1]}"
    env = {**os.environ, "XDG_CACHE_HOME": str(args.workdir / "cache-loader"), "PYTHONWARNINGS": "ignore"}
    if not (shards / "tl_project.json").is_file():
        command = [sys.executable, "-m", "tl_project", "optimize", "--data.root", str(folder), "--output", str(shards)]
        print(f"  optimize: {json.dumps(run(command, env))}", flush=True)
    os.environ["XDG_CACHE_HOME"] = env["XDG_CACHE_HOME"]
    results = []
    for source, root in (("folder", str(folder)), ("litdata", str(shards))):
        data = ImageDataModule(
            dataset=None if source == "folder" else source,
            root=root,
            batch_size=args.batch_size,
            num_workers=args.workers,
            image_size=args.image_size,
            verify="off",  # the loader alone: no data check before it
        )
        data.setup("fit")
        images, started = 0, 0.0
        for batch in data.train_dataloader():  # one epoch, timed from its first batch (workers started)
            if not started:
                started = time.perf_counter()
                continue
            images += len(batch[1])
        seconds = time.perf_counter() - started
        row = {
            "source": source,
            "images": images,
            "seconds": round(seconds, 2),
            "images_per_s": round(images / seconds, 1),
        }
        print(f"  {json.dumps(row)}", flush=True)
        results.append(row)
    return results


def predict(args: argparse.Namespace) -> list[dict[str, object]]:
    """`predict --output` over each folder size: wall time, peak memory, rows written."""
    results = []
    env = {**os.environ, "XDG_CACHE_HOME": str(args.workdir / "cache-predict"), "PYTHONWARNINGS": "ignore"}
    runs = args.workdir / "runs-predict"
    shutil.rmtree(runs, ignore_errors=True)
    small = make_folder(args.workdir, 200, *args.size)
    fit = [sys.executable, "-m", "tl_project", "fit", "--model.backbone", "resnet18", "--model.weights", "null"]
    fit += ["--data.dataset", "null", "--data.root", str(small), "--data.image_size", "32", "--data.batch_size", "16"]
    fit += ["--trainer.max_steps", "1", "--trainer.limit_val_batches", "1", "--trainer.default_root_dir", str(runs)]
    run(fit, env)
    checkpoint = next(runs.glob("version_*/checkpoints/last.ckpt"))
    for count in args.images:
        folder = make_folder(args.workdir, count, *args.size)
        out = args.workdir / f"predictions-{count}.csv"
        for stale in args.workdir.glob(f"predictions-{count}.csv*"):
            stale.unlink()
        command = [sys.executable, "-m", "tl_project", "predict", "--ckpt_path", str(checkpoint), "--output", str(out)]
        command += ["--data.predict_dir", str(folder), "--data.batch_size", str(args.batch_size)]
        command += ["--data.num_workers", str(args.workers), "--data.verify", args.verify]
        command += ["--trainer.enable_progress_bar", "false"]
        row: dict[str, object] = {"images": count, "verify": args.verify, "batch_size": args.batch_size}
        row |= run(command, env)
        with out.open() as written:
            row["rows"] = sum(1 for _ in written) - 1
        print(f"  {json.dumps(row)}", flush=True)
        results.append(row)
        out.unlink()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["check", "loader", "predict"])
    parser.add_argument("--images", type=int, nargs="+", default=[200, 100_000])
    parser.add_argument("--size", type=int, nargs=2, default=[64, 64], metavar=("WIDTH", "HEIGHT"))
    parser.add_argument("--verify", default="full", choices=["full", "header", "off"])
    parser.add_argument("--repeat", type=int, default=3, help="check: runs of the second fit and of test (median)")
    parser.add_argument("--workers", type=int, default=2, help="loader: worker processes")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tl_project-data-benchmark"))
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    print(f"Machine: {platform.processor() or platform.machine()}, {cores} usable cores")
    results = {"check": check, "loader": loader, "predict": predict}[args.what](args)
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
