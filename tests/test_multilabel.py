"""Multi-label (`--data.multi_label true`): label sets from a CSV, thresholds chosen on
validation and kept in the checkpoint, the metrics, predict's rows, the report, refusals."""

from __future__ import annotations

import csv
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests import processes
from tests.helpers import QUIET, exit_code, fit_args, read_csv, run_dirs
from tl_project import main
from tl_project.checkpoints import read_checkpoint
from tl_project.classifier import Classifier
from tl_project.data import ImageDataModule
from tl_project.errors import UserError
from tl_project.multilabel import best_f1_thresholds, predicted_sets
from tl_project.predictions import answer_threshold_in_force
from tl_project.recipe import BatchMix, positive_weights
from tl_project.serve import ClassifierAPI, Upload
from tl_project.transforms import eval_transform

COLOURS = {"red": (220, 40, 40), "green": (40, 220, 40), "blue": (40, 40, 220)}


def write_stripes(root: Path, count: int = 60, seed: int = 0) -> Path:
    """`root/images/NNN.png`: 40 px pictures with one or two colour stripes, and `root/labels.csv`
    naming their colours (a space between them)."""
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(count):
        chosen = sorted(rng.choice(3, int(rng.integers(1, 3)), replace=False).tolist())
        pixels = np.zeros((40, 40, 3), np.int64)
        for j, c in enumerate(chosen):
            pixels[:, 20 * j : 20 * j + 20] = COLOURS[names[c]]
        pixels = np.clip(pixels + rng.integers(-20, 20, pixels.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{i:03d}.png")
        rows.append([f"{i:03d}.png", " ".join(names[c] for c in chosen)])
    with open(root / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "label"], *rows])
    return root


def test_best_f1_thresholds_separate_what_can_be_separated() -> None:
    probabilities = torch.tensor([[0.9, 0.2], [0.7, 0.6], [0.4, 0.1], [0.1, 0.05]])
    targets = torch.tensor([[1, 0], [1, 1], [0, 0], [0, 0]])
    thresholds = best_f1_thresholds(probabilities, targets)
    assert 0.4 < thresholds[0] <= 0.7 and 0.2 < thresholds[1] <= 0.6
    assert predicted_sets(probabilities, thresholds) == [[0], [0, 1], [], []]
    # A class without a positive image keeps the default.
    assert best_f1_thresholds(probabilities, torch.zeros(4, 2, dtype=torch.int))[0] == 0.5


def test_classes_are_every_name_and_targets_are_multi_hot(tmp_path: Path) -> None:
    root = write_stripes(tmp_path)
    data = ImageDataModule(
        dataset=None, root=str(root / "images"), labels=str(root / "labels.csv"), multi_label=True, num_workers=0
    )
    assert data.class_names == ["blue", "green", "red"]
    data.setup("fit")
    rows = {r["path"]: set(r["label"].split()) for r in read_csv(root / "labels.csv")}
    dataset = data.datasets["train"]
    for index in range(5):
        _, target, _ = dataset[index]
        named = {data.class_names[c] for c in target.nonzero().flatten().tolist()}
        assert named == rows[Path(dataset.describe(index)).name]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"labels": None}, r"pass --data.labels FILE"),
        ({"balance": "sampler"}, r"--data.balance sampler draws single classes; .* use --data.balance loss"),
        ({"label_delimiter": ""}, r"--data.label_delimiter is empty"),
    ],
)
def test_what_multi_label_needs_or_cannot_do_is_said(tmp_path: Path, kwargs: dict, message: str) -> None:
    root = write_stripes(tmp_path, count=12)
    options = {"dataset": None, "root": str(root / "images"), "labels": str(root / "labels.csv"), "multi_label": True}
    with pytest.raises(UserError, match=message):
        ImageDataModule(**(options | kwargs))  # type: ignore[arg-type]


