"""The fastest exact way to run a checkpoint: ONNX Runtime on a CPU, PyTorch on a GPU.

`predict --ckpt_path CKPT` and `serve --ckpt_path CKPT` choose with `--runtime`:

- `auto` (the default): ONNX Runtime on a CPU where onnxruntime is installed (the `export`
  extra), else PyTorch; on a GPU, PyTorch with the GPU's fast precision;
- `onnxruntime`: ONNX Runtime, or an error saying why it cannot be;
- `torch`: PyTorch.

The checkpoint is converted once into the cache (`$XDG_CACHE_HOME/tl_project/onnx/` or
`~/.cache/tl_project/onnx/`), under a key made of the checkpoint's bytes, the image size and
the test-time augmentation, and reused after; the cache keeps the 8 most recently used
conversions. Before it is used, the converted model is
checked against PyTorch: on a fixed batch at conversion, and by `predict` on the first batch
of the user's own images (same top-1 class, calibrated logits within the export's tolerance).
Where the conversion or a check fails, the command says why and runs PyTorch.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Any, Literal, get_args

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from tl_project.data.manifest import default_cache_dir
from tl_project.errors import UserError
from tl_project.runtime import say, usable_cores, warn

Runtime = Literal["auto", "torch", "onnxruntime"]
RUNTIMES: tuple[str, ...] = get_args(Runtime)
# The export's parity tolerances (export --rtol/--atol defaults).
RTOL, ATOL = 1e-3, 1e-4
# Raised with the cache's layout or the conversion, so that old cached files are not reused.
CACHE_VERSION = 1
# Conversions the cache keeps, the most recently used (a ResNet-50's is about 100 MB).
CACHE_KEEP = 8


def cache_folder() -> Path:
    return default_cache_dir() / "onnx"


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def choose(runtime: str, device: str) -> tuple[str, str]:
    """("onnxruntime" or "torch", why) for `--runtime runtime` on a `device` ("cpu", "cuda", ...)."""
    if runtime not in RUNTIMES:
        raise UserError(f"--runtime {runtime}: choose one of {', '.join(RUNTIMES)}.")
    has_onnxruntime = importlib.util.find_spec("onnxruntime") is not None
    if runtime == "torch":
        return "torch", "--runtime torch"
    if device != "cpu":
        if runtime == "onnxruntime":
            raise UserError(
                f"--runtime onnxruntime runs on the CPU; this run is on {device}: pass --runtime torch (or auto), "
                "or --trainer.accelerator cpu."
            )
        return "torch", f"on {device} PyTorch runs the GPU's fast precision"
    if not has_onnxruntime:
        if runtime == "onnxruntime":
            raise UserError("--runtime onnxruntime needs onnxruntime: pip install 'tl_project[export]'.")
        return "torch", "onnxruntime is not installed (pip install 'tl_project[export]' for the faster CPU path)"
    return "onnxruntime", "the faster exact path on a CPU" if runtime == "auto" else "--runtime onnxruntime"


def convert(model: Any, ckpt_path: str | Path, image_size: int) -> Path:
    """The checkpoint's network as ONNX in the cache (converted now, or found there): calibrated
    logits, with the model's flip TTA inside; checked against PyTorch on a fixed batch."""
    flip = model.hparams.get("tta") == "flip"
    key = f"{file_digest(Path(ckpt_path))[:32]}-{image_size}px-{'flip' if flip else 'plain'}-v{CACHE_VERSION}"
    target = cache_folder() / f"{key}.onnx"
    if target.is_file():
        os.utime(target)  # used now: the pruning keeps the most recently used
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    network = InferenceNetwork(model, flip=flip, sigmoid=False).cpu().float().eval()
    network.to(memory_format=torch.contiguous_format)
    example = example_batch(image_size)
    partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with torch.no_grad():
            expected = network(example)
            write_onnx(network, example, partial)
        got = torch.from_numpy(onnx_session(partial).run(None, {"images": example.numpy()})[0])
        problem = parity_problem(got, expected)
        if problem:
            raise UserError(f"the converted model differs from PyTorch on a fixed batch: {problem}")
        os.replace(partial, target)  # whole or not at all, also with another process converting
    finally:
        partial.unlink(missing_ok=True)
    prune_cache(target.parent, CACHE_KEEP)
    return target


def prune_cache(folder: Path, keep: int) -> None:
    """Remove all but the `keep` most recently used conversions in `folder`, and say so."""

    def used(path: Path) -> float:
        try:
            return path.stat().st_mtime
        except OSError:  # removed meanwhile by another process
            return 0.0

    old = sorted(folder.glob("*.onnx"), key=used, reverse=True)[keep:]
    for path in old:
        path.unlink(missing_ok=True)
    if old:
        say(f"Removed {len(old)} older conversion{'s' if len(old) > 1 else ''} from {folder} "
            f"(it keeps the {keep} most recently used).")  # fmt: skip


def parity_problem(got: torch.Tensor, expected: torch.Tensor) -> str | None:
    """Why `got` (ONNX Runtime's logits) is not `expected` (PyTorch's), or None when it is."""
    expected = expected.float().cpu()
    if got.shape != expected.shape:
        return f"shape {tuple(got.shape)} against {tuple(expected.shape)}"
    changed = int((got.argmax(dim=1) != expected.argmax(dim=1)).sum())
    difference = float((got - expected).abs().max()) if got.numel() else 0.0
    if changed:
        return f"the top class changed for {changed} of {len(got)} images (largest logit difference {difference:.3g})"
    if not torch.allclose(got, expected, rtol=RTOL, atol=ATOL):
        return f"largest logit difference {difference:.3g} (tolerance rtol {RTOL:g}, atol {ATOL:g})"
    return None


