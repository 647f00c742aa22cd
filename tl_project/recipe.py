"""The parts of a stronger fine-tuning recipe that the model switches on (each off by default):

- `warmup_cosine`: the learning rate rises linearly from 0 for the warmup steps, then
  falls along a cosine to 0 at the last step; stepped every optimizer step;
- `BatchMix`: MixUp and CutMix (torchvision `transforms.v2`) on a batch on the device,
  after the data's batch hook; the targets become class probabilities;
- `balanced_class_weights`: loss weights that make every class count as much in total
  (`data.balance loss`);
- `EMA`: Lightning's `EMAWeightAveraging` callback whose decay warms up from the first
  step, so that the average never reaches back further than the run has gone
  (`configs/strong.yaml`);
- `recipe_traps`: the switches' settings that cannot pay off in the run at hand, found
  when fitting starts.

Test-time flips are `model.tta`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging
from torch.optim.lr_scheduler import LambdaLR
from torchvision.transforms import v2

from tl_project.runtime import say


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int) -> LambdaLR:
    """Linear warmup over `warmup_steps`, then cosine decay to 0 at `total_steps` (a factor of each group's lr)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return LambdaLR(optimizer, factor)


def learning_rate_schedule(
    optimizer: torch.optim.Optimizer,
    schedule: str,
    warmup_epochs: float,
    lr_scheduler: Callable[[torch.optim.Optimizer], Any] | None,
    run_length: Callable[[], tuple[int, int | None]],
    monitor: tuple[str, str],
) -> Any:
    """What `configure_optimizers` returns: with `schedule` cosine or a warmup, a per-step
    `warmup_cosine` over the run's estimated steps; else the user's `lr_scheduler`, stepped
    every epoch (a ReduceLROnPlateau watches `monitor` when its mode is the monitor's, else
    the validation loss); else the optimizer alone. `run_length` gives the run's (steps, epochs)."""
    if schedule == "cosine" or warmup_epochs:
        total, max_epochs = run_length()
        epochs = max_epochs if max_epochs and max_epochs > 0 else 1
        warmup = round(warmup_epochs * total / epochs)
        steps = total if schedule == "cosine" else 10**12  # constant after the warmup
        stepwise = warmup_cosine(optimizer, steps, warmup)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": stepwise, "interval": "step"}}
    if lr_scheduler is None:
        return optimizer
    scheduler = lr_scheduler(optimizer)
    config: dict[str, Any] = {"scheduler": scheduler, "interval": "epoch"}
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        # The plateau of what the scheduler watches for: accuracy rises (mode max), loss falls (min).
        config["monitor"] = monitor[0] if scheduler.mode == monitor[1] else "val/loss"
    return {"optimizer": optimizer, "lr_scheduler": config}


class BatchMix:
    """MixUp (alpha `mixup`) and/or CutMix (alpha `cutmix`) of a batch: one of them, chosen at
    random per batch when both are on. Returns the mixed images and the targets as class
    probabilities (each row sums to one)."""

    def __init__(self, mixup: float, cutmix: float, num_classes: int) -> None:
        self.mixup, self.cutmix = mixup, cutmix
        self.transform = self.mixes(num_classes)
        self.num_classes = num_classes

    def mixes(self, num_classes: int) -> v2.Transform | None:
        """torchvision's MixUp and/or CutMix for labels `0 .. num_classes - 1`."""
        mixes: list[v2.Transform] = []
        if self.mixup > 0:
            mixes.append(v2.MixUp(alpha=self.mixup, num_classes=num_classes))
        if self.cutmix > 0:
            mixes.append(v2.CutMix(alpha=self.cutmix, num_classes=num_classes))
        return v2.RandomChoice(mixes) if len(mixes) > 1 else mixes[0] if mixes else None

    def __bool__(self) -> bool:
        return self.transform is not None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix a batch; the draws (which mix, its strength, the box) follow from `seed` alone, so
        a resumed run mixes as an uninterrupted one (see `mix_seed`). Multi-hot `labels`
        (multi-label) are mixed with the same weights as the images: torchvision mixes the
        images' positions `0 .. n - 1` as labels, whose one-hot rows come back as the weights."""
        assert self.transform is not None, "no mix switched on"
        with torch.random.fork_rng(devices=[]):  # torchvision draws these on the CPU generator
            torch.manual_seed(seed)
            if labels.ndim == 1:
                return self.transform(images, labels)
            mix = self.mixes(len(labels))
            assert mix is not None
            mixed, weights = mix(images, torch.arange(len(labels), device=labels.device))
            return mixed, weights @ labels.to(weights.dtype)


def mix_seed(seed: int, epoch: int, batch: int, rank: int) -> int:
    """The seed of one training batch's mix: from the data's seed, the epoch, the batch index and
    the process, not from the state of a generator a resumed run would not have."""
    return hash((seed, epoch, batch, rank)) & 0x7FFF_FFFF_FFFF_FFFF


def balanced_class_weights(counts: Sequence[int]) -> torch.Tensor:
    """Weights `total / (classes * count)` per class: each class weighs as much in total (0 for absent ones)."""
    counts_t = torch.tensor(counts, dtype=torch.float32)
    present = counts_t > 0
    weights = torch.zeros_like(counts_t)
    weights[present] = counts_t.sum() / (present.sum() * counts_t[present])
    return weights


def positive_weights(positives: Sequence[int], total: int, class_names: Sequence[str]) -> torch.Tensor:
    """Multi-label data.balance loss: each class's `pos_weight` of `BCEWithLogitsLoss`, its
    negatives over its positives among `total` training images (1 for a class with none),
    said per class."""
    counts = torch.tensor(positives, dtype=torch.float32)
    weights = torch.where(counts > 0, (total - counts) / counts.clamp(min=1), torch.ones_like(counts))
    listed = ", ".join(f"{name} {w:.3g}" for name, w in zip(class_names, weights.tolist(), strict=True))
    say(f"Positive-class weights of the training loss (data.balance loss): {listed}")
    return weights


def loss_weights(counts: Sequence[int], class_names: Sequence[str]) -> torch.Tensor:
    """`balanced_class_weights` of data.balance loss, said per class."""
    weights = balanced_class_weights(counts)
    listed = ", ".join(f"{name} {w:.3g}" for name, w in zip(class_names, weights.tolist(), strict=True))
    say(f"Class weights of the training loss (data.balance loss): {listed}")
    return weights


def warm_decay(decay: float, updates: torch.Tensor) -> torch.Tensor:
    """The decay of the EMA's next update after `updates` of them: `(1 + n) / (10 + n)`, at most
    `decay` (the warmup of TensorFlow's ExponentialMovingAverage and timm's EMA). The average
    then spans about the last tenth of the steps so far, until `decay`'s own horizon,
    `1 / (1 - decay)` steps, is the shorter one (0.999: after about 9,000 steps)."""
    return ((1 + updates) / (10 + updates)).clamp(max=decay)


def warm_ema_avg_fn(decay: float) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """`torch.optim.swa_utils.get_ema_avg_fn` with the decay of `warm_decay` (computed on the
    device: no synchronisation per parameter)."""

    @torch.no_grad()
    def update(average: torch.Tensor, current: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
        d = warm_decay(decay, updates.to(average.device))
        return d * average + (1 - d) * current

    return update


class EMA(EMAWeightAveraging):
    """An exponential moving average of the weights (Lightning's `EMAWeightAveraging`): validation,
    checkpoints and `test` use the averaged weights, and `last.ckpt` holds the raw ones too.

    Unlike a fixed decay, the decay warms up (`warm_decay`): early averages follow the weights
    closely, and the memory grows with the run up to `1 / (1 - decay)` steps. A fixed decay
    remembers that many steps from the first: on a short run, mostly the untrained start
    (measured: docs/recipes.md)."""

    def __init__(self, decay: float = 0.999, warmup: bool = True, update_every_n_steps: int = 1, **kwargs: Any) -> None:
        """
        Args:
            decay: The largest decay: the average's memory is at most about 1 / (1 - decay) updates.
            warmup: Warm the decay up from the first step, as (1 + n) / (10 + n) after n updates; false keeps it fixed.
            update_every_n_steps: Update the average every this many optimizer steps.
        """
        super().__init__(decay=decay, update_every_n_steps=update_every_n_steps, **kwargs)
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay is {decay}; it must be in [0, 1).")
        self.decay, self.warmup = decay, warmup
        if warmup:
            self._kwargs["avg_fn"] = warm_ema_avg_fn(decay)  # Lightning 2.6: AveragedModel's arguments


def fixed_ema_decay(callback: Callback) -> float | None:
    """The fixed decay of an EMA callback (None for one whose decay warms up, or not an EMA)."""
    if isinstance(callback, EMA):
        return None if callback.warmup else callback.decay
    if isinstance(callback, EMAWeightAveraging):
        # Lightning 2.6 keeps the decay only inside its update function (in the callback's
        # AveragedModel arguments): one update from 0 towards 1 is 1 - decay.
        update = callback._kwargs.get("avg_fn")
        if update is not None:
            zero, one = torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.float64)
            return round(1.0 - float(update(zero, one, torch.tensor(1))), 9)
    return None


# A share of the run that a switch should not take: beyond it, the switch cannot pay off.
RUN_SHARE = 0.25
# Below this many training images of a class, mixing is flagged (a rule of thumb).
MIN_MIX_IMAGES = 50


def recipe_traps(
    total_steps: int,
    epochs: int,
    callbacks: Sequence[Callback],
    warmup_epochs: float,
    mixing: bool,
    class_counts: Sequence[int],
) -> list[str]:
    """Settings that cannot pay off in a run of `total_steps` optimizer steps over `epochs`
    epochs: an EMA whose fixed memory outlasts a large share of the run, a warmup that takes
    most of it, mixing on a handful of images a class. Each as a message with the fix."""
    traps = []
    for callback in callbacks if total_steps > 0 else []:  # 0: a run without a known end
        decay = fixed_ema_decay(callback)
        if decay is not None and 1 / (1 - decay) > RUN_SHARE * total_steps:
            traps.append(
                f"The EMA's fixed decay {decay:g} averages about {1 / (1 - decay):.0f} steps, more than "
                f"{RUN_SHARE:.0%} of this run's {total_steps}: validation, checkpoints and test would use weights "
                "close to the untrained start. Use tl_project.recipe.EMA (its decay warms up with the run), "
                f"or a decay of at most {1 - 1 / (RUN_SHARE * total_steps):.3g}."
            )
    if warmup_epochs and epochs and warmup_epochs > 2 * RUN_SHARE * epochs:
        traps.append(
            f"model.warmup_epochs {warmup_epochs:g} is over half of the run's {epochs} epochs: the learning rate "
            "is still rising for most of it. Lower model.warmup_epochs or raise trainer.max_epochs."
        )
    fewest = min((count for count in class_counts if count > 0), default=0)
    if mixing and fewest < MIN_MIX_IMAGES:
        traps.append(
            f"MixUp/CutMix on {fewest} training images of a class: mixing slows the fit of the training set, "
            f"which so few images need most; it pays off on longer runs with more images (at least "
            f"{MIN_MIX_IMAGES} a class). Consider --model.mixup 0 --model.cutmix 0."
        )
    return traps


def fit_traps(trainer: Any, warmup_epochs: float, mixing: bool, class_counts: Sequence[int]) -> list[str]:
    """`recipe_traps` of a Trainer's run (its estimated steps: infinite for a run without an end)."""
    steps = trainer.estimated_stepping_batches
    total = int(steps) if math.isfinite(steps) else 0
    return recipe_traps(total, trainer.max_epochs or 0, trainer.callbacks, warmup_epochs, mixing, class_counts)