def test_a_cell_of_delimiters_only_is_a_bad_row(tmp_path: Path) -> None:
    root = write_stripes(tmp_path, count=4)
    with open(root / "labels.csv", "a", newline="") as f:
        csv.writer(f).writerow(["000.png", ";"])
    with pytest.raises(UserError, match=r"row 6: no class in the label ';'"):
        ImageDataModule(
            dataset=None, root=str(root / "images"), labels=str(root / "labels.csv"), multi_label=True,
            label_delimiter=";",
        )  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = write_stripes(tmp_path_factory.mktemp("multilabel"), count=90)
    runs = root / "runs"
    args = fit_args(root / "images", runs, "--data.labels", str(root / "labels.csv"), "--data.multi_label", "true")
    main([*args, "--trainer.max_epochs", "3", "--data.batch_size", "16", "--model.optimizer.lr", "0.01"])
    return {"root": root, "runs": runs, "ckpt": run_dirs(runs)[0] / "checkpoints" / "last.ckpt"}


def test_the_checkpoint_keeps_the_task_and_the_thresholds(trained: dict[str, Path]) -> None:
    checkpoint = read_checkpoint(trained["ckpt"])
    assert checkpoint["hyper_parameters"]["multi_label"] is True
    thresholds = checkpoint["state_dict"]["thresholds"]
    assert thresholds.shape == (3,) and not torch.equal(thresholds, torch.full((3,), 0.5))
    logged = [r for r in read_csv(run_dirs(trained["runs"])[0] / "metrics.csv") if r.get("val/map")]
    assert len(logged) == 3 and all(r["val/acc"] and r["val/f1_micro"] for r in logged)


def test_test_prints_the_mean_average_precision_and_writes_the_report(
    trained: dict[str, Path], capfd: pytest.CaptureFixture[str]
) -> None:
    main(["test", "--ckpt_path", str(trained["ckpt"]), "--trainer.default_root_dir", str(trained["runs"]), *QUIET])
    out = capfd.readouterr().out
    assert "Mean average precision of the model on the test images:" in out
    assert "Exact-match accuracy of the model on the test images:" in out
    report = run_dirs(trained["runs"])[-1] / "report"
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["mean_average_precision"] > 0.8  # three colours in stripes: easy
    assert set(metrics["per_class"]) == {"blue", "green", "red"}
    assert all(0 < row["threshold"] < 1 for row in metrics["per_class"].values())
    assert (report / "pr_curves.png").is_file() and (report / "worst.png").is_file()
    assert (report / "reliability.png").is_file() and len(metrics["temperature"]) == 3
    state = torch.load(trained["ckpt"], weights_only=True)["state_dict"]
    assert metrics["temperature"] == pytest.approx(state["temperature"].tolist())  # one a class, from validation
    assert (
        0 <= metrics["expected_calibration_error"] <= 1 and 0 <= metrics["expected_calibration_error_uncalibrated"] <= 1
    )
    assert read_csv(report / "worst.csv")[0].keys() == {"path", "true", "predicted", "loss"}


def test_predict_writes_the_set_then_every_probability(trained: dict[str, Path], tmp_path: Path) -> None:
    output = tmp_path / "predictions.csv"
    main(["predict", "--ckpt_path", str(trained["ckpt"]), "--data.predict_dir", str(trained["root"] / "images"),
          "--output", str(output), *QUIET])  # fmt: skip
    rows = read_csv(output)
    assert list(rows[0]) == ["path", "labels", "blue", "green", "red"] and len(rows) == 90
    thresholds = read_checkpoint(trained["ckpt"])["state_dict"]["thresholds"]
    for row in rows:
        expected = [c for i, c in enumerate(("blue", "green", "red")) if float(row[c]) >= float(thresholds[i]) - 1e-6]
        assert row["labels"].split() == expected
    truth = {r["path"]: set(r["label"].split()) for r in read_csv(trained["root"] / "labels.csv")}
    right = sum(set(row["labels"].split()) == truth[Path(row["path"]).name] for row in rows)
    assert right >= 0.8 * len(rows)


