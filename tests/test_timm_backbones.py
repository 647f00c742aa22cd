"""timm backbones: names, weights (hub cache, files, tags), preprocessing, fixed input sizes,
and every command with a timm model. Mechanics use timm's tiny test models with random
weights; what real ImageNet weights learn is tests/test_outcomes.py's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from tests.conftest import COLORS, make_image_folder
from tests.helpers import QUIET, exit_code, fit_args, read_csv, run_dirs
from tl_project import main, timm_backbones
from tl_project.backbones import build_backbone, weights_preprocessing
from tl_project.checkpoints import read_checkpoint
from tl_project.classifier import Classifier
from tl_project.data.images import load_image
from tl_project.errors import UserError
from tl_project.transforms import eval_transform

TINY = "timm/test_efficientnet"  # 0.36 M parameters, BatchNorm, any input size


def timm_fit_args(root: Path, runs: Path, *extra: str) -> list[str]:
    """The tests' fit (`helpers.fit_args`: random weights, 32 px) with the tiny timm backbone."""
    return fit_args(root, runs, "--model.backbone", TINY, *extra)


@pytest.mark.parametrize("name", ["timm/test_efficientnet", "timm/test_convnext", "timm/test_resnet"])
def test_timm_model_loses_its_classifier_and_gives_features(name: str) -> None:
    model, in_features = build_backbone(name, weights=None)
    reference = timm.create_model(name.removeprefix("timm/"))
    assert in_features == reference.get_classifier().in_features
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, in_features)


@pytest.mark.parametrize(
    ("name", "suggested"),
    [
        ("timm/convnext_tnyi", "timm/convnext_tiny"),
        ("convnext_tnyi", "convnext_tiny"),
        ("resnet5000", "resnet50"),
        ("efficientnet_lite0", "timm/efficientnet_lite0"),
    ],
)
def test_unknown_names_get_the_closest_ones_not_a_list_of_everything(name: str, suggested: str) -> None:
    with pytest.raises(UserError) as error:
        build_backbone(name, weights=None)
    message = str(error.value)
    assert f"Did you mean {suggested}" in message and len(message) < 600


def test_without_timm_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(timm_backbones, "timm", None)
    with pytest.raises(UserError, match=r"pip install 'tl_project\[timm\]'"):
        build_backbone(TINY, weights=None)


def test_pretrained_weights_offline_name_the_cache_and_the_way_out() -> None:
    with pytest.raises(UserError) as error:
        build_backbone(TINY, weights="DEFAULT")
    message = str(error.value)
    assert "timm/test_efficientnet.r160_in1k are not available" in message
    assert timm_backbones.cache_folder() in message
    assert "--model.weights PATH" in message and "--model.weights null" in message


def standin_hub_cache(name: str) -> dict[str, torch.Tensor]:
    """A STAND-IN for timm's hub download of `name` (random values from timm's own model, in the
    Hugging Face cache's layout), so that the hub path loads offline; not pretrained."""
    torch.manual_seed(0)
    state = timm.create_model(name.partition(".")[0]).state_dict()
    repo = Path(timm_backbones.cache_folder()) / f"models--timm--{name}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(repo / "snapshots" / commit / "model.safetensors"))
    return state


@pytest.mark.parametrize("weights", ["DEFAULT", "r160_in1k"])
def test_pretrained_weights_load_from_timms_cache(weights: str) -> None:
    state = standin_hub_cache("test_efficientnet.r160_in1k")
    model, _ = build_backbone(TINY, weights=weights)
    assert torch.equal(model.conv_stem.weight, state["conv_stem.weight"])


def test_tags_are_checked_against_timms_list() -> None:
    with pytest.raises(UserError, match=r"no weights 'fb_in99k'.*r160_in1k"):
        build_backbone(TINY, weights="fb_in99k")
    with pytest.raises(UserError, match=r"names the tag 'r160_in1k'.*Pass one"):
        build_backbone(f"{TINY}.r160_in1k", weights="in1k")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_state_dict_file_with_another_head_loads_its_backbone(tmp_path: Path, suffix: str) -> None:
    source = timm.create_model("test_efficientnet", num_classes=7)
    path = tmp_path / f"mine{suffix}"
    if suffix == ".safetensors":
        save_file(source.state_dict(), str(path))
    else:
        torch.save(source.state_dict(), path)
    model, _ = build_backbone(TINY, weights=str(path))
    assert torch.equal(model.conv_stem.weight, source.conv_stem.weight)


def test_state_dict_of_another_architecture_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "convnext.pth"
    torch.save(timm.create_model("test_convnext").state_dict(), path)
    with pytest.raises(UserError, match="do not fit EfficientNet"):
        build_backbone(TINY, weights=str(path))


def test_preprocessing_comes_from_timms_pretrained_config() -> None:
    lite = weights_preprocessing("timm/tf_efficientnet_lite0", "weights.pth")
    assert lite.mean == (0.5, 0.5, 0.5) and lite.std == (0.5, 0.5, 0.5) and lite.interpolation == "bicubic"
    tagged = weights_preprocessing("timm/convnext_tiny.in12k_ft_in1k", "DEFAULT")
    assert tagged.crop_pct == 0.95 and tagged.mean == (0.485, 0.456, 0.406)
    assert weights_preprocessing("timm/convnext_tiny", "fb_in22k").crop_pct == 0.875


