"""Small callbacks: checkpoints (`best.ckpt`, a current `last.ckpt`), early stopping, the
prediction writer, the end-of-fit summary, the divergence guard. (The test report's callback
is in report.py.)"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback, EarlyStopping, ModelCheckpoint, RichModelSummary
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.model_summary.model_summary import get_formatted_model_size, get_human_readable_count

from tl_project.checkpoints import AtomicCheckpointIO
from tl_project.errors import UserError
from tl_project.predictions import PredictionFile, answer_threshold_in_force
from tl_project.runtime import LOW_PRECISIONS, MIN_BATCHNORM_BATCH, say, small_batch_advice


class Checkpoint(ModelCheckpoint):
    """`ModelCheckpoint` that keeps `best.ckpt` pointing at the best checkpoint so far.

    `last.ckpt` is kept by its companion, `LastCheckpoint` (`split_last`): Lightning 2.6
    rewrites `last.ckpt` only when a new best is saved, so a crash could lose every epoch
    since the last best.
    """

    BEST_NAME = "best.ckpt"

    def split_last(self) -> LastCheckpoint | None:
        """With `save_last`, the companion that keeps `last.ckpt`; this one then keeps the top k
        only. Put it after this one among the callbacks: it then saves in the same hook, after
        this one has taken in the new score, so `last.ckpt` holds the current best too."""
        if not self.save_last:
            return None
        self.save_last = False
        return LastCheckpoint(self.dirpath, self.save_weights_only, companion=self)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._link_best(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self._link_best(trainer)

    def _link_best(self, trainer: L.Trainer) -> None:
        if not (trainer.is_global_zero and self.best_model_path and self.dirpath):
            return
        if Path(self.best_model_path).parent != Path(self.dirpath):  # e.g. resumed: the best is in the earlier run
            return
        link = Path(self.dirpath) / self.BEST_NAME
        target = os.path.basename(self.best_model_path)
        if link.is_symlink() and os.readlink(link) == target:
            return
        # Swap the link atomically: a reader never sees a missing best.ckpt.
        tmp = link.with_name(f".{self.BEST_NAME}.tmp")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target)
        os.replace(tmp, link)


class ModelOverview(RichModelSummary):
    """Lightning's model summary without its FLOPs column and total, which Lightning counts only
    for a model with an example input and prints as 0 for this one."""

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        from rich import get_console
        from rich.table import Table

        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        for name, _ in columns:
            table.add_column(name, justify="right" if name in ("Params", "In sizes", "Out sizes") else "left")
        for row in zip(*(values for _, values in columns), strict=True):
            table.add_row(*row)
        console = get_console()
        console.print(table)
        trainable, frozen, total = (
            get_human_readable_count(n).strip()
            for n in (trainable_parameters, total_parameters - trainable_parameters, total_parameters)
        )
        console.print(
            f"Trainable params: {trainable}, non-trainable: {frozen}, total: {total} "
            f"({get_formatted_model_size(model_size)} MB in fp32); modules in train mode: "
            f"{total_training_modes['train']}, in eval mode: {total_training_modes['eval']}"
        )


class LastCheckpoint(ModelCheckpoint):
    """`last.ckpt`, rewritten at every validation (or epoch end without validation), and on
    SIGTERM (a scheduler's notice before preemption) before the run stops: a `ModelCheckpoint`
    of the latest, named `last`, with no monitor."""

    def __init__(
        self,
        dirpath: str | Path | None = None,
        save_weights_only: bool = False,
        companion: ModelCheckpoint | None = None,
    ) -> None:
        """`companion`: the top-k `Checkpoint`; when it saved at this very step, `last.ckpt` is a
        hard link to its file (one copy on disk for a checkpoint that is both best and last)."""
        super().__init__(
            dirpath=dirpath,
            filename=self.CHECKPOINT_NAME_LAST,
            monitor=None,
            save_top_k=1,
            save_weights_only=save_weights_only,
            enable_version_counter=False,
        )
        self.companion = companion

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        companion = self.companion
        # Lightning's record of the companion's latest save (the same on every process).
        saved = getattr(companion, "_last_checkpoint_saved", None)
        # Only with writes that replace the file (a rename): one written in place would change both names.
        replaces = isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
        if companion is None or not saved or not replaces or companion._last_global_step_saved != trainer.global_step:
            super()._save_checkpoint(trainer, filepath)
            return
        linked = True
        if trainer.is_global_zero:
            tmp = Path(filepath).with_name(f".{Path(filepath).name}.link")
            try:
                tmp.unlink(missing_ok=True)
                os.link(saved, tmp)  # the same file: nothing written twice
                os.replace(tmp, filepath)
            except OSError:  # a file system without hard links: a copy as before
                linked = False
        if not trainer.strategy.broadcast(linked):
            super()._save_checkpoint(trainer, filepath)
            return
        trainer.strategy.barrier("last.ckpt linked")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Only on SIGTERM: after any other error the weights may be broken (e.g. a NaN loss).
        if isinstance(exception, SIGTERMException) and self.dirpath:
            # The name every other save of this callback gets (its filename, formatted).
            metrics = {"epoch": torch.tensor(trainer.current_epoch), "step": torch.tensor(trainer.global_step)}
            metrics |= trainer.callback_metrics
            trainer.save_checkpoint(self.format_checkpoint_name(metrics), self.save_weights_only)


class PredictionWriter(BasePredictionWriter):
    """Streams the predictions to `output` (default: the run folder's `predictions.csv`) as
    batches finish, and continues an interrupted run (`tl_project.predictions`).

    Under DDP every process predicts its share of the images still to do and writes its own
    part; rank zero merges them, each image once, in the order of the images.
    """

    FILENAME = "predictions.csv"

    def __init__(self, output: str | None = None, min_probability: float | None = None) -> None:
        """`min_probability`: the answer threshold; default the checkpoint's."""
        super().__init__(write_interval="batch")
        self.output, self.min_probability = output, min_probability
        self.file: PredictionFile | None = None
        self.path: Path | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Before the loader is made: which images still need a row (all, unless continuing)."""
        if stage != "predict":
            return
        datamodule: Any = trainer.datamodule  # type: ignore[attr-defined]
        run_dir = trainer.log_dir or trainer.default_root_dir  # a collective call: every rank asks
        self.path = Path(self.output).expanduser() if self.output else Path(run_dir) / self.FILENAME
        paths = datamodule.predict_paths
        delimiter = datamodule.hparams.get("label_delimiter", " ") if getattr(pl_module, "multi_label", False) else None
        self.file = PredictionFile(self.path, paths, pl_module.class_names, trainer.global_rank, delimiter)  # type: ignore[arg-type]
        attempt, problem = 0, None
        if trainer.is_global_zero:
            try:
                attempt = self.file.prepare()
            except UserError as error:
                problem = str(error)
        attempt, problem = trainer.strategy.broadcast((attempt, problem))  # the others wait for rank 0's repairs
        if problem:
            raise UserError(problem)
        datamodule.predict_skip = self.file.begin(attempt)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After the checkpoint is loaded: the answer threshold it carries, unless one was given."""
        assert self.file is not None
        saved, multi_label = float(getattr(pl_module, "min_probability", 0.0)), getattr(pl_module, "multi_label", False)
        self.file.min_probability = answer_threshold_in_force(self.min_probability, saved, multi_label)

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if prediction is None or self.file is None:  # a batch whose images all failed to load
            return
        indices = prediction["index"].tolist()
        if "chosen" in prediction:  # multi-label
            self.file.write_sets(indices, prediction["chosen"].tolist(), prediction["probabilities"].tolist())
            return
        self.file.write(indices, prediction["top_classes"].tolist(), prediction["top_probabilities"].tolist())

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert self.file is not None
        self.file.close()
        trainer.strategy.barrier("parts written")
        if trainer.is_global_zero:
            self.file.finish()
        # Every rank leaves together: none tears down the process group while rank 0 still writes.
        trainer.strategy.barrier("predictions written")


class EarlyStop(EarlyStopping):
    """Lightning's EarlyStopping, off unless `patience` is given, and saying when it stopped."""

    def __init__(
        self, patience: int | None = None, monitor: str = "val/acc", mode: str = "max", min_delta: float = 0.0
    ) -> None:
        """
        Args:
            patience: Stop fitting after this many validations without improvement of monitor; null: never stop early.
            monitor: The validation metric to watch (as the best checkpoint's: val/acc).
            mode: max when higher is better (accuracy), min when lower is (loss).
            min_delta: The least change of monitor that counts as an improvement.
        """
        if patience is not None and patience < 1:
            raise UserError(f"early_stopping.patience is {patience}; pass 1 or more, or null to never stop early.")
        super().__init__(monitor=monitor, mode=mode, patience=patience or 1, min_delta=min_delta)
        self.enabled = patience is not None

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.enabled:
            super().on_train_epoch_end(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.enabled:
            super().on_validation_end(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.enabled and self.stopped_epoch:
            say(
                f"Stopped early after epoch {self.stopped_epoch}: {self.monitor} did not improve for {self.patience} "
                f"validations (best {self.best_score.item():.4f}; --early_stopping.patience sets the wait)."
            )


# Metrics that are better higher (accuracy, mean average precision) and lower (loss).
HIGHER_IS_BETTER, LOWER_IS_BETTER = ("acc", "map"), ("loss",)


def check_watch_modes(callbacks: list[Callback]) -> None:
    """Refuse an early stop or a checkpoint whose mode keeps the worst of what it watches:
    Lightning's EarlyStopping and ModelCheckpoint default to mode min, which for val/acc stops
    (or keeps) at the lowest accuracy; and mode max for a loss."""
    for callback in callbacks:
        if not isinstance(callback, EarlyStopping | ModelCheckpoint) or not callback.monitor:
            continue
        name = callback.monitor.rsplit("/", 1)[-1]
        right = "max" if name.startswith(HIGHER_IS_BETTER) else "min" if name.startswith(LOWER_IS_BETTER) else None
        if right is not None and callback.mode != right:
            option = "--trainer.callbacks.mode"  # (or mode in a config's init_args)
            if isinstance(callback, EarlyStop | Checkpoint):
                option = "--early_stopping.mode" if isinstance(callback, EarlyStop) else "--checkpoint.mode"
            raise UserError(
                f"{type(callback).__name__} watches {callback.monitor} with mode {callback.mode}: it would take the "
                f"worst value for the best. Pass {option} {right}."
            )


class FitSummary(Callback):
    """Prints at the end of `fit`: the best checkpoint with its score, training throughput, total time.

    Throughput is steady-state: from the end of each epoch's first batch (start-up,
    worker spawn and warm-up excluded) to the end of its last, data loading included,
    validation excluded, summed over all processes.
    """

    def __init__(self) -> None:
        self.images = 0
        self.seconds = 0.0
        self._last: float | None = None
        self._fit_start = time.perf_counter()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.images += len(batch[0]) * trainer.world_size
            self.seconds += now - self._last
        self._last = now

    @property
    def images_per_second(self) -> float | None:
        """Training images per second over all processes, or None before a second batch."""
        return self.images / self.seconds if self.seconds else None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        checkpoint = trainer.checkpoint_callback
        if isinstance(checkpoint, ModelCheckpoint) and checkpoint.best_model_path:
            score = checkpoint.best_model_score
            shown = f" ({checkpoint.monitor} {score.item():.4f})" if score is not None else ""
            say(f"Best checkpoint: {checkpoint.best_model_path}{shown}")
        if self.images_per_second is not None:
            say(
                f"Training throughput: {self.images_per_second:.1f} images/s "
                f"({self.images} images in {self.seconds:.1f} s, first batch of each epoch excluded)"
            )
        say(f"Fit took {time.perf_counter() - self._fit_start:.1f} s in all")


class DivergenceGuard(Callback):
    """Stops the run on a NaN or infinite training loss, before it reaches the weights or a
    checkpoint, on every process together, with the likely causes and their fixes. Part of
    `fit`'s Trainer; `tune` leaves it out (its range test ends on divergence by design)."""

    def __init__(self) -> None:
        self.batch_size = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self.batch_size = len(batch[1])

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        diverged = not bool(torch.isfinite(loss))
        if trainer.world_size > 1:  # every rank stops together, none waits for the others
            diverged = trainer.strategy.reduce_boolean_decision(diverged, all=False)
        if not diverged:
            return
        # The likely causes first: reduced precision, then batches too small for BatchNorm.
        advice = []
        precision = str(trainer.precision)
        if precision in LOW_PRECISIONS:
            advice.append(
                f"It ran in {precision}: --trainer.precision 32-true shows whether the reduced precision is the cause."
            )
        if self.batch_size < MIN_BATCHNORM_BATCH and getattr(pl_module, "batchnorm_trains", False):
            advice.append(small_batch_advice(self.batch_size))
        advice.append(
            "Otherwise lower the learning rate (--model.optimizer.init_args.lr), clip gradients "
            "(--trainer.gradient_clip_val 1.0), or check the data."
        )
        raise UserError(
            f"The training loss is {loss.item()} at epoch {trainer.current_epoch}, step {trainer.global_step} "
            f"(precision {precision}, batches of {self.batch_size} images per device): training diverged and "
            "stopped; no checkpoint of it was written.\n" + "\n".join(advice)
        )
