"""Probabilities that mean what they say, and a threshold below which the model is not sure.

- **Temperature scaling** (Guo et al., 2017): the logits are divided by one temperature T
  (multi-label: one per class) chosen to minimise the validation split's negative
  log-likelihood. The top class never changes; an over-confident model gets T > 1 and
  softer probabilities. The model fits T after every validation epoch, so each checkpoint
  carries the temperature of its own epoch (`TransferLearningModel.temperature`).
- **Selective answers**: with a target accuracy A, the lowest top-class probability at
  which the answered validation images are at least A accurate, by one standard error (a
  Wilson lower bound: `answer_threshold`); images below it are marked not answered. The risk-coverage curve shows the trade.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn

# The temperatures a fit may choose: beyond these the validation split is too small or too
# easy to say anything (every image right with margin pushes T toward 0).
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0
# A threshold no probability reaches: nothing is answered.
ANSWER_NOTHING = 2.0
# How far above the target the validation split's accuracy must be, in standard errors (the
# Wilson lower bound's z). Taking the largest share whose accuracy reaches the target picks the
# split's luck, and fewer of the answered new images are right than asked (docs/trust.md).
ANSWER_MARGIN = 1.0
# Bins of the expected calibration error and of the reliability diagram.
CALIBRATION_BINS = 15


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, multi_label: bool = False) -> torch.Tensor:
    """The temperature(s) minimising the negative log-likelihood of `logits / T` on `targets`:
    shape (1,) for class indices, (classes,) for multi-hot targets (a class whose targets are
    all the same keeps T = 1: its likelihood has no finite optimum). A unit Gaussian prior on
    log T keeps a few images that happen to be separable from pushing T toward 0; with
    hundreds of images it weighs nothing."""
    shape = (logits.shape[1],) if multi_label else (1,)
    finite = torch.isfinite(logits).all(dim=1)  # a diverged model's rows say nothing
    logits, targets = logits.detach().float().cpu()[finite], targets.detach().cpu()[finite]
    if not len(targets):
        return torch.ones(shape)
    log_t = torch.zeros(shape, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def nll() -> torch.Tensor:
        optimizer.zero_grad()
        scaled = logits / log_t.exp()
        if multi_label:
            loss = nn.functional.binary_cross_entropy_with_logits(scaled, targets.float())
        else:
            loss = nn.functional.cross_entropy(scaled, targets.long())
        loss = loss + (log_t**2).sum() / (2 * targets.numel())  # the prior, per image (and class)
        loss.backward()
        return loss

    try:
        with torch.enable_grad():
            optimizer.step(nll)
    except RuntimeError:  # logits too large for the line search: nothing sensible to fit
        return torch.ones(shape)
    temperature = log_t.detach().exp().clamp(MIN_TEMPERATURE, MAX_TEMPERATURE)
    if multi_label:
        positives = targets.float().sum(dim=0)
        one_kind = (positives == 0) | (positives == len(targets))
        temperature[one_kind] = 1.0
    if not torch.isfinite(temperature).all():
        return torch.ones(shape)
    return temperature


def describe_temperature(temperature: torch.Tensor) -> str:
    """`1.327`, or for several: `0.82 to 1.61 over 5 classes`."""
    values = temperature.flatten().tolist()
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{min(values):.2f} to {max(values):.2f} over {len(values)} classes"


def wilson_lower(right: torch.Tensor, count: torch.Tensor, z: float) -> torch.Tensor:
    """The Wilson score interval's lower bound of a proportion: `right` of `count`, `z` standard errors."""
    share = right / count
    margin = z * torch.sqrt(share * (1 - share) / count + z * z / (4 * count * count))
    return (share + z * z / (2 * count) - margin) / (1 + z * z / count)


def answer_threshold(
    confidence: torch.Tensor, correct: torch.Tensor, target_accuracy: float, margin: float = ANSWER_MARGIN
) -> float:
    """The lowest top-class probability at which the images answered (probability at or above
    it) are at least `target_accuracy` accurate, by `margin` standard errors (a Wilson lower
    bound; 0 for the point estimate); `ANSWER_NOTHING` when no threshold reaches it."""
    order = confidence.float().argsort(descending=True)
    p, right = confidence.float()[order], correct.float()[order]
    answered = torch.arange(1, len(p) + 1, dtype=torch.float32)
    accuracy = wilson_lower(right.cumsum(0), answered, margin)
    # Images tied at a probability are answered together: only cuts between distinct values count.
    cut = torch.ones_like(p, dtype=torch.bool)
    cut[:-1] = p[:-1] != p[1:]
    reaching = ((accuracy >= target_accuracy) & cut).nonzero().flatten()
    if not len(reaching):
        return ANSWER_NOTHING
    return float(p[int(reaching[-1])])


@dataclass(frozen=True)
class Selective:
    """What a threshold does on a set of images: the share answered and their accuracy."""

    threshold: float
    coverage: float
    accuracy: float  # of the answered images; nan when none is answered
    answered: int

    @classmethod
    def at(cls, threshold: float, confidence: torch.Tensor, correct: torch.Tensor) -> Selective:
        answered = confidence >= threshold
        count = int(answered.sum())
        accuracy = float(correct[answered].float().mean()) if count else float("nan")
        return cls(threshold, count / max(1, len(confidence)), accuracy, count)

    def describe(self) -> str:
        if not self.answered:
            return f"at probability >= {self.threshold:.3f} no image is answered"
        return (
            f"at probability >= {self.threshold:.3f}: {100 * self.coverage:.1f} % of the images answered, "
            f"{100 * self.accuracy:.1f} % of those right"
        )


def risk_coverage(confidence: torch.Tensor, correct: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(coverage, accuracy of the answered) when answering the k most confident images, k = 1..N."""
    order = confidence.float().argsort(descending=True)
    right = correct.float()[order]
    answered = torch.arange(1, len(right) + 1)
    return answered / max(1, len(right)), right.cumsum(0) / answered


def reliability(
    confidence: torch.Tensor, correct: torch.Tensor, bins: int = CALIBRATION_BINS
) -> list[tuple[float, float, int]]:
    """Per non-empty equal-width bin of the probability: (mean probability, share right, images),
    the points of the reliability diagram. For multi-label, pass every (image, class) pair's
    probability and whether the class is in the image."""
    edges = torch.linspace(0, 1, bins + 1)
    edges[0] = -1.0  # a probability of exactly 0 falls in the first bin
    rows = []
    for low, high in itertools.pairwise(edges.tolist()):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            rows.append((float(confidence[inside].mean()), float(correct[inside].float().mean()), int(inside.sum())))
    return rows


def calibration_error(confidence: torch.Tensor, correct: torch.Tensor, bins: int = CALIBRATION_BINS) -> float:
    """The expected calibration error: the image-weighted mean |share right - mean probability|
    over the reliability diagram's bins (torchmetrics' L1 definition for the top class)."""
    total = max(1, len(confidence))
    return sum(count / total * abs(p - right) for p, right, count in reliability(confidence, correct, bins))
