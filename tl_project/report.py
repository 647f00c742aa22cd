"""The test report: numbers, pictures and a model card, written after every `test`.

`write_report(folder, ...)` writes into `folder`:

- `metrics.json`: top-1 / top-5 / macro accuracy, loss, the expected calibration error
  before and after the temperature, the answer threshold's coverage and accuracy,
  per-class precision, recall, F1 and support, the confusion matrix;
- `confusion_matrix.png`: counts and row-normalised, drawn by torchmetrics' `plot()`;
- `reliability.png`: the reliability diagram, uncalibrated and calibrated;
- `risk_coverage.png`: the accuracy of the answered images against the share answered;
- `misclassified.png` and `misclassified.csv`: the most confidently wrong test images, with
  the class-activation map of the predicted class where captum is installed;
- `curves.png`: loss and accuracy per epoch of the training run, from its `metrics.csv`;
- `report.md`: all of it together, with the data, the recipe and the commands.

`TestReport`, a callback that `test` adds, collects what these need while the test runs
and writes them at its end.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from tl_project.calibration import Selective, calibration_error
from tl_project.checkpoints import read_checkpoint
from tl_project.errors import UserError
from tl_project.explain import ClassActivationMaps, in_original, overlay
from tl_project.figures import (
    plot_confusion_matrix,
    plot_curves,
    plot_misclassified,
    plot_reliability,
    plot_risk_coverage,
)
from tl_project.runtime import gather_objects, say
from tl_project.transforms import Preprocessing, normalize

# How many of the most confidently wrong test images the report keeps.
MOST_WRONG = 16


def report_metrics(num_classes: int) -> MetricCollection:
    """Per-class precision, recall and F1, the confusion matrix."""
    return MetricCollection(
        {
            "precision": MulticlassPrecision(num_classes, average=None),
            "recall": MulticlassRecall(num_classes, average=None),
            "f1": MulticlassF1Score(num_classes, average=None),
            "confusion_matrix": MulticlassConfusionMatrix(num_classes),
        }
    )


def _as_list(value: Any) -> Any:
    return value.tolist() if isinstance(value, torch.Tensor) else value


def build_metrics(
    results: Mapping[str, Any], logged: Mapping[str, float], class_names: Sequence[str]
) -> dict[str, Any]:
    """The content of metrics.json from the model's test results and the logged test metrics."""
    confusion = results["confusion_matrix"]
    support = confusion.sum(dim=1)
    per_class = {
        name: {
            "precision": float(results["precision"][i]),
            "recall": float(results["recall"][i]),
            "f1": float(results["f1"][i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(class_names)
    }
    overall = {key.removeprefix("test/"): float(value) for key, value in logged.items() if key.startswith("test/")}
    confidence, raw_confidence, correct = results["confidence"], results["raw_confidence"], results["correct"]
    selective = Selective.at(results["min_probability"], confidence, correct)
    return {
        "num_images": int(support.sum()),
        **overall,
        "expected_calibration_error": calibration_error(confidence, correct),
        "expected_calibration_error_uncalibrated": calibration_error(raw_confidence, correct),
        "temperature": float(results["temperature"]),
        "answers": {
            "min_probability": selective.threshold,
            "coverage": selective.coverage,
            "accuracy_answered": selective.accuracy if selective.answered else None,
            "answered": selective.answered,
        },
        "per_class": per_class,
        "classes": list(class_names),
        "confusion_matrix": _as_list(confusion),
    }


def read_epoch_curves(metrics_csv: Path) -> dict[str, dict[int, float]]:
    """Per-epoch values of train/val loss and accuracy from a CSVLogger metrics.csv."""
    curves: dict[str, dict[int, float]] = {k: {} for k in ("train/loss", "val/loss", "train/acc", "val/acc")}
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            for key, values in curves.items():
                if row.get(key) and row.get("epoch"):
                    values[int(float(row["epoch"]))] = float(row[key])
    return curves


def write_report(
    folder: Path,
    results: Mapping[str, Any],
    logged: Mapping[str, float],
    class_names: Sequence[str],
    dataset: Any,
    context: Mapping[str, Any],
    maps: Any = None,
) -> Path:
    """Write every report file into `folder`; returns the path of report.md. `maps`: see
    `plot_misclassified`."""
    folder.mkdir(parents=True, exist_ok=True)
    metrics = build_metrics(results, logged, class_names)
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    plot_confusion_matrix(results["confusion_matrix"], class_names, folder / "confusion_matrix.png")
    plot_reliability(
        results["raw_confidence"],
        results["confidence"],
        results["correct"],
        f"{float(results['temperature']):.2f}",
        folder / "reliability.png",
        "top-class probability",
    )
    plot_risk_coverage(results, folder / "risk_coverage.png")

    wrong = results["most_confident_wrong"]
    plot_misclassified(wrong, dataset, class_names, folder / "misclassified.png", maps)
    with open(folder / "misclassified.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "true", "predicted", "confidence"])
        for confidence, index, target, predicted in wrong:
            writer.writerow([dataset.describe(index), class_names[target], class_names[predicted], f"{confidence:.4f}"])

    training_metrics = context.get("training_metrics")
    has_curves = training_metrics is not None and Path(training_metrics).is_file()
    if training_metrics is not None and has_curves:
        plot_curves(read_epoch_curves(Path(training_metrics)), folder / "curves.png")

    path = folder / "report.md"
    path.write_text(_model_card(metrics, context, has_curves))
    return path


def _no_curves(training_metrics: Path | None) -> list[str]:
    """Why the card has no training curves, when the checkpoint came from a run without a metrics.csv."""
    if training_metrics is None:
        return []
    return [
        f"No training curves: the training run has no `{training_metrics}` (curves.png is drawn from the "
        "CSV logger's file; a run that logged only elsewhere, e.g. to TensorBoard, shows its curves there).",
        "",
    ]


def _answers_row(answers: Mapping[str, Any]) -> list[str]:
    """The answer threshold's row of the results table, where the model has one."""
    if not answers["min_probability"]:
        return []
    accuracy = answers["accuracy_answered"]
    right = "none answered" if accuracy is None else f"{100 * accuracy:.2f} % right"
    return [
        f"| answered at probability >= {answers['min_probability']:.3f} | "
        f"{100 * answers['coverage']:.2f} % of the images, {right} |"
    ]


def _model_card(metrics: Mapping[str, Any], context: Mapping[str, Any], has_curves: bool) -> str:
    model, data = context.get("model", {}), context.get("data", {})
    source = data.get("dataset") or f"image folder {data.get('root')}"
    names = {"acc": "top-1 accuracy", "acc_top5": "top-5 accuracy", "acc_macro": "macro accuracy"}
    percent = {names[k]: 100 * metrics[k] for k in names if k in metrics}
    lines = [
        "# Test report",
        "",
        f"Checkpoint: `{context.get('ckpt_path')}`",
        "",
        "## Data",
        "",
        f"- Source: {source} (root `{data.get('root')}`), {metrics['num_images']} test images, "
        f"{data.get('image_size')} px",
        f"- Classes ({len(metrics['classes'])}): {', '.join(metrics['classes'])}",
        "",
        "## Model and recipe",
        "",
        f"- Backbone: {model.get('backbone')}, initial weights: {model.get('weights')}, "
        f"fine-tuning: {model.get('finetune')}",
        f"- Optimizer: {context.get('optimizer', 'see the training run config.yaml')}",
        f"- Preprocessing: {describe_preprocessing(model.get('preprocessing'), data.get('image_size'))}",
        "",
        "## Results",
        "",
        "| metric | value |",
        "| --- | --- |",
        *(f"| {name} | {value:.2f} % |" for name, value in percent.items()),
        f"| test loss | {metrics.get('loss', float('nan')):.4f} |",
        f"| expected calibration error | {metrics['expected_calibration_error']:.4f} "
        f"(uncalibrated {metrics['expected_calibration_error_uncalibrated']:.4f}, "
        f"temperature {metrics['temperature']:.3f}) |",
        *_answers_row(metrics["answers"]),
        "",
        "| class | precision | recall | F1 | support |",
        "| --- | --- | --- | --- | --- |",
        *(
            f"| {name} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} |"
            for name, m in metrics["per_class"].items()
        ),
        "",
        "![confusion matrix](confusion_matrix.png)",
        "",
        "![reliability diagram](reliability.png)",
        "",
        "![risk-coverage curve](risk_coverage.png)",
        "",
        "![most confidently wrong](misclassified.png) (paths in `misclassified.csv`)",
        "",
        *([f"No class-activation maps over them: {context['no_maps']}", ""] if context.get("no_maps") else []),
        *(["![training curves](curves.png)", ""] if has_curves else _no_curves(context.get("training_metrics"))),
        "## Reproduce",
        "",
        "```",
        f"python -m tl_project test --ckpt_path {context.get('ckpt_path')}",
        *(
            [f"python -m tl_project fit --config {context['training_config']}"]
            if context.get("training_config")
            else []
        ),
        "```",
        "",
    ]
    return "\n".join(lines)


class TestReport(Callback):
    """Collects what the report needs during `test`, then writes it into `<run>/report/` and says where.

    From each test batch (what `test_step` returns: logits, labels, dataset indices) it
    updates per-class precision, recall and F1, the confusion matrix and the calibration
    error, and keeps the most confidently wrong images; under DDP the metrics are
    synchronised and the wrong images gathered from every process before rank 0 writes.
    """

    def __init__(self) -> None:
        self.metrics: MetricCollection | None = None
        self.wrong: list[tuple[float, int, int, int]] = []  # (confidence, index, target, prediction)
        # Per test image: top-class probability calibrated and not, and whether the top class is right.
        self.answers: list[torch.Tensor] = []
        self.results: dict[str, Any] = {}

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        classes = len(pl_module.class_names)  # type: ignore[arg-type]
        self.metrics = report_metrics(classes).to(pl_module.device)
        self.wrong, self.answers = [], []

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        assert self.metrics is not None
        if outputs is None:  # a batch whose images all failed to load
            return
        logits, labels, indices = outputs["logits"], outputs["labels"], outputs["indices"]
        self.metrics.update(logits, labels)
        confidence, predicted = logits.float().softmax(dim=1).max(dim=1)
        temperature: Any = pl_module.temperature
        raw = (logits.float() * temperature.to(logits.device)).softmax(dim=1).amax(dim=1)
        self.answers.append(torch.stack([confidence, raw, (predicted == labels).float()], dim=1).cpu())
        wrong = predicted != labels
        rows = zip(
            confidence[wrong].tolist(),
            indices[wrong].tolist(),
            labels[wrong].tolist(),
            predicted[wrong].tolist(),
            strict=True,
        )
        self.wrong = sorted([*self.wrong, *rows], reverse=True)[:MOST_WRONG]

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert self.metrics is not None
        self.results = {name: value.cpu() for name, value in self.metrics.compute().items()}  # synchronised
        wrong = [row for part in gather_objects(self.wrong) for row in part]
        self.results["most_confident_wrong"] = sorted(wrong, reverse=True)[:MOST_WRONG]
        answers = torch.cat([part for parts in gather_objects(self.answers) for part in parts] or [torch.empty(0, 3)])
        self.results["confidence"], self.results["raw_confidence"] = answers[:, 0], answers[:, 1]
        self.results["correct"] = answers[:, 2].bool()
        saved: Any = pl_module  # the model's calibration buffers
        self.results["temperature"] = float(saved.temperature.flatten()[0])
        self.results["min_probability"] = float(saved.min_probability)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        run_dir = trainer.log_dir or trainer.default_root_dir  # a collective call: every rank asks
        if trainer.is_global_zero:
            self._write(trainer, pl_module, Path(run_dir))
        trainer.strategy.barrier("test report written")  # every rank leaves together

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule, run_dir: Path) -> None:
        datamodule: Any = trainer.datamodule  # type: ignore[attr-defined]
        context: dict[str, Any] = {
            "ckpt_path": trainer.ckpt_path,
            "model": dict(pl_module.hparams),
            "data": dict(datamodule.hparams),
        }
        if trainer.ckpt_path:  # the training run: runs/version_N/checkpoints/X.ckpt
            # As trained (this run builds the model with weights=None and loads the checkpoint).
            context["model"] = read_checkpoint(trainer.ckpt_path)["hyper_parameters"]
            training_run = Path(trainer.ckpt_path).resolve().parents[1]
            context["training_metrics"] = training_run / "metrics.csv"
            if (training_run / "config.yaml").is_file():
                context["training_config"] = training_run / "config.yaml"
                context["optimizer"] = describe_optimizer(training_run / "config.yaml")
        logged = {key: float(value) for key, value in trainer.callback_metrics.items()}
        dataset = datamodule.datasets["test"]
        maps = None
        try:
            maps = map_drawer(pl_module, dataset, int(datamodule.image_size))
        except UserError as error:
            context["no_maps"] = str(error)
        path = write_report(
            run_dir / "report",
            self.results,
            logged,
            pl_module.class_names,  # type: ignore[arg-type]
            dataset,
            context,
            maps,
        )
        say(f"Test report written to {path}")


def map_drawer(model: Any, dataset: Any, image_size: int) -> Any:
    """`maps(indices, classes, images)`: the dataset's original `images` with the class-activation
    map of `classes` drawn over them (`explain.py`); a UserError says why there can be none."""
    grad_cam = ClassActivationMaps(model, image_size)

    def maps(indices: Sequence[int], classes: Sequence[int], images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        inputs = torch.stack([dataset.item(index)[0] for index in indices]).to(model.device)
        cams = grad_cam(normalize(inputs, model.preprocessing), torch.tensor(classes))
        drawn = []
        for image, cam in zip(images, cams, strict=True):
            full = in_original(cam, image.shape[1], image.shape[2], model.preprocessing)
            drawn.append(torch.from_numpy(np.array(overlay(image, full))).permute(2, 0, 1))
        return drawn

    return maps


def describe_preprocessing(preprocessing: Mapping[str, Any] | None, image_size: int | None) -> str:
    """`resize 232, center crop 224, bilinear, mean [...], std [...]` from the saved preprocessing."""
    if not preprocessing or not image_size:
        return "not recorded (a checkpoint from before preprocessing was saved)"
    steps = Preprocessing.from_dict(dict(preprocessing))
    return (
        f"resize {steps.resize_size(int(image_size))}, center crop {image_size}, {steps.interpolation}, "
        f"mean {[round(m, 3) for m in steps.mean]}, std {[round(s, 3) for s in steps.std]}"
    )


def describe_optimizer(config_yaml: Path) -> str:
    """`SGD(lr=0.001, momentum=0.9)` from a run's config.yaml."""
    optimizer = (yaml.safe_load(config_yaml.read_text()).get("model") or {}).get("optimizer") or {}
    name = str(optimizer.get("class_path", "?")).rsplit(".", 1)[-1]
    shown = ("lr", "momentum", "weight_decay", "betas", "nesterov")
    args = optimizer.get("init_args") or {}
    return f"{name}(" + ", ".join(f"{k}={args[k]}" for k in shown if args.get(k) not in (None, 0, 0.0, False)) + ")"
