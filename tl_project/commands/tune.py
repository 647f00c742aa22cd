"""`python -m tl_project tune`: the learning-rate range test (and, if asked, the largest batch
that fits) on the real model, data and fine-tune policy, with the same config and flags as `fit`.

The range test trains from the configured start for `--tune.steps` steps while the
learning rate grows exponentially from `--tune.min_lr` to `--tune.max_lr`, recording the
training loss (averaged over the DDP processes, so every process decides alike); it stops
early once the smoothed loss exceeds 4x its minimum. Every parameter group keeps its ratio
to the first (`finetune gradual`: the backbone at `backbone_lr_factor`). The suggestion is
fastai's "valley" (see `suggest`). The run folder gets
`lr_find.png` (loss against rate, the suggestion marked), `lr_find.csv` and `tuned.yaml`,
which `fit --config base.yaml --config runs/version_N/tuned.yaml` picks up.

Lightning's own `Tuner.lr_find` is not used: it runs one process only (not under DDP) and
sets one rate for every parameter group. `--tune.batch_size true` uses Lightning's
`Tuner.scale_batch_size` (binary search up to the first out-of-memory error, at most
`--tune.max_batch_size`; one process only); on a CPU nothing runs out of memory, so the
answer there is the largest batch tried.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser

from tl_project.callbacks import DivergenceGuard, FitSummary
from tl_project.errors import UserError
from tl_project.launch import launched
from tl_project.lightning_cli import TransferLearningCLI, parser_settings
from tl_project.runtime import say


class TuneCLI(TransferLearningCLI):
    """`fit`'s options plus `--tune.*`; its Trainer runs the range test: `tune.steps` steps, no
    validation, no checkpoints."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument("--tune.min_lr", type=float, default=1e-7, help="The range test's first learning rate.")
        parser.add_argument("--tune.max_lr", type=float, default=1.0, help="Its last learning rate.")
        parser.add_argument(
            "--tune.steps", type=int, default=100, help="Its training steps (fewer if the loss diverges)."
        )
        parser.add_argument(
            "--tune.batch_size", type=bool, default=False, help="First find the largest batch that fits the device."
        )
        parser.add_argument("--tune.max_batch_size", type=int, default=1024, help="The largest batch size tried.")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        steps = self.config["tune"]["steps"]
        kwargs |= {"max_steps": steps, "max_epochs": -1, "limit_val_batches": 0, "num_sanity_val_steps": 0}
        trainer = super().instantiate_trainer(**kwargs)
        # No checkpoints, no summary, and no divergence guard: a diverging loss ends the range test.
        unwanted = ModelCheckpoint | FitSummary | DivergenceGuard  # Checkpoint and LastCheckpoint
        trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, unwanted)]  # type: ignore[attr-defined]
        return trainer


class LRRangeTest(Callback):
    """Sets an exponentially growing learning rate before every training step and records
    the loss after it; stops the run when the loss has clearly diverged."""

    def __init__(self, min_lr: float, max_lr: float, steps: int) -> None:
        if not 0 < min_lr < max_lr or steps < 2:
            raise UserError("tune needs 0 < --tune.min_lr < --tune.max_lr and --tune.steps of at least 2.")
        self.min_lr, self.max_lr, self.steps = min_lr, max_lr, steps
        self.rates: list[float] = []
        self.losses: list[float] = []
        self._ratios: list[float] = []

    def rate(self, step: int) -> float:
        return self.min_lr * (self.max_lr / self.min_lr) ** (step / (self.steps - 1))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        groups = trainer.optimizers[0].param_groups
        if not self._ratios:
            self._ratios = [group["lr"] / groups[0]["lr"] for group in groups]
        rate = self.rate(trainer.global_step)
        for group, ratio in zip(groups, self._ratios, strict=True):
            group["lr"] = rate * ratio

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        mean = float(trainer.strategy.reduce(loss.detach().float(), reduce_op="mean"))
        self.rates.append(self.rate(trainer.global_step - 1))
        self.losses.append(mean)
        smoothed = smooth(self.losses)
        if not math.isfinite(mean) or (len(smoothed) > 5 and smoothed[-1] > 4 * min(smoothed)):
            trainer.should_stop = True  # the same decision on every process: the loss is their mean


