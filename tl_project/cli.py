"""The command line: `python -m tl_project {fit,validate,test,predict,check,export,tune,cv,optimize,serve}`.

`COMMANDS` is the table of commands: each one's one-line description (shown by `--help`)
and the module that runs it, imported only when the command runs, so that the table
prints at once (Lightning alone takes seconds to import). `main` dispatches, and prints a
`UserError` as one line on stderr with exit status 2.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from tl_project.errors import PROG, UserError, user_message

# Every command: its one-line description (shown by --help) and the module of tl_project.commands
# whose `run(command, args, description, from_sys_argv)` runs it.
COMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("Fine-tune the model on the data; checkpoints and logs go to runs/version_N/.", "lightning"),
    "validate": ("Evaluate a checkpoint on the validation set.", "lightning"),
    "test": ("Evaluate a checkpoint on the test set: the accuracy line and the test report.", "lightning"),
    "predict": ("Classify new images with a checkpoint or an exported .onnx file: predictions.csv.", "lightning"),
    "check": (
        "Check an image folder: unusable images, wrong extensions, duplicates, leakage, class counts.",
        "check",
    ),
    "export": ("Export a checkpoint to ONNX or TorchScript, checked against PyTorch.", "export"),
    "tune": (
        "Find a learning rate (range test: lr_find.png, tuned.yaml) and the largest batch, with fit's options.",
        "tune",
    ),
    "cv": (
        "Cross-validate on k folds: mean ± std of the accuracy, out-of-fold predictions, suspect labels.",
        "cv",
    ),
    "optimize": (
        "Write an image folder's splits as LitData shards, to stream from disk or object storage.",
        "optimize",
    ),
    "serve": (
        "Serve a checkpoint or .onnx file over HTTP: POST /predict, an upload page, dynamic batching.",
        "serve",
    ),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"usage: {PROG} COMMAND [options]   ({PROG} COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {description}" for name, (description, _) in COMMANDS.items()]
    return "\n".join(lines)


def main(args: Sequence[str] | None = None) -> None:
    """Run the command line with `args` (default: `sys.argv[1:]`)."""
    try:
        argv = list(sys.argv[1:] if args is None else args)
        if not argv or argv[0] in ("-h", "--help"):
            print(usage(), file=sys.stdout if argv else sys.stderr)
            raise SystemExit(0 if argv else 2)
        command, rest = argv[0], argv[1:]
        if command.startswith("--print_shtab"):  # shell completion of the Lightning commands (needs shtab)
            command, rest = "--print_shtab", argv
        elif command not in COMMANDS:
            raise UserError(f"Unknown command {command!r}.\n{usage()}")
        description, module = COMMANDS.get(command, ("", "lightning"))
        importlib.import_module(f"tl_project.commands.{module}").run(command, rest, description, args is None)
    except UserError as error:
        print(f"error: {user_message(error)}", file=sys.stderr)
        raise SystemExit(2) from None
