"""Wrong labels: cv's out-of-fold predictions (every image once, by a model that did not see
it), label issues that rank planted wrong labels first, and `--data.exclude` (out of train
and validation, never out of test, recorded in the checkpoint; named datasets too)."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import COLORS, make_image_folder
from tests.helpers import exit_code, fit_args, read_csv, run_dirs
from tests.test_data import _fake_fashion_mnist
from tl_project import ImageDataModule, TransferLearningModel, main
from tl_project.data.datasets import FolderDataset
from tl_project.transforms import eval_transform, normalize

# The fast path: a frozen backbone whose features every fold shares.
FAST = ("--model.finetune", "head", "--data.augment", "false", "--model.cache_features", "true")


def planted_folder(root: Path) -> tuple[Path, list[Path]]:
    """Colour classes, 12 images each, plus two red images filed under dog (wrong labels)."""
    make_image_folder(root, COLORS, per_class=12)
    make_image_folder(root / "planted", {"cat": COLORS["cat"]}, per_class=14)
    planted = []
    for i in (12, 13):  # images unlike the folder's own red ones (other noise draws)
        target = root / "dog" / f"planted_{i}.png"
        shutil.move(root / "planted" / "cat" / f"{i:03d}.png", target)
        planted.append(target)
    shutil.rmtree(root / "planted")
    return root, planted


@pytest.fixture(scope="module")
def cv_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    base = tmp_path_factory.mktemp("labels")
    root, planted = planted_folder(base / "images")
    args = fit_args(root, base / "runs", *FAST, "--model.backbone", "resnet18", "--trainer.max_epochs", "8")[1:]
    args += ["--model.optimizer.lr", "0.05", "--data.test_split", "0.2"]
    main(["cv", *args, "--cv.folds", "3"])
    return {"root": root, "planted": planted, "folder": base / "runs" / "cv_0", "args": args}


def test_out_of_fold_predicts_every_image_once_by_a_model_that_did_not_see_it(cv_run: dict) -> None:
    root, folder = cv_run["root"], cv_run["folder"]
    rows = read_csv(folder / "out_of_fold.csv")
    pool = ImageDataModule(dataset=None, root=str(root), num_workers=0, test_split=0.2).folder_splits()
    pool_paths = sorted(str(p) for split in ("train", "val") for p, _ in pool[split])
    assert sorted(row["path"] for row in rows) == pool_paths  # each once; no test image
    for fold in range(3):
        data = ImageDataModule(dataset=None, root=str(root), num_workers=0, test_split=0.2, folds=3, fold=fold)
        splits = data.folder_splits()
        val, train = {str(p) for p, _ in splits["val"]}, {str(p) for p, _ in splits["train"]}
        fold_rows = [row for row in rows if row["path"] in val]
        assert fold_rows and not any(row["path"] in train for row in fold_rows)
        # The probabilities are those of this fold's final model, calibrated as everywhere.
        model = TransferLearningModel.load_from_checkpoint(
            next((folder / f"fold_{fold}").glob("version_*/checkpoints/last.ckpt")), weights=None
        ).eval()
        row = fold_rows[0]
        image = FolderDataset([(Path(row["path"]), 0)], eval_transform(32))[0][0]
        with torch.no_grad():
            expected = model.evaluate(normalize(image[None])).softmax(dim=1)[0].tolist()
        got = [float(row[f"prob_{name}"]) for name in model.class_names]
        assert got == pytest.approx(expected, abs=1e-4)
        assert row["given"] == Path(row["path"]).parent.name
    summary = json.loads((folder / "cv.json").read_text())
    assert summary["out_of_fold"]["images"] == len(rows)
    assert set(summary["out_of_fold"]["per_class"]) == {"cat", "dog", "fish"}


def test_planted_wrong_labels_top_the_ranking(cv_run: dict) -> None:
    issues = read_csv(cv_run["folder"] / "label_issues.csv")
    assert list(issues[0]) == ["path", "given", "suggested", "quality"]
    top = {row["path"] for row in issues[:2]}
    assert top == {str(p) for p in cv_run["planted"]}
    assert all(row["given"] == "dog" and row["suggested"] == "cat" for row in issues[:2])
    qualities = [float(row["quality"]) for row in issues]
    assert all(0.0 <= q <= 1.0 for q in qualities)
    assert (cv_run["folder"] / "label_issues.png").stat().st_size > 0


def test_exclude_leaves_train_and_val_keeps_test_and_is_recorded(
    cv_run: dict, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    root = cv_run["root"]
    before = ImageDataModule(dataset=None, root=str(root), num_workers=0, test_split=0.2).folder_splits()
    test_image = before["test"][0][0]
    listed = tmp_path / "exclude.txt"  # one path per line: two planted images, one test image, one unknown
    listed.write_text("\n".join(["# reviewed", *map(str, cv_run["planted"]), str(test_image), "nowhere.png"]) + "\n")
    after = ImageDataModule(dataset=None, root=str(root), num_workers=0, test_split=0.2, exclude=str(listed))
    splits = after.folder_splits()
    kept = {p for split in ("train", "val") for p, _ in splits[split]}
    assert not kept & set(cv_run["planted"]) and splits["test"] == before["test"]
    assert len(kept) == sum(len(before[s]) for s in ("train", "val")) - 2
    said = capfd.readouterr().out
    assert "2 of its 4 images left out" in said and "1 are test images" in said and "1 are not in this data" in said
    # label_issues.csv (a path column) into fit: the checkpoint records what was left out.
    issues = cv_run["folder"] / "label_issues.csv"
    runs = tmp_path / "runs"
    main(fit_args(root, runs, "--model.backbone", "resnet18", "--trainer.max_epochs", "1", "--data.test_split", "0.2",
                  "--data.exclude", str(issues)))  # fmt: skip
    checkpoint = torch.load(run_dirs(runs)[0] / "checkpoints" / "last.ckpt", weights_only=True)
    record = checkpoint["ImageDataModule"]
    assert record["exclude"] == str(issues)
    flagged = {row["path"] for row in read_csv(issues)}
    assert set(record["excluded"]) == flagged - {str(p) for p, _ in before["test"]}
    assert checkpoint["datamodule_hyper_parameters"]["exclude"] == str(issues)
    # test from that checkpoint needs no exclude file and tests the same images
    issues_copy = issues.read_bytes()
    issues.unlink()
    try:
        checkpoint_path = str(run_dirs(runs)[0] / "checkpoints" / "last.ckpt")
        main(
            ["test", "--ckpt_path", checkpoint_path, "--data.num_workers", "0", "--trainer.default_root_dir", str(runs)]
        )
    finally:
        issues.write_bytes(issues_copy)
    # check shows the count per class of what was left out
    assert (
        exit_code(["check", "--data.root", str(root), "--data.exclude", str(listed), "--data.test_split", "0.2"]) == 0
    )
    assert "Left out by --data.exclude (checked: the rest), per class: cat 0, dog 2, fish 0" in capfd.readouterr().out


def test_exclude_on_a_named_dataset_by_name(tmp_path: Path) -> None:
    _fake_fashion_mnist(tmp_path / "fmnist")
    listed = tmp_path / "exclude.csv"
    with open(listed, "w", newline="") as f:
        csv.writer(f).writerows([["path", "given"], ["FashionMNIST/train/3", "x"], ["FashionMNIST/train/7", "x"]])
    data = ImageDataModule(dataset="FashionMNIST", root=str(tmp_path / "fmnist"), download=False, exclude=str(listed))
    data.setup("fit")
    names = {data.datasets[s].describe(i) for s in ("train", "val") for i in range(len(data.datasets[s]))}
    assert len(names) == 98 and not names & {"FashionMNIST/train/3", "FashionMNIST/train/7"}
    assert len(data.datasets["test"]) == 20 and data.exclusion.names == ["FashionMNIST/train/3", "FashionMNIST/train/7"]


def test_bad_exclude_and_shards_are_refused(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    root = make_image_folder(tmp_path / "images", COLORS, per_class=4)
    assert exit_code(fit_args(root, tmp_path / "runs", "--data.exclude", str(tmp_path / "missing.csv"))) == 2
    assert "--data.exclude" in capfd.readouterr().err
    assert exit_code(["fit", "--data.dataset", "litdata", "--data.root", str(tmp_path), "--data.exclude", "x"]) == 2


def test_label_issues_without_cleanlab_name_the_extra_before_any_fold_trains(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cleanlab" else real(name, *a))
    args = fit_args(image_folder, tmp_path / "runs", "--cv.folds", "2", "--cv.label_issues", "true")
    assert exit_code(["cv", *args[1:]]) == 2
    assert "pip install 'tl_project[labels]'" in capfd.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_the_commands_do_not_import_cleanlab_until_labels_are_ranked() -> None:
    code = "import sys, tl_project.commands.cv, tl_project.lightning_cli; print('cleanlab' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
