"""Checkpoints you can trust: a file that is no checkpoint, a damaged one, one holding code
(refused, never run), hyper-parameters naming unknown callables, `--ckpt_path last`."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torchvision
import yaml
from PIL import Image

from tests.helpers import ACCURACY_LINE, MARKER_ENV, QUIET, exit_code, fit_args, read_csv, run_dirs
from tl_project import TransferLearningModel, main
from tl_project.backbones import build_backbone, hub_file
from tl_project.checkpoints import read_checkpoint
from tl_project.errors import UserError


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "hyper_parameters": {"num_classes": 2}}, good)
    png = tmp_path / "picture.ckpt"
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    return {"good": good, "png": png, "truncated": truncated}


def test_a_file_that_is_no_checkpoint_is_named_so_without_suggesting_unsafe_loading(
    files: dict[str, Path], capfd: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(UserError, match=r"picture\.ckpt is not a checkpoint: it was not written by torch\.save"):
        read_checkpoint(files["png"])
    assert exit_code(["test", "--ckpt_path", str(files["png"])]) == 2
    err = capfd.readouterr().err
    assert "is not a checkpoint" in err and "weights_only=False" not in err


def test_a_truncated_checkpoint_is_named_truncated_or_corrupt(files: dict[str, Path]) -> None:
    with pytest.raises(UserError, match=r"The checkpoint .*truncated\.ckpt is truncated or corrupt \(") as raised:
        read_checkpoint(files["truncated"])
    assert ".." not in str(raised.value) and "weights_only=False" not in str(raised.value)
    assert read_checkpoint(files["good"])["hyper_parameters"] == {"num_classes": 2}


@pytest.fixture
def small_run(image_folder: Path, tmp_path: Path) -> Path:
    """One finished 1-epoch run; returns its checkpoints folder."""
    main(fit_args(image_folder, tmp_path / "runs", "--trainer.max_epochs", "1"))
    return run_dirs(tmp_path / "runs")[0] / "checkpoints"


def test_last_ckpt_follows_every_validation_and_holds_the_best_so_far(image_folder: Path, tmp_path: Path) -> None:
    # A frozen backbone and a learning rate of ~0: the score never beats the first
    # validation's, so only that one is a best; last.ckpt must still follow all four.
    args = ("--model.finetune", "head", "--model.optimizer.lr", "1e-12", "--trainer.val_check_interval", "0.5")
    main(fit_args(image_folder, tmp_path / "runs", *args))
    folder = run_dirs(tmp_path / "runs")[0] / "checkpoints"
    best = folder / "best.ckpt"
    first = torch.load(best, weights_only=True)
    last = torch.load(folder / "last.ckpt", weights_only=True)
    assert last["epoch"] == 1 and last["global_step"] > first["global_step"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(["best.ckpt", "last.ckpt", os.readlink(best)])
    # last.ckpt was written after the best was taken in: resuming from it keeps the right best.
    state = next(v for k, v in last["callbacks"].items() if k.startswith("Checkpoint{"))
    assert Path(state["best_model_path"]).name == os.readlink(best)
    assert not os.path.samefile(folder / "last.ckpt", best)  # a later step: a file of its own


def test_a_checkpoint_that_is_both_best_and_last_is_on_disk_once(image_folder: Path, tmp_path: Path) -> None:
    main(fit_args(image_folder, tmp_path / "runs", "--trainer.max_epochs", "1"))
    folder = run_dirs(tmp_path / "runs")[0] / "checkpoints"
    best = folder / os.readlink(folder / "best.ckpt")
    assert os.path.samefile(folder / "last.ckpt", best) and best.stat().st_nlink == 2  # one copy, two names
    assert not list(folder.glob(".*"))  # no temporary file left
    resumed = torch.load(folder / "last.ckpt", weights_only=True)
    assert (
        resumed["epoch"] == 0
        and resumed["state_dict"].keys() == torch.load(best, weights_only=True)["state_dict"].keys()
    )


@pytest.fixture
def marker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The file a payload would write; it must never exist."""
    path = tmp_path / "marker"
    monkeypatch.setenv(MARKER_ENV, str(path))
    yield path
    assert not path.exists(), "the payload ran"


def crafted(small_run: Path, tmp_path: Path, key: str, value: object) -> Path:
    """A copy of a genuine checkpoint with one hyper-parameter set to `value`."""
    checkpoint = torch.load(small_run / "last.ckpt", weights_only=True)
    checkpoint["hyper_parameters"][key] = value
    path = tmp_path / "crafted.ckpt"
    torch.save(checkpoint, path)
    return path


