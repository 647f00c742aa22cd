"""`export` (a checkpoint to ONNX or TorchScript, see `tl_project.export`) and `predict` from an
exported .onnx file."""

from __future__ import annotations

from typing import Literal

from tl_project.errors import UserError
from tl_project.export import export, predict_onnx
from tl_project.launch import launched
from tl_project.lightning_cli import MIN_PROBABILITY_HELP, parser_settings
from tl_project.parsing import Parser


def run(command: str, args: list[str], description: str, from_sys_argv: bool) -> None:
    """`python -m tl_project export ...`"""
    with launched(command, args, from_sys_argv) as args:
        parser = Parser(**parser_settings(command, description))
        parser.add_function_arguments(export, as_positional=False)
        export(**parser.parse_args(args).as_dict())


# Trainer options a checkpoint's predict takes that keep a meaning for an .onnx file (ONNX
# Runtime, fp32, one CPU process): the values that fit it, or None for any value (display only).
ONNX_TRAINER_OPTIONS: dict[str, tuple[str, ...] | None] = {
    "--trainer.accelerator": ("cpu", "auto"),
    "--trainer.devices": ("1", "auto"),
    "--trainer.precision": ("32", "32-true"),
    "--trainer.enable_progress_bar": None,
    "--trainer.enable_model_summary": None,
}


def check_onnx_options(args: list[str]) -> list[str]:
    """`args` without the Trainer options an .onnx file's predict accepts and ignores; a clear
    error for one with a value it cannot honour, or for any other Trainer option."""
    kept: list[str] = []
    rest = iter(args)
    for arg in rest:
        name, given, value = arg.partition("=")
        if not name.startswith("--trainer.") or name == "--trainer.default_root_dir":
            kept.append(arg)
            continue
        if name not in ONNX_TRAINER_OPTIONS:
            raise UserError(
                f"{name} means nothing for an .onnx file, which ONNX Runtime runs on the CPU in one process; "
                f"it takes {', '.join(ONNX_TRAINER_OPTIONS)} (for the same command line as a checkpoint's) and "
                "--trainer.default_root_dir. Predict with the checkpoint to use the Trainer's options."
            )
        value = value if given else next(rest, "")
        allowed = ONNX_TRAINER_OPTIONS[name]
        if allowed is not None and value.lower() not in allowed:
            raise UserError(
                f"{name} {value}: an .onnx file runs fp32 on the CPU with ONNX Runtime ({name} takes "
                f"{' or '.join(allowed)} here); predict with the checkpoint for another device or precision."
            )
    return kept


def main_predict_onnx(args: list[str], description: str) -> None:
    """`python -m tl_project predict --ckpt_path X.onnx --data.predict_dir DIR ...`"""
    args = check_onnx_options(args)
    parser = Parser(**parser_settings("predict", f"{description} (an .onnx file: ONNX Runtime)"))
    parser.add_argument("--ckpt_path", required=True, help="The exported .onnx file.")
    parser.add_argument("--data.predict_dir", required=True, help="A folder (searched recursively) or one image.")
    parser.add_argument("--data.batch_size", type=int, default=32, help="Images per batch.")
    parser.add_argument("--data.num_workers", type=int, default=0, help="Loader worker processes.")
    parser.add_argument(
        "--data.on_bad_image", type=Literal["error", "skip"], default="error", help="Unusable images: stop, or skip."
    )
    parser.add_argument("--trainer.default_root_dir", default="runs", help="Where runs/version_N/ goes.")
    parser.add_argument(
        "--output", help="The predictions CSV (continued after an interruption, never overwritten); default: the run's."
    )
    parser.add_argument("--min_probability", type=float | None, default=None, help=MIN_PROBABILITY_HELP)
    parser.add_argument(
        "--runtime", type=Literal["auto", "onnxruntime"], default="auto", help="An .onnx file: ONNX Runtime."
    )
    parser.add_argument(
        "--explain", type=str | None, default=None, help="Class-activation maps: from a checkpoint only."
    )
    config = parser.parse_args(args)
    if config.explain:
        raise UserError(
            "--explain needs the network's gradients, which an .onnx file does not give: predict with the checkpoint "
            "it was exported from (--ckpt_path ...ckpt) for the maps."
        )
    predict_onnx(
        config.ckpt_path,
        config.data.predict_dir,
        batch_size=config.data.batch_size,
        num_workers=config.data.num_workers,
        on_bad_image=config.data.on_bad_image,
        default_root_dir=config.trainer.default_root_dir,
        output=config.output,
        min_probability=config.min_probability,
    )
