"""`Classifier`: a model loaded to answer images as they come, for `serve`: a tl_project
checkpoint (PyTorch, or ONNX Runtime on a CPU by default: `runtimes.py`) or an exported .onnx
file, with its classes, preprocessing, thresholds and the precision `predict` would use."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tl_project.checkpoints import read_checkpoint
from tl_project.export import OnnxClassifier
from tl_project.model import TransferLearningModel
from tl_project.runtime import choose_precision, usable_cores
from tl_project.runtimes import choose, onnx_logits
from tl_project.transforms import Preprocessing, normalize

DEFAULT_MAX_PIXELS = 89_478_485  # data.max_image_pixels' default


class Classifier:
    """A loaded model for serving: a tl_project checkpoint (PyTorch) or an exported .onnx file
    (ONNX Runtime), with its classes and preprocessing. `probabilities` takes uint8 images."""

    def __init__(self, path: str, device: str, runtime: str = "auto") -> None:
        self.path, self.device = path, torch.device(device)
        self.runtime, self.runtime_reason = "onnxruntime", "an exported .onnx file"
        self.autocast: torch.dtype | None = None
        self.onnx: OnnxClassifier | None = None
        self.model: TransferLearningModel | None = None
        if path.endswith(".onnx"):
            self.onnx = OnnxClassifier(Path(path))
            self.classes, self.image_size = self.onnx.classes, self.onnx.image_size
            self.preprocessing: Preprocessing = self.onnx.preprocessing
            self.backbone, self.tta, self.max_pixels = self.onnx.meta.get("backbone"), "none", DEFAULT_MAX_PIXELS
            self.multi_label, self.thresholds = self.onnx.multi_label, self.onnx.thresholds
            self.min_probability = self.onnx.min_probability
            return
        checkpoint = read_checkpoint(path)
        data = checkpoint.get("datamodule_hyper_parameters") or {}
        self.image_size = int(data.get("image_size", 224))
        self.max_pixels = int(data.get("max_image_pixels", DEFAULT_MAX_PIXELS))
        model = TransferLearningModel.load_from_checkpoint(path, weights=None, map_location="cpu")
        self.model = model.eval().to(self.device)
        if model.hparams["channels_last"]:
            self.model.to(memory_format=torch.channels_last)
        chosen, why = choose(runtime, self.device.type)
        if chosen == "onnxruntime":  # checked against PyTorch on the first batch it answers
            self.model.fast = onnx_logits(self.model, path, self.image_size, usable_cores())
        self.runtime = "onnxruntime" if self.model.fast is not None else "torch"
        self.runtime_reason = why if chosen == self.runtime else "the conversion to ONNX failed (see the warning)"
        self.classes, self.preprocessing = model.class_names, model.preprocessing
        self.backbone, self.tta = model.hparams["backbone"], model.hparams.get("tta", "none")
        self.multi_label = model.multi_label
        self.thresholds = model.thresholds.cpu() if model.multi_label else torch.empty(0)
        self.min_probability = float(model.min_probability)
        # The precision `predict` chooses: fp32 on a CPU, the GPU's fast one on CUDA.
        precision, _ = choose_precision(self.device.type, training=False, batch_size=1, batchnorm_trains=False)
        self.autocast = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)

    @torch.inference_mode()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities (N x classes, float32 on the CPU) of uint8 images (N x 3 x S x S)."""
        normalised = normalize(images.to(self.device), self.preprocessing)
        if self.onnx is not None:
            return self.onnx.probabilities(normalised)
        assert self.model is not None
        with torch.autocast(self.device.type, dtype=self.autocast or torch.float32, enabled=bool(self.autocast)):
            logits = self.model.predict_logits(normalised)
        return (logits.float().sigmoid() if self.multi_label else logits.float().softmax(dim=1)).cpu()

    def describe(self) -> dict[str, Any]:
        return {
            "file": self.path,
            "format": "onnx" if self.onnx is not None else "checkpoint",
            "runtime": self.runtime,
            "runtime_reason": self.runtime_reason,
            "backbone": self.backbone,
            "classes": self.classes,
            "image_size": self.image_size,
            "preprocessing": self.preprocessing.as_dict(),
            "tta": self.tta,
            "max_image_pixels": self.max_pixels,
            "multi_label": self.multi_label,
            **({"thresholds": self.thresholds.tolist()} if self.multi_label else {}),
            "min_probability": self.min_probability,
            "explain": self.model is not None,
        }
