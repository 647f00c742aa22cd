"""Reading checkpoints: a file that is no checkpoint, a damaged one, one holding objects."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.helpers import exit_code
from tl_project.checkpoints import read_checkpoint
from tl_project.errors import UserError


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "hyper_parameters": {"num_classes": 2}}, good)
    png = tmp_path / "picture.ckpt"
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    return {"good": good, "png": png, "truncated": truncated}


def test_a_file_that_is_no_checkpoint_is_named_so_without_suggesting_unsafe_loading(
    files: dict[str, Path], capfd: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(UserError, match=r"picture\.ckpt is not a checkpoint: it was not written by torch\.save"):
        read_checkpoint(files["png"])
    assert exit_code(["test", "--ckpt_path", str(files["png"])]) == 2
    err = capfd.readouterr().err
    assert "is not a checkpoint" in err and "weights_only=False" not in err


def test_a_truncated_checkpoint_is_named_truncated_or_corrupt(files: dict[str, Path]) -> None:
    with pytest.raises(UserError, match=r"The checkpoint .*truncated\.ckpt is truncated or corrupt \(") as raised:
        read_checkpoint(files["truncated"])
    assert ".." not in str(raised.value) and "weights_only=False" not in str(raised.value)
    assert read_checkpoint(files["good"])["hyper_parameters"] == {"num_classes": 2}