@pytest.mark.parametrize("backbone", ["timm/test_vit", "vit_b_16"])
def test_fixed_input_size_is_refused_before_anything_runs(
    backbone: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    root = make_image_folder(tmp_path / "images", COLORS, per_class=4)
    args = timm_fit_args(root, tmp_path / "runs", "--model.backbone", backbone)
    assert exit_code(args) == 2
    size = 160 if backbone == "timm/test_vit" else 224
    assert f"takes {size} px images only, and --data.image_size is 32" in capfd.readouterr().err
    assert not run_dirs(tmp_path / "runs")


@pytest.fixture(scope="module")
def timm_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("timm")
    root = make_image_folder(base / "images", COLORS, per_class=6)
    main(timm_fit_args(root, base / "runs"))
    return {"base": base, "root": root, "ckpt": run_dirs(base / "runs")[0] / "checkpoints" / "last.ckpt"}


def test_checkpoint_keeps_timms_preprocessing_and_test_needs_no_weights(
    timm_run: dict[str, Path], capfd: pytest.CaptureFixture[str]
) -> None:
    hparams = read_checkpoint(timm_run["ckpt"])["hyper_parameters"]
    assert hparams["backbone"] == TINY
    assert hparams["preprocessing"]["crop_pct"] == 0.95 and hparams["preprocessing"]["interpolation"] == "bicubic"
    runs = str(timm_run["base"] / "test_runs")
    main(["test", "--ckpt_path", str(timm_run["ckpt"]), "--trainer.default_root_dir", runs, *QUIET])
    assert "Accuracy of the model on the test images" in capfd.readouterr().out


def test_predict_export_and_predict_from_onnx_agree(timm_run: dict[str, Path], tmp_path: Path) -> None:
    ckpt, images = str(timm_run["ckpt"]), str(timm_run["root"] / "cat")
    main(["predict", "--ckpt_path", ckpt, "--data.predict_dir", images, "--output", str(tmp_path / "a.csv"), *QUIET])
    for format in ("onnx", "torchscript"):
        main(["export", "--ckpt_path", ckpt, "--format", format, "--output", str(tmp_path / f"model.{format}")])
    sidecar = json.loads((tmp_path / "model.onnx.json").read_text())
    assert sidecar["preprocessing"]["interpolation"] == "bicubic"
    onnx = ["predict", "--ckpt_path", str(tmp_path / "model.onnx"), "--data.predict_dir", images]
    main([*onnx, "--output", str(tmp_path / "b.csv")])
    torch_rows, onnx_rows = read_csv(tmp_path / "a.csv"), read_csv(tmp_path / "b.csv")
    assert [r["prediction"] for r in torch_rows] == [r["prediction"] for r in onnx_rows]
    for a, b in zip(torch_rows, onnx_rows, strict=True):
        assert float(a["probability"]) == pytest.approx(float(b["probability"]), abs=1e-4)


def test_serve_answers_as_predict_from_a_timm_checkpoint(timm_run: dict[str, Path], tmp_path: Path) -> None:
    """The model `serve` loads (checkpoint and .onnx) gives predict's probabilities."""
    images = sorted((timm_run["root"] / "fish").glob("*.png"))
    main(["predict", "--ckpt_path", str(timm_run["ckpt"]), "--data.predict_dir", str(timm_run["root"] / "fish"),
          "--output", str(tmp_path / "p.csv"), *QUIET])  # fmt: skip
    expected = {row["path"]: float(row["probability"]) for row in read_csv(tmp_path / "p.csv")}
    main(["export", "--ckpt_path", str(timm_run["ckpt"]), "--output", str(tmp_path / "m.onnx")])
    for path in (str(timm_run["ckpt"]), str(tmp_path / "m.onnx")):
        served = Classifier(path, "cpu")
        assert served.backbone == TINY
        batch = torch.stack([eval_transform(served.image_size, served.preprocessing)(load_image(p)) for p in images])
        top = served.probabilities(batch).max(dim=1).values
        for image, probability in zip(images, top.tolist(), strict=True):
            assert probability == pytest.approx(expected[str(image)], abs=1e-4)


def test_a_timm_checkpoint_is_a_backbone_for_the_next_fit(timm_run: dict[str, Path], tmp_path: Path) -> None:
    state = read_checkpoint(timm_run["ckpt"])["state_dict"]
    model, _ = build_backbone(TINY, weights=str(timm_run["ckpt"]))
    assert torch.equal(model.conv_stem.weight, state["backbone.conv_stem.weight"])
    with pytest.raises(UserError, match="holds a 'timm/test_efficientnet' backbone"):
        build_backbone("timm/test_convnext", weights=str(timm_run["ckpt"]))


@pytest.mark.parametrize(
    "flags",
    [
        ["--model.finetune", "head", "--data.augment", "false", "--model.cache_features", "true"],
        ["--model.finetune", "gradual", "--model.unfreeze_at_epoch", "1"],
        ["--model.freeze_batchnorm", "true", "--model.channels_last", "false"],
    ],
    ids=["cache_features", "gradual", "freeze_batchnorm"],
)
def test_fine_tune_modes_work_with_a_timm_backbone(flags: list[str], timm_run: dict[str, Path], tmp_path: Path) -> None:
    main(timm_fit_args(timm_run["root"], tmp_path / "runs", *flags))
    rows = [r for r in read_csv(run_dirs(tmp_path / "runs")[0] / "metrics.csv") if r.get("val/acc")]
    assert len(rows) == 2


def test_cv_with_a_timm_backbone(timm_run: dict[str, Path], tmp_path: Path) -> None:
    args = timm_fit_args(timm_run["root"], tmp_path / "runs", "--trainer.max_epochs", "1")[1:]
    main(["cv", *args, "--cv.folds", "2"])
    summary = json.loads((tmp_path / "runs" / "cv_0" / "cv.json").read_text())
    assert [row["fold"] for row in summary["folds"]] == [0, 1]
