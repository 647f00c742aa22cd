"""Train and eval image presets, split between the loader workers and the device.

Workers only cut and resize; the float work happens on the device, batched:

- image files: `train_transform` / `eval_transform` turn a decoded uint8 image into
  a uint8 `image_size` x `image_size` tensor (random resized crop + horizontal flip
  for training, the classic ImageNet recipe; resize the short side to
  `image_size / 0.875` and center crop for evaluation). `normalize` makes floats
  on the device: a quarter of the bytes cross to it.
- in-memory datasets (small images): `CropSampler` only draws each image's crop box
  and flip; `resized_crops` cuts, resizes, flips and normalises the whole batch on
  the device in one step (`torchvision.ops.roi_align`, bilinear like the worker path).

What "resize" and "normalise" mean comes from the weights (`Preprocessing`): the
evaluation resize (the crop's share of the resized image, `crop_pct`), the
interpolation, and the mean and standard deviation. For a torchvision weights name
they are read from the weights' own preset (`weights.transforms()`: ResNet-50's
IMAGENET1K_V2 resizes to 232 for a 224 crop, EfficientNets use bicubic); otherwise
ImageNet's classic preset (256 for 224, bilinear). The in-memory path always samples
bilinearly (`roi_align`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torchvision import transforms as v1
from torchvision.models import WeightsEnum
from torchvision.ops import roi_align
from torchvision.transforms import InterpolationMode, v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Eval resizes to size / 0.875 before the center crop (256 -> 224), as ImageNet's classic preset.
CROP_RATIO = 0.875
CROP_RATIOS = (3 / 4, 4 / 3)  # aspect ratios of the random crops, as torchvision's RandomResizedCrop


@dataclass(frozen=True)
class Preprocessing:
    """How images become the network's input, whatever `image_size`: resize the short side to
    `image_size / crop_pct` with `interpolation`, center crop `image_size`, scale to 0..1,
    subtract `mean`, divide by `std`."""

    crop_pct: float = CROP_RATIO
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    @classmethod
    def of_weights(cls, weights: WeightsEnum) -> Preprocessing:
        """The preset of torchvision `weights` (`weights.transforms()`)."""
        preset = weights.transforms()
        return cls(
            crop_pct=preset.crop_size[0] / preset.resize_size[0],
            interpolation=preset.interpolation.value,
            mean=tuple(preset.mean),
            std=tuple(preset.std),
        )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Preprocessing:
        """From `as_dict()`'s plain values (checkpoints store those)."""
        return cls(float(values["crop_pct"]), str(values["interpolation"]), tuple(values["mean"]), tuple(values["std"]))

    def as_dict(self) -> dict[str, Any]:
        """Plain values (lists, not tuples), as checkpoints read with weights_only=True hold them."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def resize_size(self, image_size: int) -> int:
        """The evaluation resize of the short side, before the center crop of `image_size`."""
        return round(image_size / self.crop_pct)

    @property
    def mode(self) -> InterpolationMode:
        return InterpolationMode(self.interpolation)


IMAGENET = Preprocessing()


def train_transform(
    image_size: int, min_crop_scale: float = 0.08, preprocessing: Preprocessing = IMAGENET
) -> v2.Compose:
    """Random resized crop (at least `min_crop_scale` of the area) and horizontal flip; uint8 out."""
    crop = v2.RandomResizedCrop(
        image_size, scale=(min_crop_scale, 1.0), ratio=CROP_RATIOS, interpolation=preprocessing.mode, antialias=True
    )
    return v2.Compose([v2.ToImage(), crop, v2.RandomHorizontalFlip(), v2.ToPureTensor()])


def eval_transform(image_size: int, preprocessing: Preprocessing = IMAGENET) -> v2.Compose:
    """Resize and center crop; uint8 out."""
    resize = v2.Resize(preprocessing.resize_size(image_size), interpolation=preprocessing.mode, antialias=True)
    return v2.Compose([v2.ToImage(), resize, v2.CenterCrop(image_size), v2.ToPureTensor()])


def normalize(images: torch.Tensor, preprocessing: Preprocessing = IMAGENET) -> torch.Tensor:
    """uint8 (or 0..255 float) images to float32 normalised by the preprocessing's mean and std."""
    mean = torch.tensor(preprocessing.mean, device=images.device).view(-1, 1, 1)
    std = torch.tensor(preprocessing.std, device=images.device).view(-1, 1, 1)
    return (images.float() / 255 - mean) / std


def eval_box(
    height: int, width: int, image_size: int, preprocessing: Preprocessing = IMAGENET
) -> tuple[float, float, float, float]:
    """The source box (x1, y1, x2, y2) that `eval_transform`'s resize + center crop shows."""
    short = preprocessing.resize_size(image_size)
    long = int(short * max(height, width) / min(height, width))
    new_h, new_w = (long, short) if width <= height else (short, long)
    top, left = round((new_h - image_size) / 2), round((new_w - image_size) / 2)
    sy, sx = height / new_h, width / new_w
    return left * sx, top * sy, (left + image_size) * sx, (top + image_size) * sy


class CropSampler:
    """(image, params) for one in-memory image: its crop box and flip, drawn for training
    as `train_transform` would draw them, fixed (`eval_box`, no flip) for evaluation.

    params is float32 (x1, y1, x2, y2, flip); `resized_crops` applies it on the device.
    """

    def __init__(
        self,
        image_size: int,
        min_crop_scale: float = 0.08,
        train: bool = True,
        preprocessing: Preprocessing = IMAGENET,
    ) -> None:
        self.image_size = image_size
        self.scale = (min_crop_scale, 1.0)
        self.train = train
        self.preprocessing = preprocessing

    def __call__(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = image.shape[-2:]
        if not self.train:
            return image, torch.tensor([*eval_box(height, width, self.image_size, self.preprocessing), 0.0])
        top, left, h, w = v1.RandomResizedCrop.get_params(image, list(self.scale), list(CROP_RATIOS))
        flip = float(torch.rand(1).item() < 0.5)
        return image, torch.tensor([left, top, left + w, top + h, flip], dtype=torch.float32)


def resized_crops(
    images: torch.Tensor, params: torch.Tensor, image_size: int, preprocessing: Preprocessing = IMAGENET
) -> torch.Tensor:
    """Cut each image's box, resize it to `image_size`, flip where asked, normalise: one batched step.

    `roi_align` with aligned boxes samples bilinearly at the same points as a crop
    followed by an (antialiased) resize; going down in size it averages several
    samples a pixel, as antialiasing does.
    """
    boxes = torch.cat([torch.arange(len(images), device=images.device)[:, None], params[:, :4]], dim=1)
    crops = roi_align(images.float(), boxes.float(), image_size, spatial_scale=1.0, sampling_ratio=0, aligned=True)
    flip = params[:, 4].bool()[:, None, None, None]
    return normalize(torch.where(flip, crops.flip(-1), crops), preprocessing)
