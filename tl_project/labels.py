"""Wrong labels: out-of-fold predictions from `cv`, ranked label issues with cleanlab.

Every training-and-validation image is validated by exactly one fold, whose model did not
train on it: its predicted probabilities there are out-of-sample. `cv` collects them
(`fold_predictions`) and writes, in `runs/cv_N/`:

- `out_of_fold.csv`: path, given label, predicted label, the probability of every class;
- `label_issues.csv`: the images confident learning flags (cleanlab's
  `find_label_issues`), most suspect first, with `path, given, suggested, quality`
  (cleanlab's label quality score: low is suspect);
- `label_issues.png`: a grid of the top suspects, each with its given and suggested class.

`--data.exclude label_issues.csv` then leaves them out of the next fit (`data/exclude.py`).

Multi-label: the probabilities are each class's sigmoid, a label is a set (given and
suggested sets are written joined by spaces), the suggested set is the classes at or above
the fold model's thresholds, and the issues come from cleanlab's multi-label functions
(`cleanlab.multilabel_classification`).
"""

from __future__ import annotations

import csv
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tl_project.data.module import device_batches
from tl_project.errors import UserError
from tl_project.figures import plot_image_grid
from tl_project.runtime import gather_objects, say, warn

GRID_IMAGES = 16


@dataclass
class OutOfFold:
    """The out-of-fold predictions of all folds so far (on rank zero)."""

    class_names: list[str]
    multi_label: bool = False
    names: list[str] = field(default_factory=list)
    labels: list[Any] = field(default_factory=list)  # a class index; multi-label: the sorted class indices
    probabilities: list[list[float]] = field(default_factory=list)
    # Multi-label: the classes at or above the fold model's thresholds.
    chosen: list[list[int]] = field(default_factory=list)
    # Where each image can be loaded again, for the grid: (dataset, index).
    sources: list[tuple[Any, int]] = field(default_factory=list)

    def add(self, dataset: Any, rows: dict[int, list[float]], thresholds: list[float] | None = None) -> None:
        for index in sorted(rows):
            self.names.append(dataset.describe(index))
            target = dataset.target(index)
            self.labels.append(target.nonzero().flatten().tolist() if self.multi_label else target)
            self.probabilities.append(rows[index])
            self.sources.append((dataset, index))
            if thresholds is not None:
                self.chosen.append([c for c, (p, t) in enumerate(zip(rows[index], thresholds, strict=True)) if p >= t])

    def accuracy(self) -> dict[str, Any]:
        """Out-of-fold accuracy, overall and per class (multi-label: exact match overall, and per
        class the share of images whose yes or no for it is right)."""
        if self.multi_label:
            truth = np.zeros((len(self.labels), len(self.class_names)), dtype=bool)
            answer = np.zeros_like(truth)
            for row, (given, chosen) in enumerate(zip(self.labels, self.chosen, strict=True)):
                truth[row, given], answer[row, chosen] = True, True
            right = truth == answer
            answers = {name: float(right[:, k].mean()) for k, name in enumerate(self.class_names)}
            return {"accuracy": float(right.all(axis=1).mean()), "per_class": answers, "images": len(truth)}
        predicted = np.asarray(self.probabilities).argmax(axis=1)
        labels = np.asarray(self.labels)
        per_class = {
            name: float((predicted[labels == k] == k).mean()) if (labels == k).any() else None
            for k, name in enumerate(self.class_names)
        }
        return {"accuracy": float((predicted == labels).mean()), "per_class": per_class, "images": len(labels)}


@torch.no_grad()
def fold_predictions(model: Any, datamodule: Any, trainer: Any) -> dict[int, list[float]] | None:
    """The class probabilities of every validation image of this fold by `model` (its final
    weights, which did not train on them), gathered from every process; None off rank zero."""
    model.eval()
    rows: dict[int, list[float]] = {}
    for images, _, indices in device_batches(datamodule, datamodule.val_dataloader(), model.device):
        with trainer.precision_plugin.forward_context():
            logits = model.evaluate(images).float()
        probabilities = logits.sigmoid() if model.multi_label else logits.softmax(dim=1)
        rows.update(zip(indices.tolist(), probabilities.cpu().tolist(), strict=True))
    merged = {index: row for part in gather_objects(rows) for index, row in part.items()}
    return merged if trainer.is_global_zero else None


