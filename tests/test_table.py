"""A CSV of labels (`--data.labels`): splits from its split column, every command reading it,
and every kind of bad table refused with its row numbers."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import COLORS, make_image_folder
from tests.helpers import QUIET, exit_code, fit_args, read_csv, run_dirs
from tl_project import main
from tl_project.data import ImageDataModule
from tl_project.errors import UserError


def write_table(path: Path, rows: list[list[str]], header: tuple[str, ...] = ("path", "label", "split")) -> Path:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([list(header), *rows])
    return path


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """root/{cat,dog,fish}/NNN.png, 10 images a class (the folder names are not the labels here)."""
    return make_image_folder(tmp_path / "images", COLORS, per_class=10)


def split_of(i: int) -> str:
    return "train" if i < 6 else "val" if i < 8 else "test"


@pytest.fixture
def table(images: Path) -> Path:
    """Labels in other words than the folders, and a split column: 6 / 2 / 2 a class."""
    names = {"cat": "feline", "dog": "canine", "fish": "aquatic"}
    rows = [[f"{folder}/{i:03d}.png", label, split_of(i)] for folder, label in names.items() for i in range(10)]
    return write_table(images.parent / "labels.csv", rows)


def data(table: Path, images: Path, **kwargs: object) -> ImageDataModule:
    return ImageDataModule(dataset=None, root=str(images), labels=str(table), num_workers=0, **kwargs)  # type: ignore[arg-type]


def test_classes_are_the_sorted_labels_and_the_split_column_is_used(table: Path, images: Path) -> None:
    module = data(table, images)
    assert module.class_names == ["aquatic", "canine", "feline"]
    splits = module.folder_splits()
    assert {split: len(samples) for split, samples in splits.items()} == {"train": 18, "val": 6, "test": 6}
    assert all(Path(path).name in ("008.png", "009.png") for path, _ in splits["test"])
    assert {label for path, label in splits["train"] if "/cat/" in path} == {2}  # feline


def test_without_a_split_column_val_and_test_are_carved_at_random(images: Path, tmp_path: Path) -> None:
    rows = [[f"{folder}/{i:03d}.png", folder] for folder in COLORS for i in range(10)]
    table = write_table(tmp_path / "plain.csv", rows, ("file_name", "label"))
    splits = data(table, images, val_split=0.2, test_split=0.2).folder_splits()
    assert {split: len(samples) for split, samples in splits.items()} == {"train": 18, "val": 6, "test": 6}


def test_fit_and_test_read_the_table_and_test_evaluates_the_rows_marked_test(
    table: Path, images: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    runs = tmp_path / "runs"
    main(fit_args(images, runs, "--data.labels", str(table), "--trainer.max_epochs", "1"))
    ckpt = run_dirs(runs)[0] / "checkpoints" / "last.ckpt"
    main(["test", "--ckpt_path", str(ckpt), "--trainer.default_root_dir", str(runs), *QUIET])
    assert "Accuracy of the model on the test images" in capfd.readouterr().out
    metrics = json.loads((run_dirs(runs)[-1] / "report" / "metrics.json").read_text())
    assert metrics["num_images"] == 6 and metrics["classes"] == ["aquatic", "canine", "feline"]
    main(["predict", "--ckpt_path", str(ckpt), "--data.predict_dir", str(images / "dog"), *QUIET,
          "--output", str(tmp_path / "p.csv")])  # fmt: skip
    assert {row["prediction"] for row in read_csv(tmp_path / "p.csv")} <= {"aquatic", "canine", "feline"}


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([["cat/000.png", ""]], r"row 2: empty label"),
        ([["", "feline"]], r"row 2: empty path"),
        ([["cat/000.png", "feline"], ["cat/404.png", "feline"]], r"row 3: .*cat/404\.png does not exist"),
        (
            [["cat/000.png", "feline"], ["cat/000.png", "canine"]],
            r"rows 2 and 3: cat/000\.png is listed with the labels 'feline' and 'canine'",
        ),
        ([["../outside.png", "feline"]], r"row 2: \.\./outside\.png leaves"),
    ],
    ids=["empty label", "empty path", "missing file", "two labels", "leaves the root"],
)
def test_bad_rows_are_refused_with_their_row_numbers(images: Path, tmp_path: Path, rows: list, message: str) -> None:
    (images.parent / "outside.png").write_bytes((images / "cat" / "000.png").read_bytes())
    table = write_table(tmp_path / "bad.csv", rows, ("path", "label"))
    with pytest.raises(UserError, match=message):
        data(table, images)


def test_every_bad_row_is_listed_at_once(images: Path, tmp_path: Path) -> None:
    rows = [["cat/000.png", "feline", "train"], ["cat/001.png", "feline", "holdout"], ["cat/404.png", "x", "train"]]
    with pytest.raises(UserError) as error:
        data(write_table(tmp_path / "bad.csv", rows), images)
    message = str(error.value)
    assert "2 bad rows" in message and "row 3: split 'holdout' is none of train, val, test" in message
    assert "row 4:" in message


def test_missing_columns_and_classes_without_training_images(images: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"columns \['image', 'label'\]; it needs path \(or file_name\) and label"):
        data(write_table(tmp_path / "a.csv", [["cat/000.png", "feline"]], ("image", "label")), images)
    rows = [["cat/000.png", "feline", "train"], ["dog/000.png", "canine", "test"]]
    with pytest.raises(UserError, match=r"the classes \['canine'\] have no training image"):
        data(write_table(tmp_path / "b.csv", rows), images)


def test_a_csv_as_root_and_labels_with_a_named_dataset_say_what_to_pass(
    table: Path, images: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    assert exit_code(["check", "--data.root", str(table)]) == 2
    assert f"is a file, not a folder. For a CSV of labels pass --data.labels {table}" in capfd.readouterr().err
    with pytest.raises(UserError, match=r"pass --data.dataset null with it"):
        ImageDataModule(dataset="FashionMNIST", root=str(images), labels=str(table))


def test_check_reports_the_images_the_table_does_not_name(
    images: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    rows = [[f"{folder}/{i:03d}.png", folder] for folder in COLORS for i in range(8)]
    table = write_table(tmp_path / "most.csv", rows, ("path", "label"))
    assert exit_code(["check", "--data.root", str(images), "--data.labels", str(table)]) == 0
    assert "6 images under" in capfd.readouterr().out


def test_images_the_table_names_are_checked_as_a_folders_are(
    table: Path, images: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    (images / "cat" / "004.png").write_bytes(b"not an image")
    shutil.copy(images / "dog" / "000.png", images / "dog" / "009.png")  # a train image again, in test
    assert exit_code(fit_args(images, tmp_path / "runs", "--data.labels", str(table))) == 2
    err = capfd.readouterr().err
    assert "1 unusable images" in err and "cat/004.png" in err
    assert exit_code(["check", "--data.root", str(images), "--data.labels", str(table)]) == 1
    out = capfd.readouterr().out
    assert "leakage" in out and "dog/009.png" in out


def test_tune_and_single_label_cv_read_the_table(table: Path, images: Path, tmp_path: Path) -> None:
    args = fit_args(images, tmp_path / "runs", "--data.labels", str(table), "--trainer.max_epochs", "1")[1:]
    main(["tune", *args, "--tune.steps", "20", "--tune.min_lr", "1e-6"])
    assert (run_dirs(tmp_path / "runs")[0] / "tuned.yaml").is_file()
    main(["cv", *args, "--cv.folds", "2"])
    out_of_fold = read_csv(tmp_path / "runs" / "cv_0" / "out_of_fold.csv")
    assert len(out_of_fold) == 24 and {row["given"] for row in out_of_fold} == {"aquatic", "canine", "feline"}
