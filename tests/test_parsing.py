"""Command-line errors: a short line naming the option and the fix, the command's --help, exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import exit_code, fit_args
from tl_project.parsing import plain_error

UNION = """Parser key "trainer.callbacks":
  Does not validate against any of the Union subtypes
  Subtypes: [list[lightning.pytorch.callbacks.callback.Callback], <class 'NoneType'>]
  Errors:
    - Expected a <class 'list'>
    - Problem with given class_path 'lightning.pytorch.callbacks.EarlyStopping':
        the following arguments are required: monitor
    - Expected a <class 'NoneType'>
  Given value type: <class 'jsonargparse._namespace.Namespace'>
  Given value: Namespace(class_path='lightning.pytorch.callbacks.EarlyStopping', init_args=Namespace())"""


def test_plain_error_keeps_the_line_that_matters() -> None:
    text = plain_error(UNION)
    assert text.startswith(
        "--trainer.callbacks: lightning.pytorch.callbacks.EarlyStopping: the following arguments are required: monitor"
    )
    assert "--early_stopping.patience" in text and "Subtypes" not in text and "Namespace" not in text
    typed = 'Parser key "trainer.max_epochs":\n  Does not validate against any of the Union subtypes\n  Errors:\n'
    typed += "    - Expected a <class 'int'>\n    - Expected a <class 'NoneType'>\n  Given value: abc"
    assert plain_error(typed) == "--trainer.max_epochs: expected int or None, got 'abc'"
    literal = "Parser key \"model.finetune\":\n  Expected a typing.Literal['full', 'head']. Got value: half"
    assert plain_error(literal) == "--model.finetune: expected one of full, head, got 'half'"
    assert plain_error("unrecognized arguments: --x 1") == "unrecognized arguments: --x 1"


@pytest.mark.parametrize(
    ("args", "wanted"),
    [
        (["fit", "--trainer.callbacks", "EarlyStopping"], "required: monitor"),
        (["fit", "--trainer.max_epochs", "abc"], "--trainer.max_epochs: expected int or None, got 'abc'"),
        (["test", "--nonsense", "1"], "unrecognized arguments: --nonsense 1"),
        (["cv", "--cv.folds", "abc"], "--cv.folds: expected int, got 'abc'"),
        (["serve", "--port", "x"], "--port: expected int, got 'x'"),
        (["fit", "--model.bakbone", "x"], "unrecognized arguments: --model.bakbone x\nDid you mean --model.backbone?"),
        (["tune", "--tune.max_lrr", "3"], "Did you mean --tune.max_lr?"),
    ],
)
def test_a_bad_option_gets_a_short_error_naming_the_commands_help(
    args: list[str], wanted: str, capfd: pytest.CaptureFixture[str]
) -> None:
    assert exit_code(args) == 2
    err = capfd.readouterr().err
    assert wanted in err
    assert f"Every option: python -m tl_project {args[0]} --help" in err
    assert "usage:" not in err and len(err.splitlines()) <= 3


def test_a_watch_mode_that_keeps_the_worst_is_refused_before_any_run_folder(
    image_folder: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Lightning's EarlyStopping and ModelCheckpoint default to mode min, the worst for val/acc."""
    runs = tmp_path / "runs"
    lightning_stop = ["--trainer.callbacks", "EarlyStopping", "--trainer.callbacks.monitor", "val/acc"]
    assert exit_code(fit_args(image_folder, runs, *lightning_stop)) == 2
    assert "EarlyStopping watches val/acc with mode min" in (err := capfd.readouterr().err)
    assert "Pass --trainer.callbacks.mode max" in err
    assert exit_code(fit_args(image_folder, runs, "--checkpoint.monitor", "val/loss")) == 2
    assert "Pass --checkpoint.mode min" in capfd.readouterr().err
    assert not runs.exists()


def test_a_misspelt_key_in_a_config_names_the_closest_option(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "mine.yaml"
    config.write_text("data:\n  batchsize: 3\n")
    assert exit_code(["fit", "--config", str(config)]) == 2
    assert "'data.batchsize'\nDid you mean --data.batch_size?" in capfd.readouterr().err
    assert exit_code(["check", "--config", str(config)]) == 2  # a command with a parser of its own
    assert f"{config}: check has no option data.batchsize. Did you mean --data.batch_size?" in capfd.readouterr().err