class InferenceNetwork(nn.Module):
    """What runs outside PyTorch: images -> calibrated logits (the temperature is a constant of
    the graph); with `flip`, the mean with the mirror image's (`model.tta flip`); with `sigmoid`,
    a multi-label model's probabilities."""

    def __init__(self, model: Any, flip: bool, sigmoid: bool) -> None:
        super().__init__()
        self.backbone, self.head, self.flip, self.sigmoid = model.backbone, model.head, flip, sigmoid
        temperature: Any = model.temperature
        self.register_buffer("temperature", temperature.detach().clone().float().cpu())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.backbone(images))
        if self.flip:
            logits = (logits + self.head(self.backbone(images.flip(-1)))) / 2
        temperature: Any = self.temperature
        logits = logits / temperature
        return logits.sigmoid() if self.sigmoid else logits


def example_batch(image_size: int, count: int = 4) -> torch.Tensor:
    """A fixed batch of normalised-looking random images, for parity checks."""
    return torch.randn(count, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))


# ONNX's protobuf limit: above it the weights must go to a companion file.
ONNX_SINGLE_FILE_BYTES = 2 * 1024**3 - 64 * 1024**2


def write_onnx(network: nn.Module, example: torch.Tensor, target: Path, output_name: str = "logits") -> None:
    """`network` as ONNX at `target`, one self-contained file where the weights fit (under 2 GB),
    with a dynamic batch dimension."""
    weight_bytes = sum(t.numel() * t.element_size() for t in [*network.parameters(), *network.buffers()])
    torch.onnx.export(
        network,
        (example,),
        str(target),
        input_names=["images"],
        output_names=[output_name],
        dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
        dynamo=True,
        external_data=weight_bytes > ONNX_SINGLE_FILE_BYTES,
        verbose=False,  # the exporter's own progress lines; the command says what it did
    )


def onnx_session(path: Path, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session of `path`; a missing companion weights file is said plainly."""
    try:
        import onnxruntime
    except ImportError:
        raise UserError("Running ONNX models needs onnxruntime: pip install 'tl_project[export]'.") from None
    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:
        if "external data" in str(error).lower():
            raise UserError(
                f"{path} keeps its weights in a companion file that is not beside it ({error}). Copy the file "
                f"named there ({Path(path).name}.data) with it, or export again: models under 2 GB are now one file."
            ) from None
        raise UserError(f"ONNX Runtime could not load {path}: {error}") from None


class OnnxLogits:
    """A converted checkpoint in ONNX Runtime: calibrated logits of normalised images."""

    def __init__(self, path: Path, threads: int) -> None:
        self.path = path
        self.session = onnx_session(path, threads)
        self.checked = False  # against PyTorch on the user's own images

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        array = images.detach().float().cpu().contiguous().numpy()
        return torch.from_numpy(np.asarray(self.session.run(None, {"images": array})[0]))


def onnx_logits(model: Any, ckpt_path: str | Path | None, image_size: int, threads: int) -> OnnxLogits | None:
    """The checkpoint in ONNX Runtime, or None (said why) where the conversion fails."""
    if not ckpt_path:
        warn("No checkpoint to convert (--ckpt_path): running PyTorch.")
        return None
    try:
        return OnnxLogits(convert(model, ckpt_path, image_size), threads)
    except Exception as error:  # any failure of the exporter or of onnxruntime: PyTorch still answers
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        warn(f"Could not run the checkpoint with ONNX Runtime ({reason}): running PyTorch.")
        return None


class InferenceRuntime(Callback):
    """`predict --runtime`: puts the converted checkpoint (`OnnxLogits`) on the model, whose
    `predict_step` then uses it after checking its first batch against PyTorch."""

    def __init__(self, runtime: str = "auto") -> None:
        self.runtime = runtime

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model: Any = pl_module
        model.fast = None
        chosen, why = choose(self.runtime, pl_module.device.type)
        precision = str(trainer.precision)
        if chosen == "onnxruntime" and precision not in ("32-true", "32"):
            if self.runtime == "onnxruntime":
                raise UserError(f"--runtime onnxruntime runs fp32: leave out --trainer.precision {precision}.")
            chosen, why = "torch", f"--trainer.precision {precision} runs in PyTorch"
        if chosen == "torch":
            say(f"Runtime: PyTorch ({why})")
            return
        datamodule: Any = trainer.datamodule  # type: ignore[attr-defined]
        image_size = int(datamodule.image_size)
        converted: OnnxLogits | None = None
        if trainer.is_global_zero:  # one process converts; the others then find it in the cache
            converted = onnx_logits(model, trainer.ckpt_path, image_size, self.threads(trainer))
        ready = trainer.strategy.broadcast(converted is not None)
        if ready and converted is None:
            converted = onnx_logits(model, trainer.ckpt_path, image_size, self.threads(trainer))
        if converted is None:
            if self.runtime == "onnxruntime":
                raise UserError("--runtime onnxruntime: the checkpoint could not be run with ONNX Runtime (above).")
            return
        model.fast = converted
        say(f"Runtime: ONNX Runtime ({why}; {converted.path})")

    @staticmethod
    def threads(trainer: L.Trainer) -> int:
        """The cores of this machine shared among the processes of the run."""
        return max(1, usable_cores() // max(1, trainer.world_size))

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model: Any = pl_module
        model.fast = None
