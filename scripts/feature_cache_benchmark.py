"""Epoch time of a frozen backbone (finetune head) with and without the feature cache.

    python scripts/feature_cache_benchmark.py

ResNet-50, 224 px, batch 16, 540 Fashion-MNIST training images (val_split 0.99), no
augmentation, 2 epochs each way. With the cache, the features are computed once in a
pass before the first epoch (not counted in the epoch times printed).
"""

import time

import lightning as L
from lightning.pytorch.callbacks import Callback

from tl_project import ImageDataModule, TransferLearningModel


class EpochTimer(Callback):
    def __init__(self):
        self.times = []

    def on_train_epoch_start(self, *a):
        self.t = time.perf_counter()

    def on_train_epoch_end(self, *a):
        self.times.append(time.perf_counter() - self.t)


for cache in (False, True):
    data = ImageDataModule(
        root="/usr/share/datasets/fashion-mnist",
        download=False,
        image_size=224,
        batch_size=16,
        num_workers=2,
        augment=False,
        val_split=0.99,
        test_split=0.0,
    )
    model = TransferLearningModel(10, weights=None, finetune="head", cache_features=cache)
    timer = EpochTimer()
    L.Trainer(
        max_epochs=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    ).fit(model, datamodule=data)
    print(f"cache={cache}: epoch seconds " + ", ".join(f"{t:.2f}" for t in timer.times))
