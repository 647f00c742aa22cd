"""The scripts that must run anywhere: scripts/gpu_check.py on a machine without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_on_the_cpu_and_marks_the_gpu_rows(tmp_path: Path) -> None:
    out, scratch = tmp_path / "gpu_check.json", tmp_path / "scratch"
    scratch.mkdir()
    script = str(ROOT / "scripts" / "gpu_check.py")
    done = subprocess.run(
        [sys.executable, script, "--quick", "--only", "loader", "--out", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "TMPDIR": str(scratch)},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = {row["variant"]: row for row in result["rows"]}
    cpu = rows["CPU decode, 0 workers"]
    assert cpu["status"] == "measured" and cpu["images_per_s"] > 0 and cpu["images"] >= 16
    gpu = rows["decode_jpeg(device='cuda')"]
    assert gpu["status"] == ("measured" if torch.cuda.is_available() else "skipped: needs a CUDA GPU")
    assert "| loader |" in done.stdout and not list(scratch.iterdir())  # its images are gone
