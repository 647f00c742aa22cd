"""The tests' processes (`tests/processes.py`): a forked command is what a new interpreter
runs, and `python -m tl_project` and the `tl_project` script end the same."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import processes


def test_a_forked_command_answers_as_a_new_interpreter(tmp_path: Path) -> None:
    missing = ["fit", "--data.dataset", "null", "--data.root", str(tmp_path / "none")]
    script = str(Path(sys.executable).parent / "tl_project")  # the installed `tl_project` script
    for args, interpreters in (
        (missing, [[sys.executable, "-m", "tl_project"]]),
        (["--help"], [[sys.executable, "-m", "tl_project"], [script]]),
    ):
        forked = processes.run(args, cwd=tmp_path)
        for interpreter in interpreters:
            started = subprocess.run([*interpreter, *args], capture_output=True, text=True, cwd=tmp_path, timeout=120)
            assert (forked.returncode, forked.stdout, forked.stderr) == (
                started.returncode,
                started.stdout,
                started.stderr,
            ), interpreter
    assert forked.returncode == 0 and "commands:" in forked.stdout


def write_surroundings(path: str) -> None:
    Path(path).write_text(json.dumps({"cwd": os.getcwd(), "env": os.environ.get("TL_PROJECT_TEST_VALUE")}))


def test_a_forked_process_has_the_callers_folder_and_environment(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    env = {**os.environ, "TL_PROJECT_TEST_VALUE": "42"}
    assert processes.run_call(write_surroundings, str(out), cwd=tmp_path, env=env).returncode == 0
    assert json.loads(out.read_text()) == {"cwd": str(tmp_path), "env": "42"}


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_a_forked_process_ends_by_a_signal_as_an_interpreter_does(sig: int) -> None:
    process = processes.start_call(time.sleep, 60, stderr=subprocess.DEVNULL)
    time.sleep(0.5)  # SIGINT: a KeyboardInterrupt, uncaught, ends the interpreter by SIGINT
    process.send_signal(sig)
    assert process.wait(timeout=30) == -sig
