"""The recipe's questions, measured on real images offline (Fashion-MNIST, the transfer demo's
setting: a backbone pretrained on seven classes, fine-tuned on the other three):

- `strong`: configs/strong.yaml's switches against the seed recipe, and each switch off
  in turn (ablation);
- `balance`: an imbalanced training split, `data.balance` none / sampler / loss, by the
  test set's macro accuracy;
- `tune`: the range test's learning rate against the seed recipe's 0.001;
- `cv`: whether cross-validation's mean ± std brackets the test accuracy of a full fit.

Each fine-tuning run is repeated for every seed of --seeds; mean ± std are printed and
written to --out/recipe.json.

    python scripts/recipe_benchmark.py --root /usr/share/datasets/fashion-mnist --out recipe
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path
from typing import Any

import yaml
from transfer_demo import SOURCE, TARGET, fit_and_test, run_dir, write_folder  # scripts/ is on the path

from tl_project import main
from tl_project.data.named import read_named

# Each of configs/strong.yaml's switches turned off, as flags given after the config (an EMA of
# decay 0 is the current weights).
STRONG_OFF = {
    "schedule": ["--model.schedule", "constant", "--model.warmup_epochs", "0"],
    "label_smoothing": ["--model.label_smoothing", "0"],
    "mix": ["--model.mixup", "0", "--model.cutmix", "0"],
    "ema": ["--trainer.callbacks.decay", "0"],
    "tta": ["--model.tta", "none"],
}


def summary(values: list[float]) -> dict[str, Any]:
    return {
        "mean": statistics.mean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "each": values,
    }


def line(name: str, values: list[float]) -> str:
    s = summary([100 * v for v in values])
    return f"  {name:<28} {s['mean']:6.2f} ± {s['std']:.2f} %  ({', '.join(f'{v:.2f}' for v in s['each'])})"


def test_metric(runs: Path, key: str) -> float:
    with open(run_dir(runs) / "metrics.csv", newline="") as f:
        return float(list(csv.DictReader(f))[-1][key])


def main_benchmark() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--out", type=Path, default=Path("recipe"))
    parser.add_argument("--pretrained", help="a pretraining checkpoint (else pretrained here, as transfer_demo.py)")
    parser.add_argument("--shots", type=int, default=50, help="labelled target images per class")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--parts", nargs="+", default=["strong", "balance", "tune", "cv"])
    parser.add_argument("--imbalance", type=int, nargs=3, default=[200, 40, 10], help="balance: train images per class")
    parser.add_argument("--source", type=int, nargs="+", default=list(SOURCE), help="pretraining class labels")
    parser.add_argument("--target", type=int, nargs="+", default=list(TARGET), help="fine-tuning class labels")
    parser.add_argument("--source_per_class", type=int, default=1200, help="pretraining images per class")
    parser.add_argument("--pretrain_epochs", type=int, default=8)
    parser.add_argument("--test_per_class", type=int, default=300)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--ablation", action="store_true", help="strong: also each switch of strong.yaml off")
    args = parser.parse_args()
    args.backbone, args.image_size, args.min_crop_scale = "resnet18", 32, 0.5

    images, labels = read_named("FashionMNIST", Path(args.root), train=True)
    test_images, test_labels = read_named("FashionMNIST", Path(args.root), train=False)
    target = args.out / "target"
    write_folder(images, labels, args.target, args.shots, target / "train")
    write_folder(test_images, test_labels, args.target, args.test_per_class, target / "test")
    pretrained = args.pretrained
    if pretrained is None:
        source = args.out / "source"
        write_folder(images, labels, args.source, args.source_per_class, source)
        pretrain = argparse.Namespace(**{**vars(args), "epochs": args.pretrain_epochs, "lr": 0.05, "batch_size": 64})
        pretrained = str(fit_and_test("pretrain", source, "null", pretrain)["checkpoint"])
    results: dict[str, Any] = {"setup": {k: str(v) for k, v in vars(args).items()}, "pretrained": pretrained}
    printed: list[str] = []

    def fine_tune(name: str, root: Path, seed: int, *extra: str, key: str = "test/acc") -> float:
        runs = args.out / "runs" / name
        flags = list(extra)
        fit_and_test(name, root, pretrained, argparse.Namespace(**{**vars(args), "extra": flags}), seed)
        return test_metric(runs, key)

    if "strong" in args.parts:
        # The two configs exactly as shipped (each with its own optimizer and learning rate), on
        # the same data, backbone, epochs and batch size.
        variants = {"configs/base.yaml": ("configs/base.yaml", []), "configs/strong.yaml": ("configs/strong.yaml", [])}
        if args.ablation:
            variants |= {f"strong.yaml without {off}": ("configs/strong.yaml", v) for off, v in STRONG_OFF.items()}
        scores = {}
        for i, (name, (config, flags)) in enumerate(variants.items()):
            as_shipped = argparse.Namespace(**{**vars(args), "config": config, "lr": None, "extra": flags})
            scores[name] = []
            for s in args.seeds:
                fit_and_test(f"strong-{i}-seed{s}", target, pretrained, as_shipped, s)
                scores[name].append(test_metric(args.out / "runs" / f"strong-{i}-seed{s}", "test/acc"))
        results["strong"] = {name: summary(values) for name, values in scores.items()}
        printed += [f"Strong recipe vs the seed recipe ({args.shots} images a class, {args.epochs} epochs):"]
        printed += [line(name, values) for name, values in scores.items()]

    if "balance" in args.parts:
        skewed = args.out / "imbalanced"
        for label, count in zip(TARGET, args.imbalance, strict=True):
            write_folder(images, labels, [label], count, skewed / "train", offset=args.shots)
        write_folder(test_images, test_labels, TARGET, 300, skewed / "test")
        scores = {
            mode: [
                fine_tune(f"balance-{mode}-seed{s}", skewed, s, "--data.balance", mode, key="test/acc_macro")
                for s in args.seeds
            ]
            for mode in ("none", "sampler", "loss")
        }
        results["balance"] = {mode: summary(values) for mode, values in scores.items()}
        printed += [f"Imbalanced training split {args.imbalance}, test macro accuracy:"]
        printed += [line(f"data.balance {mode}", values) for mode, values in scores.items()]

    if "tune" in args.parts:
        runs = args.out / "runs" / "tune"
        common = [
            "--data.dataset",
            "null",
            "--data.root",
            str(target),
            "--data.image_size",
            "32",
            "--data.val_split",
            "0.2",
        ]
        common += ["--model.backbone", "resnet18", "--model.weights", pretrained, "--data.batch_size", "16"]
        main(["tune", *common, "--trainer.default_root_dir", str(runs), "--trainer.enable_progress_bar", "false"])
        tuned = yaml.safe_load((run_dir(runs) / "tuned.yaml").read_text())["model"]["optimizer"]["init_args"]["lr"]
        scores = {}
        for name, lr in ((f"tuned lr {tuned:.3g}", tuned), ("seed recipe lr 0.001", 0.001)):
            tuned_args = argparse.Namespace(**{**vars(args), "lr": lr})
            scores[name] = []
            for s in args.seeds:
                fit_and_test(f"lr-{lr}-seed{s}", target, pretrained, tuned_args, s)
                scores[name].append(test_metric(args.out / "runs" / f"lr-{lr}-seed{s}", "test/acc"))
        results["tune"] = {"suggestion": tuned, **{name: summary(values) for name, values in scores.items()}}
        printed += ["Learning rate from tune vs the seed recipe's:"] + [line(n, v) for n, v in scores.items()]

    if "cv" in args.parts:
        runs = args.out / "runs" / "cv"
        common = ["--data.dataset", "null", "--data.root", str(target), "--data.image_size", "32"]
        common += [
            "--model.backbone",
            "resnet18",
            "--model.weights",
            pretrained,
            "--data.batch_size",
            str(args.batch_size),
        ]
        common += ["--model.optimizer.lr", str(args.lr), "--trainer.max_epochs", str(args.epochs)]
        common += ["--data.min_crop_scale", "0.5", "--trainer.enable_progress_bar", "false"]
        main(["cv", *common, "--cv.folds", "5", "--trainer.default_root_dir", str(runs)])
        cv = json.loads(max(runs.glob("cv_*/cv.json")).read_text())
        full = [fine_tune(f"cv-full-seed{s}", target, s) for s in args.seeds]
        results["cv"] = {"val_acc": cv["val_acc"], "full_fit_test_acc": summary(full)}
        low, high = cv["val_acc"]["mean"] - cv["val_acc"]["std"], cv["val_acc"]["mean"] + cv["val_acc"]["std"]
        inside = sum(low <= value <= high for value in full)
        printed += [
            f"Cross-validation (5 folds): validation accuracy {100 * cv['val_acc']['mean']:.2f} ± {100 * cv['val_acc']['std']:.2f} %",
            line("full fit, test accuracy", full),
            f"  {inside} of {len(full)} full-fit test accuracies inside mean ± std",
        ]

    (args.out / "recipe.json").write_text(json.dumps(results, indent=1) + "\n")
    print("\n".join(printed))
    print(f"Results in {args.out / 'recipe.json'}")


if __name__ == "__main__":
    main_benchmark()
