"""fit, validate, test, predict: LightningCLI with tl_project's model and data; predict with an
exported .onnx file runs ONNX Runtime instead."""

from __future__ import annotations

import sys
from typing import Any

from tl_project.commands.export import main_predict_onnx
from tl_project.lightning_cli import PROG, TransferLearningCLI, option_value


def run(command: str, args: list[str], description: str, from_sys_argv: bool) -> None:
    """fit / validate / test / predict: LightningCLI with tl_project's model and data."""
    if command == "--print_shtab":
        TransferLearningCLI(args=args, parser_kwargs={"prog": PROG})
        return
    if command == "predict" and str(option_value(args, "--ckpt_path")).endswith(".onnx"):
        return main_predict_onnx(args)
    parser_kwargs: dict[str, Any] = {"prog": PROG, command: {"description": description}}
    # Every option also from the environment: TL_PROJECT_FIT__TRAINER__MAX_EPOCHS=1 etc.
    parser_kwargs |= {"default_env": True, "env_prefix": "TL_PROJECT"}
    if from_sys_argv:
        sys.argv[1:] = [command, *args]  # resolved in place: DDP re-launches this process with sys.argv
        TransferLearningCLI(parser_kwargs=parser_kwargs)
    else:
        TransferLearningCLI(args=[command, *args], parser_kwargs=parser_kwargs)
