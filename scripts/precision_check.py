"""bf16 against fp32 on real runs: validation accuracy over seeds, and the runs that diverge.

Two parts, each a set of `python -m tl_project fit` runs on this machine:

- accuracy: real Fashion-MNIST images (Debian's `dataset-fashion-mnist`), a backbone
  from random initialisation (no pretrained weights offline; ResNet-18 by default, so
  that a CPU run gets past the first, erratic epochs), 32 px, batch 64, SGD lr 0.05
  momentum 0.9, a few short epochs; `--trainer.precision 32-true` against
  `bf16-mixed` for each seed (the seed sets the initialisation, the split and the
  shuffling; both precisions of a seed see the same images). The last epoch's
  validation accuracy of each run, the mean and standard deviation per precision, and
  the mean of the per-seed differences.
- stability: a generated three-colour folder (30 images a class, as the tests'), the
  cases that break BatchNorm (batches of 2 images, the end of an epoch, gradual
  unfreezing, head-only, frozen BatchNorm), each with the default precision (what
  tl_project chooses on this machine) and explicit ones; whether the run finishes or
  stops on a non-finite loss, and its validation accuracy.

    python scripts/precision_check.py --out precision.json
    python scripts/precision_check.py --skip stability --backbone resnet50 --lr 0.01 --batch_size 32
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tl_project.runtime import cpu_has_native_bf16  # noqa: E402

COLORS = {"cat": (220, 60, 60), "dog": (60, 220, 60), "fish": (60, 60, 220)}
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def colour_folder(root: Path, per_class: int = 30, size: int = 40) -> Path:
    rng = np.random.default_rng(0)
    for name, color in COLORS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(np.array(color) + rng.integers(-30, 30, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")
    return root


def fit(args: list[str], runs: Path, precision: str | None) -> dict[str, Any]:
    """One `fit` in a subprocess with `precision` (None: the default): finished or diverged,
    the precision used, the last val/acc."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    command = [sys.executable, "-m", "tl_project", "fit", *args, "--trainer.default_root_dir", str(runs), *QUIET]
    command += ["--trainer.precision", precision] if precision else []
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    seconds = time.perf_counter() - start
    output = result.stdout + result.stderr
    chosen = (line.split()[1].rstrip(":") for line in output.splitlines() if line.startswith("Precision "))
    precision = precision or next(chosen, None)
    run = max(runs.glob("version_*"), key=lambda p: int(p.name.split("_")[1]), default=None)
    val_acc = None
    if run is not None and (run / "metrics.csv").is_file():
        with open(run / "metrics.csv", newline="") as f:
            values = [float(row["val/acc"]) for row in csv.DictReader(f) if row.get("val/acc")]
        val_acc = values[-1] if values else None
    diverged = "training loss is" in output
    if result.returncode != 0 and not diverged:
        raise SystemExit(f"fit failed ({result.returncode}):\n{output[-3000:]}")
    return {
        "outcome": "diverged" if diverged else "finished",
        "precision": precision,
        "val_acc": val_acc,
        "seconds": round(seconds, 1),
        "message": next((line for line in output.splitlines() if "training loss is" in line), None),
    }


def accuracy(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    rows: dict[str, list[float]] = {"32-true": [], "bf16-mixed": []}
    runs = []
    for seed in args.seeds:
        for precision in rows:
            fit_args = [
                *("--model.weights", "null", "--model.backbone", args.backbone),
                *("--data.dataset", "FashionMNIST", "--data.root", args.root, "--data.download", "false"),
                *("--data.image_size", "32", "--data.batch_size", str(args.batch_size)),
                *("--data.seed", str(seed), "--seed_everything", str(seed)),
                *("--model.optimizer.lr", str(args.lr), "--trainer.max_epochs", str(args.epochs)),
                *("--trainer.limit_train_batches", str(args.train_batches)),
                *("--trainer.limit_val_batches", str(args.val_batches)),
            ]
            result = fit(fit_args, work / f"accuracy-{seed}-{precision}", precision)
            runs.append({"seed": seed, **result})
            print(f"seed {seed} {precision}: {result}", flush=True)
            if result["outcome"] == "finished" and result["val_acc"] is not None:
                rows[precision].append(100 * result["val_acc"])
    summary = {
        precision: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "runs": v}
        for precision, v in rows.items()
        if v
    }
    if len(rows["32-true"]) == len(rows["bf16-mixed"]) == len(args.seeds):
        differences = [b - a for a, b in zip(rows["32-true"], rows["bf16-mixed"], strict=True)]
        summary["bf16 - fp32"] = {"mean": statistics.mean(differences), "runs": differences}
    return {"runs": runs, "summary": summary}


STABILITY_CASES = [
    # (name, extra fit flags, precisions to try: None is the default chosen on this machine)
    ("batch 2, full fine-tuning", ["--data.batch_size", "2"], [None, "32-true", "bf16-mixed"]),
    ("batch 2, finetune head", ["--data.batch_size", "2", "--model.finetune", "head"], [None, "bf16-mixed"]),
    (
        "batch 2, finetune gradual (unfreeze at epoch 1)",
        ["--data.batch_size", "2", "--model.finetune", "gradual"],
        [None, "bf16-mixed"],
    ),
    ("batch 2, freeze_batchnorm", ["--data.batch_size", "2", "--model.freeze_batchnorm", "true"], [None, "bf16-mixed"]),
    # 72 training images: one batch of 71 and one image, which the loader drops.
    ("batch 71, one image left at the epoch's end", ["--data.batch_size", "71"], [None, "bf16-mixed"]),
]


def stability(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    root = colour_folder(work / "colours")
    results = []
    for name, extra, precisions in STABILITY_CASES:
        for precision in precisions:
            fit_args = [
                *("--model.weights", "null", "--data.dataset", "null", "--data.root", str(root)),
                *("--data.image_size", "32", "--data.num_workers", "0", "--trainer.max_epochs", "2"),
                *extra,
            ]
            label = precision or "default"
            result = fit(fit_args, work / f"stability-{len(results)}", precision)
            results.append({"case": name, "asked": label, **result})
            print(f"{name} [{label}]: {result}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="/usr/share/datasets/fashion-mnist", help="Fashion-MNIST IDX files")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--train_batches", type=int, default=60, help="training batches per epoch")
    parser.add_argument("--val_batches", type=int, default=40, help="validation batches")
    parser.add_argument("--skip", choices=["accuracy", "stability"], action="append", default=[])
    parser.add_argument("--out", type=Path, default=Path("precision.json"))
    args = parser.parse_args()
    report: dict[str, Any] = {"machine": {"cpu": cpu_model(), "native_bf16": cpu_has_native_bf16()}}
    print(f"Machine: {report['machine']}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        if "stability" not in args.skip:
            report["stability"] = stability(args, Path(tmp))
        if "accuracy" not in args.skip:
            report["accuracy"] = accuracy(args, Path(tmp))
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for row in report.get("stability", []):
        acc = f"{100 * row['val_acc']:.1f} %" if row["val_acc"] is not None else "-"
        print(f"| {row['case']} | {row['asked']} -> {row['precision']} | {row['outcome']} | {acc} |")
    for precision, values in report.get("accuracy", {}).get("summary", {}).items():
        spread = f" ± {values['std']:.2f}" if "std" in values else ""
        print(f"| {precision} | {values['mean']:.2f}{spread} | {', '.join(f'{v:.2f}' for v in values['runs'])} |")
    print(f"Written to {args.out}")


if __name__ == "__main__":
    main()
