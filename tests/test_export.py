"""Export to ONNX and TorchScript: parity with PyTorch, the sidecar, predict from ONNX."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from tests.helpers import QUIET, exit_code, fit_args, read_csv, run_dirs
from tl_project import main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.conftest import COLORS, make_image_folder

    base = tmp_path_factory.mktemp("export")
    root = make_image_folder(base / "images", COLORS, per_class=6)
    main(fit_args(root, base / "runs", "--trainer.max_epochs", "1"))
    return run_dirs(base / "runs")[0] / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize("format", ["onnx", "torchscript"])
def test_export_checks_parity_and_writes_classes_beside_the_model(
    checkpoint: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str], format: str
) -> None:
    target = tmp_path / f"model.{format}"
    main(["export", "--ckpt_path", str(checkpoint), "--format", format, "--output", str(target)])
    out = capfd.readouterr().out
    difference = float(re.search(r"max abs difference (\S+) ", out).group(1))  # type: ignore[union-attr]
    assert difference < 1e-3 and target.is_file()
    meta = json.loads(Path(f"{target}.json").read_text())
    assert meta["classes"] == ["cat", "dog", "fish"] and meta["input"]["image_size"] == 32
    assert meta["preprocessing"]["mean"] == [0.485, 0.456, 0.406]
    # Random init: ImageNet's classic preset, 32 / 0.875 = 36.6.
    assert meta["preprocessing"]["resize_short_side"] == 37 and meta["preprocessing"]["interpolation"] == "bilinear"
    if format == "torchscript":
        scripted = torch.jit.load(str(target))
        assert scripted(torch.randn(3, 3, 32, 32)).shape == (3, 3)
    # An existing file is never overwritten.
    assert exit_code(["export", "--ckpt_path", str(checkpoint), "--format", format, "--output", str(target)]) == 2


def test_export_fails_and_keeps_nothing_beyond_the_tolerance(checkpoint: Path, tmp_path: Path) -> None:
    target = tmp_path / "strict.onnx"
    # A tolerance no float computation meets, unless it repeats PyTorch bit for bit.
    code = exit_code(["export", "--ckpt_path", str(checkpoint), "--output", str(target), "--rtol", "0", "--atol", "0"])
    if code == 0:
        pytest.skip("the ONNX runtime reproduced PyTorch bit for bit; the tolerance could not fail")
    assert code == 2 and not target.exists()


def test_predict_from_onnx_matches_the_checkpoint(checkpoint: Path, tmp_path: Path) -> None:
    target = tmp_path / "model.onnx"
    main(["export", "--ckpt_path", str(checkpoint), "--output", str(target)])
    photos = checkpoint.parents[3] / "images"
    runs = tmp_path / "runs"
    common = ["--data.predict_dir", str(photos), "--trainer.default_root_dir", str(runs)]
    main(["predict", "--ckpt_path", str(checkpoint), *common, *QUIET])
    main(["predict", "--ckpt_path", str(target), *common])
    from_checkpoint, from_onnx = (read_csv(run / "predictions.csv") for run in run_dirs(runs))
    assert len(from_onnx) == len(from_checkpoint) == 18
    for a, b in zip(from_checkpoint, from_onnx, strict=True):
        assert a["path"] == b["path"] and a["prediction"] == b["prediction"]
        assert float(a["probability"]) == pytest.approx(float(b["probability"]), abs=1e-4)
