"""Export a checkpoint to ONNX or TorchScript, and predict with the ONNX file.

    python -m tl_project export --ckpt_path runs/version_0/checkpoints/best.ckpt --format onnx
    python -m tl_project predict --ckpt_path runs/version_0/export/best.onnx --data.predict_dir photos/

The exported network takes normalised float32 images (N x 3 x S x S) and returns
calibrated class logits, already divided by the checkpoint's temperature (a multi-label
model: each class's calibrated sigmoid probability). Beside it, `<file>.json` records what
a user of the file needs: the class names, the preprocessing (resize, center crop, mean,
std), the temperature (applied), `min_probability` (below it an image is not answered)
and, for multi-label, each class's threshold. Before it is
kept, the file's outputs are compared with PyTorch's on a batch; above the
tolerance it is removed and the export fails.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger

from tl_project.checkpoints import read_checkpoint
from tl_project.data import ImageDataModule
from tl_project.data.module import device_batches
from tl_project.errors import UserError
from tl_project.model import TransferLearningModel
from tl_project.predictions import PredictionFile, answer_threshold_in_force
from tl_project.quantize import quantize_int8
from tl_project.runtime import say
from tl_project.runtimes import InferenceNetwork, example_batch, onnx_session, write_onnx
from tl_project.transforms import Preprocessing


def export(
    ckpt_path: str,
    format: Literal["onnx", "torchscript"] = "onnx",
    output: str | None = None,
    rtol: float = 1e-3,
    atol: float = 1e-4,
    quantize: Literal["none", "int8"] = "none",
    calibration_images: int = 256,
) -> Path:
    """Export a tl_project checkpoint and check it against PyTorch.

    Args:
        ckpt_path: The checkpoint to export.
        format: onnx (run with onnxruntime) or torchscript (torch.jit).
        output: The file to write; default <run>/export/<checkpoint name>.onnx or .pt. Never overwritten.
        rtol: Relative tolerance of the parity check against PyTorch.
        atol: Absolute tolerance of the parity check against PyTorch.
        quantize: int8 writes an int8 ONNX model (ONNX Runtime static quantization, calibrated on the run's validation images); its agreement with fp32, accuracy and speed are measured on the test split and printed. none: fp32.
        calibration_images: With quantize int8: how many validation images calibrate it.
    """
    if quantize != "none" and format != "onnx":
        raise UserError("--quantize int8 writes an ONNX model: pass --format onnx.")
    checkpoint = read_checkpoint(ckpt_path)
    source = Path(ckpt_path)
    suffix = (".int8.onnx" if quantize == "int8" else ".onnx") if format == "onnx" else ".pt"
    target = Path(output) if output else source.resolve().parents[1] / "export" / (source.stem + suffix)
    if target.exists():
        raise UserError(f"{target} exists; pass --output with a new file name.")
    target.parent.mkdir(parents=True, exist_ok=True)

    model = TransferLearningModel.load_from_checkpoint(source, weights=None, map_location="cpu").eval()
    # images -> calibrated logits (multi-label: probabilities), nothing else
    network = InferenceNetwork(model, flip=False, sigmoid=model.multi_label).eval()
    output_name = "probabilities" if model.multi_label else "logits"
    image_size = int((checkpoint.get("datamodule_hyper_parameters") or {}).get("image_size", 224))
    example = example_batch(image_size)
    with torch.no_grad():
        expected = network(example)
        if format == "onnx":
            write_onnx(network, example, target, output_name)
            exported = torch.from_numpy(onnx_session(target).run(None, {"images": example.numpy()})[0])
        else:
            traced = torch.jit.trace(network, example)
            traced.save(str(target))
            exported = torch.jit.load(str(target))(example)

    difference = (exported - expected).abs().max().item()
    say(f"Parity with PyTorch on a batch of 4: max abs difference {difference:.3g} (rtol {rtol:g}, atol {atol:g})")
    if not torch.allclose(exported, expected, rtol=rtol, atol=atol):
        target.unlink()
        raise UserError(f"The exported {format} model differs from PyTorch beyond the tolerance; nothing was kept.")
    measured: dict[str, Any] | None = None
    if quantize == "int8":
        fp32 = target.with_name(f".{target.name}.fp32.onnx")
        target.rename(fp32)
        try:
            measured = quantize_int8(fp32, target, checkpoint, model, calibration_images)
        except BaseException:
            target.unlink(missing_ok=True)
            raise
        finally:
            fp32.unlink(missing_ok=True)
    meta: dict[str, Any] = {
        "format": format,
        "checkpoint": str(source),
        "backbone": model.hparams["backbone"],
        "classes": model.class_names,
        "input": {"name": "images", "layout": "NCHW", "dtype": "float32", "image_size": image_size},
        "preprocessing": {
            "resize_short_side": model.preprocessing.resize_size(image_size),
            "interpolation": model.preprocessing.interpolation,
            "center_crop": image_size,
            "scale": "pixel / 255",
            "mean": list(model.preprocessing.mean),
            "std": list(model.preprocessing.std),
        },
        "output": {"name": "logits", "softmax": "apply for probabilities"},
        # Already applied in the file: the logits are divided by it.
        "temperature": model.temperature.tolist(),
        # A top-class probability below it is "not answered" (0: every image is answered).
        "min_probability": float(model.min_probability),
    }
    if measured is not None:
        meta["quantized"] = {"type": "int8", "method": "ONNX Runtime static, QDQ, per-channel weights", **measured}
    if model.multi_label:
        data = checkpoint.get("datamodule_hyper_parameters") or {}
        meta["multi_label"] = True
        meta["thresholds"] = model.thresholds.tolist()
        meta["label_delimiter"] = data.get("label_delimiter", " ")
        meta["output"] = {"name": output_name, "sigmoid": "applied: a class is in the answer at or above its threshold"}
    Path(f"{target}.json").write_text(json.dumps(meta, indent=2) + "\n")
    say(f"Exported {format} model to {target} (classes and preprocessing in {target}.json)")
    return target


class OnnxClassifier:
    """An exported ONNX model with its sidecar: class names and image size."""

    def __init__(self, path: Path) -> None:
        sidecar = Path(f"{path}.json")
        if not sidecar.is_file():
            raise UserError(f"{sidecar} is missing: export the model with python -m tl_project export.")
        self.meta = json.loads(sidecar.read_text())
        self.classes: list[str] = self.meta["classes"]
        self.image_size: int = self.meta["input"]["image_size"]
        steps = self.meta["preprocessing"]
        self.preprocessing = Preprocessing(
            crop_pct=steps["center_crop"] / steps["resize_short_side"],
            interpolation=steps.get("interpolation", "bilinear"),
            mean=tuple(steps["mean"]),
            std=tuple(steps["std"]),
        )
        self.multi_label = bool(self.meta.get("multi_label"))
        self.thresholds = torch.tensor(self.meta.get("thresholds") or [], dtype=torch.float32)
        self.delimiter: str | None = self.meta.get("label_delimiter", " ") if self.multi_label else None
        self.min_probability = float(self.meta.get("min_probability", 0.0))
        self.run = onnx_session(path).run

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities: softmax of the logits, or (multi-label) the network's own sigmoid outputs."""
        outputs = torch.from_numpy(self.run(None, {"images": images.numpy().astype(np.float32)})[0])
        return outputs if self.multi_label else outputs.softmax(dim=1)


def predict_onnx(
    ckpt_path: str,
    predict_dir: str,
    batch_size: int = 32,
    num_workers: int = 0,
    on_bad_image: Literal["error", "skip"] = "error",
    default_root_dir: str = "runs",
    output: str | None = None,
    min_probability: float | None = None,
) -> Path:
    """`predict` with an exported ONNX file: predictions.csv in a new run folder (or `output`),
    written as batches finish and continued after an interruption, as with a checkpoint."""
    model = OnnxClassifier(Path(ckpt_path))
    data = ImageDataModule(
        dataset=None,
        root=None,
        classes=model.classes,
        image_size=model.image_size,
        batch_size=batch_size,
        num_workers=num_workers,
        predict_dir=predict_dir,
        on_bad_image=on_bad_image,
    )
    data.preprocessing = model.preprocessing
    data.setup("predict")
    path = Path(output) if output else Path(CSVLogger(save_dir=default_root_dir, name="").log_dir) / "predictions.csv"
    threshold = answer_threshold_in_force(min_probability, model.min_probability, model.multi_label)
    file = PredictionFile(
        path, data.predict_paths, model.classes, label_delimiter=model.delimiter, min_probability=threshold
    )
    data.predict_skip = file.begin(file.prepare())
    try:
        for images, _, indices in device_batches(data, data.predict_dataloader(), torch.device("cpu")):
            probabilities = model.probabilities(images)
            if model.multi_label:
                file.write_sets(indices.tolist(), (probabilities >= model.thresholds).tolist(), probabilities.tolist())
                continue
            top = probabilities.topk(min(5, len(model.classes)), dim=1)
            file.write(indices.tolist(), top.indices.tolist(), top.values.tolist())
    finally:
        file.close()
    file.finish()
    return path
