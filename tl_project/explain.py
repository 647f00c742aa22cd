"""Where the model looked: class-activation maps (Grad-CAM, through captum's `LayerGradCam`).

A map weighs the last convolutional stage's channels by the mean gradient of a class's
logit and keeps the positive part (Selvaraju et al., 2017): bright where evidence for the
class lies. It is computed for a whole batch at once, on the model's device.

- `predict --explain DIR` writes, per image `NAME` (its file name, in the folders of
  `--data.predict_dir`), `NAME.png` (the map over the image) and `NAME.cam.png` (the map
  alone, grayscale 0-255, in the image's own pixels; what the center crop cut away is 0);
- the test report draws the maps over its most confidently wrong images;
- `serve` answers with the map when the request asks (`-F explain=true`).

The layer is the backbone's last stage whose output map is at least 4 x 4 (ResNet's `layer4`,
EfficientNet's `features` or timm's `bn2` at the usual sizes; an earlier stage for small
images, where the last one is 2 x 2): backbones without a spatial stage (a vision
transformer) are refused with a message.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import lightning as L
import matplotlib
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from PIL import Image
from torch import nn

from tl_project.data.images import load_image
from tl_project.errors import UserError
from tl_project.runtime import say
from tl_project.transforms import Preprocessing, eval_box

# How much of the overlay is the map (the rest is the image).
OVERLAY_ALPHA = 0.5


def require_captum() -> Any:
    try:
        from captum.attr import LayerGradCam
    except ImportError:
        raise UserError("Class-activation maps need captum: pip install 'tl_project[explain]'.") from None
    return LayerGradCam


# The smallest side of a map that can say where: on the measured task (docs/trust.md) maps
# of a 4 x 4 stage peaked on the item for most correct answers, those of a 2 x 2 stage
# almost never.
MIN_MAP_SIDE = 4


def last_spatial_layer(backbone: nn.Module, image_size: int) -> nn.Module:
    """The layer whose Grad-CAM map explains `backbone` at `image_size`: the last stage (a
    top-level child, or a child of one: timm's `blocks`, torchvision's `features`) whose output
    map is at least `MIN_MAP_SIDE` on each side; where none is, the last with any spatial
    output (larger than 1 x 1)."""
    layers = {name: child for name, child in backbone.named_children()}
    layers |= {
        f"{name}.{sub}": module for name, child in backbone.named_children() for sub, module in child.named_children()
    }
    outputs: dict[str, tuple[int, ...]] = {}  # in the order the layers finish
    hooks = [
        layer.register_forward_hook(lambda _m, _i, out, name=name: outputs.__setitem__(name, tuple(out.shape)))
        for name, layer in layers.items()
    ]
    device = next(backbone.parameters()).device
    was_training = backbone.training
    try:
        backbone.eval()
        with torch.no_grad():
            backbone(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        backbone.train(was_training)
        for hook in hooks:
            hook.remove()
    spatial = {name: shape[2:] for name, shape in outputs.items() if len(shape) == 4 and shape[2] * shape[3] > 1}
    if not spatial:
        raise UserError(
            "Class-activation maps need a convolutional backbone (a stage with a spatial output); this one has "
            "none (a vision transformer?): train a CNN (resnet50, efficientnet_b0, convnext_tiny, ...) to explain."
        )
    large = [name for name, side in spatial.items() if min(side) >= MIN_MAP_SIDE]
    return layers[large[-1] if large else list(spatial)[-1]]


class ClassActivationMaps:
    """Grad-CAM maps of a TransferLearningModel, batched, on its device."""

    def __init__(self, model: Any, image_size: int) -> None:
        layer_grad_cam = require_captum()
        self.model = model
        self.image_size = image_size
        # The plain network, not `model.forward`: that one runs a frozen backbone without
        # gradients (finetune gradual before its unfreeze epoch), and the maps need them.
        self.gradcam = layer_grad_cam(self.logits, last_spatial_layer(model.backbone, image_size))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.head(self.model.backbone(images))

    def __call__(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Maps (N x S x S, 0..1, each scaled to its own maximum) of `classes` on normalised
        `images` (N x 3 x S x S), in the coordinates of the network's input."""
        with torch.inference_mode(False), torch.enable_grad():
            inputs = images.detach().clone().float().requires_grad_(True)
            maps = self.gradcam.attribute(inputs, target=classes.tolist(), relu_attributions=True)
            maps = nn.functional.interpolate(maps.detach().float(), size=images.shape[-2:], mode="bilinear")
        maps = maps[:, 0].clamp(min=0)
        peak = maps.flatten(1).amax(dim=1).clamp(min=1e-12).view(-1, 1, 1)
        return (maps / peak).cpu()


