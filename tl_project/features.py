"""The feature cache (`model.cache_features`): with a frozen backbone and fixed images, the
backbone's features of every training and validation image are computed once, before the
first step; the epochs then run the head alone, looking features up by dataset index.

The features are also kept for the other fits of the same process, by the backbone's
weights and the images' view, then by image (its path, or its name in a named dataset):
`cv`'s folds share the pool of images, so across k folds each image goes through the
backbone once instead of k times.
"""

from __future__ import annotations

from typing import Any

import torch

from tl_project.data.module import device_batches
from tl_project.errors import UserError

# (backbone fingerprint, image view) -> image name -> feature (on the CPU).
SHARED: dict[tuple[Any, ...], dict[str, torch.Tensor]] = {}


def fingerprint(module: torch.nn.Module) -> tuple[int, float]:
    """The same value for the same weights and statistics (their count and float64 sum)."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() for t in tensors), float(sum(t.detach().double().sum() for t in tensors))


class FeatureCache:
    """The frozen backbone's features of the training and validation images, by dataset index."""

    def __init__(self) -> None:
        self.features: dict[str, torch.Tensor] = {}

    @staticmethod
    def require_fixed_view(datamodule: Any) -> None:
        """The rule the data must keep: the same view of every image in every epoch."""
        if getattr(datamodule, "augment", True):
            raise UserError(
                "model.cache_features reuses the backbone's features, so they must not change: "
                "pass --data.augment false (augmented images give other features every epoch)."
            )

    def fill(self, model: Any, datamodule: Any) -> None:
        """The features of every training and validation image (those already computed by an
        earlier fit of this process with the same backbone and view are taken from there)."""
        model.train()  # Lightning may have restored saved module modes: the frozen backbone is in eval
        view = (fingerprint(model.backbone), datamodule.image_size, repr(datamodule.preprocessing))
        store = SHARED.setdefault(view, {})
        self.features = {}
        validates = model.trainer.limit_val_batches != 0
        for split in ("train", "val") if validates else ("train",):
            dataset = datamodule.datasets.get(split)
            if dataset is not None:
                self.features[split] = self._split(model, datamodule, split, dataset, store).to(model.device)

    def _split(
        self, model: Any, datamodule: Any, split: str, dataset: Any, store: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        names = [dataset.describe(i) for i in range(len(dataset))]
        if names and names[0].startswith("#"):  # images without names cannot be found again
            store = {}
        missing = [i for i, name in enumerate(names) if name not in store]
        with torch.no_grad():
            for images, _, indices in device_batches(
                datamodule, datamodule.feature_loader(split, missing), model.device
            ):
                if model.hparams["channels_last"]:
                    images = images.contiguous(memory_format=torch.channels_last)
                with model.trainer.precision_plugin.forward_context():
                    features = model.backbone(images).float().cpu()
                store.update(zip((names[i] for i in indices.tolist()), features, strict=True))
        empty = torch.zeros(model.head.in_features)  # an image that failed to load (never looked up)
        return torch.stack([store.get(name, empty) for name in names]) if names else empty[None][:0]

    def get(self, split: str) -> torch.Tensor | None:
        """The cached features of `split`, or None (no cache, or another stage)."""
        return self.features.get(split)
