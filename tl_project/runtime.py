"""Where a run meets the machine: the precision a run uses when none is given, whether
the output folder can hold the run, gathering values across processes, and the one
voice that talks to the user (`say`, `warn`: from rank zero only, through the
`tl_project` logger; results and notes on stdout, warnings on stderr; errors are
`UserError`s, printed by `cli.main`).

The precision (`choose_precision`), when `--trainer.precision` is not given:

- training (`fit`) uses mixed precision where the hardware computes it natively (bf16
  on CPUs with AMX or AVX-512 BF16 and on CUDA GPUs of compute capability 8.0 or newer,
  fp16 on older GPUs), fp32 elsewhere; but fp32 whenever BatchNorm layers train on
  fewer than `MIN_BATCHNORM_BATCH` images per device (see there);
- evaluation (`validate`, `test`, `predict`) on a CPU uses fp32, so that predictions
  and probabilities are the same on every CPU model; on a GPU, the GPU's mixed precision.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from tl_project.errors import UserError


def check_output_dir(root: Path, model: torch.nn.Module) -> None:
    """Fail before training when `root` cannot hold this run's checkpoints."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root) as probe:
            probe.write(b"probe")
    except OSError as error:
        raise UserError(
            f"Cannot write to the output folder {root}: {error.strerror or error}. "
            "Pass --trainer.default_root_dir with a writable folder."
        ) from None
    # A checkpoint holds the weights and about as much optimizer state; fit keeps best and last.
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    needed, free = 2 * 3 * weights, shutil.disk_usage(root).free
    if free < needed:
        raise UserError(
            f"Only {free / 2**20:.0f} MiB free in {root}; this run's checkpoints need about "
            f"{needed / 2**20:.0f} MiB. Free some space or pass --trainer.default_root_dir elsewhere."
        )


# BatchNorm in training mode normalises each channel by the statistics of the batch
# on one device. On few images with little variation the batch variance nears zero,
# and the 1 / sqrt(var + eps) of every BatchNorm layer multiplies the gradients of the
# layers before it (measured: docs/performance.md, "Small batches and BatchNorm"). fp32
# survives such steps (without learning); bf16, with 8 significant bits, turns them into
# NaN. So below this size mixed precision is not chosen, and `fit` warns.
MIN_BATCHNORM_BATCH = 16
LOW_PRECISIONS = ("bf16-mixed", "16-mixed", "bf16-true", "16-true", "bf16", "16")


def usable_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0))


def default_num_workers(on_gpu: bool) -> int:
    """Loader workers per process when --data.num_workers is not given.

    On a GPU, the usable cores (at most 8): decoding and cropping must keep up with
    thousands of images a second. On a CPU, one: the model consumes far fewer images a
    second than one worker delivers, and each further worker takes a core from the model
    (measured: docs/performance.md).
    """
    return min(8, usable_cores()) if on_gpu else 1


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether the CPU computes bf16 natively (AMX or AVX-512 BF16), as Linux reports it."""
    try:
        flags = set(cpuinfo.read_text().split())
    except OSError:
        return False
    return bool({"amx_bf16", "avx512_bf16"} & flags)


def uses_cuda(accelerator: Any) -> bool:
    """Whether a run with `accelerator` (`auto`, `gpu`, `cuda`, `cpu`, ...) runs on a CUDA GPU."""
    return str(accelerator) in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def fast_precision(accelerator: Any) -> tuple[str, str]:
    """The fastest precision this machine runs natively for `accelerator`, and why."""
    if uses_cuda(accelerator):
        if torch.cuda.get_device_capability()[0] >= 8:
            return "bf16-mixed", "a CUDA GPU with compute capability 8.0 or newer"
        return "16-mixed", "a CUDA GPU older than compute capability 8.0"
    if cpu_has_native_bf16():
        return "bf16-mixed", "a CPU with native bf16 (AMX or AVX-512 BF16)"
    return "32-true", "no native bf16 on this CPU"


def choose_precision(accelerator: Any, training: bool, batch_size: int, batchnorm_trains: bool) -> tuple[str, str]:
    """The precision of a run that did not name one, and why (see the module's docstring).

    `batch_size` is per device; `batchnorm_trains` says whether BatchNorm layers will
    normalise by batch statistics (not with a frozen backbone or frozen BatchNorm).
    """
    if not training and not uses_cuda(accelerator):
        return "32-true", "evaluation on a CPU runs in fp32, so predictions are the same on every CPU"
    fast, why = fast_precision(accelerator)
    if training and fast != "32-true" and batchnorm_trains and batch_size < MIN_BATCHNORM_BATCH:
        return "32-true", (
            f"{why}, but batches of {batch_size} images per device are too few for BatchNorm "
            f"in {fast} (fp32 from {MIN_BATCHNORM_BATCH} images on)"
        )
    return fast, why


def small_batch_advice(batch_size: int) -> str:
    """What to do when BatchNorm trains on batches of `batch_size` images per device."""
    return (
        f"Batches of {batch_size} images per device are small for BatchNorm in training mode: its "
        "batch statistics are noisy and can blow the gradients up (most on images with little variation). "
        f"Use --data.batch_size {MIN_BATCHNORM_BATCH} or more, or keep BatchNorm's statistics fixed with "
        "--model.freeze_batchnorm true (pretrained weights) or --model.finetune head."
    )


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (0 and 1 when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_objects(value: Any) -> list[Any]:
    """`value` from every process, in rank order (just `[value]` when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


class _CurrentStream(logging.StreamHandler):
    """A handler that writes to whatever sys.stdout / sys.stderr is now (also when it was replaced)."""

    def __init__(self, name: str, levels: tuple[int, int]) -> None:
        super().__init__()
        self.name_of_stream = name
        self.addFilter(lambda record: levels[0] <= record.levelno < levels[1])

    @property
    def stream(self) -> Any:
        return getattr(sys, self.name_of_stream)

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


log = logging.getLogger("tl_project")
log.setLevel(logging.INFO)
log.propagate = False
log.addHandler(_CurrentStream("stdout", (logging.INFO, logging.WARNING)))
log.addHandler(_CurrentStream("stderr", (logging.WARNING, logging.CRITICAL + 1)))


@rank_zero_only
def say(message: str) -> None:
    """Tell the user something (a result, where a file went, a phase change): once, on stdout."""
    log.info(message)


@rank_zero_only
def warn(message: str) -> None:
    """Warn the user (something they may want to change; the run goes on): once, on stderr."""
    log.warning(message)