def in_original(cam: torch.Tensor, height: int, width: int, preprocessing: Preprocessing) -> torch.Tensor:
    """A map of the network's input (S x S) in the pixels of the original image (height x width):
    resized into the box the resize + center crop showed, 0 outside it."""
    x1, y1, x2, y2 = eval_box(height, width, cam.shape[-1], preprocessing)
    left, top = round(x1), round(y1)
    right, bottom = max(left + 1, min(width, round(x2))), max(top + 1, min(height, round(y2)))
    full = torch.zeros(height, width)
    box = nn.functional.interpolate(cam[None, None], size=(bottom - top, right - left), mode="bilinear")[0, 0]
    # Resampling can land between the peak's pixels: the map keeps its own peak at 1 (or stays 0).
    full[top:bottom, left:right] = (box * (float(cam.max()) / float(box.max())) if box.max() > 0 else box).clamp(0, 1)
    return full


def overlay(image: torch.Tensor, cam: torch.Tensor) -> Image.Image:
    """The map (H x W, 0..1) drawn over a uint8 CHW image of the same size, in the jet colours."""
    rgb = image.expand(3, -1, -1).permute(1, 2, 0).numpy().astype(np.float32) / 255
    heat = matplotlib.colormaps["jet"](cam.numpy())[..., :3]
    blended = (1 - OVERLAY_ALPHA) * rgb + OVERLAY_ALPHA * heat
    return Image.fromarray((blended * 255).round().astype(np.uint8))


def grayscale(cam: torch.Tensor) -> Image.Image:
    return Image.fromarray((cam.numpy() * 255).round().astype(np.uint8), mode="L")


def png_bytes(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def write_maps(folder: Path, name: str, image: torch.Tensor, cam: torch.Tensor) -> None:
    """`folder/name.png` (the overlay) and `folder/name.cam.png` (the map) of one image."""
    folder.mkdir(parents=True, exist_ok=True)
    overlay(image, cam).save(folder / f"{name}.png")
    grayscale(cam).save(folder / f"{name}.cam.png")


class ExplanationWriter(Callback):
    """`predict --explain DIR`: the maps of each predicted batch's top class (see the module's text)."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder).expanduser()
        self.maps: ClassActivationMaps | None = None

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule: Any = trainer.datamodule  # type: ignore[attr-defined]
        self.maps = ClassActivationMaps(pl_module, int(datamodule.image_size))
        self.preprocessing: Preprocessing = pl_module.preprocessing  # type: ignore[assignment]
        root = Path(datamodule.predict_dir).expanduser()
        self.root = root if root.is_dir() else root.parent
        self.paths = datamodule.predict_paths

    def on_predict_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if outputs is None or self.maps is None:
            return
        # The top class; multi-label: the most probable one.
        top = outputs.get("top_classes")
        classes = top[:, 0] if top is not None else outputs["probabilities"].argmax(dim=1)
        for index, cam in zip(outputs["index"].tolist(), self.maps(batch[0], classes), strict=True):
            path = Path(self.paths[index])
            original = load_image(path)
            full = in_original(cam, original.shape[1], original.shape[2], self.preprocessing)
            relative = path.relative_to(self.root) if path.is_relative_to(self.root) else Path(path.name)
            write_maps(self.folder / relative.parent, relative.name, original, full)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        say(f"Class-activation maps written to {self.folder}")
