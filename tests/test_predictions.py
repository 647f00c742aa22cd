"""Streaming, resumable predict: rows on disk as batches finish; a run killed with SIGKILL and
run again ends with each image once, equal to an uninterrupted run, in one process or two
(DDP: parts merged by rank zero); a complete file is never overwritten."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests import processes
from tests.conftest import COLORS, make_image_folder
from tests.helpers import exit_code, fit_args, read_csv, run_dirs
from tl_project import main
from tl_project.predictions import PredictionFile

DDP = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("predictions")
    images = make_image_folder(base / "images", COLORS, per_class=6)
    main(fit_args(images, base / "runs", "--trainer.max_epochs", "1"))
    many = make_image_folder(base / "many", COLORS, per_class=300, size=24)  # 900 images to predict
    reference = base / "reference.csv"
    main(predict_args(base, reference))
    return {"base": base, "checkpoint": run_dirs(base / "runs")[0] / "checkpoints" / "last.ckpt", "many": many,
            "reference": reference}  # fmt: skip


def predict_args(base: Path, output: Path, *extra: str) -> list[str]:
    checkpoint = run_dirs(base / "runs")[0] / "checkpoints" / "last.ckpt"
    return [
        *("predict", "--ckpt_path", str(checkpoint), "--data.predict_dir", str(base / "many")),
        *("--output", str(output), "--data.batch_size", "1", "--data.num_workers", "0"),
        *("--trainer.default_root_dir", str(base / "predict_runs"), "--trainer.enable_progress_bar", "false"),
        *extra,
    ]


def start_and_kill(args: list[str], output: Path, at_rows: int) -> None:
    """Run `python -m tl_project ARGS` and SIGKILL it once its parts hold `at_rows` rows."""
    errors = output.parent / "killed.err"
    with errors.open("wb") as stderr:
        process = processes.start(args, stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        parts = list(output.parent.glob(f"{output.name}.part*"))
        if sum(p.read_bytes().count(b"\n") for p in parts) >= at_rows:
            process.send_signal(signal.SIGKILL)
            process.wait()
            return
        time.sleep(0.02)
    raise AssertionError(f"predict ended before it could be killed: {process.returncode}, {errors.read_text()}")


def test_a_killed_predict_continues_to_the_uninterrupted_file(
    setup: dict[str, Path], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "out.csv"
    command = predict_args(setup["base"], output)
    start_and_kill(command, output, at_rows=100)
    assert not output.exists() and Path(f"{output}.progress.json").exists()
    kept = sum(p.read_bytes().count(b"\n") for p in tmp_path.glob("out.csv.part*"))
    assert 100 <= kept < 900
    result = processes.run(command, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Continuing {output}: " in result.stdout + result.stderr
    assert output.read_text() == setup["reference"].read_text()  # each image once, in order
    assert len(read_csv(output)) == 900
    assert not list(tmp_path.glob("out.csv.*"))  # parts and record gone
    assert not (setup["base"] / "predict_runs").exists()  # --output FILE: no run folder
    with pytest.raises(SystemExit) as again:
        main(command)
    assert again.value.code == 2 and "exists and is complete" in capfd.readouterr().err
    assert output.read_text() == setup["reference"].read_text()  # untouched


@pytest.mark.slow
def test_two_processes_continue_a_killed_run_and_merge(setup: dict[str, Path], tmp_path: Path) -> None:
    """Killed in one process, continued by two (DDP): rank zero merges the parts of both runs."""
    output = tmp_path / "out.csv"
    start_and_kill(predict_args(setup["base"], output), output, at_rows=50)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = processes.run_ddp(predict_args(setup["base"], output, *DDP), cwd=tmp_path, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert output.read_text() == setup["reference"].read_text()
    assert not (setup["base"] / "predict_runs").exists()
    # (An uninterrupted DDP predict writes the one-process file too: test_cli.py's DDP test.)


def test_prediction_file_cuts_a_torn_row_and_refuses_other_images(tmp_path: Path) -> None:
    paths = [f"img{i}.png" for i in range(5)]
    file = PredictionFile(tmp_path / "p.csv", paths, ["a", "b"])
    file.open(file.prepare())
    file.write([0, 1], [[0, 1], [1, 0]], [[0.9, 0.1], [0.8, 0.2]])
    file.close()
    part = next(tmp_path.glob("p.csv.part*"))
    part.write_bytes(part.read_bytes() + b"2,img2.png,a,0.7")  # a row cut by a kill
    again = PredictionFile(tmp_path / "p.csv", paths, ["a", "b"])
    assert again.prepare() == 2 and again.done() == {0, 1}
    other = PredictionFile(tmp_path / "p.csv", [*paths, "img5.png"], ["a", "b"])
    with pytest.raises(Exception, match="started for other images"):
        other.prepare()
    again.open(2)
    again.write([2, 3, 4], [[0, 1]] * 3, [[0.6, 0.4]] * 3)
    again.close()
    assert again.finish() == 5
    rows = read_csv(tmp_path / "p.csv")
    assert [r["path"] for r in rows] == paths and rows[0]["top2"] == "b"


def test_predict_without_output_writes_the_run_folder(setup: dict[str, Path], tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    args = ["predict", "--ckpt_path", str(setup["checkpoint"]), "--data.predict_dir", str(setup["base"] / "images")]
    main([*args, "--trainer.default_root_dir", str(runs), "--data.num_workers", "0"])
    assert len(read_csv(run_dirs(runs)[0] / "predictions.csv")) == 18


def test_output_is_in_predicts_help_only(capfd: pytest.CaptureFixture[str]) -> None:
    assert exit_code(["predict", "--help"]) == 0
    assert "--output OUTPUT" in capfd.readouterr().out
    assert exit_code(["test", "--help"]) == 0
    assert "--output" not in capfd.readouterr().out
