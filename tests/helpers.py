"""Shared helpers of the tests: command lines, run folders, exit codes; and the objects the
reliability tests hand to tl_project by import path, in-process or in a subprocess."""

from __future__ import annotations

import csv
import io
import os
import re
import signal
from pathlib import Path
from typing import Any
from unittest import mock

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from tl_project import main

MARKER_ENV = "TL_PROJECT_TEST_MARKER"


def write_marker(*args: Any, **kwargs: Any) -> None:
    """A stand-in for a malicious payload: proves it ran by writing the marker file."""
    Path(os.environ[MARKER_ENV]).write_text("payload ran")


class FailOnRank(Callback):
    """Raises on one rank at one training step, as a crash on one machine would."""

    def __init__(self, rank: int = 1, step: int = 2) -> None:
        self.rank = rank
        self.step = step

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            raise RuntimeError(f"injected failure on rank {self.rank} at step {self.step}")


def fit_killed_while_saving(args: list[str]) -> None:
    """`main(args)` in a process that SIGKILLs itself halfway through writing epoch 1's
    last.ckpt (whatever file it is written to first), as a kill or power loss could."""
    real_save = torch.save

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(obj, dict) and obj.get("epoch") == 1 and "last.ckpt" in str(getattr(f, "name", f)):
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        real_save(obj, f, *args, **kwargs)

    with mock.patch.object(torch, "save", save):
        main(args)


ACCURACY_LINE = re.compile(r"Accuracy of the model on the test images: (\d+\.\d\d) %")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def fit_args(root: Path, runs: Path, *extra: str) -> list[str]:
    return [
        "fit",
        *("--model.backbone", "resnet18", "--model.weights", "null"),  # the smallest that shows what a test tests
        *("--data.dataset", "null", "--data.root", str(root)),
        *("--data.image_size", "32", "--data.batch_size", "4", "--data.num_workers", "0"),
        *("--trainer.max_epochs", "2", "--trainer.default_root_dir", str(runs)),
        *QUIET,
        *extra,
    ]


def run_dirs(runs: Path) -> list[Path]:
    return sorted(runs.glob("version_*"), key=lambda p: int(p.name.split("_")[1]))


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def exit_code(args: list[str]) -> int:
    with pytest.raises(SystemExit) as raised:
        main(args)
    return int(raised.value.code or 0)


RECORD_ENV = "TL_PROJECT_TEST_RECORD"


class RecordBatches(Callback):
    """Appends `epoch: index index ...` per training batch to the file named by TL_PROJECT_TEST_RECORD."""

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        with open(os.environ[RECORD_ENV], "a") as out:
            out.write(f"{trainer.current_epoch}: {' '.join(map(str, batch[2].tolist()))}\n")