def smooth(losses: list[float], beta: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (non-finite values end it)."""
    out, average = [], 0.0
    for i, loss in enumerate(losses):
        if not math.isfinite(loss):
            break
        average = beta * average + (1 - beta) * loss
        out.append(average / (1 - beta ** (i + 1)))
    return out


def suggest(rates: list[float], losses: list[float]) -> float:
    """fastai's "valley": the longest stretch over which the smoothed loss keeps falling (as a
    longest decreasing subsequence), and the rate halfway along its middle third. Sturdier
    than the steepest slope, which the noise of the first steps can fake."""
    smoothed = smooth(losses)
    if len(smoothed) < 4:
        raise UserError(
            f"The range test stopped after {len(smoothed)} steps: too few for a suggestion. "
            "Lower --tune.min_lr or raise --tune.steps."
        )
    falling = [1] * len(smoothed)  # length of the longest decreasing run ending at each point
    start = end = 0
    for i in range(1, len(smoothed)):
        for j in range(i):
            if smoothed[i] < smoothed[j] and falling[i] < falling[j] + 1:
                falling[i] = falling[j] + 1
        if falling[i] > falling[end]:
            end = i
            start = end - falling[end]
    third = (end - start) / 3
    return rates[start + int(third) + int(third / 2)]


def write_results(folder: Path, test: LRRangeTest, suggestion: float, batch_size: int | None) -> Path:
    """lr_find.csv, lr_find.png and tuned.yaml in `folder`; returns tuned.yaml's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "lr_find.csv", "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["lr", "loss", "smoothed_loss"])
        smoothed = smooth(test.losses)
        for i, (rate, loss) in enumerate(zip(test.rates, test.losses, strict=True)):
            writer.writerow([f"{rate:.6g}", f"{loss:.6g}", f"{smoothed[i]:.6g}" if i < len(smoothed) else ""])
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot(test.rates, test.losses, alpha=0.3, label="loss")
    axes.plot(test.rates[: len(smoothed)], smoothed, label="smoothed")
    axes.axvline(suggestion, color="red", linestyle="--", label=f"suggestion {suggestion:.2g}")
    axes.set(xscale="log", xlabel="learning rate", ylabel="training loss", title="Learning-rate range test")
    finite = [loss for loss in smoothed if math.isfinite(loss)]
    if finite:
        axes.set_ylim(min(finite) * 0.9, min(max(finite), 4 * min(finite)) * 1.1)
    axes.legend()
    figure.tight_layout()
    figure.savefig(folder / "lr_find.png", dpi=120)
    plt.close(figure)
    lines = [
        "# Written by python -m tl_project tune (lr_find.png shows the range test).",
        "# Use it after your config: python -m tl_project fit --config YOURS.yaml --config tuned.yaml",
        "model:",
        "  optimizer:",
        "    init_args:",
        f"      lr: {suggestion:.3g}",
    ]
    if batch_size is not None:
        lines += ["data:", f"  batch_size: {batch_size}"]
    (folder / "tuned.yaml").write_text("\n".join(lines) + "\n")
    return folder / "tuned.yaml"


def run_range_test(trainer: L.Trainer, model: Any, data: Any, options: Any) -> None:
    """The batch-size search when asked, then the range test; rank zero writes the results."""
    batch_size = None
    if options.batch_size:
        if trainer.world_size > 1:
            raise UserError(
                "--tune.batch_size runs on one device (Lightning's batch-size finder): drop --trainer.devices."
            )
        from lightning.pytorch.tuner import Tuner

        found = Tuner(trainer).scale_batch_size(
            model, datamodule=data, mode="binsearch", init_val=data.batch_size, max_val=options.max_batch_size
        )
        batch_size = int(found or data.batch_size)
        say(f"Largest batch that fits: {batch_size} images per device (searched up to --tune.max_batch_size)")
    test = LRRangeTest(options.min_lr, options.max_lr, options.steps)
    trainer.callbacks.append(test)  # type: ignore[attr-defined]
    trainer.fit(model, datamodule=data)
    folder = Path(trainer.log_dir or trainer.default_root_dir)  # a collective call: every process asks
    if not trainer.is_global_zero:
        return
    suggestion = suggest(test.rates, test.losses)
    tuned = write_results(folder, test, suggestion, batch_size)
    say(f"Suggested learning rate: {suggestion:.3g} (the range test: {folder / 'lr_find.png'})")
    say(f"Use it: python -m tl_project fit --config YOURS.yaml --config {tuned}")


def run(command: str, args: list[str], description: str, from_sys_argv: bool) -> None:
    """`tune`: the learning-rate range test with fit's config and flags."""
    with launched(command, args, from_sys_argv) as args:
        cli = TuneCLI(args=args, run=False, parser_kwargs=parser_settings(command, description))
        run_range_test(cli.trainer, cli.model, cli.datamodule, cli.config["tune"])
