"""The command line: `python -m tl_project {fit,validate,test,predict,check,export,tune,cv,optimize}`.

A LightningCLI over `TransferLearningModel` and `ImageDataModule` that adds:

- `--config NAME.yaml` (or `NAME`) that is not a file here is looked up in `configs/`;
- the data's `num_classes` and `class_names` linked into the model;
- default callbacks: `Checkpoint` (best by `val/acc`, `last.ckpt`, `best.ckpt`),
  `LearningRateMonitor` and `FitSummary` while fitting, `PredictionWriter` while predicting, and a
  CSV logger that gives every run a new `runs/version_N/` folder;
- `validate`/`test`/`predict --ckpt_path X` rebuild the model and the data from the
  checkpoint's hyper-parameters, so no config is needed; explicit flags still win;
- `--ckpt_path last|best` finds the newest run's file; every checkpoint is checked
  (`checkpoints.py`) before Lightning reads it;
- `fit` checks that the output folder is writable and has room before training (`runtime.py`);
  SIGTERM saves `last.ckpt` and exits with 143;
- `check`: the data check of `checks.py` on its own, with the report;
- `export` and `predict` with an `.onnx` file: see `export.py`;
- `tune`: the learning-rate range test (`tune.py`); `cv`: k-fold cross-validation (`crossval.py`);
- `optimize`: an image folder as LitData shards (`data/streaming.py`).
"""

from __future__ import annotations

import inspect
import logging
import signal
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import CheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from tl_project.callbacks import Checkpoint, FitSummary, PredictionWriter
from tl_project.checkpoints import AtomicCheckpointIO, find_checkpoint, read_checkpoint
from tl_project.data import ImageDataModule
from tl_project.data.streaming import META, is_url, write_shards
from tl_project.errors import UserError, user_message
from tl_project.model import MONITOR, MONITOR_MODE, RECIPE_OPTIMIZER, TransferLearningModel
from tl_project.report import TestReport
from tl_project.runtime import check_output_dir, choose_precision, say, usable_cores

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


