"""The data check and the bad-image policy: every image decoded once, before training."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image, ImageFile

from tests.conftest import COLORS, make_image_folder
from tests.helpers import QUIET, exit_code, fit_args, read_csv, run_dirs
from tl_project import ImageDataModule, main
from tl_project.data.checks import check_images, inspect_file
from tl_project.data.module import saved_settings
from tl_project.errors import UserError


def _messy_folder(root: Path) -> Path:
    """The tiny colour folder plus one of each kind of trouble."""
    make_image_folder(root, COLORS, per_class=6)
    (root / "cat" / "zero.png").write_bytes(b"")
    (root / "dog" / "notes.jpg").write_bytes(b"plain text, not an image")
    whole = (root / "fish" / "000.png").read_bytes()
    (root / "fish" / "truncated.png").write_bytes(whole[: len(whole) // 2])
    Image.new("RGB", (8, 8), (1, 2, 3)).save(root / "cat" / "really_png.jpg", format="PNG")
    shutil.copy(root / "dog" / "001.png", root / "dog" / "copy_of_001.png")
    return root


def _data(root: Path, **kwargs: object) -> ImageDataModule:
    options = {"dataset": None, "root": str(root), "image_size": 32, "batch_size": 4, "num_workers": 0, **kwargs}
    return ImageDataModule(**options)  # type: ignore[arg-type]


def test_each_kind_of_problem_is_found_with_its_path(tmp_path: Path) -> None:
    root = _messy_folder(tmp_path / "images")
    data = _data(root)
    report = data.check(data.folder_splits(), data.class_names)
    problems = {(f.kind, Path(f.path).name) for f in report.problems}
    assert problems == {("empty", "zero.png"), ("unreadable", "notes.jpg"), ("unreadable", "truncated.png")}
    warnings = {(f.kind, Path(f.path).name) for f in report.warnings}
    assert ("extension", "really_png.jpg") in warnings
    assert {"duplicate", "leakage"} & {kind for kind, name in warnings if "001" in name}
    assert sum(sum(c.values()) for c in report.counts.values()) == 23
    assert report.counts["train"]["cat"] + report.counts["val"].get("cat", 0) + report.counts["test"].get("cat", 0) == 8


def test_leakage_across_split_folders(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "train", COLORS, per_class=4)
    (tmp_path / "test" / "cat").mkdir(parents=True)
    shutil.copy(tmp_path / "train" / "cat" / "002.png", tmp_path / "test" / "cat" / "seen_before.png")
    data = _data(tmp_path)
    report = data.check(data.folder_splits(), data.class_names)
    [leak] = [f for f in report.warnings if f.kind == "leakage"]
    assert Path(leak.path).name == "seen_before.png" and "002.png" in leak.detail
    assert "Class imbalance" in report.format(data.class_names)


def test_one_image_in_two_class_folders_has_conflicting_labels_and_stops_fit(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    root = make_image_folder(tmp_path / "images", COLORS, per_class=6)
    shutil.copy(root / "cat" / "003.png", root / "dog" / "also_a_dog.png")
    data = _data(root)
    [conflict] = data.check(data.folder_splits(), data.class_names).problems
    assert conflict.kind == "conflicting labels" and Path(conflict.path).name in ("003.png", "also_a_dog.png")
    assert "labelled" in conflict.detail and "cat" in conflict.detail and "dog" in conflict.detail
    assert exit_code(fit_args(root, tmp_path / "runs")) == 2
    assert "conflicting labels" in capfd.readouterr().err


def test_oversized_image_is_refused_without_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 100)).save(path)
    decoded: list[object] = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self) or real_load(self))
    problem, _ = inspect_file(path, max_pixels=5000).findings(path, max_pixels=5000)
    assert problem is not None and problem.kind == "too large" and "100 x 100" in problem.detail
    assert decoded == []
    assert inspect_file(path, max_pixels=10_000).findings(path, 10_000)[0] is None and decoded


def test_check_images_counts_classes_per_split(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path, COLORS, per_class=2)
    splits = {"train": [(p, 0) for p in (root / "cat").iterdir()], "val": [(p, 1) for p in (root / "dog").iterdir()]}
    report = check_images(splits, ["cat", "dog"], max_pixels=10**8, workers=2)
    assert report.counts == {"train": {"cat": 2}, "val": {"dog": 2}}
    assert not report.problems and "No problems found." in report.format(["cat", "dog"])


# --- the policy ---


def test_error_policy_lists_every_bad_image_before_training(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    root = _messy_folder(tmp_path / "images")
    assert exit_code(fit_args(root, tmp_path / "runs")) == 2
    err = capfd.readouterr().err
    for name in ("zero.png", "notes.jpg", "truncated.png"):
        assert name in err
    assert "3 unusable images; nothing was trained" in err and "--data.on_bad_image skip" in err
    assert not list((tmp_path / "runs").glob("*/checkpoints"))


def test_skip_policy_leaves_them_out_and_says_which(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    root = _messy_folder(tmp_path / "images")
    data = _data(root, on_bad_image="skip")
    data.setup("fit")
    data.setup("test")
    used = {p for split in ("train", "val", "test") for p, _ in data.datasets[split].samples}  # type: ignore[attr-defined]
    assert len(used) == 20 and not {"zero.png", "notes.jpg", "truncated.png"} & {Path(p).name for p in used}
    err = capfd.readouterr().err
    assert "Skipping 3 unusable images" in err and "truncated.png" in err

    main(fit_args(root, tmp_path / "runs", "--data.on_bad_image", "skip", "--trainer.max_epochs", "1"))
    assert read_csv(run_dirs(tmp_path / "runs")[0] / "metrics.csv")  # trained to the end


def test_bad_images_to_predict(tmp_path: Path) -> None:
    photos = make_image_folder(tmp_path / "photos", {"x": (9, 9, 9)}, per_class=2)
    (photos / "x" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(UserError, match=r"broken\.png"):
        _data(photos, predict_dir=str(photos)).setup("predict")
    data = _data(photos, predict_dir=str(photos), on_bad_image="skip")
    data.setup("predict")
    assert [Path(p).name for p in data.predict_paths] == ["000.png", "001.png"]


# --- the check command ---


def test_check_command_reports_and_fails_on_problems(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    root = _messy_folder(tmp_path / "images")
    assert exit_code(["check", "--data.root", str(root)]) == 1  # check inspects folders: no --data.dataset null
    out = capfd.readouterr().out
    assert "Unusable images (3)" in out and "extension" in out and "class" in out and "fish" in out

    clean = make_image_folder(tmp_path / "clean", COLORS, per_class=3)
    config = tmp_path / "mine.yaml"
    config.write_text(f"trainer: {{max_epochs: 1}}\ndata: {{dataset: null, root: {clean}}}\n")
    assert exit_code(["check", "--config", str(config)]) == 0
    assert "No problems found." in capfd.readouterr().out


# --- how thoroughly: data.verify ---


def test_header_check_reads_headers_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _messy_folder(tmp_path / "images")
    decoded: list[object] = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self) or real_load(self))
    data = _data(root, verify="header")
    report = data.check(data.folder_splits(), data.class_names)
    assert decoded == []
    # Empty and non-image files show in the header; a truncated image does not.
    assert {(f.kind, Path(f.path).name) for f in report.problems} == {
        ("empty", "zero.png"),
        ("unreadable", "notes.jpg"),
    }
    assert {f.kind for f in report.warnings} == {"extension"}  # no content hashes: no duplicates
    assert "Headers only" in report.format(data.class_names)


@pytest.mark.parametrize("level", ["off", "header"])
def test_images_that_fail_to_load_are_skipped_with_a_summary(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], level: str
) -> None:
    root = make_image_folder(tmp_path / "images", COLORS, per_class=10)
    whole = (root / "fish" / "000.png").read_bytes()
    for name in ("cat", "dog", "fish"):
        (root / name / "truncated.png").write_bytes(whole[: len(whole) // 2])
    args = fit_args(root, tmp_path / "runs", "--data.verify", level, "--trainer.max_epochs", "2")
    main(args)
    err = capfd.readouterr().err
    assert "Left out 3 images that could not be loaded (--data.verify " + level in err
    assert err.count("truncated.png") == 3 and "train:" in err
    logged = read_csv(run_dirs(tmp_path / "runs")[0] / "metrics.csv")
    assert any(row.get("val/acc") for row in logged)  # trained and validated to the end


def test_predict_with_the_check_off_leaves_unreadable_images_out(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    photos = make_image_folder(tmp_path / "photos", {"x": (9, 9, 9)}, per_class=3)
    (photos / "x" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    main(fit_args(make_image_folder(tmp_path / "images", COLORS, per_class=6), tmp_path / "runs"))
    runs = ["--trainer.default_root_dir", str(tmp_path / "runs")]
    best = run_dirs(tmp_path / "runs")[0] / "checkpoints" / "best.ckpt"
    main(["predict", "--ckpt_path", str(best), "--data.predict_dir", str(photos), "--data.verify", "off", *runs])
    rows = read_csv(run_dirs(tmp_path / "runs")[-1] / "predictions.csv")
    assert sorted(Path(r["path"]).name for r in rows) == ["000.png", "001.png", "002.png"]
    assert "Left out 1 image that could not be loaded" in capfd.readouterr().err


def test_the_old_name_data_check_still_works_and_says_the_new_one(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    root = make_image_folder(tmp_path / "images", COLORS, per_class=6)
    main(fit_args(root, tmp_path / "runs", "--data.check", "header", "--trainer.max_epochs", "1"))
    assert "data.check is deprecated: it is now data.verify (--data.verify header)" in capfd.readouterr().err
    best = run_dirs(tmp_path / "runs")[0] / "checkpoints" / "best.ckpt"
    checkpoint = torch.load(best, weights_only=True)
    saved = checkpoint["datamodule_hyper_parameters"]
    assert saved["verify"] == "header" and "check" not in saved
    # A checkpoint saved under the old name loads without the message, with its value.
    saved["check"] = saved.pop("verify")
    torch.save(checkpoint, old := tmp_path / "old.ckpt")
    assert saved_settings(saved)["verify"] == "header"
    main(["test", "--ckpt_path", str(old), "--trainer.default_root_dir", str(tmp_path / "runs"), *QUIET])
    assert "deprecated" not in capfd.readouterr().err
    config = yaml.safe_load((run_dirs(tmp_path / "runs")[-1] / "config.yaml").read_text())
    assert config["data"]["verify"] == "header"
