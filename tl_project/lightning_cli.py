"""TransferLearningCLI: the LightningCLI of tl_project, and what every command's parser shares.

A LightningCLI over `TransferLearningModel` and `ImageDataModule` that adds:

- the data's `num_classes` and `class_names` linked into the model;
- default callbacks: `Checkpoint` (best by `val/acc`, `best.ckpt`) with `LastCheckpoint` (`last.ckpt`),
  `LearningRateMonitor` and `FitSummary` while fitting, `PredictionWriter` while predicting, and a
  CSV logger that gives every run a new `runs/version_N/` folder;
- `validate`/`test`/`predict --ckpt_path X` rebuild the model and the data from the
  checkpoint's hyper-parameters, so no config is needed; explicit flags still win;
- `--ckpt_path last|best` finds the newest run's file; every checkpoint is checked
  (`checkpoints.py`) before Lightning reads it;
- `fit` checks that the output folder is writable and has room before training (`runtime.py`).

Every command runs inside `launch.launched`, and every parser takes its
options from the environment too (`parser_settings`): `TL_PROJECT_<COMMAND>__<OPTION>`,
e.g. `TL_PROJECT_FIT__TRAINER__MAX_EPOCHS=1`, `TL_PROJECT_CHECK__DATA__ROOT=my_images`.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import CheckpointIO

from tl_project.backbones import check_input_size
from tl_project.callbacks import (
    Checkpoint,
    DivergenceGuard,
    EarlyStop,
    FitSummary,
    ModelOverview,
    PredictionWriter,
    check_watch_modes,
)
from tl_project.checkpoints import AtomicCheckpointIO, find_checkpoint, read_checkpoint
from tl_project.data import ImageDataModule
from tl_project.data.module import saved_settings
from tl_project.data.named import missing_named
from tl_project.errors import PROG, UserError
from tl_project.explain import ExplanationWriter, last_spatial_layer, require_captum
from tl_project.model import MONITOR, MONITOR_MODE, RECIPE_OPTIMIZER, TransferLearningModel
from tl_project.multilabel_report import MultiLabelReport
from tl_project.parsing import CLIParser, Parser, option_strings, suggestion
from tl_project.report import TestReport
from tl_project.runtime import check_output_dir, choose_precision, say
from tl_project.runtimes import InferenceRuntime, Runtime

ENV_PREFIX = "TL_PROJECT"
EVAL_SUBCOMMANDS = ("validate", "test", "predict")


def checkpoint_defaults(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """`model.*` and `data.*` defaults from a checkpoint's saved hyper-parameters."""
    model_hp = dict(checkpoint.get("hyper_parameters") or {})
    if not model_hp:
        raise UserError("The checkpoint holds no model hyper-parameters; is it a tl_project checkpoint?")
    # The checkpoint holds every weight: build the model without loading pretrained ones.
    model_hp["weights"] = None
    params = inspect.signature(TransferLearningModel.__init__).parameters
    # num_classes and class_names reach the model through the data link.
    skip = {"self", "num_classes", "class_names", "multi_label"}
    defaults = {f"model.{k}": v for k, v in model_hp.items() if k in params and k not in skip}
    data = saved_settings(checkpoint.get("datamodule_hyper_parameters") or {})
    data["classes"] = model_hp.get("class_names")
    return defaults | {f"data.{k}": v for k, v in data.items()}


def run_config(ckpt_path: str) -> str | None:
    """The config a resumed `fit` starts from, as YAML: the run's own `config.yaml` (beside its
    `checkpoints/` folder), without pretrained weights to load (the checkpoint holds them all)
    and without its `ckpt_path`; None when the checkpoint is not in a run folder."""
    saved = Path(ckpt_path).resolve().parents[1] / "config.yaml"
    if not saved.is_file():
        return None
    config = yaml.safe_load(saved.read_text()) or {}
    config.pop("ckpt_path", None)
    if isinstance(config.get("model"), dict):
        config["model"]["weights"] = None
    return yaml.safe_dump(config)


