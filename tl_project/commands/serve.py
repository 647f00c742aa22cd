"""`serve`: a checkpoint or an exported .onnx file behind HTTP (see `tl_project.serve`)."""

from __future__ import annotations

from tl_project.errors import UserError
from tl_project.launch import launched
from tl_project.lightning_cli import parser_settings
from tl_project.parsing import Parser


def run(command: str, args: list[str], description: str, from_sys_argv: bool) -> None:
    """`python -m tl_project serve --ckpt_path FILE ...`"""
    try:
        from tl_project.serve import serve
    except ImportError as error:  # the optional serving packages
        raise UserError(f"serve needs LitServe ({error.name} is missing): pip install 'tl_project[serve]'.") from None
    with launched(command, args, from_sys_argv) as args:
        parser = Parser(**parser_settings(command, description))
        parser.add_function_arguments(serve, as_positional=False)
        serve(**parser.parse_args(args).as_dict())
