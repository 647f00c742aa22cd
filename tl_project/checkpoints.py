"""Reading checkpoints and weights files without trusting them.

Every file is read with `torch.load(weights_only=True)`: tensors and plain values,
never code. A checkpoint's hyper-parameters may also name a callable that Lightning
would import and call when rebuilding the model (`_instantiator`) or a class to
build (`_class_path`); only the ones tl_project itself writes are accepted.
`find_checkpoint` turns `last` / `best` into the newest run's file, and
`AtomicCheckpointIO` writes checkpoints so that an interrupted write loses nothing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from tl_project.errors import UserError, class_mismatch
from tl_project.runtime import say

# What LightningCLI records when it builds the model; anything else is refused.
TRUSTED_INSTANTIATORS = frozenset({"lightning.pytorch.cli.instantiate_module"})
TRUSTED_CLASS_PATHS = frozenset({"tl_project.model.TransferLearningModel", "tl_project.TransferLearningModel"})
SPECIAL_NAMES = ("last", "best")


def load_trusted(file: Path, what: str) -> Any:
    """`torch.load(file, weights_only=True)`, memory-mapped where the format allows it."""
    try:
        try:
            return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):  # files from torch.save(..., _use_new_zipfile_serialization=False)
                raise
            return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:
        raise unreadable(file, what, error) from None


def unreadable(file: Path, what: str, error: Exception) -> UserError:
    """Why `file` could not be read, in the user's terms: not a torch file, damaged, or holding code."""
    with open(file, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive (or, in its old format, a pickle: protocol byte 0x80).
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        return UserError(
            f"{file} is not a {what}: it was not written by torch.save (it starts with {head!r}). "
            "Pass a file saved by tl_project or with torch.save(state_dict)."
        )
    text = str(error)
    if "Weights only load failed" in text or "Unsupported global" in text:
        return UserError(
            f"Cannot read {what} {file} as plain tensors and values (weights_only=True): it holds other "
            "objects, which were refused unread. Only load files from a source you trust, saved with "
            "torch.save(state_dict) or by tl_project."
        )
    first = text.split(". ")[0].rstrip(".")
    return UserError(
        f"The {what} {file} is truncated or corrupt ({first}). "
        "Copy it again, or pass another file (an earlier epoch's checkpoint, last.ckpt)."
    )


def check_hyperparameters(hparams: dict[str, Any], source: str) -> None:
    """Refuse hyper-parameters that would make Lightning import and call something unknown."""
    instantiator = hparams.get("_instantiator")
    if instantiator is not None and instantiator not in TRUSTED_INSTANTIATORS:
        raise UserError(
            f"Checkpoint {source} names an unknown instantiator {instantiator!r} in its hyper-parameters; "
            "refusing to load it. tl_project checkpoints only name " + ", ".join(sorted(TRUSTED_INSTANTIATORS)) + "."
        )
    class_path = hparams.get("_class_path")
    if class_path is not None and class_path not in TRUSTED_CLASS_PATHS:
        raise UserError(f"Checkpoint {source} asks to build {class_path!r}; refusing to load it.")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A tl_project checkpoint, read safely, its hyper-parameters checked."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"Checkpoint {path} does not exist. Pass --ckpt_path PATH/TO/FILE.ckpt, last or best.")
    checkpoint = load_trusted(file, what="checkpoint")
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UserError(f"{path} is not a Lightning checkpoint (no state_dict).")
    for key in ("hyper_parameters", "datamodule_hyper_parameters"):
        check_hyperparameters(checkpoint.get(key) or {}, str(path))
    return checkpoint


def find_checkpoint(value: str, root_dir: str | Path) -> str:
    """`value`, or for `last` / `best` that file of the newest run under `root_dir` that has one."""
    if value not in SPECIAL_NAMES:
        return value
    runs = Path(root_dir).expanduser()
    candidates = [
        p
        for p in runs.glob(f"version_*/checkpoints/{value}.ckpt")
        if p.exists() and p.parts[-3].removeprefix("version_").isdigit()
    ]
    if not candidates:
        raise UserError(
            f"--ckpt_path {value}: no {runs}/version_*/checkpoints/{value}.ckpt found. "
            "Pass --ckpt_path PATH, or --trainer.default_root_dir where the runs are."
        )
    newest = max(candidates, key=lambda p: int(p.parts[-3].removeprefix("version_")))
    say(
        f"--ckpt_path {value}: {newest}, of the newest run with a {value}.ckpt ({len(candidates)} runs have one "
        f"under {runs}; pass a file's path to take another)"
    )
    return str(newest)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a hidden file beside it, syncs it to disk, then renames it into place.

    A crash, SIGKILL or full disk mid-write leaves the previous file whole: the rename
    is atomic within one folder, unlike a copy from a temporary folder elsewhere.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
        try:
            with open(partial, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)


def check_compatible(saved: dict[str, Any], class_names: list[str], backbone: str) -> None:
    """A checkpoint's hyperparameters (`saved`) fit a model of these classes and backbone."""
    saved_names = saved.get("class_names") or [str(i) for i in range(saved.get("num_classes", 0))]
    if saved_names and saved_names != class_names:
        raise class_mismatch(saved_names, class_names)
    if saved.get("backbone", backbone) != backbone:
        raise UserError(
            f"The checkpoint holds a {saved['backbone']!r} backbone, not {backbone!r}: "
            f"pass --model.backbone {saved['backbone']}."
        )
