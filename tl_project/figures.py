"""The report's pictures: confusion matrices, image grids, reliability diagrams, the
risk-coverage curve and the training curves, each written to a PNG file (matplotlib, headless).
`report.py` (single-label), `multilabel_report.py` and `labels.py` draw with them."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: files only

import matplotlib.pyplot as plt
import torch
from matplotlib.ticker import MaxNLocator
from torchmetrics.classification import MulticlassConfusionMatrix

from tl_project.calibration import Selective, calibration_error, reliability, risk_coverage
from tl_project.runtime import warn

# Above this many classes, cell values would not fit in the confusion-matrix picture.
ANNOTATE_UP_TO = 20


def plot_confusion_matrix(confusion: torch.Tensor, class_names: Sequence[str], path: Path) -> None:
    """Counts and row-normalised confusion matrices side by side."""
    side = max(5.0, 0.45 * len(class_names) + 2.5)
    fig, axes = plt.subplots(1, 2, figsize=(2 * side, side), constrained_layout=True)
    rows = confusion.sum(dim=1, keepdim=True).clamp(min=1)
    annotate = len(class_names) <= ANNOTATE_UP_TO
    metric = MulticlassConfusionMatrix(len(class_names))
    for ax, values, title in (
        (axes[0], confusion, "counts"),
        (axes[1], (confusion / rows).round(decimals=2), "normalised by true class"),
    ):
        metric.plot(values, ax=ax, add_text=annotate, labels=list(class_names))
        ax.set_title(f"Confusion matrix ({title})")
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.tick_params(axis="x", labelrotation=45)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_image_grid(items: Sequence[tuple[torch.Tensor, str]], title: str, empty: str, path: Path) -> None:
    """A grid of uint8 CHW images, each with its caption, under `title` (`empty` when there are none)."""
    columns = min(4, max(1, len(items)))
    rows = max(1, math.ceil(len(items) / columns))
    # Constrained layout keeps every two-line caption clear of the image above it.
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.6 * rows), squeeze=False, constrained_layout=True)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image, caption) in zip(axes.flat, items, strict=False):
        ax.imshow(image.permute(1, 2, 0).numpy())
        ax.set_title(caption, fontsize=9)
    if not items:
        axes.flat[0].text(0.5, 0.5, empty, ha="center", va="center")
    fig.suptitle(title)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_misclassified(
    wrong: Sequence[tuple[float, int, int, int]],
    dataset: Any,
    class_names: Sequence[str],
    path: Path,
    maps: Any = None,
) -> None:
    """A grid of the most confidently wrong images: true and predicted class, confidence;
    `maps(indices, classes)`, where given, draws each image's map of its predicted class over it."""
    images = [dataset.load(index)[0] for _, index, _, _ in wrong]
    drawn = False
    if maps is not None and wrong:
        try:
            images = maps([index for _, index, _, _ in wrong], [predicted for *_, predicted in wrong], images)
            drawn = True
        except Exception as error:  # the maps are an extra: the report is written without them
            warn(f"The test report's misclassified.png has no class-activation maps: {error}")
    items = [
        (image, f"true: {class_names[target]}\npredicted: {class_names[predicted]} ({confidence:.2f})")
        for image, (confidence, _, target, predicted) in zip(images, wrong, strict=True)
    ]
    title = "Most confidently wrong test images" + (" (where the model looked)" if drawn else "")
    plot_image_grid(items, title, "No misclassified test images", path)


def plot_reliability(
    raw: torch.Tensor, calibrated: torch.Tensor, correct: torch.Tensor, temperature: str, path: Path, what: str
) -> None:
    """The reliability diagram before and after the temperature: the share right per bin of
    the probability (`what`: which probability, for the axis)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4), constrained_layout=True, sharey=True)
    for ax, probability, title in (
        (axes[0], raw, "uncalibrated"),
        (axes[1], calibrated, f"calibrated (temperature {temperature})"),
    ):
        rows = reliability(probability, correct)
        ax.plot([0, 1], [0, 1], ":", color="grey", label="perfectly calibrated")
        ax.bar([p for p, _, _ in rows], [r for _, r, _ in rows], width=1 / 15, alpha=0.7, edgecolor="black")
        ax.plot([p for p, _, _ in rows], [r for _, r, _ in rows], "o-", label="test images")
        ax.set_title(f"{title}: ECE {calibration_error(probability, correct):.3f}")
        ax.set_xlabel(what)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left")
    axes[0].set_ylabel("share right")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_risk_coverage(results: Mapping[str, Any], path: Path) -> None:
    """Accuracy of the answered images against the share answered, most confident first; the
    answer threshold's point where there is one."""
    coverage, accuracy = risk_coverage(results["confidence"], results["correct"])
    fig, ax = plt.subplots(figsize=(6, 4.4), constrained_layout=True)
    ax.plot(coverage.numpy(), accuracy.numpy(), "-", label="answering the most confident first")
    threshold = float(results["min_probability"])
    if threshold > 0:
        chosen = Selective.at(threshold, results["confidence"], results["correct"])
        if chosen.answered:
            ax.plot([chosen.coverage], [chosen.accuracy], "o", color="C3", label=f"at probability >= {threshold:.3f}")
    ax.set_xlabel("coverage (share of test images answered)")
    ax.set_ylabel("accuracy of the answered")
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_curves(curves: Mapping[str, Mapping[int, float]], path: Path) -> None:
    """Loss and accuracy per epoch, train and validation."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for ax, quantity in zip(axes, ("loss", "acc"), strict=True):
        for stage, style in (("train", "o-"), ("val", "s--")):
            points = curves.get(f"{stage}/{quantity}", {})
            if points:
                epochs = sorted(points)
                ax.plot(epochs, [points[e] for e in epochs], style, label=stage)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        values = [v for stage in ("train", "val") for v in curves.get(f"{stage}/{quantity}", {}).values()]
        if quantity == "loss" and values and min(values) > 0 and max(values) / min(values) > 100:
            ax.set_yscale("log")  # early losses of a fresh head can dwarf the rest
        ax.set_title("loss" if quantity == "loss" else "top-1 accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
