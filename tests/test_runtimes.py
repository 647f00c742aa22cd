"""predict and serve from a checkpoint on the fastest exact path: ONNX Runtime on a CPU,
converted once into the cache, checked against PyTorch, PyTorch where that fails."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from tests.conftest import COLORS, make_image_folder
from tests.helpers import QUIET, exit_code, fit_args, read_csv, run_dirs
from tl_project import main
from tl_project import runtimes as runtimes_module
from tl_project.classifier import Classifier
from tl_project.errors import UserError
from tl_project.export import OnnxClassifier
from tl_project.runtimes import CACHE_KEEP, OnnxLogits, cache_folder, choose


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("runtimes")
    root = make_image_folder(tmp / "images", COLORS, per_class=8)
    main(fit_args(root, tmp / "runs", "--trainer.max_epochs", "1"))
    return {"root": root, "ckpt": run_dirs(tmp / "runs")[0] / "checkpoints" / "last.ckpt"}


def predict(trained: dict[str, Path], output: Path, *extra: str) -> list[dict[str, str]]:
    main(["predict", "--ckpt_path", str(trained["ckpt"]), "--data.predict_dir", str(trained["root"]),
          "--data.batch_size", "8", "--output", str(output), *QUIET, *extra])  # fmt: skip
    return read_csv(output)


def same_answers(a: list[dict[str, str]], b: list[dict[str, str]], tolerance: float = 1e-4) -> None:
    assert len(a) == len(b) == 24
    for x, y in zip(a, b, strict=True):
        assert (x["path"], x["prediction"], x["top2"]) == (y["path"], y["prediction"], y["top2"])
        assert float(x["probability"]) == pytest.approx(float(y["probability"]), abs=tolerance)


def test_predict_runs_onnx_runtime_on_a_cpu_converted_once(
    trained: dict[str, Path], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    torch_rows = predict(trained, tmp_path / "torch.csv", "--runtime", "torch")
    assert "Runtime: PyTorch (--runtime torch)" in capfd.readouterr().out
    fast = predict(trained, tmp_path / "fast.csv")
    out = capfd.readouterr().out
    assert "Runtime: ONNX Runtime (the faster exact path on a CPU" in out
    assert "[torch.onnx]" not in out  # the exporter's progress lines are not the user's business
    cached = list(cache_folder().glob("*.onnx"))
    assert len(cached) == 1 and not list(cache_folder().glob("*.data"))  # one self-contained file
    same_answers(fast, torch_rows)
    written = cached[0].stat()
    os.utime(cached[0], (written.st_atime - 60, written.st_mtime - 60))
    again = predict(trained, tmp_path / "again.csv")
    reused = cached[0].stat()
    assert reused.st_ino == written.st_ino and list(cache_folder().glob("*.onnx")) == cached  # not written again
    assert reused.st_mtime > written.st_mtime - 60  # marked as used: the pruning keeps the most recently used
    assert again == fast


def test_the_cache_keeps_the_most_recently_used_conversions(
    trained: dict[str, Path], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    folder = cache_folder()
    folder.mkdir(parents=True, exist_ok=True)
    for age in range(CACHE_KEEP):  # older conversions, the oldest last
        (old := folder / f"old{age}.onnx").write_bytes(b"x")
        os.utime(old, (1_000_000 - age, 1_000_000 - age))
    predict(trained, tmp_path / "p.csv")
    kept = sorted(path.name for path in folder.glob("*.onnx"))
    assert len(kept) == CACHE_KEEP and f"old{CACHE_KEEP - 1}.onnx" not in kept and "old0.onnx" in kept
    assert f"Removed 1 older conversion from {folder} (it keeps the {CACHE_KEEP} most recently used)" in (
        capfd.readouterr().out
    )


def test_flip_tta_runs_inside_the_converted_model(trained: dict[str, Path], tmp_path: Path) -> None:
    flipped = predict(trained, tmp_path / "fast.csv", "--model.tta", "flip")
    same_answers(flipped, predict(trained, tmp_path / "torch.csv", "--model.tta", "flip", "--runtime", "torch"))
    assert any(p.name.endswith("-flip-v1.onnx") for p in cache_folder().glob("*.onnx"))
    assert flipped != predict(trained, tmp_path / "plain.csv", "--runtime", "torch")  # the flip changes answers


def test_a_difference_on_the_first_batch_falls_back_to_pytorch(
    trained: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    honest = OnnxLogits.__call__
    monkeypatch.setattr(OnnxLogits, "__call__", lambda self, images: honest(self, images) + torch.tensor([5.0, 0, 0]))
    rows = predict(trained, tmp_path / "fallback.csv")
    assert "ONNX Runtime differs from PyTorch on the first batch of these images" in capfd.readouterr().err
    same_answers(rows, predict(trained, tmp_path / "torch.csv", "--runtime", "torch"), tolerance=1e-6)


def test_a_failed_conversion_says_why_and_runs_pytorch(
    trained: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("an operator without an ONNX form")

    monkeypatch.setattr(runtimes_module, "write_onnx", fail)
    rows = predict(trained, tmp_path / "p.csv")
    err = capfd.readouterr().err
    assert "Could not run the checkpoint with ONNX Runtime (an operator without an ONNX form): running PyTorch" in err
    assert len(rows) == 24 and not list(cache_folder().glob("*.onnx"))
    args = ["predict", "--ckpt_path", str(trained["ckpt"]), "--data.predict_dir", str(trained["root"])]
    assert exit_code([*args, "--output", str(tmp_path / "q.csv"), "--runtime", "onnxruntime", *QUIET]) == 2
    assert "--runtime onnxruntime: the checkpoint could not be run with ONNX Runtime" in capfd.readouterr().err


def test_choice_by_device_and_install(monkeypatch: pytest.MonkeyPatch) -> None:
    assert choose("auto", "cpu")[0] == "onnxruntime"
    assert choose("auto", "cuda") == ("torch", "on cuda PyTorch runs the GPU's fast precision")
    assert choose("torch", "cpu")[0] == "torch"
    with pytest.raises(UserError, match=r"--trainer\.accelerator cpu"):
        choose("onnxruntime", "cuda")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "onnxruntime" else real(name))
    assert choose("auto", "cpu") == (
        "torch",
        "onnxruntime is not installed (pip install 'tl_project[export]' for the faster CPU path)",
    )
    with pytest.raises(UserError, match="pip install 'tl_project\\[export\\]'"):
        choose("onnxruntime", "cpu")


def test_serve_answers_from_onnx_runtime_as_pytorch_does(trained: dict[str, Path]) -> None:
    fast, plain = Classifier(str(trained["ckpt"]), "cpu"), Classifier(str(trained["ckpt"]), "cpu", "torch")
    assert fast.describe()["runtime"] == "onnxruntime" and plain.describe()["runtime"] == "torch"
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    assert torch.allclose(fast.probabilities(images), plain.probabilities(images), atol=1e-5)


def test_export_writes_one_file_and_a_missing_companion_is_named(trained: dict[str, Path], tmp_path: Path) -> None:
    single = tmp_path / "single.onnx"
    main(["export", "--ckpt_path", str(trained["ckpt"]), "--output", str(single)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["single.onnx", "single.onnx.json"]
    # A file exported with its weights beside it (as before), copied without them:
    split = tmp_path / "split.onnx"
    network = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    torch.onnx.export(network, (torch.randn(1, 3, 32, 32),), str(split), input_names=["images"], dynamo=True,
                      external_data=True)  # fmt: skip
    Path(f"{split}.json").write_text(Path(f"{single}.json").read_text())
    Path(f"{split}.data").unlink()
    with pytest.raises(UserError, match="companion file"):
        OnnxClassifier(split)


def test_onnx_predict_takes_the_checkpoints_trainer_options_that_mean_something(
    trained: dict[str, Path], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    onnx = tmp_path / "m.onnx"
    main(["export", "--ckpt_path", str(trained["ckpt"]), "--output", str(onnx)])
    args = ["predict", "--ckpt_path", str(onnx), "--data.predict_dir", str(trained["root"]), *QUIET]
    main([*args, "--trainer.accelerator", "cpu", "--trainer.devices=1", "--output", str(tmp_path / "p.csv")])
    assert len(read_csv(tmp_path / "p.csv")) == 24
    assert exit_code([*args, "--trainer.accelerator", "gpu"]) == 2
    assert "an .onnx file runs fp32 on the CPU with ONNX Runtime" in capfd.readouterr().err
    assert exit_code([*args, "--trainer.max_epochs", "3"]) == 2
    err = capfd.readouterr().err
    assert "--trainer.max_epochs means nothing for an .onnx file" in err and "usage:" not in err
    meta = json.loads(Path(f"{onnx}.json").read_text())
    assert meta["input"]["name"] == "images"


def test_int8_export_is_measured_and_predicts_like_any_onnx(
    trained: dict[str, Path], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "m.int8.onnx"
    main(["export", "--ckpt_path", str(trained["ckpt"]), "--quantize", "int8", "--output", str(target)])
    out = capfd.readouterr().out
    assert "int8 against fp32 on" in out and "% of the answers agree" in out
    quantized = json.loads(Path(f"{target}.json").read_text())["quantized"]
    assert quantized["type"] == "int8" and quantized["calibration"].endswith("validation images")
    assert 0 <= quantized["agreement_with_fp32"] <= 1 and quantized["images_per_s_int8"] > 0
    import onnx

    graph = onnx.load(str(target)).graph
    assert any(node.op_type == "QuantizeLinear" for node in graph.node)  # int8 in the file, not a copy
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.int8.onnx", "m.int8.onnx.json"]
    args = ["predict", "--ckpt_path", str(target), "--data.predict_dir", str(trained["root"]), *QUIET]
    main([*args, "--output", str(tmp_path / "p.csv")])
    assert len(read_csv(tmp_path / "p.csv")) == 24
    assert exit_code(["export", "--ckpt_path", str(trained["ckpt"]), "--quantize", "int8", "--format", "torchscript",
                      "--output", str(tmp_path / "x.pt")]) == 2  # fmt: skip
    assert "--quantize int8 writes an ONNX model" in capfd.readouterr().err
