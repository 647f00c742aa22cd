"""Where a run meets the machine: the precision the hardware runs fast, and whether the
output folder can hold the run.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

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


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether the CPU computes bf16 natively (AMX or AVX-512 BF16), as Linux reports it."""
    try:
        flags = set(cpuinfo.read_text().split())
    except OSError:
        return False
    return bool({"amx_bf16", "avx512_bf16"} & flags)


def fast_precision(accelerator: Any) -> tuple[str, str]:
    """The fastest precision this machine runs natively for `accelerator`, and why."""
    on_gpu = str(accelerator) in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    if on_gpu:
        if torch.cuda.get_device_capability()[0] >= 8:
            return "bf16-mixed", "a CUDA GPU with compute capability 8.0 or newer"
        return "16-mixed", "a CUDA GPU older than compute capability 8.0"
    if cpu_has_native_bf16():
        return "bf16-mixed", "a CPU with native bf16 (AMX or AVX-512 BF16)"
    return "32-true", "no native bf16 on this CPU"
