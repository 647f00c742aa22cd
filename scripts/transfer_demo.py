"""Transfer learning on real images, offline: does a transferred backbone beat training from scratch?

1. Pretrain a backbone from random initialisation on seven classes (T-shirt/top,
   Trouser, Pullover, Dress, Sandal, Bag, Ankle boot). Seven, not five: features
   learned from five classes did not transfer (docs/benchmarks.md).
2. Fine-tune on the other three (Coat, Shirt, Sneaker) with only `--shots` labelled
   images per class, once from scratch and once from the pretrained checkpoint
   (`--model.weights pretrain.ckpt`: its backbone, a new head), with the same recipe,
   for each of `--seeds`.
3. Test both on held-out images of the five target classes and print the accuracies.

    python scripts/transfer_demo.py --root /usr/share/datasets/fashion-mnist

The images come from the four IDX files (Debian's dataset-fashion-mnist, or a
torchvision download); the script writes them as PNG folders under --out and drives
`python -m tl_project` in-process.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import torch
from PIL import Image

from tl_project import main
from tl_project.data.named import NAMED_DATASETS, read_named

# Each target class has relatives among the sources: Coat and Shirt (Pullover, T-shirt/top,
# Dress), Sneaker (Sandal, Ankle boot).
SOURCE, TARGET = (0, 1, 2, 3, 5, 8, 9), (4, 6, 7)


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
    parser.add_argument("--source", type=int, nargs="+", default=list(SOURCE), help="pretraining class labels")
    parser.add_argument("--target", type=int, nargs="+", default=list(TARGET), help="fine-tuning class labels")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--source_per_class", type=int, default=1200, help="pretraining images per class")
    parser.add_argument("--pretrain_epochs", type=int, default=8)
    parser.add_argument("--shots", type=int, default=10, help="labelled target images per class")
    parser.add_argument("--test_per_class", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=30, help="fine-tuning epochs")
    parser.add_argument("--lr", type=float, default=0.01, help="fine-tuning learning rate")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="one fine-tuning pair per seed")
    parser.add_argument("--min_crop_scale", type=float, default=0.5, help="28 px items fill the frame: mild crops")
    args = parser.parse_args()

    images, labels = read_named("FashionMNIST", Path(args.root), train=True)
    test_images, test_labels = read_named("FashionMNIST", Path(args.root), train=False)
    source, target = args.out / "source", args.out / "target"
    write_folder(images, labels, args.source, args.source_per_class, source)
    write_folder(images, labels, args.target, args.shots, target / "train")
    write_folder(test_images, test_labels, args.target, args.test_per_class, target / "test")

    pretrain = argparse.Namespace(**{**vars(args), "epochs": args.pretrain_epochs, "lr": 0.05, "batch_size": 64})
    source_result = fit_and_test("pretrain", source, "null", pretrain)
    runs: dict[str, list[dict[str, float]]] = {"scratch": [], "transfer": []}
    for seed in args.seeds:
        runs["scratch"].append(fit_and_test(f"scratch-seed{seed}", target, "null", args, seed))
        runs["transfer"].append(fit_and_test(f"transfer-seed{seed}", target, source_result["checkpoint"], args, seed))  # type: ignore[arg-type]
    accuracy = {name: [run["test_accuracy"] for run in results] for name, results in runs.items()}

    results = {
        "setup": {k: str(v) for k, v in vars(args).items()},
        "pretrain_source_test_accuracy": source_result["test_accuracy"],
        "target_from_scratch": accuracy["scratch"],
        "target_from_pretrained": accuracy["transfer"],
        "seconds": {
            "pretrain": source_result["seconds"],
            "scratch": sum(run["seconds"] for run in runs["scratch"]),
            "transfer": sum(run["seconds"] for run in runs["transfer"]),
        },
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nSource classes, pretrained from scratch: test accuracy {100 * source_result['test_accuracy']:.2f} %")
    for name, label in (("scratch", "from scratch:   "), ("transfer", "from pretrained:")):
        values = torch.tensor(accuracy[name]) * 100
        spread = f" ± {values.std().item():.2f}" if len(values) > 1 else ""
        each = ", ".join(f"{v:.2f}" for v in values.tolist())
        print(
            f"Target classes, {args.shots} images a class, {label} {values.mean().item():.2f}{spread} % (seeds {args.seeds}: {each})"
        )
    print(f"Results in {args.out / 'results.json'}")


if __name__ == "__main__":
    main_demo()
