"""`export --quantize int8`: ONNX Runtime static quantization, calibrated on the run's images,
with what it costs measured and printed.

The fp32 ONNX model (already checked against PyTorch) is pre-processed (shape inference and
graph optimisation, `quant_pre_process`), then quantized to int8 in the QDQ format, weights per
channel, activations from min-max calibration on up to `calibration_images` images of the
checkpoint's validation split (the eval preprocessing; never the test split). Then, on the
test split where the checkpoint's data has one (else the validation split), it measures and
prints the top-1 agreement of int8 with fp32 (a multi-label model: the share of images whose
whole set agrees), both accuracies, and both speeds in ONNX Runtime on the same batch; the
numbers also go into the sidecar. int8 is never a default: only this option writes it.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tl_project.data import ImageDataModule
from tl_project.data.module import device_batches, saved_settings
from tl_project.errors import UserError
from tl_project.runtime import say, usable_cores
from tl_project.runtimes import onnx_session


def checkpoint_data(checkpoint: dict[str, Any], model: Any) -> ImageDataModule:
    """The checkpoint's data, as it was trained (splits, seed), with its model's preprocessing."""
    data = ImageDataModule(**saved_settings(checkpoint.get("datamodule_hyper_parameters") or {}))
    data.preprocessing = model.preprocessing
    try:
        data.setup("fit")
        data.setup("test")
    except UserError as error:
        raise UserError(
            f"int8 calibrates on the checkpoint's own images, and they could not be read ({error}). Put the data "
            "back where the run found it, or export without --quantize."
        ) from None
    return data


def batches(data: ImageDataModule, split: str, limit: int) -> list[tuple[np.ndarray, torch.Tensor]]:
    """Up to `limit` images of `split` as (normalised float32 NCHW arrays, targets) batches."""
    loader = data.test_dataloader() if split == "test" else data.val_dataloader()
    out: list[tuple[np.ndarray, torch.Tensor]] = []
    count = 0
    for images, targets, _ in device_batches(data, loader, torch.device("cpu")):
        out.append((images.float().contiguous().numpy(), targets))
        count += len(targets)
        if count >= limit:
            break
    return out


class Reader:
    """ONNX Runtime's CalibrationDataReader over ready batches."""

    def __init__(self, ready: list[tuple[np.ndarray, torch.Tensor]]) -> None:
        self.items = iter([{"images": images} for images, _ in ready])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.items, None)


def decisions(outputs: np.ndarray, multi_label: bool, thresholds: torch.Tensor) -> torch.Tensor:
    values = torch.from_numpy(outputs)
    return (values >= thresholds).int() if multi_label else values.argmax(dim=1)


def speed(session: Any, images: np.ndarray, rounds: int = 3) -> float:
    """images/s of `session` on one batch (best of `rounds`, after a warm-up)."""
    session.run(None, {"images": images})
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        session.run(None, {"images": images})
        best = max(best, len(images) / (time.perf_counter() - start))
    return best


def quantize_int8(
    fp32: Path, target: Path, checkpoint: dict[str, Any], model: Any, calibration_images: int
) -> dict[str, Any]:
    """Write the int8 model of `fp32` to `target`; what was measured (see the module's text)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    data = checkpoint_data(checkpoint, model)
    calibration = batches(data, "val", calibration_images)
    if not calibration:
        raise UserError("int8 calibrates on the validation split, and the checkpoint's data has none.")
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared))
        quantize_static(
            str(prepared),
            str(target),
            Reader(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
    split = "test" if len(data.datasets.get("test") or []) else "val"
    evaluation = batches(data, split, 10**9)
    threads = usable_cores()
    sessions = {"fp32": onnx_session(fp32, threads), "int8": onnx_session(target, threads)}
    thresholds = model.thresholds.cpu() if model.multi_label else torch.empty(0)
    answers: dict[str, list[torch.Tensor]] = {"fp32": [], "int8": []}
    truths: list[torch.Tensor] = []
    for images, targets in evaluation:
        truths.append(targets)
        for name, session in sessions.items():
            answers[name].append(decisions(session.run(None, {"images": images})[0], model.multi_label, thresholds))
    truth = torch.cat(truths)
    fp32_answers, int8_answers = torch.cat(answers["fp32"]), torch.cat(answers["int8"])

    def right(predicted: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
        same = predicted == expected
        return same.all(dim=1) if same.ndim > 1 else same

    measured: dict[str, Any] = {
        "calibration": f"{sum(len(t) for _, t in calibration)} validation images",
        "evaluated_on": f"{len(truth)} {split} images",
        "agreement_with_fp32": float(right(int8_answers, fp32_answers).float().mean()),
        "accuracy_fp32": float(right(fp32_answers, truth).float().mean()),
        "accuracy_int8": float(right(int8_answers, truth).float().mean()),
        "images_per_s_fp32": speed(sessions["fp32"], calibration[0][0]),
        "images_per_s_int8": speed(sessions["int8"], calibration[0][0]),
        "threads": threads,
    }
    say(
        f"int8 against fp32 on {measured['evaluated_on']}: {100 * measured['agreement_with_fp32']:.2f} % of the "
        f"answers agree; accuracy {100 * measured['accuracy_int8']:.2f} % (fp32 {100 * measured['accuracy_fp32']:.2f} %); "
        f"{measured['images_per_s_int8']:.1f} images/s (fp32 {measured['images_per_s_fp32']:.1f}) on a batch of "
        f"{len(calibration[0][0])}, {threads} threads"
    )
    return measured
