"""Calibrated probabilities, the answer threshold and class-activation maps, through every command."""

from __future__ import annotations

import base64
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchmetrics.classification import MulticlassCalibrationError

from tests.conftest import COLORS, make_image_folder
from tests.helpers import QUIET, exit_code, fit_args, read_csv, run_dirs
from tl_project import main
from tl_project import serve as serve_module
from tl_project.calibration import (
    ANSWER_NOTHING,
    Selective,
    answer_threshold,
    calibration_error,
    fit_temperature,
    wilson_lower,
)
from tl_project.errors import UserError
from tl_project.explain import ClassActivationMaps, in_original, last_spatial_layer
from tl_project.model import TransferLearningModel
from tl_project.serve import ClassifierAPI, Rejected, Upload
from tl_project.transforms import IMAGENET

TARGET = 0.9


# -- the pieces --


def test_fit_temperature_finds_the_temperature_that_made_the_labels() -> None:
    generator = torch.Generator().manual_seed(0)
    scores = 2 * torch.randn(4000, 5, generator=generator)
    labels = torch.multinomial(scores.softmax(dim=1), 1, generator=generator).flatten()
    # The model's logits are 3x too sharp: the fitted temperature undoes it.
    assert float(fit_temperature(3 * scores, labels)) == pytest.approx(3.0, rel=0.08)
    assert float(fit_temperature(scores / 2, labels)) == pytest.approx(0.5, rel=0.08)
    # Multi-label: one temperature per class; a class that is never present keeps 1.
    targets = torch.bernoulli(scores.sigmoid(), generator=generator)
    targets[:, 4] = 0
    temperatures = fit_temperature(torch.cat([2 * scores[:, :2], scores[:, 2:] / 2], dim=1), targets, True)
    assert temperatures[:2].tolist() == pytest.approx([2.0, 2.0], rel=0.1)
    assert temperatures[2:4].tolist() == pytest.approx([0.5, 0.5], rel=0.1)
    assert float(temperatures[4]) == 1.0


def test_few_separable_images_do_not_make_the_temperature_extreme() -> None:
    logits = torch.tensor([[4.0, 0.0], [0.0, 4.0], [5.0, 1.0]])
    assert 0.3 < float(fit_temperature(logits, torch.tensor([0, 1, 0]))) < 1.0