@pytest.fixture(scope="module")
def predicted(trained: dict[str, Path]) -> dict[str, dict[str, str]]:
    """predict's rows from the checkpoint, by file name."""
    output = trained["root"] / "predicted.csv"
    main(["predict", "--ckpt_path", str(trained["ckpt"]), "--data.predict_dir", str(trained["root"] / "images"),
          "--output", str(output), *QUIET])  # fmt: skip
    return {Path(row["path"]).name: row for row in read_csv(output)}


def test_flip_tta_predicts_sets_too(trained: dict[str, Path], tmp_path: Path) -> None:
    output = tmp_path / "tta.csv"
    main(["predict", "--ckpt_path", str(trained["ckpt"]), "--data.predict_dir", str(trained["root"] / "images"),
          "--model.tta", "flip", "--output", str(output), *QUIET])  # fmt: skip
    rows = read_csv(output)
    assert len(rows) == 90 and all(set(row["labels"].split()) <= {"blue", "green", "red"} for row in rows)


@pytest.mark.parametrize("format", ["onnx", "torchscript"])
def test_export_keeps_the_sigmoid_and_the_thresholds(trained: dict[str, Path], tmp_path: Path, format: str) -> None:
    target = tmp_path / f"model.{format}"
    main(["export", "--ckpt_path", str(trained["ckpt"]), "--format", format, "--output", str(target)])
    meta = json.loads(Path(f"{target}.json").read_text())
    thresholds = read_checkpoint(trained["ckpt"])["state_dict"]["thresholds"]
    assert meta["multi_label"] is True and meta["label_delimiter"] == " "
    assert meta["thresholds"] == pytest.approx(thresholds.tolist())
    assert meta["output"]["name"] == "probabilities"


def test_predict_from_onnx_gives_the_same_sets(
    trained: dict[str, Path], predicted: dict[str, dict[str, str]], tmp_path: Path
) -> None:
    main(["export", "--ckpt_path", str(trained["ckpt"]), "--output", str(tmp_path / "m.onnx")])
    main(["predict", "--ckpt_path", str(tmp_path / "m.onnx"), "--data.predict_dir", str(trained["root"] / "images"),
          "--output", str(tmp_path / "onnx.csv")])  # fmt: skip
    rows = read_csv(tmp_path / "onnx.csv")
    assert list(rows[0]) == ["path", "labels", "blue", "green", "red"] and len(rows) == len(predicted)
    for row in rows:
        expected = predicted[Path(row["path"]).name]
        assert row["labels"] == expected["labels"]
        for name in ("blue", "green", "red"):
            assert float(row[name]) == pytest.approx(float(expected[name]), abs=1e-4)


@pytest.mark.parametrize("source", ["checkpoint", "onnx"])
def test_serve_answers_the_set_and_every_probability(
    trained: dict[str, Path], predicted: dict[str, dict[str, str]], tmp_path: Path, source: str
) -> None:
    path = str(trained["ckpt"])
    if source == "onnx":
        path = str(tmp_path / "m.onnx")
        main(["export", "--ckpt_path", str(trained["ckpt"]), "--output", path])
    api = ClassifierAPI(path, None)  # what setup() builds in a worker, without tying this process to another
    api.classifier = Classifier(path, "cpu")
    api.max_pixels, api.pool = api.classifier.max_pixels, ThreadPoolExecutor(1)
    api.transform = eval_transform(api.classifier.image_size, api.classifier.preprocessing)
    assert api.classifier.describe()["multi_label"] is True
    for name in ("000.png", "001.png", "002.png"):
        upload = Upload((trained["root"] / "images" / name).read_bytes(), explain=False)
        answer = api.encode_response(api.predict(upload))
        expected = predicted[name]
        assert answer["labels"] == expected["labels"].split()
        assert answer["probabilities"] == pytest.approx(
            {c: float(expected[c]) for c in ("blue", "green", "red")}, abs=1e-4
        )


