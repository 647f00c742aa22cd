"""What every command runs in: `launched`.

`--config NAME.yaml` (or `NAME`) that is not a file here is looked up in `configs/`;
`sys.argv` is set for DDP's re-launch; SIGTERM (a scheduler's notice) ends the command with
status 143; at the end the processes of a distributed command leave together; and what
Lightning says that asks nothing of the user is silenced.
"""

from __future__ import annotations

import logging
import signal
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from lightning.pytorch.utilities.exceptions import SIGTERMException

from tl_project.errors import UserError

CONFIG_DIRS = (Path("configs"), Path(__file__).resolve().parent.parent / "configs")


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


@contextmanager
def launched(command: str, args: list[str], from_sys_argv: bool) -> Iterator[list[str]]:
    """What every command runs in; yields `args` with `--config NAME` resolved. `sys.argv` is set
    to the resolved command line when the command came from it: DDP re-launches this process
    with `sys.argv`. SIGTERM (a scheduler's notice) ends the command with status 143 and says
    how to resume; at the end every process of a distributed command waits for the others."""
    quiet_lightning()
    resolved = resolve_config_args(args)
    if from_sys_argv:
        sys.argv[1:] = [command, *resolved]
    try:
        yield resolved
    except SIGTERMException:
        print(
            "Stopped by SIGTERM; last.ckpt holds the state at the stop. "
            "Resume with the same command plus --ckpt_path last.",
            file=sys.stderr,
        )
        raise SystemExit(128 + signal.SIGTERM) from None
    leave_together()


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
    # The summary's size estimate is of the fp32 parameters, which is what a checkpoint holds.
    r"Precision .* is not supported by the model summary",
)


class _Notices(logging.Filter):
    """Drops Lightning's advertisement, its "Seed set to" line and its note that the summary is
    this tool's own; the run's own lines stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not message.startswith(("💡 Tip:", "Seed set to", "Trainer already configured with model summary"))


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
