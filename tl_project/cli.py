"""The command line: `python -m tl_project {fit,validate,test,predict}`.

A LightningCLI over `TransferLearningModel` and `ImageDataModule` that adds:

- `--config NAME.yaml` (or `NAME`) that is not a file here is looked up in `configs/`;
- the data's `num_classes` and `class_names` linked into the model;
- default callbacks: `Checkpoint` (best by `val/acc`, `last.ckpt`, `best.ckpt`),
  `LearningRateMonitor` and `FitSummary` while fitting, `PredictionWriter` while predicting, and a
  CSV logger that gives every run a new `runs/version_N/` folder;
- `validate`/`test`/`predict --ckpt_path X` rebuild the model and the data from the
  checkpoint's hyper-parameters, so no config is needed; explicit flags still win.
"""

from __future__ import annotations

import inspect
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger

from tl_project.backbones import load_trusted
from tl_project.callbacks import Checkpoint, FitSummary, PredictionWriter
from tl_project.data import ImageDataModule
from tl_project.errors import UserError, user_message
from tl_project.model import TransferLearningModel

CONFIG_DIRS = (Path("configs"), Path(__file__).resolve().parent.parent / "configs")
EVAL_SUBCOMMANDS = ("validate", "test", "predict")


def find_config(name: str) -> str:
    """`name` if it is a file, else `configs/<name>` (with `.yaml` added when missing)."""
    if Path(name).is_file():
        return name
    candidates = [name] if name.endswith((".yaml", ".yml")) else [f"{name}.yaml", name]
    for folder in CONFIG_DIRS:
        for candidate in candidates:
            if (folder / candidate).is_file():
                return str(folder / candidate)
    known = sorted({p.name for folder in CONFIG_DIRS if folder.is_dir() for p in folder.glob("*.yaml")})
    raise UserError(f"Config {name} not found here or in configs/. Available configs: {', '.join(known)}")


def resolve_config_args(args: Sequence[str]) -> list[str]:
    """Replace every `--config NAME` / `--config=NAME` / `-c NAME` value by its path."""
    resolved = list(args)
    for i, arg in enumerate(resolved):
        if arg in ("--config", "-c") and i + 1 < len(resolved):
            resolved[i + 1] = find_config(resolved[i + 1])
        elif arg.startswith("--config="):
            resolved[i] = "--config=" + find_config(arg.split("=", 1)[1])
    return resolved


def checkpoint_defaults(ckpt_path: str) -> dict[str, Any]:
    """`model.*` and `data.*` defaults from a checkpoint's saved hyper-parameters."""
    if not Path(ckpt_path).is_file():
        raise UserError(f"Checkpoint {ckpt_path} does not exist. Pass --ckpt_path PATH/TO/FILE.ckpt.")
    checkpoint = load_trusted(Path(ckpt_path), what="checkpoint")
    model_hp = dict(checkpoint.get("hyper_parameters") or {})
    data_hp = dict(checkpoint.get("datamodule_hyper_parameters") or {})
    if not model_hp:
        raise UserError(f"{ckpt_path} holds no model hyper-parameters; is it a tl_project checkpoint?")
    # The checkpoint holds every weight: build the model without loading pretrained ones.
    model_hp["weights"] = None
    data_hp["classes"] = model_hp.get("class_names")
    defaults: dict[str, Any] = {}
    for prefix, values, cls in (("model", model_hp, TransferLearningModel), ("data", data_hp, ImageDataModule)):
        params = inspect.signature(cls.__init__).parameters
        # num_classes and class_names reach the model through the data link.
        skip = {"self", "num_classes", "class_names"} if cls is TransferLearningModel else {"self"}
        defaults |= {f"{prefix}.{k}": v for k, v in values.items() if k in params and k not in skip}
    return defaults


class TransferLearningCLI(LightningCLI):
    """LightningCLI with tl_project's links, default callbacks and checkpoint-driven evaluation."""

    def __init__(self, args: list[str] | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("trainer_defaults", {"default_root_dir": "runs"})
        super().__init__(
            TransferLearningModel,
            ImageDataModule,
            args=args,
            auto_configure_optimizers=False,
            seed_everything_default=kwargs.pop("seed_everything_default", 42),
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")
        parser.add_lightning_class_args(Checkpoint, "checkpoint")
        parser.set_defaults(
            {
                "model.optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.001, "momentum": 0.9}},
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "epoch={epoch}-val_acc={val/acc:.4f}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand in EVAL_SUBCOMMANDS else None
        if ckpt_path:
            # The checkpoint's settings become defaults, then parse again: configs and flags win.
            self._subcommand_parsers[subcommand].set_defaults(checkpoint_defaults(ckpt_path))
            super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """Done in `parse_arguments`, where the checkpoint's values rank below explicit ones."""

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        if config.get("logger") in (None, True):
            # A new runs/version_N/ per run: earlier checkpoints and logs are never overwritten.
            config["logger"] = CSVLogger(save_dir=config.get("default_root_dir") or "runs", name="")
        if self.subcommand == "fit":
            callbacks.append(FitSummary())
            if config["logger"]:
                callbacks.append(LearningRateMonitor())
        else:
            # Nothing trains, so nothing to checkpoint.
            callbacks = [c for c in callbacks if not isinstance(c, Checkpoint)]
            config["enable_checkpointing"] = False
        if self.subcommand == "predict":
            callbacks.append(PredictionWriter())
        return super()._instantiate_trainer(config, callbacks)


# Lightning warnings that ask nothing of the user of this command line: evaluation
# runs deliberately leave out the checkpoint callback, `main(args)` deliberately
# passes args while sys.argv has others, and the pytree one is internal.
QUIET_WARNINGS = (
    r"Be aware that when using `ckpt_path`, callbacks used to create the checkpoint",
    r"LightningCLI's args parameter is intended to run from within Python",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)


def main(args: Sequence[str] | None = None) -> None:
    """Run the command line with `args` (default: `sys.argv[1:]`)."""
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    try:
        if args is None:
            # Resolved in place: DDP re-launches this process with sys.argv.
            sys.argv[1:] = resolve_config_args(sys.argv[1:])
            TransferLearningCLI()
        else:
            TransferLearningCLI(args=resolve_config_args(args))
    except UserError as error:
        print(f"error: {user_message(error)}", file=sys.stderr)
        raise SystemExit(2) from None
