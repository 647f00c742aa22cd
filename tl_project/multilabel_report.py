"""The test report of a multi-label model, written after every `test` into `<run>/report/`:

- `metrics.json`: mean average precision, exact-match accuracy, micro and macro F1, and per
  class its AP, precision, recall, threshold and support;
- `pr_curves.png`: each class's precision-recall curve, its threshold marked;
- `reliability.png`: every (image, class) probability against how often the class is
  there, before and after the per-class temperatures (the calibration error of both in
  metrics.json);
- `worst.png` and `worst.csv`: the test images whose predicted sets are furthest from the
  true ones (by binary cross-entropy), with both sets.

`MultiLabelReport`, the callback `test` adds for a multi-label model, collects the test
probabilities (from every process under DDP) and writes these at the end.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import matplotlib.pyplot as plt
import torch
from lightning.pytorch.callbacks import Callback
from torchmetrics.functional.classification import multilabel_precision_recall_curve

from tl_project.calibration import calibration_error, describe_temperature
from tl_project.figures import plot_image_grid, plot_reliability
from tl_project.multilabel import Collected, predicted_sets
from tl_project.report import MOST_WRONG
from tl_project.runtime import gather_objects, say


def names_of(classes: Sequence[int], class_names: Sequence[str]) -> str:
    return " ".join(class_names[c] for c in classes) or "(none)"


def plot_pr_curves(
    probabilities: torch.Tensor, targets: torch.Tensor, thresholds: torch.Tensor, names: Sequence[str], path: Path
) -> None:
    """One precision-recall curve per class, with the point of its threshold."""
    precision, recall, cuts = multilabel_precision_recall_curve(probabilities, targets, len(names))
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    for c, name in enumerate(names):
        (line,) = ax.plot(recall[c].numpy(), precision[c].numpy(), label=name)
        at = int((cuts[c] < thresholds[c]).sum()) if len(cuts[c]) else 0
        ax.plot(recall[c][at].item(), precision[c][at].item(), "o", color=line.get_color())
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.02))
    ax.set_title("Precision-recall per class (dots: the chosen thresholds)")
    ax.legend(fontsize=8, loc="lower left")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


class MultiLabelReport(Callback):
    """Collects the test probabilities, then writes the multi-label report (see the module's text)."""

    def __init__(self) -> None:
        self.collected = Collected()
        self.indices: list[int] = []

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.collected = Collected().to(pl_module.device)
        self.indices = []

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if outputs is None:  # a batch whose images all failed to load
            return
        self.collected.update(outputs["logits"].float().sigmoid(), outputs["labels"])
        self.indices += outputs["indices"].tolist()

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Collective calls, on every process: synchronised across processes, in rank order.
        probabilities, targets = self.collected.compute()
        model: Any = pl_module
        per_class = {name: value.cpu() for name, value in model.test_per_class.compute().items()}
        indices = [i for part in gather_objects(self.indices) for i in part]
        run_dir = trainer.log_dir or trainer.default_root_dir  # a collective call: every rank asks
        if trainer.is_global_zero:
            datamodule: Any = trainer.datamodule  # type: ignore[attr-defined]
            thresholds: Any = pl_module.thresholds
            folder = Path(run_dir) / "report"
            tested = (probabilities.cpu(), targets.cpu(), indices, per_class)
            write(folder, tested, thresholds.cpu(), pl_module, datamodule)
            say(f"Test report written to {folder}")
        trainer.strategy.barrier("test report written")


def write(
    folder: Path,
    tested: tuple[torch.Tensor, torch.Tensor, list[int], dict[str, torch.Tensor]],
    thresholds: torch.Tensor,
    model: Any,
    datamodule: Any,
) -> None:
    """The report's files (see the module's text) from what was tested: the probabilities, the
    targets, their dataset indices and the per-class metrics."""
    probabilities, targets, indices, per_class = tested
    folder.mkdir(parents=True, exist_ok=True)
    names: list[str] = model.class_names
    logged = {
        k.removeprefix("test/"): float(v) for k, v in model.trainer.callback_metrics.items() if k.startswith("test/")
    }
    metrics = {
        "num_images": len(targets),
        "mean_average_precision": logged.get("map"),
        "exact_match_accuracy": logged.get("acc"),
        "f1_micro": logged.get("f1_micro"),
        "f1_macro": logged.get("f1_macro"),
        "loss": logged.get("loss"),
        "per_class": {
            name: {
                "average_precision": float(per_class["ap"][c]),
                "precision": float(per_class["precision"][c]),
                "recall": float(per_class["recall"][c]),
                "threshold": float(thresholds[c]),
                "support": int(targets[:, c].sum()),
            }
            for c, name in enumerate(names)
        },
        "classes": names,
    }
    temperature = model.temperature.cpu()
    raw = torch.sigmoid(torch.logit(probabilities, eps=1e-7) * temperature).flatten()
    present = targets.flatten().bool()
    metrics["expected_calibration_error"] = calibration_error(probabilities.flatten(), present)
    metrics["expected_calibration_error_uncalibrated"] = calibration_error(raw, present)
    metrics["temperature"] = temperature.tolist()
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    what = "a class's probability (every image and class)"
    described = describe_temperature(temperature)
    plot_reliability(raw, probabilities.flatten(), present, described, folder / "reliability.png", what)
    plot_pr_curves(probabilities, targets, thresholds, names, folder / "pr_curves.png")

    chosen = predicted_sets(probabilities, thresholds)
    loss = torch.nn.functional.binary_cross_entropy(
        probabilities.clamp(1e-6, 1 - 1e-6), targets.float(), reduction="none"
    )
    worst = loss.sum(dim=1).argsort(descending=True)[:MOST_WRONG].tolist()
    dataset = datamodule.datasets["test"]
    rows = []
    for i in worst:
        true = targets[i].nonzero().flatten().tolist()
        rows.append((indices[i], names_of(true, names), names_of(chosen[i], names), float(loss[i].sum())))
    with open(folder / "worst.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "true", "predicted", "loss"])
        writer.writerows(
            [(dataset.describe(index), true, predicted, f"{value:.4f}") for index, true, predicted, value in rows]
        )
    items = [(dataset.load(index)[0], f"true: {true}\npredicted: {predicted}") for index, true, predicted, _ in rows]
    plot_image_grid(items, "Test images with the most wrong labels", "No test images", folder / "worst.png")
