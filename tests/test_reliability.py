"""Nothing lost, nothing trusted blindly: interrupted writes, resume parity,
SIGTERM, divergence, failures on one rank, two nodes, offline,
unwritable output folders. (Unsafe checkpoints: test_checkpoints.py; exact distributed
evaluation: test_cli.py's DDP test.)

Runs use a ResNet-18 at 32 px on tiny generated folders, random init.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from tests import processes
from tests.conftest import COLORS, make_image_folder
from tests.helpers import exit_code, fit_args, fit_killed_while_saving, run_dirs
from tl_project import main
from tl_project.backbones import build_backbone

REPO = Path(__file__).resolve().parent.parent
DDP = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]


def environment(**env: str) -> dict[str, str]:
    """The tests' environment, quiet; tests.helpers importable (its callbacks, in DDP's second process too)."""
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore", **env}


def state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(image_folder: Path, tmp_path: Path) -> None:
    args = fit_args(image_folder, tmp_path / "runs", "--trainer.max_epochs", "3")
    result = processes.run_call(fit_killed_while_saving, args, cwd=tmp_path, env=environment())
    assert result.returncode == -signal.SIGKILL
    last = run_dirs(tmp_path / "runs")[0] / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)  # whole, and loadable
    assert checkpoint["epoch"] == 0


# --- resume to the same result ---


MIX = ["--model.backbone", "resnet18", "--model.mixup", "0.2", "--model.cutmix", "1.0"]


@pytest.mark.parametrize("extra", [[], MIX], ids=["plain", "mixup-cutmix"])
def test_resume_gives_the_same_weights_and_schedule_as_one_run(
    image_folder: Path, tmp_path: Path, extra: list[str]
) -> None:
    schedule = [
        "--model.lr_scheduler",
        "StepLR",
        "--model.lr_scheduler.step_size",
        "1",
        "--model.lr_scheduler.gamma",
        "0.5",
        *extra,  # MixUp/CutMix draws follow from (seed, epoch, batch): a resumed run mixes the same
    ]
    main(fit_args(image_folder, tmp_path / "straight", "--trainer.max_epochs", "2", *schedule))
    main(fit_args(image_folder, tmp_path / "split", "--trainer.max_epochs", "1", *schedule))
    main(fit_args(image_folder, tmp_path / "split", "--trainer.max_epochs", "2", *schedule, "--ckpt_path", "last"))

    straight = torch.load(run_dirs(tmp_path / "straight")[0] / "checkpoints" / "last.ckpt", weights_only=True)
    resumed = torch.load(run_dirs(tmp_path / "split")[1] / "checkpoints" / "last.ckpt", weights_only=True)
    assert straight["epoch"] == resumed["epoch"] == 1
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    assert straight["lr_schedulers"] == resumed["lr_schedulers"]
    assert straight["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(0.00025)
    assert resumed["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(0.00025)


def test_sigterm_saves_a_checkpoint_and_resume_continues(tmp_path: Path) -> None:
    # 288 training images in 36 batches of 8: a run that trains (at batch 2 BatchNorm blows up).
    root = make_image_folder(tmp_path / "images", COLORS, per_class=120)
    args = fit_args(root, tmp_path / "runs", "--trainer.max_epochs", "50", "--data.batch_size", "8")
    with (tmp_path / "fit.err").open("wb") as stderr:
        process = processes.start(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=stderr, env=environment())
    metrics = tmp_path / "runs" / "version_0" / "metrics.csv"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # until the first epoch has ended and logged its loss
        if metrics.exists() and "train/loss" in metrics.read_text():
            break
        time.sleep(0.2)
    time.sleep(1.0)  # now in the middle of the second epoch
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)
    err = (tmp_path / "fit.err").read_text()
    assert process.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "Stopped by SIGTERM" in err and "Traceback" not in err
    stopped = torch.load(tmp_path / "runs" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert stopped["global_step"] > stopped["epoch"] * 36  # saved mid-epoch: 36 steps an epoch

    resume = [*args, "--trainer.max_epochs", str(stopped["epoch"] + 2), "--ckpt_path", "last"]
    result = processes.run(resume, cwd=tmp_path, env=environment())
    assert result.returncode == 0, result.stderr[-2000:]
    final = torch.load(run_dirs(tmp_path / "runs")[-1] / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] > stopped["global_step"] and final["epoch"] == stopped["epoch"] + 1


def test_nan_loss_stops_the_run_and_leaves_no_checkpoint_of_it(
    image_folder: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    args = fit_args(image_folder, tmp_path / "runs", "--model.optimizer.lr", "1e30")
    assert exit_code(args) == 2
    assert re.search(r"training loss is (nan|inf|-inf) at epoch 0", capfd.readouterr().err)
    checkpoints = run_dirs(tmp_path / "runs")[0] / "checkpoints"
    assert not checkpoints.exists() or not any(checkpoints.iterdir())


# --- distributed runs ---


@pytest.mark.slow
def test_failure_on_one_rank_ends_the_whole_job(image_folder: Path, tmp_path: Path) -> None:
    args = fit_args(
        image_folder, tmp_path / "runs", "--trainer.max_epochs", "3", "--trainer.callbacks", "tests.helpers.FailOnRank"
    )
    start = time.monotonic()
    result = processes.run([*args, *DDP], cwd=tmp_path, env=environment(), timeout=240)
    assert result.returncode != 0
    assert "injected failure on rank 1" in result.stderr
    assert time.monotonic() - start < 240


@pytest.mark.slow
def test_two_nodes_on_one_machine_over_loopback(image_folder: Path, tmp_path: Path) -> None:
    args = fit_args(image_folder, tmp_path / "runs", "--trainer.max_epochs", "1")
    args += [
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "1",
        "--trainer.num_nodes",
        "2",
        "--trainer.strategy",
        "ddp",
    ]
    port = str(processes.free_port())
    logs = [tmp_path / f"node{rank}.log" for rank in (0, 1)]
    nodes = []
    for rank, log in enumerate(logs):
        with log.open("wb") as out:
            env = environment(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK=str(rank))
            nodes.append(processes.start(args, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT))
    codes = [node.wait(timeout=240) for node in nodes]
    outputs = [log.read_text() for log in logs]
    assert codes == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert "Starting with 2 processes" in outputs[0]
    assert (run_dirs(tmp_path / "runs")[0] / "checkpoints" / "last.ckpt").is_file()


# --- offline and environment ---


@contextmanager
def no_sockets(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[object]]:
    attempts: list[object] = []

    def refuse(self: socket.socket, address: object) -> None:
        attempts.append(address)
        raise OSError("network blocked by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    yield attempts


def test_cached_or_local_weights_never_touch_the_network(
    standin_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # standin_cache: a STAND-IN file of random values under the official name.
    monkeypatch.undo()  # the real downloader: it must not be reached at all
    monkeypatch.setenv("TORCH_HOME", str(standin_cache.parents[2]))
    local = tmp_path / "local.pth"
    torch.save(torch.load(standin_cache, weights_only=True), local)
    with no_sockets(monkeypatch) as attempts:
        build_backbone("resnet50", "IMAGENET1K_V2")
        build_backbone("resnet50", str(local))
    assert attempts == []


@contextmanager
def mounted_tmpfs(path: Path, options: str) -> Iterator[Path]:
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("needs root to mount a tmpfs (CI runs as root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.mark.parametrize(
    ("options", "message"),
    [("ro,size=64m", "Cannot write to the output folder"), ("size=1m", "MiB free in")],
    ids=["read-only", "full"],
)
def test_unusable_output_folder_fails_before_training(
    image_folder: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str], options: str, message: str
) -> None:
    with mounted_tmpfs(tmp_path / "mnt", options) as mount:
        assert exit_code(fit_args(image_folder, mount / "runs")) == 2
    err = capfd.readouterr().err
    assert message in err and "--trainer.default_root_dir" in err
    assert "Epoch 0" not in capfd.readouterr().out


def test_output_folder_under_a_file_fails_before_training(
    image_folder: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a_file").write_text("")
    assert exit_code(fit_args(image_folder, tmp_path / "a_file" / "runs")) == 2
    assert "Cannot write to the output folder" in capfd.readouterr().err
