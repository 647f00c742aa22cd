"""The command line: `python -m tl_project {fit,validate,test,predict,check,export,tune,cv,optimize,serve}`.

`COMMANDS` is the table of commands: each one's one-line description and where it runs
(shown by `--help`), and the module that runs it, imported only when the command runs, so that the table
prints at once (Lightning alone takes seconds to import). `main` dispatches, and prints a
`UserError` as one line on stderr with exit status 2.
"""

from __future__ import annotations

import gc
import importlib
import sys
from collections.abc import Sequence
from typing import NamedTuple

from tl_project.errors import PROG, UserError, user_message


class Command(NamedTuple):
    """A command of the table: what it does (shown by --help), where it runs, and the module of
    tl_project.commands whose `run(command, args, description, from_sys_argv)` runs it."""

    description: str
    runs_on: str
    module: str


TRAINER = "CPU, a GPU, or several (--trainer.devices N: DDP)"
COMMANDS: dict[str, Command] = {
    "fit": Command(
        "Fine-tune the model on the data; checkpoints and logs go to runs/version_N/.", TRAINER, "lightning"
    ),
    "validate": Command("Evaluate a checkpoint on the validation set.", TRAINER, "lightning"),
    "test": Command(
        "Evaluate a checkpoint on the test set: the accuracy line and the test report.", TRAINER, "lightning"
    ),
    "predict": Command(
        "Classify new images with a checkpoint or an exported .onnx file: predictions.csv, resumable.",
        f"{TRAINER}; an .onnx file on the CPU (ONNX Runtime)",
        "lightning",
    ),
    "check": Command(
        "Check an image folder (or a labels CSV): unusable images, conflicting labels, duplicates, leakage, class counts.",
        "every core of this machine (worker processes)",
        "check",
    ),
    "export": Command("Export a checkpoint to ONNX or TorchScript, checked against PyTorch.", "the CPU", "export"),
    "tune": Command(
        "Find a learning rate (range test: lr_find.png, tuned.yaml) and the largest batch, with fit's options.",
        f"as fit: {TRAINER}; --tune.batch_size on one device",
        "tune",
    ),
    "cv": Command(
        "Cross-validate on k folds: mean ± std of the accuracy, out-of-fold predictions, suspect labels.",
        f"one fold after another, each as fit: {TRAINER}",
        "cv",
    ),
    "optimize": Command(
        "Write an image folder's splits as LitData shards, to stream from disk or object storage.",
        "every core of this machine (worker processes)",
        "optimize",
    ),
    "serve": Command(
        "Serve a checkpoint or .onnx file over HTTP: POST /predict, an upload page, dynamic batching.",
        "the CPU or the GPUs (--accelerator, --devices; LitServe worker processes)",
        "serve",
    ),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"usage: {PROG} COMMAND [options]   ({PROG} COMMAND --help for its options)", "", "commands:"]
    for name, command in COMMANDS.items():
        lines += [f"  {name:<{width}}  {command.description}", f"  {'':<{width}}  runs on: {command.runs_on}"]
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
        description, _, module = COMMANDS.get(command, Command("", "", "lightning"))
        importlib.import_module(f"tl_project.commands.{module}").run(command, rest, description, args is None)
    except UserError as error:
        print(f"error: {user_message(error)}", file=sys.stderr)
        raise SystemExit(2) from None


def console() -> None:
    """`python -m tl_project` and the `tl_project` script: `main`, then the process ends at once.

    Without `gc.freeze()`, the interpreter's last garbage collections walk every object that
    torch, torchvision and Lightning created before the process ends, a wait at the end of
    every command (docs/benchmarks-archive.md). Frozen, they are not walked; the memory goes
    back to the OS with the process, and everything else of an interpreter's exit happens as
    before (atexit, threads joined, files flushed and closed)."""
    try:
        main()
    finally:
        gc.freeze()
