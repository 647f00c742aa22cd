"""Training from LitData shards against training from the image folder they were written from,
on real Fashion-MNIST images: the same fit (ResNet-18 from random initialisation), then
`test`, once from the folder and once from `optimize`'s shards.

    python scripts/shards_vs_folder.py --out shards-check

Defaults: classes 0 1 2 (T-shirt/top, Trouser, Pullover), 60 / 20 / 30 images a class for
train / val / test, 32 px, lr 0.01, 6 epochs, batch 32, --data.min_crop_scale 0.5, seed 42.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/ is importable from the repository root

from tests.outcome_task import FASHION_MNIST, write_class_images
from tl_project import main
from tl_project.data.named import NAMED_DATASETS, read_named


def newest(runs: Path) -> Path:
    return max(runs.glob("version_*"), key=lambda p: int(p.name.split("_")[1]))


def main_check() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("shards-check"))
    parser.add_argument("--classes", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sizes", type=int, nargs=3, default=[60, 20, 30], help="train, val, test images a class")
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()
    images, labels = read_named("FashionMNIST", FASHION_MNIST, train=True)
    test_images, test_labels = read_named("FashionMNIST", FASHION_MNIST, train=False)
    folder = args.out / "images"
    train, val, test = args.sizes
    for label in args.classes:
        name = NAMED_DATASETS["FashionMNIST"][label].replace("/", "-")
        pool = (labels == label).nonzero().flatten().tolist()
        write_class_images(images, pool[:train], folder / "train" / name)
        write_class_images(images, pool[train : train + val], folder / "val" / name)
        write_class_images(
            test_images, (test_labels == label).nonzero().flatten().tolist()[:test], folder / "test" / name
        )
    main(["optimize", "--data.root", str(folder), "--output", str(args.out / "shards")])
    common = ["--model.backbone", "resnet18", "--model.weights", "null", "--data.image_size", "32"]
    common += ["--model.optimizer.lr", "0.01", "--trainer.max_epochs", str(args.epochs), "--data.min_crop_scale", "0.5"]
    common += ["--seed_everything", "42", "--trainer.enable_progress_bar", "false"]
    results = {}
    for source, flags in (("folder", ["null", str(folder)]), ("shards", ["litdata", str(args.out / "shards")])):
        runs = args.out / "runs" / source
        main(
            [
                "fit",
                *common,
                "--data.dataset",
                flags[0],
                "--data.root",
                flags[1],
                "--trainer.default_root_dir",
                str(runs),
            ]
        )
        main(
            [
                "test",
                "--ckpt_path",
                "best",
                "--trainer.default_root_dir",
                str(runs),
                "--trainer.enable_progress_bar",
                "false",
            ]
        )
        with open(newest(runs) / "metrics.csv", newline="") as f:
            results[source] = 100 * float(list(csv.DictReader(f))[-1]["test/acc"])
    print(", ".join(f"{source}: test accuracy {value:.2f} %" for source, value in results.items()))


if __name__ == "__main__":
    main_check()
