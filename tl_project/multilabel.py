"""Multi-label classification (`--data.multi_label true`): one sigmoid output per class.

The loss is `BCEWithLogitsLoss`; an image's answer is the set of classes whose probability
reaches that class's threshold. The thresholds are chosen on the validation split after
every validation epoch (each class's best F1 over the validation probabilities), so a
checkpoint carries the thresholds of its own epoch. Metrics, per stage:

- `map`: mean average precision over the classes (macro AP; threshold-free), the headline;
- `acc`: exact-match accuracy (the share of images whose whole set is right), at the thresholds;
- `f1_micro`, `f1_macro`: at the thresholds;
- for test, each class's AP, precision and recall go to the report.
"""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    MultilabelAveragePrecision,
    MultilabelExactMatch,
    MultilabelF1Score,
    MultilabelPrecision,
    MultilabelRecall,
)
from torchmetrics.utilities import dim_zero_cat

DEFAULT_THRESHOLD = 0.5


class Collected(Metric):
    """The probabilities and targets of an epoch, gathered from every process."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("probabilities", default=[], dist_reduce_fx="cat")
        self.add_state("targets", default=[], dist_reduce_fx="cat")

    def update(self, probabilities: torch.Tensor, targets: torch.Tensor) -> None:
        states: Any = self  # list states, which the type of Module's attributes does not know
        states.probabilities.append(probabilities.detach().float())
        states.targets.append(targets.detach().int())

    def compute(self) -> Any:
        states: Any = self
        return dim_zero_cat(states.probabilities), dim_zero_cat(states.targets)


class ThresholdedMetric(Collected):
    """A thresholded multi-label metric at per-class thresholds: it keeps the probabilities and
    targets of the epoch (synchronised across processes like any torchmetrics state) and
    computes at the thresholds it is given when the epoch ends."""

    def __init__(self, metric: Metric) -> None:
        super().__init__()
        self.metric = metric
        self.thresholds: torch.Tensor | None = None

    def compute(self) -> Any:
        probabilities, targets = super().compute()
        thresholds = self.thresholds if self.thresholds is not None else torch.full_like(probabilities[0], 0.5)
        predicted = (probabilities >= thresholds.to(probabilities.device)).int()
        self.metric.reset()
        self.metric.to(probabilities.device)
        return self.metric(predicted, targets)


def stage_metrics(stage: str, num_classes: int) -> MetricCollection:
    """The metrics of a multi-label stage (see the module's text)."""
    metrics: dict[str, Any] = {
        "map": MultilabelAveragePrecision(num_classes, average="macro"),
        "acc": ThresholdedMetric(MultilabelExactMatch(num_classes, threshold=0.5)),
        "f1_micro": ThresholdedMetric(MultilabelF1Score(num_classes, threshold=0.5, average="micro")),
        "f1_macro": ThresholdedMetric(MultilabelF1Score(num_classes, threshold=0.5, average="macro")),
    }
    return MetricCollection(metrics, prefix=f"{stage}/", compute_groups=False)


def per_class_metrics(num_classes: int) -> MetricCollection:
    """Each class's AP, precision and recall (vectors: for the report, not the logger)."""
    return MetricCollection(
        {
            "ap": MultilabelAveragePrecision(num_classes, average=None),
            "precision": ThresholdedMetric(MultilabelPrecision(num_classes, average=None)),
            "recall": ThresholdedMetric(MultilabelRecall(num_classes, average=None)),
        },
        compute_groups=False,
    )


def use_thresholds(thresholds: torch.Tensor, *collections: MetricCollection) -> None:
    """Set the thresholds at which the collections' thresholded metrics compute."""
    for metrics in collections:
        for metric in metrics.values():
            if isinstance(metric, ThresholdedMetric):
                metric.thresholds = thresholds


def best_f1_thresholds(probabilities: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each class's threshold with the best F1 on (probabilities, targets): the midpoint below the
    lowest probability it answers yes to; 0.5 for a class with no positive image."""
    thresholds = torch.full((probabilities.shape[1],), DEFAULT_THRESHOLD)
    for c in range(probabilities.shape[1]):
        p, t = probabilities[:, c].float(), targets[:, c].float()
        if t.sum() == 0:
            continue
        order = p.argsort(descending=True)
        p, t = p[order], t[order]
        true_positives = t.cumsum(0)
        # Answering yes to the top k: precision tp/k, recall tp/positives, F1 = 2 tp / (k + positives).
        f1 = 2 * true_positives / (torch.arange(1, len(p) + 1) + t.sum())
        k = int(f1.argmax())
        below = p[k + 1] if k + 1 < len(p) else torch.tensor(0.0)
        thresholds[c] = float((p[k] + below) / 2)
    return thresholds


def predicted_sets(probabilities: torch.Tensor, thresholds: torch.Tensor) -> list[list[int]]:
    """The classes each image is given: those at or above their threshold."""
    answered = probabilities >= thresholds.to(probabilities.device)
    return [row.nonzero().flatten().tolist() for row in answered]