class TransferLearningCLI(LightningCLI):
    """LightningCLI with tl_project's links, default callbacks and checkpoint-driven evaluation."""

    def __init__(self, args: Any = None, **kwargs: Any) -> None:
        kwargs.setdefault("trainer_defaults", {"default_root_dir": "runs"})
        # A Lightning command's parser is one of subcommands: its errors name the command's --help.
        self.command_prog = (
            f"{PROG} {args[0]}" if isinstance(args, list) and args and args[0] in (*EVAL_SUBCOMMANDS, "fit") else None
        )
        super().__init__(
            TransferLearningModel,
            ImageDataModule,
            args=args,
            auto_configure_optimizers=False,
            parser_class=CLIParser,
            seed_everything_default=kwargs.pop("seed_everything_default", 42),
            parser_kwargs=kwargs.pop("parser_kwargs", {"default_env": True, "env_prefix": ENV_PREFIX}),
            **kwargs,
        )

    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """The model's and the data's options first, then the Trainer's: `--help` leads with
        what this tool adds (Lightning adds the Trainer's first)."""
        parser.add_lightning_class_args(self._model_class, "model", subclass_mode=self.subclass_mode_model)
        parser.add_lightning_class_args(self._datamodule_class, "data", subclass_mode=self.subclass_mode_data)
        parser.add_lightning_class_args(self.trainer_class, "trainer")
        parser.set_defaults({"trainer." + k: v for k, v in self.trainer_defaults.items() if k != "callbacks"})

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")
        parser.link_arguments("data.multi_label", "model.multi_label", apply_on="instantiate")
        parser.add_lightning_class_args(Checkpoint, "checkpoint")
        parser.add_lightning_class_args(EarlyStop, "early_stopping")
        parser.set_defaults(
            {
                "model.optimizer": RECIPE_OPTIMIZER,
                "checkpoint.monitor": MONITOR,
                "early_stopping.monitor": MONITOR,
                "early_stopping.mode": MONITOR_MODE,
                "checkpoint.mode": MONITOR_MODE,
                "checkpoint.save_last": True,
                "checkpoint.filename": "epoch={epoch}-val_acc={val/acc:.4f}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """A subcommand's parser; predict's has `--output` (commands/lightning.py names the command)."""
        command = kwargs.pop("command", None)
        parser = super().init_parser(**kwargs)
        parser.command_prog = self.command_prog  # type: ignore[attr-defined]
        if command is None and self.command_prog is not None:  # a Lightning command's parser of subcommands
            name = self.command_prog.rsplit(" ", 1)[-1]
            parser.command_options = lambda: option_strings(self._subcommand_parsers[name])  # type: ignore[attr-defined]
        if command == "predict":
            parser.add_argument(
                "--output",
                type=str | None,
                default=None,
                help="The predictions CSV, written as batches finish; run the same command again after an "
                "interruption to continue it. Never overwritten. Default: predictions.csv in the run folder.",
            )
            parser.add_argument("--min_probability", type=float | None, default=None, help=MIN_PROBABILITY_HELP)
            parser.add_argument("--explain", type=str | None, default=None, help=EXPLAIN_HELP)
            parser.add_argument("--runtime", type=Runtime, default="auto", help=RUNTIME_HELP)
        return parser

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        """Lightning's subcommand parser, with this tool's words for the Trainer method's options."""
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        helps = {"ckpt_path": CKPT_PATH_HELP[subcommand == "fit"], "weights_only": WEIGHTS_ONLY_HELP}
        for action in parser._actions:
            if action.dest in helps:
                action.help = helps[action.dest]
        return parser

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand == "predict" and self.config.predict.get("return_predictions") is None:
            self.config.predict.return_predictions = False  # the writer streams them: none kept in memory
        if not subcommand or not self.config[subcommand].get("ckpt_path"):
            return
        root_dir = self.config[subcommand].trainer.default_root_dir or "runs"
        ckpt_path = find_checkpoint(self.config[subcommand].ckpt_path, root_dir)
        checkpoint = read_checkpoint(ckpt_path)  # refuses unsafe files before Lightning sees them
        if subcommand in EVAL_SUBCOMMANDS:
            # The checkpoint's settings become defaults, then parse again: configs and flags win.
            parser.set_defaults({f"{subcommand}.{k}": v for k, v in checkpoint_defaults(checkpoint).items()})
            super().parse_arguments(parser, args)
        elif subcommand == "fit" and (resumed := run_config(ckpt_path)) is not None:
            # Resuming: the run's own config first, then the command's configs and flags.
            argv = list(args) if args is not None else sys.argv[1:]
            at = argv.index("fit") + 1 if "fit" in argv else 0
            super().parse_arguments(parser, [*argv[:at], "--config", resumed, *argv[at:]])
        self.config[subcommand].ckpt_path = ckpt_path

    def _parse_ckpt_path(self) -> None:
        """Done in `parse_arguments`, where the checkpoint's values rank below explicit ones."""

    def instantiate_classes(self) -> None:
        """The classes of the config; when the model cannot be built (its weights), the data's
        problem too, where it has one, so that one run shows everything to fix."""
        try:
            super().instantiate_classes()
        except UserError as error:
            data = (self.config[self.subcommand] if self.subcommand else self.config).get("data") or {}
            root = Path(data.get("root") or "data").expanduser()
            problem = missing_named(data.get("dataset"), root, bool(data.get("download")))
            if problem is None or problem in str(error):
                raise
            raise UserError(f"{error}\nThe data has a problem too: {problem}") from None

    def before_instantiate_classes(self) -> None:
        subcommand_config = self.config[self.subcommand] if self.subcommand else self.config
        if subcommand_config.get("weights_only", False) is None:
            subcommand_config.weights_only = True  # Trainer reads checkpoints as tensors and plain values

    def before_fit(self) -> None:
        check_output_dir(Path(self.trainer.default_root_dir), self.model)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The Trainer, with what tl_project adds to the config's: the precision chosen for this
        run when none was given (`runtime.py`), a new runs/version_N/ folder, atomic checkpoint
        writes, and the callbacks of this command."""
        # Before any run folder exists: an image size the backbone cannot take fails here, not mid-epoch.
        check_input_size(self.model.backbone, self.model.hparams["backbone"], self.datamodule.image_size)
        config = (self.config_init[self.subcommand] if self.subcommand else self.config_init).get("trainer") or {}
        if config.get("precision") is None and "precision" not in kwargs:  # an explicit one always wins
            kwargs["precision"], why = choose_precision(
                config.get("accelerator", "auto"),
                training=self.subcommand in (None, "fit"),
                batch_size=self.datamodule.batch_size,
                batchnorm_trains=self.model.batchnorm_trains,
            )
            say(f"Precision {kwargs['precision']}: {why} (set --trainer.precision to choose)")
        to_file = self.subcommand == "predict" and self.config["predict"].get("output")
        if self.subcommand == "predict" and self.config["predict"].get("explain"):
            require_captum()  # before any run folder exists
            last_spatial_layer(self.model.backbone, self.datamodule.image_size)  # a ViT is refused here too
            kwargs["inference_mode"] = False  # the maps need gradients
        if config.get("logger") in (None, True):
            # A new runs/version_N/ per run: earlier checkpoints and logs are never overwritten.
            # predict --output FILE writes FILE (and its progress record) only: no run folder.
            kwargs["logger"] = (
                False if to_file else CSVLogger(save_dir=config.get("default_root_dir") or "runs", name="")
            )
        plugins = as_list(config.get("plugins"))
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
        callbacks = as_list(config.get("callbacks"))
        if self.subcommand in (None, "fit"):
            callbacks += [FitSummary(), DivergenceGuard()]
            if config.get("enable_model_summary") is not False:
                callbacks.append(ModelOverview())  # Lightning's, without its FLOPs of 0
            if kwargs.get("logger", config.get("logger")):
                callbacks.append(LearningRateMonitor())
        if self.subcommand == "predict":
            options = self.config["predict"]
            callbacks.append(PredictionWriter(options.get("output"), options.get("min_probability")))
            if options.get("explain"):
                callbacks.append(ExplanationWriter(options["explain"]))
            callbacks.append(InferenceRuntime(options.get("runtime") or "auto"))
        if self.subcommand == "test":
            callbacks.append(MultiLabelReport() if self.model.multi_label else TestReport())
        trainer = super().instantiate_trainer(**kwargs, callbacks=callbacks)
        check_watch_modes(trainer.callbacks)  # type: ignore[attr-defined]
        if self.subcommand not in (None, "fit"):  # nothing trains, so nothing to checkpoint
            trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, Checkpoint)]  # type: ignore[attr-defined]
        elif isinstance(trainer.checkpoint_callback, Checkpoint):
            last = trainer.checkpoint_callback.split_last()
            if last is not None:
                trainer.callbacks.append(last)  # type: ignore[attr-defined]  # after it: see split_last
        if to_file and not trainer.loggers:  # no run folder: its config.yaml would land in --trainer.default_root_dir
            trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, SaveConfigCallback)]  # type: ignore[attr-defined]
        return trainer


CKPT_PATH_HELP = {
    True: "A checkpoint to resume from, with its run's own settings (its config.yaml; flags and configs you "
    "pass win): a .ckpt file, or last / best (the newest run under --trainer.default_root_dir; the file is "
    "named when it starts). Default: a new run.",
    False: "The checkpoint to use: a .ckpt file (its model and data settings are the defaults: flags win), or "
    "last / best (the newest run under --trainer.default_root_dir; the file is named when it starts).",
}
WEIGHTS_ONLY_HELP = (
    "How checkpoints are read: true (the default when left null) loads tensors and plain values only, never "
    "code; every tl_project checkpoint loads so. false unpickles arbitrary objects: never for a file you did "
    "not make yourself."
)
MIN_PROBABILITY_HELP = (
    "The lowest top-class probability that counts as an answer: the CSV's answered column is false below it. "
    "Default: the checkpoint's (fit --model.target_accuracy), else 0 (every image answered)."
)
RUNTIME_HELP = (
    "What runs the network: auto (ONNX Runtime on a CPU, converted once from the checkpoint into the cache and "
    "checked against PyTorch; PyTorch on a GPU or where that fails), torch, or onnxruntime."
)
EXPLAIN_HELP = (
    "A folder for class-activation maps (Grad-CAM) of the predicted class: NAME.png (the map over the image) and "
    "NAME.cam.png (the map alone, grayscale, in the image's own pixels). Needs the explain extra."
)


def as_list(value: Any) -> list[Any]:
    """A config value that may be None, one item or a list, as a list."""
    return [] if value is None else list(value) if isinstance(value, list) else [value]


def option_value(args: Sequence[str], option: str) -> str | None:
    """The value of `option` in `args` (`--option VALUE` or `--option=VALUE`), if given; the
    last one given, as the parser takes it."""
    value = None
    for i, arg in enumerate(args):
        if arg == option and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(option + "="):
            value = arg.split("=", 1)[1]
    return value


def parser_settings(command: str, description: str) -> dict[str, Any]:
    """The parser settings of a command with a parser of its own (not a Lightning subcommand):
    its name and description for `--help`, and its options from the environment as
    `TL_PROJECT_<COMMAND>__<OPTION>` (as LightningCLI names those of `fit` and the others)."""
    return {
        "prog": f"{PROG} {command}",
        "description": description,
        "default_env": True,
        "env_prefix": f"{ENV_PREFIX}_{command.upper()}_",  # jsonargparse adds one more "_"
    }


def data_module(
    command: str, description: str, args: list[str], **extra: dict[str, Any]
) -> tuple[ImageDataModule, Any]:
    """The image-folder data module of `command`'s `--data.*` options (and a config's data section),
    with the parsed config; `extra` adds options: name -> add_argument keywords."""
    parser = Parser(**parser_settings(command, description))
    parser.add_argument("--config", help="A tl_project config; its data section is used.")
    for name, keywords in extra.items():
        parser.add_argument(name, **keywords)
    parser.add_class_arguments(ImageDataModule, "data")
    parser.set_defaults({"data.dataset": None})  # an image folder: --data.root is one
    config = parser.parse_args(args)
    if config.config:
        section = yaml.safe_load(Path(config.config).read_text()).get("data") or {}
        options = option_strings(parser)
        if unknown := [f"--data.{key}" for key in section if f"--data.{key}" not in options]:
            names = ", ".join(name.removeprefix("--") for name in unknown)
            raise UserError(f"{config.config}: {command} has no option {names}. {suggestion(unknown, options)}".strip())
        parser.set_defaults({f"data.{key}": value for key, value in section.items()})
        config = parser.parse_args(args)
    data = parser.instantiate_classes(config).data
    if data.dataset is not None:
        raise UserError(
            f"{command} reads image folders; pass --data.dataset null --data.root DIR (not {data.dataset})."
        )
    return data, config
