"""LitData shards: `optimize` writes them, `--data.dataset litdata` trains, tests and predicts
from them as from the folder, under DDP each test image counts once, and resuming repeats
or skips nothing."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from tests import processes
from tests.conftest import COLORS, make_image_folder
from tests.helpers import ACCURACY_LINE, QUIET, RECORD_ENV, exit_code, read_csv, run_dirs
from tl_project import main
from tl_project.data import ImageDataModule, streaming

DDP = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]


def _shards_args(shards: Path, runs: Path, *extra: str) -> list[str]:
    return [
        "fit",
        *("--model.weights", "null", "--model.backbone", "resnet18"),
        *("--data.dataset", "litdata", "--data.root", str(shards)),
        *("--data.image_size", "32", "--data.batch_size", "8", "--data.num_workers", "0"),
        *("--trainer.max_epochs", "1", "--trainer.default_root_dir", str(runs)),
        *QUIET,
        *extra,
    ]


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    """The colour folder (train 20 a class, test 9 a class, val carved out) as shards."""
    images = tmp_path / "images"
    make_image_folder(images / "train", COLORS, per_class=20)
    make_image_folder(images / "test", COLORS, per_class=9)
    (images / "test" / "dog" / "008.png").unlink()  # 26 test images: uneven over 2 processes
    photos = make_image_folder(tmp_path / "photos", {"x": (220, 60, 60)}, per_class=3)
    out = tmp_path / "shards"
    main(["optimize", "--data.root", str(images), "--output", str(out), "--data.predict_dir", str(photos)])
    return out


def test_optimize_writes_a_litdata_dataset_per_split(shards: Path) -> None:
    meta = json.loads((shards / "tl_project.json").read_text())
    assert meta["classes"] == ["cat", "dog", "fish"]
    assert meta["splits"] == {"train": 54, "val": 6, "test": 26, "predict": 3}
    assert meta["predict_paths"][0].endswith("photos/x/000.png")
    assert meta["order"] == "shuffled"
    for split in meta["splits"]:
        assert (shards / split / "index.json").is_file()


def test_fit_test_predict_from_shards_as_from_the_folder(shards: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    main(_shards_args(shards, runs, "--trainer.max_epochs", "2"))
    last = run_dirs(runs)[0] / "checkpoints" / "last.ckpt"
    # The checkpoint knows the shards: test needs nothing else, and matches the folder's test.
    here = ["--trainer.default_root_dir", str(runs), *QUIET]
    main(["test", "--ckpt_path", str(last), *here])
    folder = ["--data.dataset", "null", "--data.root", str(tmp_path / "images")]
    main(["test", "--ckpt_path", str(last), *folder, *here])
    from_shards, from_folder = (read_csv(run / "metrics.csv")[-1] for run in run_dirs(runs)[1:3])
    assert from_shards["test/acc"] == from_folder["test/acc"]
    assert float(from_shards["test/loss"]) == pytest.approx(float(from_folder["test/loss"]), rel=1e-5)
    assert (run_dirs(runs)[1] / "report" / "misclassified.csv").is_file()

    main(["predict", "--ckpt_path", str(last), *here])
    rows = read_csv(run_dirs(runs)[-1] / "predictions.csv")
    assert [Path(r["path"]).name for r in rows] == ["000.png", "001.png", "002.png"]


def test_clear_errors(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    images = make_image_folder(tmp_path / "images", COLORS, per_class=4)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "thesis.tex").write_text("mine")
    assert exit_code(["optimize", "--data.root", str(images), "--output", str(taken)]) == 2
    assert "holds other files" in capfd.readouterr().err and (taken / "thesis.tex").read_text() == "mine"
    assert exit_code(_shards_args(tmp_path / "nothing", tmp_path / "runs")) == 2
    assert "No shards written by tl_project" in capfd.readouterr().err


def test_without_litdata_shards_name_the_extra(
    shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(streaming, "INSTALLED", False)
    images = make_image_folder(tmp_path / "images", COLORS, per_class=4)
    assert exit_code(["optimize", "--data.root", str(images), "--output", str(tmp_path / "out")]) == 2
    assert "optimize needs LitData" in (err := capfd.readouterr().err) and "tl_project[shards]" in err
    assert not (tmp_path / "out").exists()
    assert exit_code(_shards_args(shards, tmp_path / "runs")) == 2
    assert "--data.dataset litdata (shards) needs LitData" in capfd.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_training_batches_from_shards_mix_the_classes(tmp_path: Path) -> None:
    """The folder lists its images class by class; the shards' training batches must mix them
    as the folder's sampler does (shards written in folder order gave batches of one or two
    classes, and a model from them fell to near chance)."""
    images = make_image_folder(tmp_path / "images", COLORS, per_class=60, size=16)
    main(["optimize", "--data.root", str(images), "--output", str(tmp_path / "shards")])
    data = ImageDataModule(dataset="litdata", root=str(tmp_path / "shards"), batch_size=24, num_workers=0)
    data.setup("fit")
    counts = [torch.bincount(labels, minlength=3).tolist() for _, labels, _ in data.train_dataloader()]
    assert sum(map(sum, counts)) == 144
    assert all(min(count) >= 3 for count in counts), counts  # every batch holds every class


def test_shards_in_folder_order_are_refused_for_training(
    shards: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    meta_file = shards / "tl_project.json"
    meta = json.loads(meta_file.read_text())
    del meta["order"]  # as written by the earlier version
    meta_file.write_text(json.dumps(meta))
    assert exit_code(_shards_args(shards, tmp_path / "runs")) == 2
    assert "Write them again" in capfd.readouterr().err


def _epochs(record: Path) -> dict[int, list[int]]:
    seen: dict[int, list[int]] = defaultdict(list)
    for line in record.read_text().splitlines():
        epoch, indices = line.split(":")
        seen[int(epoch)] += [int(i) for i in indices.split()]
    return seen


def test_resume_from_last_repeats_and_skips_nothing(
    shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = ["--trainer.callbacks", "tests.helpers.RecordBatches"]
    monkeypatch.setenv(RECORD_ENV, str(tmp_path / "whole.txt"))
    main(_shards_args(shards, tmp_path / "whole", "--trainer.max_epochs", "3", *record))
    monkeypatch.setenv(RECORD_ENV, str(tmp_path / "resumed.txt"))
    main(_shards_args(shards, tmp_path / "parts", "--trainer.max_epochs", "1", *record))
    last = run_dirs(tmp_path / "parts")[0] / "checkpoints" / "last.ckpt"
    main(_shards_args(shards, tmp_path / "parts", "--trainer.max_epochs", "3", "--ckpt_path", str(last), *record))
    whole, resumed = _epochs(tmp_path / "whole.txt"), _epochs(tmp_path / "resumed.txt")
    assert whole == resumed
    assert whole[0] != whole[1]  # each epoch shuffled anew
    assert all(len(set(indices)) == len(indices) == 54 for indices in whole.values())


@pytest.mark.slow
def test_ddp_fit_and_test_from_shards_count_each_test_image_once(shards: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = processes.run_ddp([*_shards_args(shards, tmp_path / "runs"), *DDP], cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    last = str(run_dirs(tmp_path / "runs")[0] / "checkpoints" / "last.ckpt")
    test = ["test", "--ckpt_path", last, *QUIET, "--trainer.default_root_dir", str(tmp_path / "runs")]
    main(test)  # one process
    result = processes.run_ddp([*test, *DDP], cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(ACCURACY_LINE.findall(result.stdout)) == 1
    one, two = (read_csv(run / "metrics.csv")[-1] for run in run_dirs(tmp_path / "runs")[1:3])
    assert one["test/acc"] == two["test/acc"]
    assert float(one["test/loss"]) == pytest.approx(float(two["test/loss"]), rel=1e-5)
