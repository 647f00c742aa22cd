"""The fine-tune policy: which part of the network trains at which epoch, how its BatchNorm
layers normalise, and the optimizer's parameter groups.

- `full` trains the backbone and the head;
- `head` freezes the backbone (no gradients, BatchNorm in eval mode so its running
  statistics do not drift) and gives only the head to the optimizer;
- `gradual` trains the head alone for `unfreeze_at_epoch` epochs, then the backbone too, at
  `backbone_lr_factor` times the head's learning rate. The phase follows from the epoch
  number alone, so a resumed run is in the right phase whatever epoch it resumes at;
- `freeze_batchnorm` keeps every BatchNorm layer of a training backbone in eval mode (its
  running statistics fixed, its scale and shift still trained), for batches too small for
  batch statistics.

It is built from the model's flat options (`model.finetune`, `model.unfreeze_at_epoch`, ...),
whose names users' configs rely on. It is an object the model holds, not a callback: the
CLI asks whether BatchNorm trains (to choose the precision) before any Trainer exists, and
the model's `train()` must keep a frozen backbone in eval mode whenever Lightning switches
modes, in evaluation loops too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tl_project.errors import UserError

BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
Mode = Literal["full", "head", "gradual"]


@dataclass(frozen=True)
class FinetunePolicy:
    """What trains when (see the module's text)."""

    mode: Mode = "full"
    unfreeze_at_epoch: int = 1
    backbone_lr_factor: float = 0.1
    freeze_batchnorm: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("full", "head", "gradual"):
            raise UserError(f"model.finetune is {self.mode!r}; choose full, head or gradual.")
        if self.unfreeze_at_epoch < 0 or self.backbone_lr_factor <= 0:
            raise UserError(
                f"model.unfreeze_at_epoch {self.unfreeze_at_epoch} and model.backbone_lr_factor "
                f"{self.backbone_lr_factor}: the epoch must be 0 or more, the factor above 0."
            )

    def backbone_frozen(self, epoch: int) -> bool:
        """Whether the backbone is frozen at `epoch`: always with head, before unfreeze_at_epoch with gradual."""
        if self.mode == "gradual":
            return epoch < self.unfreeze_at_epoch
        return self.mode == "head"

    def batchnorm_trains(self, backbone: nn.Module) -> bool:
        """Whether BatchNorm layers normalise by batch statistics in training (at some epoch of the fit)."""
        if self.mode == "head" or self.freeze_batchnorm:
            return False
        return any(isinstance(m, BATCHNORMS) for m in backbone.modules())

    def prepare(self, backbone: nn.Module) -> None:
        """Once, when the model is built: a frozen backbone's parameters need no gradients."""
        if self.mode == "head":
            backbone.requires_grad_(False)

    def set_modes(self, backbone: nn.Module, epoch: int) -> None:
        """After `train()`: a frozen backbone, or frozen BatchNorm, goes back to eval mode."""
        if self.backbone_frozen(epoch):
            backbone.eval()
        elif self.freeze_batchnorm:
            for module in backbone.modules():
                if isinstance(module, BATCHNORMS):
                    module.eval()

    def param_groups(self, head: nn.Module, backbone: nn.Module) -> tuple[list[Any], list[float]]:
        """The optimizer's parameter groups and each one's factor of the learning rate. With gradual
        both groups exist from the start: resuming restores one optimizer whatever the phase."""
        if self.mode == "gradual":
            return [{"params": list(head.parameters())}, {"params": list(backbone.parameters())}], [
                1.0,
                self.backbone_lr_factor,
            ]
        # With a frozen backbone only the head's parameters require gradients.
        trainable = [p for module in (backbone, head) for p in module.parameters() if p.requires_grad]
        return [{"params": trainable}], [1.0]

    def check_strategy(self, wrapped: Any) -> None:
        """gradual under DDP (`wrapped`: the strategy's model): the backbone has no gradients at
        first, which DDP must be told."""
        if (
            self.mode == "gradual"
            and isinstance(wrapped, DistributedDataParallel)
            and not wrapped.find_unused_parameters
        ):
            raise UserError(
                "finetune gradual leaves the backbone without gradients at first, which DDP must be told: "
                "pass --trainer.strategy ddp_find_unused_parameters_true."
            )

    def phase_message(self, epoch: int, trainable: int, rates: list[float]) -> str:
        """What gradual says when its phase changes."""
        state = "frozen" if self.backbone_frozen(epoch) else "training"
        return (
            f"Epoch {epoch}: backbone {state}; {trainable:,} trainable parameters; "
            f"learning rates head {rates[0]:.3g}, backbone {rates[1]:.3g}"
        )
