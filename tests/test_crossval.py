"""cv: stratified folds that are disjoint, cover the pool and repeat from the seed; the
test set untouched; the command fits every fold and summarises, under DDP too."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest

from tests import processes
from tests.conftest import COLORS, make_image_folder
from tests.helpers import exit_code, fit_args, read_csv
from tl_project import ImageDataModule, main
from tl_project.data.splits import stratified_folds

DDP = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]


def test_folds_are_disjoint_stratified_and_reproducible() -> None:
    labels = [0] * 10 + [1] * 7 + [2] * 3
    folds = stratified_folds(labels, 3, seed=1)
    assert sorted(i for fold in folds for i in fold) == list(range(20))
    for label in (0, 1, 2):
        per_fold = [sum(labels[i] == label for i in fold) for fold in folds]
        assert max(per_fold) - min(per_fold) <= 1
    assert max(map(len, folds)) - min(map(len, folds)) <= 1
    assert folds == stratified_folds(labels, 3, seed=1) != stratified_folds(labels, 3, seed=2)


def test_each_fold_validates_on_its_part_and_leaves_test_alone(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "images", COLORS, per_class=10)
    plain = ImageDataModule(dataset=None, root=str(root), num_workers=0).folder_splits()
    vals, tests = [], []
    for fold in range(3):
        splits = ImageDataModule(dataset=None, root=str(root), num_workers=0, folds=3, fold=fold).folder_splits()
        assert not {p for p, _ in splits["train"]} & {p for p, _ in splits["val"]}
        assert Counter(label for _, label in splits["val"]) == {0: 3, 1: 3, 2: 3}
        vals.append({p for p, _ in splits["val"]})
        tests.append(splits["test"])
    assert set().union(*vals) == {p for split in ("train", "val") for p, _ in plain[split]}
    assert all(test == plain["test"] for test in tests)


def test_cv_fits_every_fold_and_summarises(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    root = make_image_folder(tmp_path / "images", COLORS, per_class=10)
    args = fit_args(root, tmp_path / "runs", "--trainer.max_epochs", "2")[1:]
    main(["cv", *args, "--cv.folds", "3", "--cv.test", "true"])
    summary = json.loads((tmp_path / "runs" / "cv_0" / "cv.json").read_text())
    assert [row["fold"] for row in summary["folds"]] == [0, 1, 2]
    assert all((tmp_path / "runs" / "cv_0" / f"fold_{i}" / "version_0" / "checkpoints").is_dir() for i in range(3))
    values = [row["val_acc"] for row in summary["folds"]]
    assert summary["val_acc"]["mean"] == pytest.approx(sum(values) / 3)
    for row in summary["folds"]:  # each fold scored by its final epoch, not its best
        final = [r for r in read_csv(Path(row["run"]) / "metrics.csv") if r.get("val/acc")][-1]
        assert row["val_acc"] == pytest.approx(float(final["val/acc"]))
    assert "test_acc" in summary and all("test_acc" in row for row in summary["folds"])
    out = capfd.readouterr().out
    assert "Mean validation accuracy:" in out and "Mean test accuracy:" in out
    assert exit_code(["cv", *args, "--cv.folds", "1"]) == 2
    assert "--cv.folds is 1" in capfd.readouterr().err


@pytest.mark.slow
def test_cv_under_ddp(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "images", COLORS, per_class=10)
    args = fit_args(root, tmp_path / "runs", "--trainer.max_epochs", "1")[1:]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = processes.run(["cv", *args, "--cv.folds", "2", *DDP], cwd=tmp_path, env=env, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Mean validation accuracy") == 1
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["cv_0"]
    assert len(json.loads((tmp_path / "runs" / "cv_0" / "cv.json").read_text())["folds"]) == 2
