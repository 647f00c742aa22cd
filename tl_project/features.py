"""The feature cache (`model.cache_features`): with a frozen backbone and fixed training
images, the backbone's features of every training image are computed once, before the first
step, and the head trains on them; later epochs only look features up by dataset index."""

from __future__ import annotations

from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from tl_project.errors import UserError


class FeatureCache:
    """The frozen backbone's features of the training images, by dataset index."""

    def __init__(self) -> None:
        self.features: torch.Tensor | None = None

    @staticmethod
    def check(datamodule: Any) -> None:
        """The rule the data must keep: the same view of every image in every epoch."""
        if getattr(datamodule, "augment", True):
            raise UserError(
                "model.cache_features reuses the backbone's features, so they must not change: "
                "pass --data.augment false (augmented images give other features every epoch)."
            )

    def fill(self, model: Any, datamodule: Any) -> None:
        """One pass of `model.backbone` over every training image, in order (`feature_loader`):
        shuffling and drop_last in later epochs cannot leave gaps."""
        loader = datamodule.feature_loader()
        model.train()  # Lightning may have restored saved module modes: the frozen backbone is in eval
        self.features = torch.zeros(len(loader.dataset), model.head.in_features, device=model.device)
        with torch.no_grad():
            for batch in loader:
                batch = datamodule.on_before_batch_transfer(batch, 0)  # unreadable images out
                images, _, indices = datamodule.on_after_batch_transfer(move_data_to_device(batch, model.device))
                if model.hparams["channels_last"]:
                    images = images.contiguous(memory_format=torch.channels_last)
                with model.trainer.precision_plugin.forward_context():
                    self.features[indices] = model.backbone(images).float()

    def __bool__(self) -> bool:
        return self.features is not None

    def __getitem__(self, indices: torch.Tensor) -> torch.Tensor:
        assert self.features is not None
        return self.features[indices]
