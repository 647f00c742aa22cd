"""The test report: its numbers and pictures, from a real test run."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.conftest import COLORS, make_image_folder
from tests.helpers import ACCURACY_LINE, QUIET, fit_args, run_dirs
from tl_project import main


def test_every_test_writes_a_report_with_the_right_numbers(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    classes = {**COLORS, "sky": (120, 180, 250), "sand": (230, 210, 150), "night": (20, 20, 40)}
    root = make_image_folder(tmp_path / "images", classes, per_class=10)  # 6 classes: top-5 too
    main(fit_args(root, tmp_path / "runs", "--trainer.max_epochs", "2", "--data.test_split", "0.2"))
    main(["test", "--ckpt_path", "last", "--trainer.default_root_dir", str(tmp_path / "runs"), *QUIET])
    out = capfd.readouterr().out
    report = run_dirs(tmp_path / "runs")[-1] / "report"
    assert f"Test report written to {report / 'report.md'}" in out
    printed = float(ACCURACY_LINE.findall(out)[0])

    metrics = json.loads((report / "metrics.json").read_text())
    confusion = torch.tensor(metrics["confusion_matrix"])
    assert metrics["num_images"] == 12 == int(confusion.sum())  # 2 of 10 images a class, 6 classes
    assert 100 * metrics["acc"] == pytest.approx(printed, abs=0.006)
    assert metrics["acc"] == pytest.approx(float(confusion.diag().sum() / confusion.sum()))
    assert {"acc_top5", "acc_macro", "loss", "expected_calibration_error"} <= set(metrics)
    assert metrics["acc_top5"] >= metrics["acc"]
    for i, name in enumerate(metrics["classes"]):
        per_class = metrics["per_class"][name]
        assert per_class["support"] == int(confusion[i].sum()) == 2
        assert per_class["recall"] == pytest.approx(float(confusion[i, i] / confusion[i].sum()))

    with open(report / "misclassified.csv", newline="") as f:
        wrong = list(csv.DictReader(f))
    assert len(wrong) == min(16, 12 - int(confusion.diag().sum()))
    assert all(Path(row["image"]).is_file() and row["true"] != row["predicted"] for row in wrong)
    for picture in ("confusion_matrix.png", "misclassified.png", "curves.png"):
        with Image.open(report / picture) as image:
            assert image.width > 500 and image.height > 300
    card = (report / "report.md").read_text()
    assert "## Results" in card and "top-1 accuracy" in card and "python -m tl_project test --ckpt_path" in card
    assert re.search(r"\| sky \| \d\.\d{3} \| \d\.\d{3} \| \d\.\d{3} \| 2 \|", card)

    # A training run that logged elsewhere (no metrics.csv): no curves, and the card says why.
    (run_dirs(tmp_path / "runs")[0] / "metrics.csv").unlink()
    main(["test", "--ckpt_path", "last", "--trainer.default_root_dir", str(tmp_path / "runs"), *QUIET])
    report = run_dirs(tmp_path / "runs")[-1] / "report"
    assert not (report / "curves.png").exists() and "No training curves" in (report / "report.md").read_text()
