"""Train and eval image presets.

Both take a PIL RGB image or a uint8 CHW tensor with 3 channels and return a
normalised float tensor of `image_size` x `image_size`:

- train: random resized crop + horizontal flip (the classic ImageNet recipe; the
  smallest crop area is a setting, as small or centred objects want larger crops);
- eval: resize the short side to `image_size / 0.875`, then center crop.

Normalisation uses the ImageNet statistics that every torchvision ImageNet
weights were trained with.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Eval resizes to size / 0.875 before the center crop (256 -> 224), as torchvision's presets do.
CROP_RATIO = 0.875


def _normalize() -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def train_transform(image_size: int, min_crop_scale: float = 0.08) -> v2.Compose:
    """Random resized crop (at least `min_crop_scale` of the area) and horizontal flip, then ImageNet normalisation."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(image_size, scale=(min_crop_scale, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            *_normalize(),
        ]
    )


def eval_transform(image_size: int) -> v2.Compose:
    """Resize and center crop, then ImageNet normalisation."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(round(image_size / CROP_RATIO), antialias=True),
            v2.CenterCrop(image_size),
            *_normalize(),
        ]
    )
