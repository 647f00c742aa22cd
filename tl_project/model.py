"""TransferLearningModel: a pretrained backbone, a new linear head, one shared step.

The backbone is a torchvision or timm classifier without its final layer (see
`backbones.py`); the head is a fresh `Linear(in_features, num_classes)`. What trains
when (`finetune` full / head / gradual, `freeze_batchnorm`) is the fine-tune policy of
`finetune.py`; the recipe's parts (schedule, MixUp/CutMix, class weights) are in
`recipe.py`; the divergence guard is a callback of fit's Trainer (`callbacks.py`).
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from tl_project.backbones import build_backbone, weights_preprocessing
from tl_project.calibration import (
    ANSWER_NOTHING,
    Selective,
    answer_threshold,
    calibration_error,
    describe_temperature,
    fit_temperature,
)
from tl_project.checkpoints import check_compatible, read_checkpoint
from tl_project.errors import UserError
from tl_project.features import FeatureCache
from tl_project.finetune import FinetunePolicy
from tl_project.multilabel import (
    DEFAULT_THRESHOLD,
    Collected,
    best_f1_thresholds,
    per_class_metrics,
    use_thresholds,
)
from tl_project.multilabel import stage_metrics as multilabel_metrics
from tl_project.recipe import BatchMix, fit_traps, learning_rate_schedule, loss_weights, mix_seed, positive_weights
from tl_project.runtime import MIN_BATCHNORM_BATCH, say, small_batch_advice, warn
from tl_project.runtimes import parity_problem
from tl_project.transforms import Preprocessing

# (images, targets, dataset indices), as ImageDataModule's loaders give them.
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


# The seed recipe's optimizer, as LightningCLI writes it (the CLI's default too).
RECIPE_OPTIMIZER = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.001, "momentum": 0.9}}
# What "best" means: the checkpoint keeps the epoch with the highest validation accuracy.
MONITOR, MONITOR_MODE = "val/acc", "max"


def default_optimizer(params: Any) -> torch.optim.Optimizer:
    """The recipe's optimizer: SGD(lr=0.001, momentum=0.9)."""
    return torch.optim.SGD(params, **RECIPE_OPTIMIZER["init_args"])  # type: ignore[arg-type]


def stage_metrics(stage: str, num_classes: int) -> MetricCollection:
    """Top-1 accuracy (correct/total) for every stage; top-5 and macro accuracy for test."""
    metrics: dict[str, Any] = {"acc": MulticlassAccuracy(num_classes, average="micro")}
    if stage == "test":
        metrics["acc_macro"] = MulticlassAccuracy(num_classes, average="macro")
        if num_classes > 5:
            metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    return MetricCollection(metrics, prefix=f"{stage}/")


def check_options(
    finetune: str, cache_features: bool, mixing: float, schedule: str, warmup_epochs: float, lr_scheduler: Any
) -> None:
    """The cross-option rules of the model's own options, before anything is built."""
    if (schedule == "cosine" or warmup_epochs) and lr_scheduler is not None:
        raise UserError("Pass either model.schedule / model.warmup_epochs or model.lr_scheduler, not both.")
    if cache_features and finetune != "head":
        raise UserError(
            f"model.cache_features reuses the backbone's features, so they must not change: it needs "
            f"--model.finetune head (not {finetune}) and --data.augment false."
        )
    if cache_features and mixing:
        raise UserError(
            "model.cache_features trains on fixed features: it cannot mix images (model.mixup, model.cutmix)."
        )