def named(oof: OutOfFold, label: Any) -> str:
    """A label for people: the class name, or (multi-label) the names of the set, space-separated."""
    return " ".join(oof.class_names[c] for c in label) if oof.multi_label else oof.class_names[label]


def write_out_of_fold(oof: OutOfFold, path: Path) -> None:
    names = oof.class_names
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "given", "predicted", *(f"prob_{name}" for name in names)])
        for position, (name, label, row) in enumerate(zip(oof.names, oof.labels, oof.probabilities, strict=True)):
            predicted = oof.chosen[position] if oof.multi_label else max(range(len(row)), key=row.__getitem__)
            writer.writerow([name, named(oof, label), named(oof, predicted), *(f"{p:.6f}" for p in row)])


def require_cleanlab() -> None:
    """cleanlab is the labels extra (it brings scikit-learn, SciPy and pandas; sizes: docs/getting-started.md)."""
    if importlib.util.find_spec("cleanlab") is None:
        raise UserError("Ranking suspect labels (--cv.label_issues) needs cleanlab: pip install 'tl_project[labels]'.")


def find_label_issues(oof: OutOfFold) -> list[tuple[int, Any, float]]:
    """(position, suggested label, quality) of the images cleanlab flags, most suspect first."""
    require_cleanlab()
    from cleanlab.filter import find_label_issues as cleanlab_issues
    from cleanlab.multilabel_classification.filter import find_label_issues as cleanlab_multilabel_issues
    from cleanlab.multilabel_classification.rank import get_label_quality_scores as multilabel_quality_scores
    from cleanlab.rank import get_label_quality_scores

    probabilities = np.asarray(oof.probabilities, dtype=np.float64)
    if oof.multi_label:
        ranked = cleanlab_multilabel_issues(oof.labels, probabilities, return_indices_ranked_by="self_confidence")
        quality = multilabel_quality_scores(oof.labels, probabilities)
        return [(int(i), oof.chosen[i], float(quality[i])) for i in ranked]
    labels = np.asarray(oof.labels)
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    ranked = cleanlab_issues(labels, probabilities, return_indices_ranked_by="self_confidence")
    quality = get_label_quality_scores(labels, probabilities)
    return [(int(i), int(probabilities[i].argmax()), float(quality[i])) for i in ranked]


def write_label_issues(oof: OutOfFold, folder: Path) -> dict[str, Any]:
    """label_issues.csv and label_issues.png from the out-of-fold predictions; says how many."""
    names = oof.class_names
    present = {c for label in oof.labels for c in (label if oof.multi_label else [label])}
    if len(present) < 2:
        warn("Label issues need at least two classes with images: none ranked.")
        return {"flagged": 0}
    accuracy = oof.accuracy()["per_class"]
    chance = 0.5 if oof.multi_label else 1 / len(names)  # multi-label: each class's yes or no
    weak = [name for name, value in accuracy.items() if value is not None and value <= chance]
    if weak:
        warn(
            "The out-of-fold model is no better than chance on " + ", ".join(weak) + ": confident learning "
            "assumes it is, so the label issues of those classes are not to be trusted. Train longer or "
            "on more images first."
        )
    issues = find_label_issues(oof)
    with open(folder / "label_issues.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "given", "suggested", "quality"])
        for position, suggested, quality in issues:
            given = named(oof, oof.labels[position])
            writer.writerow([oof.names[position], given, named(oof, suggested), f"{quality:.6f}"])
    top = issues[:GRID_IMAGES]
    plot_image_grid(
        [
            (oof.sources[i][0].load(oof.sources[i][1])[0], f"given: {named(oof, oof.labels[i])} (quality {q:.2f})\nsuggested: {named(oof, s)}")
            for i, s, q in top
        ],
        "Most suspect labels (out-of-fold, cleanlab)",
        "No label issues found",
        folder / "label_issues.png",
    )  # fmt: skip
    say(
        f"Label issues: {len(issues)} of {len(oof.labels)} images flagged "
        f"({folder / 'label_issues.csv'}, top {len(top)} in {folder / 'label_issues.png'}); "
        f"review them, then leave them out with --data.exclude {folder / 'label_issues.csv'}"
    )
    return {"flagged": len(issues)}
