"""`python -m tl_project cv --config X --cv.folds 5`: k-fold cross-validation with fit's options.

The training and validation images together are split into `--cv.folds` stratified folds,
deterministic from `data.seed` (`data.folds` / `data.fold`, see `ImageDataModule`); the
test set is never touched. Fold i trains on the others and validates on fold i, as an
ordinary `fit` (LightningCLI, the same options, DDP included) in
`runs/cv_N/fold_i/version_0/`. Each fold is scored by its final model's validation
accuracy (and, with `--cv.test true`, that model's test accuracy): the best epoch would be
chosen on the very images it is scored on, an estimate optimistic by construction. The
scores go into `runs/cv_N/cv.json` and a printed summary: per fold, then mean ± standard
deviation. `--cv.folds` and `--cv.test` are options of the parser like fit's: in `--help`, in
a config's `cv:` section, and from the environment (`TL_PROJECT_CV__CV__FOLDS=3`).

Each fold's final model also predicts the fold's validation images, which it did not train
on: `out_of_fold.csv`, and from it the label issues (`tl_project.labels`,
`--cv.label_issues`).
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser

from tl_project.errors import UserError
from tl_project.labels import OutOfFold, fold_predictions, require_cleanlab, write_label_issues, write_out_of_fold
from tl_project.launch import launched
from tl_project.lightning_cli import TransferLearningCLI, parser_settings
from tl_project.runtime import say

# Where the processes of a DDP run find the cv folder rank zero chose (they start later).
CV_DIR_ENV = "TL_PROJECT_CV_DIR"


def cv_folder(root: Path) -> Path:
    """A new `root/cv_N`, or the one rank zero chose (in a DDP process it started)."""
    if os.environ.get(CV_DIR_ENV) and os.environ.get("LOCAL_RANK", "0") != "0":  # a process DDP started
        return Path(os.environ[CV_DIR_ENV])
    root.mkdir(parents=True, exist_ok=True)
    taken = {int(p.name[3:]) for p in root.glob("cv_*") if p.name[3:].isdigit()}
    folder = root / f"cv_{max(taken, default=-1) + 1}"
    folder.mkdir()
    os.environ[CV_DIR_ENV] = str(folder)  # inherited by the processes DDP starts
    return folder


class CrossValidationCLI(TransferLearningCLI):
    """`fit`'s options plus `--cv.folds` and `--cv.test`. It only parses: every fold builds its own
    model, data and Trainer (`fit_folds`)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument(
            "--cv.folds", type=int, default=5, help="Folds: each validates once while the others train."
        )
        parser.add_argument("--cv.test", type=bool, default=False, help="Also test each fold's final model.")
        parser.add_argument(
            "--cv.label_issues",
            type=bool,
            default=True,
            help="Rank suspect labels from the out-of-fold predictions (cleanlab): label_issues.csv and .png.",
        )

    def instantiate_classes(self) -> None:
        """Nothing to build here: each fold is a fit of its own."""


def run_cv(config: Namespace) -> None:
    """Fit every fold of the parsed `config`, then summarise; the out-of-fold predictions and
    the label issues they show go beside the summary."""
    folds, test = config.cv.folds, config.cv.test
    if folds < 2:
        raise UserError(f"--cv.folds is {folds}; it must be an integer of at least 2.")
    if config.cv.label_issues:
        require_cleanlab()  # before any fold trains
    folder = cv_folder(Path(config.trainer.default_root_dir or "runs"))
    try:
        results, oof = fit_folds(config, folds, test, folder)
    finally:
        os.environ.pop(CV_DIR_ENV, None)
    if oof is None:  # not rank zero
        return
    summary = summarise(results)
    write_out_of_fold(oof, folder / "out_of_fold.csv")
    summary["out_of_fold"] = oof.accuracy()
    if config.cv.label_issues:
        summary["label_issues"] = write_label_issues(oof, folder)
    (folder / "cv.json").write_text(json.dumps({"folds": results, **summary}, indent=1) + "\n")
    say(format_summary(results, summary) + f"\nWritten to {folder / 'cv.json'} and {folder / 'out_of_fold.csv'}")


def fit_folds(config: Namespace, folds: int, test: bool, folder: Path) -> tuple[list[dict[str, Any]], OutOfFold | None]:
    """Fit (and test) every fold, and predict its validation images with its final model; the
    results per fold and the out-of-fold predictions, on rank zero (None elsewhere)."""
    results: list[dict[str, Any]] = []
    oof: OutOfFold | None = None
    for fold in range(folds):
        fold_config = config.clone()
        for key in ("cv", "config", "__path__"):
            fold_config.pop(key, None)
        fold_config.data.folds, fold_config.data.fold = folds, fold
        fold_config.trainer.default_root_dir = str(folder / f"fold_{fold}")
        say(f"Cross-validation fold {fold + 1} of {folds}")
        # The options are parsed (the environment included): the folds take them as they are.
        cli = TransferLearningCLI(args={"fit": fold_config}, parser_kwargs={"default_env": False})
        trainer = cli.trainer
        # The final model, whose choice did not look at this fold (the best epoch's would).
        score = trainer.callback_metrics["val/acc"]
        row: dict[str, Any] = {"fold": fold, "run": str(trainer.log_dir), "val_acc": float(score)}
        rows = fold_predictions(cli.model, cli.datamodule, trainer)  # before test loads last.ckpt
        if rows is not None:
            oof = oof or OutOfFold(list(cli.datamodule.class_names), cli.datamodule.multi_label)
            thresholds = cli.model.thresholds.tolist() if cli.model.multi_label else None
            oof.add(cli.datamodule.datasets["val"], rows, thresholds)
        if test:
            trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="last", weights_only=True)
            row["test_acc"] = float(trainer.callback_metrics["test/acc"])
        results.append(row)
    return results, oof


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation (n - 1) of each metric over the folds."""
    summary = {}
    for key in ("val_acc", "test_acc"):
        values = [row[key] for row in results if key in row]
        if values:
            summary[key] = {"mean": statistics.mean(values), "std": statistics.stdev(values)}
    return summary


def format_summary(results: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    lines = [f"Cross-validation, {len(results)} folds:"]
    for row in results:
        test = f", test accuracy {100 * row['test_acc']:.2f} %" if "test_acc" in row else ""
        lines.append(f"  fold {row['fold']}: validation accuracy {100 * row['val_acc']:.2f} %{test}  ({row['run']})")
    for key, name in (("val_acc", "validation"), ("test_acc", "test")):
        if key in summary:
            mean, std = 100 * summary[key]["mean"], 100 * summary[key]["std"]
            lines.append(f"Mean {name} accuracy: {mean:.2f} ± {std:.2f} %")
    if "out_of_fold" in summary:
        oof = summary["out_of_fold"]
        per_class = ", ".join(f"{k} {100 * v:.1f}" for k, v in oof["per_class"].items() if v is not None)
        lines.append(f"Out-of-fold accuracy: {100 * oof['accuracy']:.2f} % of {oof['images']} images ({per_class})")
    return "\n".join(lines)


def run(command: str, args: list[str], description: str, from_sys_argv: bool) -> None:
    """`cv`: k-fold cross-validation with fit's options (DDP re-launches the whole loop)."""
    with launched(command, args, from_sys_argv) as args:
        cli = CrossValidationCLI(args=args, run=False, parser_kwargs=parser_settings(command, description))
        run_cv(cli.config)