def test_label_smoothing_is_refused_with_multi_label(
    trained: dict[str, Path], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    args = fit_args(trained["root"] / "images", tmp_path / "runs", "--data.labels", str(trained["root"] / "labels.csv"))
    assert exit_code([*args, "--data.multi_label", "true", "--model.label_smoothing", "0.1"]) == 2
    assert "model.label_smoothing is for single-label data" in capfd.readouterr().err


@pytest.mark.parametrize(("mixup", "cutmix"), [(0.4, 0.0), (0.0, 1.0)], ids=["mixup", "cutmix"])
def test_mixing_mixes_the_label_vectors_as_the_images(mixup: float, cutmix: float) -> None:
    """Image i is the constant i and holds class i alone: a mixed image's mean is then the
    mixture of the classes, which its mixed label vector must be."""
    values = torch.arange(6, dtype=torch.float32)
    images, labels = values.view(6, 1, 1, 1).expand(6, 3, 16, 16).clone(), torch.eye(6)
    mixed, targets = BatchMix(mixup, cutmix, num_classes=6)(images, labels, seed=3)
    assert torch.allclose(targets.sum(dim=1), torch.ones(6))
    assert torch.allclose(mixed.mean(dim=(1, 2, 3)), targets @ values, atol=1e-4)
    assert not torch.equal(targets, labels)  # something was mixed


def test_balance_loss_weighs_each_class_by_its_negatives_over_its_positives(
    trained: dict[str, Path], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    assert positive_weights([10, 30, 0], 40, ["a", "b", "c"]).tolist() == [3.0, pytest.approx(1 / 3), 1.0]
    root = trained["root"]
    args = fit_args(root / "images", tmp_path / "runs", "--data.labels", str(root / "labels.csv"))
    main(
        [
            *args,
            "--data.multi_label",
            "true",
            "--data.balance",
            "loss",
            "--model.mixup",
            "0.2",
            "--trainer.max_epochs",
            "1",
        ]
    )
    assert "Positive-class weights of the training loss (data.balance loss): blue" in capfd.readouterr().out


def test_the_feature_cache_trains_multi_label_heads(trained: dict[str, Path], tmp_path: Path) -> None:
    """Multi-label trains on the evaluation view by default, so the cache needs no --data.augment."""
    root, runs = trained["root"], tmp_path / "runs"
    args = fit_args(root / "images", runs, "--data.labels", str(root / "labels.csv"), "--data.multi_label", "true")
    main([*args, "--model.finetune", "head", "--model.cache_features", "true", "--data.batch_size", "16"])
    logged = [r for r in read_csv(run_dirs(runs)[0] / "metrics.csv") if r.get("train/loss")]
    assert len(logged) == 2 and float(logged[-1]["train/loss"]) < float(logged[0]["train/loss"])


def test_shards_carry_the_label_sets(
    trained: dict[str, Path], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    root, shards = trained["root"], tmp_path / "shards"
    args = [
        "--data.root",
        str(root / "images"),
        "--data.labels",
        str(root / "labels.csv"),
        "--data.multi_label",
        "true",
    ]
    main(["optimize", *args, "--output", str(shards)])
    meta = json.loads((shards / "tl_project.json").read_text())
    assert meta["multi_label"] is True and meta["classes"] == ["blue", "green", "red"]
    truth = {r["path"]: r["label"].split() for r in read_csv(root / "labels.csv")}
    assert sum(meta["train_counts"].values()) > meta["splits"]["train"]  # some images hold two classes
    from_shards = ["--data.dataset", "litdata", "--data.root", str(shards)]
    data = ImageDataModule(dataset="litdata", root=str(shards), multi_label=True, num_workers=0)
    data.setup("validate")
    dataset = data.datasets["val"]
    for index in range(len(dataset)):
        named = [data.class_names[c] for c in dataset.target(index).nonzero().flatten().tolist()]
        assert named == sorted(truth[Path(dataset.describe(index)).name])
    fit = fit_args(root / "images", tmp_path / "runs", *from_shards, "--data.multi_label", "true")
    main([*fit, "--trainer.max_epochs", "1", "--data.batch_size", "16"])
    assert exit_code([*fit[:-2], "--data.multi_label", "false"]) == 2
    assert "hold several classes per image: pass --data.multi_label true" in capfd.readouterr().err


def test_cv_flags_the_label_sets_changed_on_purpose(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    root = write_stripes(tmp_path, count=60)
    rows = read_csv(root / "labels.csv")
    wrong = {"003.png": "red", "017.png": "blue green", "031.png": "green", "045.png": "blue red"}
    for row in rows:
        if row["path"] in wrong:
            assert set(wrong[row["path"]].split()) != set(row["label"].split())
            row["label"] = wrong[row["path"]]
    with open(root / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "label"], *([r["path"], r["label"]] for r in rows)])
    args = fit_args(root / "images", tmp_path / "runs", "--data.labels", str(root / "labels.csv"))[1:]
    main(["cv", *args, "--data.multi_label", "true", "--cv.folds", "3", "--trainer.max_epochs", "3",
          "--data.batch_size", "16", "--model.optimizer.lr", "0.01", "--data.test_split", "0"])  # fmt: skip
    folder = tmp_path / "runs" / "cv_0"
    out_of_fold = read_csv(folder / "out_of_fold.csv")
    assert len(out_of_fold) == 60  # every image validated once (no test split here)
    assert list(out_of_fold[0])[:3] == ["path", "given", "predicted"]
    issues = read_csv(folder / "label_issues.csv")
    flagged = [Path(row["path"]).name for row in issues]
    assert len(set(flagged[: 2 * len(wrong)]) & set(wrong)) >= 3, flagged
    assert "Label issues:" in capfd.readouterr().out


@pytest.mark.slow
def test_ddp_fits_and_tests_multi_label_with_the_metrics_of_one_process(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    """Two processes: the thresholds come from the validation images of both, and test's mAP and
    exact match are those of one process on the same checkpoint."""
    root, runs = trained["root"], tmp_path / "runs"
    ddp = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    args = fit_args(root / "images", runs, "--data.labels", str(root / "labels.csv"), "--data.multi_label", "true")
    result = processes.run([*args, "--trainer.max_epochs", "2", "--data.batch_size", "8", *ddp], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = run_dirs(runs)[0] / "checkpoints" / "last.ckpt"
    result = processes.run_ddp(["test", "--ckpt_path", str(ckpt), *QUIET, *ddp], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    main(["test", "--ckpt_path", str(ckpt), *QUIET, "--trainer.default_root_dir", str(runs)])
    two, one = (read_csv(run / "metrics.csv")[-1] for run in run_dirs(runs)[-2:])
    for key in ("test/map", "test/acc", "test/f1_micro"):
        assert float(two[key]) == pytest.approx(float(one[key]), abs=1e-6), key


def test_min_probability_is_refused_for_multi_label_by_predict_and_serve(
    trained: dict[str, Path], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    predict = ["predict", "--ckpt_path", str(trained["ckpt"]), "--data.predict_dir", str(trained["root"] / "images")]
    assert exit_code([*predict, "--output", str(tmp_path / "p.csv"), "--min_probability", "0.5", *QUIET]) == 2
    assert "a multi-label model answers each class at its own threshold" in capfd.readouterr().err
    assert not (tmp_path / "p.csv").exists()
    with pytest.raises(UserError, match="multi-label model answers each class"):
        answer_threshold_in_force(0.5, 0.0, multi_label=True)
    assert answer_threshold_in_force(None, 0.3, multi_label=True) == 0.3
    assert answer_threshold_in_force(0.7, 0.3, multi_label=False) == 0.7
