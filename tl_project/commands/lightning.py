"""fit, validate, test, predict: LightningCLI with tl_project's model and data; predict with an
exported .onnx file runs ONNX Runtime instead."""

from __future__ import annotations

from typing import Any

from tl_project.commands.export import main_predict_onnx
from tl_project.errors import PROG
from tl_project.launch import launched
from tl_project.lightning_cli import ENV_PREFIX, TransferLearningCLI, option_value


def run(command: str, args: list[str], description: str, from_sys_argv: bool) -> None:
    """fit / validate / test / predict: LightningCLI with tl_project's model and data."""
    with launched(command, args, from_sys_argv) as args:
        if command == "--print_shtab":
            TransferLearningCLI(args=args, parser_kwargs={"prog": PROG})
        elif command == "predict" and str(option_value(args, "--ckpt_path")).endswith(".onnx"):
            main_predict_onnx(args, description)
        else:
            # Every option also from the environment: TL_PROJECT_FIT__TRAINER__MAX_EPOCHS=1 etc.
            parser_kwargs: dict[str, Any] = {"prog": PROG, command: {"description": description, "command": command}}
            parser_kwargs |= {"default_env": True, "env_prefix": ENV_PREFIX}
            TransferLearningCLI(args=[command, *args], parser_kwargs=parser_kwargs)
