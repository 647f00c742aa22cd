"""tune: the learning-rate range test writes a sane suggestion that fit picks up; the batch
search; parameter groups keep their ratio; DDP."""

from __future__ import annotations

import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from tests import processes
from tests.conftest import COLORS, make_image_folder
from tests.helpers import QUIET, run_dirs
from tl_project import main
from tl_project.commands.tune import LRRangeTest, suggest

DDP = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]


def _tune_args(root: Path, runs: Path, *extra: str) -> list[str]:
    return [
        "tune",
        *("--model.weights", "null", "--model.backbone", "resnet18"),
        *("--data.dataset", "null", "--data.root", str(root)),
        *("--data.image_size", "32", "--data.batch_size", "8", "--data.num_workers", "0"),
        *("--trainer.default_root_dir", str(runs), "--tune.steps", "30", "--tune.min_lr", "1e-6"),
        *QUIET,
        *extra,
    ]


def test_suggestion_lies_where_the_loss_falls() -> None:
    rates = [1e-6 * 10 ** (i / 10) for i in range(61)]  # 1e-6 .. 1
    losses = [
        2.0 if r < 1e-4 else 2.0 - 0.5 * math.log10(r / 1e-4) if r < 1e-2 else 1.0 + (r - 1e-2) * 50 for r in rates
    ]
    assert 1e-4 < suggest(rates, losses) < 1e-2


def test_parameter_groups_keep_their_ratio() -> None:
    groups = [{"params": [torch.zeros(1)], "lr": 1.0}, {"params": [torch.zeros(1)], "lr": 0.1}]
    optimizer = torch.optim.SGD(groups)
    test = LRRangeTest(1e-4, 1.0, steps=5)
    trainer = SimpleNamespace(optimizers=[optimizer], global_step=4)
    test.on_train_batch_start(trainer, None, None, 0)  # type: ignore[arg-type]
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1.0, 0.1])


def test_tune_writes_plot_and_a_config_that_fit_picks_up(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    root = make_image_folder(tmp_path / "images", COLORS, per_class=10)
    main(_tune_args(root, tmp_path / "runs", "--model.finetune", "gradual"))
    run = run_dirs(tmp_path / "runs")[0]
    assert (run / "lr_find.png").stat().st_size > 0 and (run / "lr_find.csv").is_file()
    assert not list(run.glob("checkpoints/*"))  # a range test leaves no checkpoint
    lr = yaml.safe_load((run / "tuned.yaml").read_text())["model"]["optimizer"]["init_args"]["lr"]
    assert 1e-6 <= lr <= 1.0
    assert f"Suggested learning rate: {lr:.3g}" in capfd.readouterr().out

    fit = ["fit", "--config", str(Path("configs/folder.yaml").resolve()), "--config", str(run / "tuned.yaml")]
    fit += ["--data.root", str(root), "--model.weights", "null", "--print_config"]
    with pytest.raises(SystemExit):
        main(fit)
    printed = yaml.safe_load(capfd.readouterr().out)
    assert printed["model"]["optimizer"]["init_args"]["lr"] == pytest.approx(lr)
    assert printed["model"]["optimizer"]["class_path"] == "torch.optim.SGD"


def test_batch_size_search(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "images", COLORS, per_class=10)
    main(_tune_args(root, tmp_path / "runs", "--tune.batch_size", "true", "--tune.max_batch_size", "16"))
    tuned = yaml.safe_load((run_dirs(tmp_path / "runs")[-1] / "tuned.yaml").read_text())
    # A CPU does not run out of memory: the largest allowed, less Lightning's 5 % safety margin.
    assert tuned["data"]["batch_size"] == 15


@pytest.mark.slow
def test_tune_under_ddp(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "images", COLORS, per_class=10)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = processes.run([*_tune_args(root, tmp_path / "runs"), *DDP], cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Suggested learning rate") == 1
    [run] = run_dirs(tmp_path / "runs")
    assert 1e-6 <= yaml.safe_load((run / "tuned.yaml").read_text())["model"]["optimizer"]["init_args"]["lr"] <= 1