def checkpoint_defaults(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """`model.*` and `data.*` defaults from a checkpoint's saved hyper-parameters."""
    model_hp = dict(checkpoint.get("hyper_parameters") or {})
    data_hp = dict(checkpoint.get("datamodule_hyper_parameters") or {})
    if not model_hp:
        raise UserError("The checkpoint holds no model hyper-parameters; is it a tl_project checkpoint?")
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
            parser_kwargs=kwargs.pop("parser_kwargs", {"default_env": True, "env_prefix": "TL_PROJECT"}),
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")
        parser.add_lightning_class_args(Checkpoint, "checkpoint")
        parser.set_defaults(
            {
                "model.optimizer": RECIPE_OPTIMIZER,
                "checkpoint.monitor": MONITOR,
                "checkpoint.mode": MONITOR_MODE,
                "checkpoint.save_last": True,
                "checkpoint.filename": "epoch={epoch}-val_acc={val/acc:.4f}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if not subcommand or not self.config[subcommand].get("ckpt_path"):
            return
        root_dir = self.config[subcommand].trainer.default_root_dir or "runs"
        ckpt_path = find_checkpoint(self.config[subcommand].ckpt_path, root_dir)
        checkpoint = read_checkpoint(ckpt_path)  # refuses unsafe files before Lightning sees them
        if subcommand in EVAL_SUBCOMMANDS:
            # The checkpoint's settings become defaults, then parse again: configs and flags win.
            self._subcommand_parsers[subcommand].set_defaults(checkpoint_defaults(checkpoint))
            super().parse_arguments(parser, args)
        self.config[subcommand].ckpt_path = ckpt_path

    def _parse_ckpt_path(self) -> None:
        """Done in `parse_arguments`, where the checkpoint's values rank below explicit ones."""

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
        config = (self.config_init[self.subcommand] if self.subcommand else self.config_init).get("trainer") or {}
        if config.get("precision") is None and "precision" not in kwargs:  # an explicit one always wins
            kwargs["precision"], why = choose_precision(
                config.get("accelerator", "auto"),
                training=self.subcommand in (None, "fit"),
                batch_size=self.datamodule.batch_size,
                batchnorm_trains=self.model.batchnorm_trains,
            )
            say(f"Precision {kwargs['precision']}: {why} (set --trainer.precision to choose)")
        if config.get("logger") in (None, True):
            # A new runs/version_N/ per run: earlier checkpoints and logs are never overwritten.
            kwargs["logger"] = CSVLogger(save_dir=config.get("default_root_dir") or "runs", name="")
        plugins = as_list(config.get("plugins"))
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
        callbacks = as_list(config.get("callbacks"))
        if self.subcommand in (None, "fit"):
            callbacks.append(FitSummary())
            if kwargs.get("logger", config.get("logger")):
                callbacks.append(LearningRateMonitor())
        if self.subcommand == "predict":
            callbacks.append(PredictionWriter())
        if self.subcommand == "test":
            callbacks.append(TestReport())
        trainer = super().instantiate_trainer(**kwargs, callbacks=callbacks)
        if self.subcommand not in (None, "fit"):  # nothing trains, so nothing to checkpoint
            trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, Checkpoint)]  # type: ignore[attr-defined]
        return trainer


def as_list(value: Any) -> list[Any]:
    """A config value that may be None, one item or a list, as a list."""
    return [] if value is None else list(value) if isinstance(value, list) else [value]


def take_option(args: Sequence[str], option: str, default: Any) -> tuple[Any, list[str]]:
    """The value of `option` (`--option V` or `--option=V`; the last one given, as the parser
    takes it, else `default`) and `args` without it."""
    rest, value, skip = [], default, False
    for i, arg in enumerate(args):
        if skip:
            skip = False
        elif arg == option and i + 1 < len(args):
            value, skip = args[i + 1], True
        elif arg.startswith(option + "="):
            value = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return value, rest


def option_value(args: Sequence[str], option: str) -> str | None:
    """The value of `option` in `args` (`--option VALUE` or `--option=VALUE`), if given; the
    last one given, as the parser takes it."""
    return take_option(args, option, None)[0]


# --- the commands ----------------------------------------------------------------

PROG = "python -m tl_project"


def run_lightning(command: str, args: list[str], from_sys_argv: bool) -> None:
    """fit / validate / test / predict: LightningCLI with tl_project's model and data."""
    if command == "predict" and str(option_value(args, "--ckpt_path")).endswith(".onnx"):
        from tl_project.export import main_predict_onnx

        return main_predict_onnx(args)
    parser_kwargs: dict[str, Any] = {"prog": PROG, command: {"description": COMMANDS[command][0]}}
    # Every option also from the environment: TL_PROJECT_FIT__TRAINER__MAX_EPOCHS=1 etc.
    parser_kwargs |= {"default_env": True, "env_prefix": "TL_PROJECT"}
    if from_sys_argv:
        sys.argv[1:] = [command, *args]  # resolved in place: DDP re-launches this process with sys.argv
        TransferLearningCLI(parser_kwargs=parser_kwargs)
    else:
        TransferLearningCLI(args=[command, *args], parser_kwargs=parser_kwargs)


def data_module(command: str, args: list[str], **extra: dict[str, Any]) -> tuple[ImageDataModule, Any]:
    """The image-folder data module of `command`'s `--data.*` options (and a config's data section),
    with the parsed config; `extra` adds options: name -> add_argument keywords."""
    parser = ArgumentParser(prog=f"{PROG} {command}", description=COMMANDS[command][0])
    parser.add_argument("--config", help="A tl_project config; its data section is used.")
    for name, keywords in extra.items():
        parser.add_argument(name, **keywords)
    parser.add_class_arguments(ImageDataModule, "data")
    parser.set_defaults({"data.dataset": None})  # an image folder: --data.root is one
    config = parser.parse_args(args)
    if config.config:
        section = yaml.safe_load(Path(config.config).read_text()).get("data") or {}
        parser.set_defaults({f"data.{key}": value for key, value in section.items()})
        config = parser.parse_args(args)
    data = parser.instantiate_classes(config).data
    if data.dataset is not None:
        raise UserError(
            f"{command} reads image folders; pass --data.dataset null --data.root DIR (not {data.dataset})."
        )
    return data, config


def run_tune(command: str, args: list[str], from_sys_argv: bool) -> None:
    """`tune`: the learning-rate range test with fit's config and flags (`tune.py`)."""
    from tl_project.tune import TuneCLI, run_range_test

    parser_kwargs: dict[str, Any] = {"prog": f"{PROG} tune", "description": COMMANDS[command][0]}
    parser_kwargs |= {"default_env": True, "env_prefix": "TL_PROJECT"}
    if from_sys_argv:
        sys.argv[1:] = [command, *args]  # DDP re-launches this process with sys.argv
    cli = TuneCLI(args=args, run=False, parser_kwargs=parser_kwargs)
    run_range_test(cli.trainer, cli.model, cli.datamodule, cli.config["tune"])


def run_cross_validation(command: str, args: list[str], from_sys_argv: bool) -> None:
    """`cv`: k-fold cross-validation with fit's config and flags (`crossval.py`)."""
    from tl_project.crossval import run_cv

    parser_kwargs: dict[str, Any] = {"prog": f"{PROG} cv", "default_env": True, "env_prefix": "TL_PROJECT"}
    run_cv(args, from_sys_argv, TransferLearningCLI, parser_kwargs)


def run_check(command: str, args: list[str], from_sys_argv: bool) -> None:
    """`check`: decode every image of an image folder once and report; exit 1 on problems."""
    data, _ = data_module(command, args)
    if data.check_level == "off":
        raise UserError("check with --data.check off would look at nothing: pass --data.check full (or header).")
    report = data.check(data.folder_splits(), data.class_names, data.root)
    say(report.format(data.class_names))
    raise SystemExit(1 if report.problems else 0)


def run_optimize(command: str, args: list[str], from_sys_argv: bool) -> None:
    """`optimize`: an image folder's splits (and --data.predict_dir) as LitData shards."""
    output_help = "Where the shards go: a new or earlier shards folder, or a URL LitData writes to (s3://...)."
    data, config = data_module(command, args, **{"--output": {"required": True, "help": output_help}})
    output = str(config.output)
    if not is_url(output):
        target = Path(output).expanduser()
        if target.exists() and any(target.iterdir()) and not (target / META).is_file():
            raise UserError(f"{target} exists and holds other files; pass a new --output folder.")
        target.mkdir(parents=True, exist_ok=True)
        output = str(target)
    data.setup("optimize")
    splits = {split: data.datasets[split].samples for split in ("train", "val", "test")}
    if data.predict_dir:
        data.setup("predict")
        splits["predict"] = [(path, -1) for path in data.predict_paths]
    settings = {"source": str(data.root), "val_split": data.val_split, "test_split": data.test_split}
    sizes = write_shards(splits, data.class_names, output, data.root, usable_cores(), data.seed, settings)
    say(
        f"Wrote {', '.join(f'{split} {n}' for split, n in sizes.items())} images to {output}. "
        f"Use them with --data.dataset litdata --data.root {output}"
    )


def run_export(command: str, args: list[str], from_sys_argv: bool) -> None:
    from tl_project.export import main_export

    main_export(args)


Runner = Callable[[str, list[str], bool], None]
# Every command: its one-line description (shown by --help) and what runs it.
COMMANDS: dict[str, tuple[str, Runner]] = {
    "fit": ("Fine-tune the model on the data; checkpoints and logs go to runs/version_N/.", run_lightning),
    "validate": ("Evaluate a checkpoint on the validation set.", run_lightning),
    "test": ("Evaluate a checkpoint on the test set: the accuracy line and the test report.", run_lightning),
    "predict": ("Classify new images with a checkpoint or an exported .onnx file: predictions.csv.", run_lightning),
    "check": (
        "Check an image folder: unusable images, wrong extensions, duplicates, leakage, class counts.",
        run_check,
    ),
    "export": ("Export a checkpoint to ONNX or TorchScript, checked against PyTorch.", run_export),
    "tune": (
        "Find a learning rate (range test: lr_find.png, tuned.yaml) and the largest batch, with fit's options.",
        run_tune,
    ),
    "cv": (
        "Cross-validate: fit on k stratified folds (--cv.folds, --cv.test), mean ± std of the accuracy.",
        run_cross_validation,
    ),
    "optimize": (
        "Write an image folder's splits as LitData shards, to stream from disk or object storage.",
        run_optimize,
    ),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"usage: {PROG} COMMAND [options]   ({PROG} COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {description}" for name, (description, _) in COMMANDS.items()]
    return "\n".join(lines)


# Lightning warnings that ask nothing of the user of this command line: evaluation
# runs deliberately leave out the checkpoint callback, `main(args)` deliberately
# passes args while sys.argv has others, and the pytree one is internal.
QUIET_WARNINGS = (
    r"Be aware that when using `ckpt_path`, callbacks used to create the checkpoint",
    r"LightningCLI's args parameter is intended to run from within Python",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"The number of training batches \(\d+\) is smaller than the logging interval",
    # LitData's loader: its dataset knows its length per process and worker; predictions carry their index.
    r"Your `IterableDataset` has `__len__` defined",
    r"Couldn't infer the batch indices fetched from your dataloader",
    r"The given buffer is not writable",  # LitData reads its chunks read-only; nothing writes to them
)


class _Notices(logging.Filter):
    """Drops Lightning's advertisement and its "Seed set to" line; the run's own lines stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("💡 Tip:") or message.startswith("Seed set to"))


def quiet_lightning() -> None:
    """Silence what Lightning says that asks nothing of the user (once per process)."""
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.seed"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Notices) for f in logger.filters):
            logger.addFilter(_Notices())


def leave_together() -> None:
    """After a distributed command, every process waits for the others, then the process group
    is closed here rather than at interpreter exit (where gloo could abort one process whose
    peer had already gone: "terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main(args: Sequence[str] | None = None) -> None:
    """Run the command line with `args` (default: `sys.argv[1:]`)."""
    quiet_lightning()
    try:
        argv = resolve_config_args(sys.argv[1:] if args is None else args)
        if not argv or argv[0] in ("-h", "--help"):
            print(usage(), file=sys.stdout if argv else sys.stderr)
            raise SystemExit(0 if argv else 2)
        command, rest = argv[0], argv[1:]
        if command.startswith("--print_shtab"):  # shell completion of the Lightning commands (needs shtab)
            TransferLearningCLI(args=argv, parser_kwargs={"prog": PROG})
            return
        if command not in COMMANDS:
            raise UserError(f"Unknown command {command!r}.\n{usage()}")
        COMMANDS[command][1](command, rest, args is None)
        leave_together()
    except UserError as error:
        print(f"error: {user_message(error)}", file=sys.stderr)
        raise SystemExit(2) from None
    except SIGTERMException:
        print(
            "Stopped by SIGTERM; last.ckpt holds the state at the stop. "
            "Resume with the same command plus --ckpt_path last.",
            file=sys.stderr,
        )
        raise SystemExit(128 + signal.SIGTERM) from None