class _Payload:
    def __reduce__(self) -> tuple:
        from tests.helpers import write_marker

        return (write_marker, ())


def test_checkpoint_with_pickle_payload_is_refused_and_never_runs(
    small_run: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str], marker: Path
) -> None:
    path = crafted(small_run, tmp_path, "note", _Payload())
    for command in (["test", "--ckpt_path", str(path)], [*fit_args(tmp_path, tmp_path), "--ckpt_path", str(path)]):
        assert exit_code(command) == 2
        assert "weights_only=True" in capfd.readouterr().err
    with pytest.raises(UserError, match="weights_only=True"):
        TransferLearningModel.load_from_checkpoint(path)


def test_checkpoint_naming_an_unknown_instantiator_is_refused(
    small_run: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str], marker: Path
) -> None:
    # Plain strings only, so weights_only=True reads it; Lightning would import and call it.
    path = crafted(small_run, tmp_path, "_instantiator", "tests.helpers.write_marker")
    assert exit_code(["test", "--ckpt_path", str(path)]) == 2
    assert "unknown instantiator 'tests.helpers.write_marker'" in capfd.readouterr().err
    with pytest.raises(UserError, match="unknown instantiator"):
        TransferLearningModel.load_from_checkpoint(path)
    # The genuine checkpoint loads through the same checks.
    assert TransferLearningModel.load_from_checkpoint(small_run / "last.ckpt", weights=None).num_classes == 3


def test_payload_in_the_torch_cache_is_refused_and_never_runs(offline: Path, marker: Path) -> None:
    cached = hub_file(torchvision.models.ResNet50_Weights.IMAGENET1K_V2)  # torchvision reads it unguarded
    cached.parent.mkdir(parents=True)
    torch.save({"conv1.weight": _Payload()}, cached)
    with pytest.raises(UserError, match=r"cached weights file .*weights_only=True"):
        build_backbone("resnet50", "IMAGENET1K_V2")


def test_ckpt_path_last_finds_the_newest_run(
    small_run: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    runs = tmp_path / "runs"
    main(["test", "--ckpt_path", "last", "--trainer.default_root_dir", str(runs), *QUIET])
    out = capfd.readouterr().out
    assert ACCURACY_LINE.search(out)
    assert "--ckpt_path last: " in out and "of the newest run with a last.ckpt" in out
    assert exit_code(["test", "--ckpt_path", "last", "--trainer.default_root_dir", str(tmp_path / "none")]) == 2
    assert "no " in capfd.readouterr().err


def test_fit_resumes_with_the_runs_own_settings_and_flags_still_win(image_folder: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    main(fit_args(image_folder, runs, "--trainer.max_epochs", "1", "--model.optimizer.lr", "0.02"))
    last = run_dirs(runs)[0] / "checkpoints" / "last.ckpt"
    # No backbone, weights, data or optimizer flags: they come from the run (no resnet50 weights
    # to fetch, no Fashion-MNIST to download); a flag still wins.
    main(["fit", "--ckpt_path", str(last), "--trainer.max_epochs", "2", "--data.batch_size", "5", *QUIET])
    resumed = yaml.safe_load((run_dirs(runs)[1] / "config.yaml").read_text())
    assert resumed["model"]["backbone"] == "resnet18" and resumed["data"]["image_size"] == 32
    assert resumed["model"]["optimizer"]["init_args"]["lr"] == 0.02 and resumed["data"]["batch_size"] == 5
    epochs = {row["epoch"] for row in read_csv(run_dirs(runs)[1] / "metrics.csv") if row.get("val/acc")}
    assert epochs == {"1"}  # only the epoch after the checkpoint's


def test_early_stopping_is_one_option_and_says_when_it_stopped(
    image_folder: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    runs = tmp_path / "runs"
    # lr 0: val/acc never improves after the first validation.
    main(
        fit_args(
            image_folder,
            runs,
            "--trainer.max_epochs",
            "6",
            "--model.optimizer.lr",
            "0",
            "--early_stopping.patience",
            "2",
        )
    )
    out = capfd.readouterr().out
    assert "Stopped early after epoch 2: val/acc did not improve for 2 validations" in out
    epochs = {row["epoch"] for row in read_csv(run_dirs(runs)[0] / "metrics.csv") if row.get("val/acc")}
    assert epochs == {"0", "1", "2"}
    assert exit_code(fit_args(image_folder, tmp_path / "other", "--early_stopping.patience", "0")) == 2
    assert "early_stopping.patience is 0" in capfd.readouterr().err