def test_the_answer_threshold_is_the_lowest_that_reaches_the_target() -> None:
    confidence = torch.tensor([0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    correct = torch.tensor([1, 1, 1, 0, 1, 1, 0, 0]).bool()
    # Top 3: 100 %; top 6: 5/6 = 83 %; top 4: 75 %; top 5: 80 %.
    # On the point estimate (margin 0):
    assert answer_threshold(confidence, correct, 0.8, margin=0) == pytest.approx(0.6)
    assert answer_threshold(confidence, correct, 0.9, margin=0) == pytest.approx(0.9)
    assert answer_threshold(torch.tensor([0.9, 0.8]), torch.tensor([False, True]), 0.99) == ANSWER_NOTHING
    # Tied probabilities are answered together: no cut between them.
    tied = torch.tensor([0.9, 0.9, 0.5]), torch.tensor([True, False, True])
    assert answer_threshold(*tied, 0.9, margin=0) == ANSWER_NOTHING
    # By default the accuracy must reach the target by one standard error (Wilson): 3 of 3
    # right is not yet 80 % with confidence, 5 of 6 neither; 12 of 13 is (0.82), 12 of 14 not (0.74).
    assert answer_threshold(confidence, correct, 0.8) == ANSWER_NOTHING
    many = torch.linspace(0.99, 0.5, 20), torch.tensor([True] * 12 + [False] * 8)
    assert answer_threshold(*many, 0.8) == pytest.approx(float(many[0][12]))
    assert wilson_lower(torch.tensor([82.0]), torch.tensor([100.0]), 1.0).item() == pytest.approx(0.7785, abs=1e-4)
    chosen = Selective.at(0.6, confidence, correct)
    assert (chosen.answered, chosen.coverage, chosen.accuracy) == (6, 0.75, pytest.approx(5 / 6))


def test_calibration_error_is_torchmetrics_top_class_error() -> None:
    generator = torch.Generator().manual_seed(1)
    logits, labels = 3 * torch.randn(500, 4, generator=generator), torch.randint(0, 4, (500,), generator=generator)
    confidence, predicted = logits.softmax(dim=1).max(dim=1)
    expected = MulticlassCalibrationError(4, n_bins=15)(logits.softmax(dim=1), labels)
    assert calibration_error(confidence, predicted == labels) == pytest.approx(float(expected), abs=1e-5)


def test_target_accuracy_must_be_a_fraction_for_single_label() -> None:
    with pytest.raises(UserError, match="between 0 and 1"):
        TransferLearningModel(3, backbone="resnet18", weights=None, target_accuracy=90)
    with pytest.raises(UserError, match="multi-label model already answers per class"):
        TransferLearningModel(3, backbone="resnet18", weights=None, multi_label=True, target_accuracy=0.9)


def test_maps_are_placed_where_the_crop_came_from() -> None:
    cam = torch.ones(32, 32)
    full = in_original(cam, 40, 80, IMAGENET)  # a wide image: resize to 36 x 73 high, crop 32 from the middle
    assert full.shape == (40, 80)
    columns = full.amax(dim=0)
    assert columns[:10].eq(0).all() and columns[-10:].eq(0).all() and columns[40] == 1
    assert full[:, 40].gt(0).sum() >= 34  # the crop keeps most of the height


def test_a_backbone_without_a_spatial_stage_is_refused_with_the_reason() -> None:
    tokens = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    with pytest.raises(UserError, match="convolutional backbone"):
        last_spatial_layer(tokens, 8)
    model = TransferLearningModel(3, backbone="resnet18", weights=None)
    # The last stage whose map is at least 4 x 4: ResNet-18's layer4 is 7 x 7 at 224 px, 2 x 2 at 64.
    assert last_spatial_layer(model.backbone, 224) is model.backbone.layer4
    assert last_spatial_layer(model.backbone, 64) is model.backbone.layer3
    assert last_spatial_layer(model.backbone, 32) is model.backbone.layer2
    # A stage inside a top-level child (torchvision EfficientNet's features).
    efficientnet = TransferLearningModel(3, backbone="efficientnet_b0", weights=None)
    assert last_spatial_layer(efficientnet.backbone, 64) is efficientnet.backbone.features[5]


def test_maps_of_a_gradual_model_whose_backbone_is_still_frozen() -> None:
    """finetune gradual runs its frozen backbone without gradients; the maps still get them."""
    torch.manual_seed(0)
    model = TransferLearningModel(3, backbone="resnet18", weights=None, finetune="gradual").eval()
    assert model.backbone_frozen
    maps = ClassActivationMaps(model, 64)(torch.randn(2, 3, 64, 64), torch.tensor([0, 2]))
    # Random weights: a map may be all 0 (no positive evidence); what matters is that it is made.
    assert maps.shape == (2, 64, 64) and bool(((maps >= 0) & (maps <= 1)).all())


# -- through the commands --


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("trust")
    root = make_image_folder(tmp / "images", COLORS, per_class=14)
    wide = tmp / "photos" / "wide.png"  # a picture of another shape: the map's crop box shows
    wide.parent.mkdir()
    Image.fromarray(np.full((40, 90, 3), COLORS["fish"], dtype=np.uint8)).save(wide)
    (tmp / "photos" / "sub").mkdir()
    Image.open(root / "cat" / "000.png").save(tmp / "photos" / "sub" / "cat.png")
    runs = tmp / "runs"
    args = fit_args(root, runs, "--data.test_split", "0.2", "--model.target_accuracy", str(TARGET))
    main([*args, "--trainer.max_epochs", "3"])
    return {"root": root, "runs": runs, "ckpt": run_dirs(runs)[0] / "checkpoints" / "last.ckpt", "photos": wide.parent}


def test_fit_saves_a_temperature_and_an_answer_threshold(trained: dict[str, Path]) -> None:
    state = torch.load(trained["ckpt"], weights_only=True)["state_dict"]
    assert state["temperature"].shape == (1,) and float(state["temperature"]) != 1.0
    assert 0 < float(state["min_probability"]) <= ANSWER_NOTHING


def test_the_report_shows_calibration_answers_and_maps(trained: dict[str, Path]) -> None:
    main(["test", "--ckpt_path", str(trained["ckpt"]), "--trainer.default_root_dir", str(trained["runs"]), *QUIET])
    report = run_dirs(trained["runs"])[-1] / "report"
    metrics = json.loads((report / "metrics.json").read_text())
    state = torch.load(trained["ckpt"], weights_only=True)["state_dict"]
    assert metrics["temperature"] == pytest.approx(float(state["temperature"]))
    assert {"expected_calibration_error", "expected_calibration_error_uncalibrated"} <= set(metrics)
    assert metrics["answers"]["min_probability"] == pytest.approx(float(state["min_probability"]))
    assert 0 <= metrics["answers"]["coverage"] <= 1
    for picture in ("reliability.png", "risk_coverage.png", "misclassified.png"):
        with Image.open(report / picture) as image:
            assert image.width > 300  # misclassified.png: one column when one image is wrong
    card = (report / "report.md").read_text()
    assert "reliability.png" in card and "risk_coverage.png" in card and "No class-activation maps" not in card


def test_predict_marks_answers_at_the_saved_or_given_threshold(trained: dict[str, Path], tmp_path: Path) -> None:
    threshold = float(torch.load(trained["ckpt"], weights_only=True)["state_dict"]["min_probability"])
    common = ["predict", "--ckpt_path", str(trained["ckpt"]), "--data.predict_dir", str(trained["root"]), *QUIET]
    main([*common, "--output", str(tmp_path / "saved.csv")])
    main([*common, "--output", str(tmp_path / "given.csv"), "--min_probability", "0.999"])
    saved, given = read_csv(tmp_path / "saved.csv"), read_csv(tmp_path / "given.csv")
    assert len(saved) == 42 and list(saved[0])[:4] == ["path", "prediction", "probability", "answered"]
    for row, other in zip(saved, given, strict=True):
        assert row["answered"] == str(float(row["probability"]) >= threshold).lower()
        assert other["answered"] == str(float(other["probability"]) >= 0.999).lower()
        assert row["prediction"] == other["prediction"]  # nothing is lost: the top class stays


def test_predict_explain_writes_each_images_map_in_its_own_pixels(trained: dict[str, Path], tmp_path: Path) -> None:
    maps = tmp_path / "maps"
    main(
        [
            "predict",
            *("--ckpt_path", str(trained["ckpt"]), "--data.predict_dir", str(trained["photos"])),
            *("--output", str(tmp_path / "p.csv"), "--explain", str(maps)),
            *QUIET,
        ]
    )
    assert sorted(str(p.relative_to(maps)) for p in maps.rglob("*.png")) == [
        "sub/cat.png.cam.png",
        "sub/cat.png.png",
        "wide.png.cam.png",
        "wide.png.png",
    ]
    with Image.open(maps / "wide.png.cam.png") as cam, Image.open(maps / "wide.png.png") as drawn:
        assert cam.mode == "L" and cam.size == drawn.size == (90, 40)
        pixels = np.asarray(cam)
    assert pixels[:, :15].max() == 0 and pixels[:, -15:].max() == 0  # cut away by the center crop
    assert pixels.max() in (0, 255)  # each map is scaled to its own peak (0: no positive evidence at all)


def test_export_applies_the_temperature_and_records_the_threshold(
    trained: dict[str, Path], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    onnx = tmp_path / "model.onnx"
    main(["export", "--ckpt_path", str(trained["ckpt"]), "--output", str(onnx)])
    meta = json.loads(Path(f"{onnx}.json").read_text())
    state = torch.load(trained["ckpt"], weights_only=True)["state_dict"]
    assert meta["temperature"] == pytest.approx(state["temperature"].tolist())
    assert meta["min_probability"] == pytest.approx(float(state["min_probability"]))
    common = ["predict", "--data.predict_dir", str(trained["root"]), *QUIET]
    main([*common, "--ckpt_path", str(trained["ckpt"]), "--output", str(tmp_path / "ckpt.csv")])
    main(
        [
            "predict",
            "--ckpt_path",
            str(onnx),
            "--data.predict_dir",
            str(trained["root"]),
            "--output",
            str(tmp_path / "onnx.csv"),
        ]
    )
    from_onnx = read_csv(tmp_path / "onnx.csv")
    for a, b in zip(read_csv(tmp_path / "ckpt.csv"), from_onnx, strict=True):
        assert a["prediction"] == b["prediction"]
        assert float(a["probability"]) == pytest.approx(float(b["probability"]), abs=1e-3)
        # The threshold is a validation image's probability: equality is decided by the last digit.
        assert b["answered"] == str(float(b["probability"]) >= meta["min_probability"]).lower()
    assert (
        exit_code(["predict", "--ckpt_path", str(onnx), "--data.predict_dir", str(trained["root"]), "--explain", "x"])
        == 2
    )
    assert "predict with the checkpoint it was exported from" in capfd.readouterr().err


def test_serve_answers_with_answered_and_the_map_on_request(
    trained: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(serve_module, "end_with", lambda parent: None)  # a worker's setup, in this process
    api = ClassifierAPI(str(trained["ckpt"]), None, min_probability=0.999)
    api.setup("cpu")
    data = (trained["root"] / "dog" / "001.png").read_bytes()
    plain, explained = (api.encode_response(api.predict(Upload(data, explain))) for explain in (False, True))
    assert plain["answered"] == (plain["probability"] >= 0.999) and "explanation" not in plain
    assert explained["prediction"] == plain["prediction"]
    prefix = "data:image/png;base64,"
    assert explained["explanation"].startswith(prefix)
    with Image.open(io.BytesIO(base64.b64decode(explained["explanation"][len(prefix) :]))) as picture:
        assert picture.size == (32, 32)  # the image as the model saw it
    assert api.classifier.describe()["explain"] is True

    onnx = tmp_path / "served.onnx"
    main(["export", "--ckpt_path", str(trained["ckpt"]), "--output", str(onnx)])
    from_onnx = ClassifierAPI(str(onnx), None)
    from_onnx.setup("cpu")
    assert not from_onnx.classifier.describe()["explain"]

    class Form(dict):
        pass

    class File:
        file = io.BytesIO(data)

    refused = from_onnx.decode_request(Form(file=File(), explain="true"))
    assert isinstance(refused, Rejected) and refused.status == 400 and "checkpoint" in refused.message


def test_a_checkpoint_from_before_calibration_gives_its_raw_probabilities(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    checkpoint = torch.load(trained["ckpt"], weights_only=True)
    for key in ("temperature", "min_probability"):
        del checkpoint["state_dict"][key]
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    model = TransferLearningModel.load_from_checkpoint(old, weights=None)
    assert model.temperature.tolist() == [1.0] and float(model.min_probability) == 0.0
    main(
        [
            "predict",
            "--ckpt_path",
            str(old),
            "--data.predict_dir",
            str(trained["root"]),
            "--output",
            str(tmp_path / "p.csv"),
            *QUIET,
        ]
    )
    assert all(row["answered"] == "true" for row in read_csv(tmp_path / "p.csv"))


def test_fit_without_validation_images_says_it_could_not_calibrate(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    root = make_image_folder(tmp_path / "images", COLORS, per_class=10)
    main(fit_args(root, tmp_path / "runs", "--trainer.limit_val_batches", "0", "--trainer.max_epochs", "1"))
    assert "could not be calibrated" in capfd.readouterr().err


def test_explain_without_captum_names_the_extra_before_any_run_folder(
    trained: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "captum.attr", None)  # as if the explain extra were not installed
    runs = tmp_path / "runs"
    args = ["predict", "--ckpt_path", str(trained["ckpt"]), "--data.predict_dir", str(trained["photos"])]
    assert exit_code([*args, "--explain", str(tmp_path / "maps"), "--trainer.default_root_dir", str(runs)]) == 2
    assert "pip install 'tl_project[explain]'" in capfd.readouterr().err
    assert not runs.exists() and not (tmp_path / "maps").exists()
