"""Objects the reliability tests hand to tl_project by import path, in-process or in a subprocess."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

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