class TransferLearningModel(L.LightningModule):
    """A pretrained torchvision or timm backbone with a new classification head."""

    def __init__(
        self,
        num_classes: int,
        class_names: list[str] | None = None,
        backbone: str = "resnet50",
        weights: str | None = "IMAGENET1K_V2",
        finetune: Literal["full", "head", "gradual"] = "full",
        unfreeze_at_epoch: int = 1,
        backbone_lr_factor: float = 0.1,
        label_smoothing: float = 0.0,
        freeze_batchnorm: bool = False,
        preprocessing: dict[str, Any] | None = None,
        channels_last: bool = True,
        cache_features: bool = False,
        compile: bool = False,
        tta: Literal["none", "flip"] = "none",
        schedule: Literal["constant", "cosine"] = "constant",
        warmup_epochs: float = 0.0,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        multi_label: bool = False,
        calibrate: bool = True,
        target_accuracy: float | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        """
        Args:
            num_classes: Number of classes (linked from the data).
            class_names: Class names in label order (linked from the data); saved in checkpoints.
            backbone: A torchvision classification model name (resnet50, efficientnet_b0, convnext_tiny, ...), or timm/NAME[.TAG] for any timm model (the timm extra).
            weights: A weights name (torchvision's IMAGENET1K_V2, DEFAULT, ...; for timm DEFAULT or a pretrained tag), a .pth/.pt/.safetensors state_dict or a tl_project .ckpt path, or null for random init.
            finetune: full trains every layer; head freezes the backbone (BatchNorm statistics included); gradual trains the head first, then everything.
            unfreeze_at_epoch: With finetune gradual: the epoch (from 0) at which the backbone starts training.
            backbone_lr_factor: With finetune gradual: the backbone's learning rate relative to the head's.
            label_smoothing: Label smoothing of the cross-entropy loss, 0 for none.
            freeze_batchnorm: Keep the backbone's BatchNorm statistics fixed (eval mode) while it trains; for batches under 16 images per device.
            preprocessing: The input preprocessing (crop_pct, interpolation, mean, std); null takes the weights' own (torchvision's preset of a weights name, timm's pretrained config of a timm model), else ImageNet's classic one. Saved resolved in checkpoints.
            channels_last: Run convolutions in channels-last memory format (faster on most CPUs and GPUs).
            cache_features: With finetune head and data.augment false: compute the frozen backbone's features once, before the first epoch, and train the head on them.
            compile: Compile the backbone with torch.compile (minutes of compiling first; see README, Performance).
            tta: Test-time augmentation in test and predict: flip averages the logits of each image and its mirror image; none.
            schedule: The learning rate over the run: constant, or cosine (to 0 at the last step); stepped every step.
            warmup_epochs: Epochs (a fraction is fine) of linear warmup from 0 before the schedule; 0 for none.
            mixup: MixUp's alpha for training batches (0.2 is usual); 0 for none.
            cutmix: CutMix's alpha for training batches (1.0 is usual); 0 for none. With mixup too, each batch gets one of the two.
            multi_label: Several classes per image (linked from the data): sigmoid outputs, BCE loss, per-class thresholds chosen on validation.
            calibrate: Fit a temperature on the validation split after every validation epoch (multi-label: one per class) and give out calibrated probabilities everywhere (test, predict, export, serve); false keeps the raw ones.
            target_accuracy: A chosen accuracy (0.9 for 90 %): on the validation split, the lowest top-class probability at which the answered images reach it is saved; predict and serve then mark images below it as not answered. Single-label only; null answers every image.
            optimizer: The optimizer; default SGD(lr=0.001, momentum=0.9).
            lr_scheduler: Any other torch learning-rate scheduler, instead of model.schedule and model.warmup_epochs: stepped every epoch (a ReduceLROnPlateau in mode max watches val/acc, in mode min val/loss).
        """
        super().__init__()
        # Optimizer factories are callables, not plain values: the run's config.yaml records them.
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        if num_classes < 1:
            raise UserError(f"num_classes is {num_classes}; the data must have at least one class.")
        if class_names is not None and len(class_names) != num_classes:
            raise UserError(f"{len(class_names)} class_names given for num_classes={num_classes}.")
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        check_options(finetune, cache_features, mixup or cutmix, schedule, warmup_epochs, lr_scheduler)
        if multi_label and label_smoothing:
            raise UserError(
                "--data.multi_label true trains one yes/no output per class: model.label_smoothing is for "
                "single-label data; set it to 0."
            )
        self.multi_label = multi_label
        check_target_accuracy(target_accuracy, multi_label)
        self.policy = FinetunePolicy(finetune, unfreeze_at_epoch, backbone_lr_factor, freeze_batchnorm)
        self.optimizer_factory = optimizer or default_optimizer
        self.lr_scheduler_factory = lr_scheduler

        self.backbone, in_features = build_backbone(backbone, weights)
        # Resolved once and saved: test, predict, the report and export use what training used.
        self.preprocessing = (
            Preprocessing.from_dict(preprocessing) if preprocessing else weights_preprocessing(backbone, weights)
        )
        self.hparams["preprocessing"] = self.preprocessing.as_dict()
        self.head = nn.Linear(in_features, num_classes)
        self.policy.prepare(self.backbone)
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.mix = BatchMix(mixup, cutmix, num_classes)
        self.data_seed = 0  # the data's seed, taken when fitting starts: MixUp/CutMix draws follow from it
        # Training loss weights per class (data.balance loss), set when fitting starts.
        self.class_weights: torch.Tensor | None = None
        metrics = multilabel_metrics if multi_label else stage_metrics
        self.train_metrics = metrics("train", num_classes)
        self.val_metrics = metrics("val", num_classes)
        self.test_metrics = metrics("test", num_classes)
        # The validation split's logits and targets of an epoch: for the temperature and thresholds.
        self.val_outputs = Collected()
        # Saved in the checkpoint's state, fitted on validation (calibration.py): the logits'
        # temperature (one per class for multi-label) and the probability below which an image
        # is not answered (0: every image; target_accuracy sets it).
        self.register_buffer("temperature", torch.ones(num_classes if multi_label else 1))
        self.register_buffer("min_probability", torch.zeros(()))
        self.calibration_summary: str | None = None  # what the last validation epoch fitted, for people
        if multi_label:
            # Each class's yes/no threshold, chosen on validation; saved in the checkpoint's state.
            self.register_buffer("thresholds", torch.full((num_classes,), DEFAULT_THRESHOLD))
            self.test_per_class = per_class_metrics(num_classes)
        # Mean loss weighted by images, summed across processes: exact under DDP too.
        self.train_loss, self.val_loss, self.test_loss = MeanMetric(), MeanMetric(), MeanMetric()
        self._was_frozen: bool | None = None  # the phase of the last training epoch (gradual)
        self._compiled = False
        self.features = FeatureCache()  # filled when training starts, with cache_features
        # predict's converted network (runtimes.OnnxLogits), set by runtimes.InferenceRuntime.
        self.fast: Any = None

    def setup(self, stage: str) -> None:
        if self.hparams["channels_last"]:
            self.to(memory_format=torch.channels_last)
        if self.hparams["compile"] and not self._compiled:
            # In place: the parameters and the checkpoint's keys stay those of the eager model.
            self.backbone.compile()
            self._compiled = True

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits for a batch of normalised images."""
        if self.hparams["channels_last"] and images.ndim == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.policy.mode == "gradual" and self.backbone_frozen:
            # No gradients reach the backbone; its parameters still require them, so that
            # DDP, which registers parameters once, keeps reducing them after the unfreeze.
            with torch.no_grad():
                features = self.backbone(images)
            return self.head(features)
        return self.head(self.backbone(images))

    @property
    def backbone_frozen(self) -> bool:
        """Whether the backbone is frozen now (the fine-tune policy at the current epoch)."""
        return self.policy.backbone_frozen(self.current_epoch)

    @property
    def batchnorm_trains(self) -> bool:
        """Whether BatchNorm layers normalise by batch statistics in training (at some epoch of the fit)."""
        return self.policy.batchnorm_trains(self.backbone)

    def train(self, mode: bool = True) -> TransferLearningModel:
        """Set train/eval mode; a frozen backbone, or frozen BatchNorm, always stays in eval mode."""
        super().train(mode)
        self.policy.set_modes(self.backbone, self.current_epoch)
        return self

    def on_train_epoch_start(self) -> None:
        frozen = self.backbone_frozen
        self.train()  # BatchNorm mode of this epoch's phase
        if self.policy.mode != "gradual" or frozen == self._was_frozen:
            return
        self._was_frozen = frozen
        count = sum(p.numel() for p in (self.head if frozen else self).parameters())
        rates = [group["lr"] for group in self.trainer.optimizers[0].param_groups]
        say(self.policy.phase_message(self.current_epoch, count, rates))
        self.log("trainable_params", float(count), on_epoch=True, on_step=False)

    def on_train_start(self) -> None:
        if self.hparams["cache_features"]:
            self.features.fill(self, self.trainer.datamodule)  # type: ignore[attr-defined]

    def on_fit_start(self) -> None:
        datamodule: Any = self.trainer.datamodule  # type: ignore[attr-defined]
        if self.hparams["cache_features"]:
            FeatureCache.require_fixed_view(datamodule)
        self.data_seed = int(getattr(datamodule, "seed", 0))  # MixUp/CutMix draws follow from it
        self.class_weights = None
        if getattr(datamodule, "balance", "none") == "loss":
            if self.multi_label:
                weights = positive_weights(datamodule.class_counts, datamodule.train_size, self.class_names)
            else:
                weights = loss_weights(datamodule.class_counts, self.class_names)
            self.class_weights = weights.to(self.device)
        if hasattr(datamodule, "train_labels_only"):
            # With the cache, training epochs look features up by index: they need no image.
            datamodule.train_labels_only = bool(self.hparams["cache_features"])
        # Last: estimating the steps builds the training loader, which must know its mode first.
        counts = datamodule.class_counts if self.mix and hasattr(datamodule, "class_counts") else []
        for trap in fit_traps(self.trainer, self.hparams["warmup_epochs"], bool(self.mix), counts):
            warn(trap)
        self.policy.check_strategy(self.trainer.strategy.model)

    # -- steps --

    def _shared_step(self, batch: Batch, stage: str, batch_idx: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, logits) of a batch; logs the stage's loss and metrics."""
        images, labels, indices = batch
        targets = labels
        if stage == "train" and self.mix:
            seed = mix_seed(self.data_seed, self.current_epoch, batch_idx, self.global_rank)
            images, targets = self.mix(images, labels, seed)  # class probabilities (multi-label: mixed vectors)
            # For the training metrics: the larger share (multi-label: the classes of at least half weight).
            labels = (targets >= 0.5).to(labels.dtype) if self.multi_label else targets.argmax(dim=1)
        cached = self.features.get(stage)  # filled for fitting (cache_features): train and val
        if cached is not None and self.trainer.state.fn == TrainerFn.FITTING:
            logits = self.head(cached[indices].to(self.head.weight.dtype))
        else:
            logits = self.evaluate(images) if stage == "test" else self(images)
        metrics, mean_loss = getattr(self, f"{stage}_metrics"), getattr(self, f"{stage}_loss")
        if self.multi_label:
            # Training: the mixed targets and data.balance loss's pos_weight, where on.
            soft, weights = (targets, self.class_weights) if stage == "train" else (labels, None)
            loss = nn.functional.binary_cross_entropy_with_logits(logits, soft.to(logits.dtype), pos_weight=weights)
            probabilities, truth = logits.detach().float().sigmoid(), labels.int()
            metrics.update(probabilities, truth)
            if stage == "test":
                self.test_per_class.update(probabilities, truth)
        else:
            if stage == "train":
                loss = nn.functional.cross_entropy(
                    logits, targets, weight=self.class_weights, label_smoothing=self.hparams["label_smoothing"]
                )
            else:
                loss = self.loss_fn(logits, labels)
            metrics.update(logits, labels)
        if stage == "val":
            self.val_outputs.update(logits, labels)
        mean_loss.update(loss.detach(), weight=len(labels))
        self.log(f"{stage}/loss", mean_loss, on_epoch=True, on_step=False)
        self.log_dict(metrics, on_epoch=True, on_step=False, prog_bar=stage != "test")
        return loss, logits

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor | None:
        if not len(batch[1]):  # every image of the batch failed to load (data.verify header/off)
            return None
        size = len(batch[1])
        if self.global_step == 0 and batch_idx == 0 and size < MIN_BATCHNORM_BATCH and self.batchnorm_trains:
            warn(small_batch_advice(size))
        loss, _ = self._shared_step(batch, "train", batch_idx)
        # The live loss of the step, for the progress bar only.
        self.log("loss", loss, prog_bar=True, logger=False)
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        if len(batch[1]):
            self._shared_step(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> dict[str, torch.Tensor] | None:
        """The batch's logits, labels and indices, for callbacks (the test report)."""
        if not len(batch[1]):
            return None
        _, logits = self._shared_step(batch, "test")
        return {"logits": logits.detach(), "labels": batch[1], "indices": batch[2]}

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking and self.trainer.state.fn == TrainerFn.FITTING:
            # This epoch's model's temperature, thresholds and answer threshold, from its
            # validation logits (gathered from all processes, so every process agrees).
            logits, targets = self.val_outputs.compute()
            self.fit_calibration(logits.cpu(), targets.cpu())
        self.val_outputs.reset()

    def fit_calibration(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Set the temperature (with `calibrate`), the multi-label thresholds and the answer
        threshold (with `target_accuracy`) from a validation split's raw logits and targets."""
        temperature: Any = self.temperature
        if self.hparams.get("calibrate", True):
            temperature.copy_(fit_temperature(logits, targets, self.multi_label))
        scaled = self.calibrated(logits)
        answers = ""
        if self.multi_label:
            raw, calibrated = logits.sigmoid().flatten(), scaled.sigmoid().flatten()
            before, after = (calibration_error(p, targets.flatten()) for p in (raw, calibrated))
            thresholds: Any = self.thresholds
            thresholds.copy_(best_f1_thresholds(scaled.sigmoid(), targets))
            # The same decisions on the uncalibrated probabilities that the val and train metrics hold.
            raw_thresholds = torch.sigmoid(temperature.cpu() * torch.logit(thresholds.cpu(), eps=1e-6))
            use_thresholds(raw_thresholds.to(self.device), self.val_metrics, self.train_metrics)
        else:
            # The temperature never changes the top class: one `correct` serves both.
            raw_top, confidence = logits.softmax(dim=1).max(dim=1), scaled.softmax(dim=1).amax(dim=1)
            correct = raw_top.indices == targets
            before, after = calibration_error(raw_top.values, correct), calibration_error(confidence, correct)
            if (target := self.hparams.get("target_accuracy")) is not None:
                threshold = answer_threshold(confidence, correct, target)
                minimum: Any = self.min_probability
                minimum.fill_(threshold)
                answers = (
                    f"; target accuracy {100 * target:g} %: {Selective.at(threshold, confidence, correct).describe()}"
                )
                if threshold == ANSWER_NOTHING:
                    answers += " (no threshold reaches the target: every image is 'not answered')"
        self.calibration_summary = (
            f"expected calibration error {before:.3f} -> {after:.3f} on {len(targets)} validation images "
            f"(temperature {describe_temperature(temperature)})"
            if self.hparams.get("calibrate", True)
            else f"not calibrated (model.calibrate false): expected calibration error {before:.3f}"
        ) + answers

    def on_fit_end(self) -> None:
        if self.calibration_summary is None:
            warn(
                "No validation images, so the probabilities could not be calibrated and no answer threshold "
                "was chosen: give the data a validation split (data.val_split, or a val folder)."
            )
            return
        say(
            f"Calibrated on the validation split after every epoch (each checkpoint keeps its epoch's): "
            f"last epoch {self.calibration_summary}"
        )

    def on_test_epoch_start(self) -> None:
        if self.multi_label:
            thresholds: Any = self.thresholds
            use_thresholds(thresholds, self.test_metrics, self.test_per_class)

    def on_test_epoch_end(self) -> None:
        accuracy = self.test_metrics["acc"].compute()  # synchronised across processes
        if self.multi_label:
            average_precision = self.test_metrics["map"].compute()
            say(f"Mean average precision of the model on the test images: {100 * average_precision.item():.2f} %")
            say(f"Exact-match accuracy of the model on the test images: {100 * accuracy.item():.2f} %")
            return
        say(f"Accuracy of the model on the test images: {100 * accuracy.item():.2f} %")

    def evaluate(self, images: torch.Tensor) -> torch.Tensor:
        """Calibrated logits for test and predict: with `tta` flip, the mean of the image's and its
        mirror's; divided by the temperature."""
        logits = self(images)
        if self.hparams.get("tta") == "flip":
            logits = (logits + self(images.flip(-1))) / 2
        return self.calibrated(logits)

    def calibrated(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits divided by the fitted temperature (per class for multi-label)."""
        temperature: Any = self.temperature
        return logits / temperature.to(logits.device)

    def predict_logits(self, images: torch.Tensor) -> torch.Tensor:
        """`evaluate`'s logits, from the converted network where predict runs one (`runtimes.py`):
        its first batch is checked against PyTorch, and a difference sends the run back to PyTorch."""
        fast = self.fast
        if fast is None:
            return self.evaluate(images)
        logits = fast(images).to(images.device)
        if not fast.checked:
            expected = self.evaluate(images)
            problem = parity_problem(logits, expected)
            fast.checked = True
            if problem:
                warn(
                    f"ONNX Runtime differs from PyTorch on the first batch of these images ({problem}): running PyTorch."
                )
                self.fast = None
                return expected
        return logits

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, torch.Tensor] | None:
        images, _, indices = batch
        if not len(indices):
            return None
        if self.multi_label:
            probabilities = self.predict_logits(images).float().sigmoid()
            thresholds: Any = self.thresholds
            return {"index": indices, "probabilities": probabilities, "chosen": probabilities >= thresholds}
        probabilities = self.predict_logits(images).float().softmax(dim=1)
        top_probabilities, top_classes = probabilities.topk(min(5, self.num_classes), dim=1)
        return {"index": indices, "top_classes": top_classes, "top_probabilities": top_probabilities}

    # -- optimisation --

    def configure_optimizers(self) -> Any:
        groups, factors = self.policy.param_groups(self.head, self.backbone)
        optimizer = self.optimizer_factory(groups)
        for group, factor in zip(optimizer.param_groups, factors, strict=True):
            group["lr"] *= factor
        return learning_rate_schedule(
            optimizer,
            self.hparams.get("schedule", "constant"),
            self.hparams.get("warmup_epochs", 0.0),
            self.lr_scheduler_factory,
            lambda: (int(self.trainer.estimated_stepping_batches), self.trainer.max_epochs),
            (MONITOR, MONITOR_MODE),
        )

    # -- checkpoints --

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        """`LightningModule.load_from_checkpoint`, after `read_checkpoint` has vetted the file."""
        read_checkpoint(checkpoint_path)
        kwargs.setdefault("weights_only", True)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_compatible(checkpoint.get("hyper_parameters", {}), self.class_names, self.hparams["backbone"])
        # A checkpoint from before calibration: its raw probabilities, every image answered.
        state = checkpoint.get("state_dict", {})
        state.setdefault("temperature", torch.ones_like(self.temperature))  # type: ignore[arg-type]
        state.setdefault("min_probability", torch.zeros(()))


def check_target_accuracy(target_accuracy: float | None, multi_label: bool) -> None:
    if target_accuracy is None:
        return
    if not 0 < target_accuracy < 1:
        raise UserError(f"model.target_accuracy is {target_accuracy}; give a fraction between 0 and 1 (0.9 for 90 %).")
    if multi_label:
        raise UserError(
            "model.target_accuracy chooses when a single-label answer is sure enough; a multi-label model "
            "already answers per class at the thresholds chosen on validation: leave it out (null)."
        )
