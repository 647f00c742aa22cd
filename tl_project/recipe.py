"""The parts of a stronger fine-tuning recipe that the model switches on (each off by default):

- `warmup_cosine`: the learning rate rises linearly from 0 for the warmup steps, then
  falls along a cosine to 0 at the last step; stepped every optimizer step;
- `BatchMix`: MixUp and CutMix (torchvision `transforms.v2`) on a batch on the device,
  after the data's batch hook; the targets become class probabilities;
- `balanced_class_weights`: loss weights that make every class count as much in total
  (`data.balance loss`).

EMA of the weights is Lightning's `EMAWeightAveraging` callback (`configs/strong.yaml`),
and test-time flips are `model.tta`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.optim.lr_scheduler import LambdaLR
from torchvision.transforms import v2


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int) -> LambdaLR:
    """Linear warmup over `warmup_steps`, then cosine decay to 0 at `total_steps` (a factor of each group's lr)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return LambdaLR(optimizer, factor)


class BatchMix:
    """MixUp (alpha `mixup`) and/or CutMix (alpha `cutmix`) of a batch: one of them, chosen at
    random per batch when both are on. Returns the mixed images and the targets as class
    probabilities (each row sums to one)."""

    def __init__(self, mixup: float, cutmix: float, num_classes: int) -> None:
        mixes: list[v2.Transform] = []
        if mixup > 0:
            mixes.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
        if cutmix > 0:
            mixes.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
        self.transform = v2.RandomChoice(mixes) if len(mixes) > 1 else mixes[0] if mixes else None
        self.num_classes = num_classes

    def __bool__(self) -> bool:
        return self.transform is not None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.transform is not None, "no mix switched on"
        return self.transform(images, labels)


def balanced_class_weights(counts: Sequence[int]) -> torch.Tensor:
    """Weights `total / (classes * count)` per class: each class weighs as much in total (0 for absent ones)."""
    counts_t = torch.tensor(counts, dtype=torch.float32)
    present = counts_t > 0
    weights = torch.zeros_like(counts_t)
    weights[present] = counts_t.sum() / (present.sum() * counts_t[present])
    return weights
