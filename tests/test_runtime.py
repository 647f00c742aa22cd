"""The hardware policy of runtime.py on every kind of machine, simulated: the precision
chosen for training and for evaluation, the small-batch guard, and one run end to end in
bf16 (emulated where the CPU lacks it), so every machine catches what a bf16 machine would.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.conftest import COLORS, make_image_folder
from tests.helpers import ACCURACY_LINE, QUIET, exit_code, fit_args, read_csv, run_dirs
from tl_project import main, runtime
from tl_project.lightning_cli import TransferLearningCLI

# /proc/cpuinfo flags of the kinds of CPU this project runs on.
CPU_FLAGS = {
    "Intel Xeon, AMX": "fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile",
    "AMD EPYC, AVX-512 BF16": "fpu sse2 avx2 avx512f avx512_bf16",
    "AMD EPYC, AVX2": "fpu sse2 avx2 fma",
}
Machine = Callable[..., None]


@pytest.fixture
def machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Machine:
    """Simulates a machine: its CPU's /proc/cpuinfo flags and, optionally, a CUDA GPU's capability."""
    read_flags = runtime.cpu_has_native_bf16

    def simulate(cpu: str, gpu: tuple[int, int] | None = None) -> None:
        cpuinfo = tmp_path / "cpuinfo"
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {CPU_FLAGS[cpu]}\n")
        monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: read_flags(cpuinfo))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu is not None)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: gpu)

    return simulate


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    for cpu, flags in CPU_FLAGS.items():
        cpuinfo.write_text(f"flags\t\t: {flags}\n")
        assert runtime.cpu_has_native_bf16(cpuinfo) == ("BF16" in cpu or "AMX" in cpu), cpu
    assert not runtime.cpu_has_native_bf16(tmp_path / "missing")


@pytest.mark.parametrize(
    ("cpu", "gpu", "accelerator", "training", "batch", "batchnorm_trains", "expected"),
    [
        ("Intel Xeon, AMX", None, "auto", True, 32, True, "bf16-mixed"),
        ("AMD EPYC, AVX-512 BF16", None, "auto", True, 16, True, "bf16-mixed"),
        ("AMD EPYC, AVX2", None, "auto", True, 32, True, "32-true"),
        # Batches too small for BatchNorm train in fp32, unless BatchNorm is frozen.
        ("Intel Xeon, AMX", None, "auto", True, 15, True, "32-true"),
        ("Intel Xeon, AMX", None, "auto", True, 2, False, "bf16-mixed"),
        # Evaluation on a CPU is fp32 on every CPU.
        ("Intel Xeon, AMX", None, "auto", False, 32, True, "32-true"),
        ("AMD EPYC, AVX2", None, "auto", False, 32, True, "32-true"),
        # GPUs: bf16 from compute capability 8.0, fp16 before; training and evaluation alike.
        ("AMD EPYC, AVX2", (9, 0), "auto", True, 64, True, "bf16-mixed"),
        ("AMD EPYC, AVX2", (9, 0), "gpu", False, 64, True, "bf16-mixed"),
        ("AMD EPYC, AVX2", (7, 0), "cuda", True, 64, True, "16-mixed"),
        ("AMD EPYC, AVX2", (7, 0), "gpu", True, 4, True, "32-true"),
        # Asked for the CPU on a GPU machine: the CPU decides.
        ("AMD EPYC, AVX2", (9, 0), "cpu", True, 64, True, "32-true"),
        ("Intel Xeon, AMX", (9, 0), "cpu", False, 64, True, "32-true"),
    ],
)
def test_precision_follows_the_machine_the_command_and_the_batch(
    machine: Machine,
    cpu: str,
    gpu: tuple[int, int] | None,
    accelerator: str,
    training: bool,
    batch: int,
    batchnorm_trains: bool,
    expected: str,
) -> None:
    machine(cpu, gpu)
    precision, why = runtime.choose_precision(accelerator, training, batch, batchnorm_trains)
    assert precision == expected, why


CIFAR = ["--model.backbone", "resnet18", "--model.weights", "null", "--data.dataset", "CIFAR10"]


def chosen(*args: str) -> str:
    return str(TransferLearningCLI(args=[*CIFAR, *args], run=False).trainer.precision)


def test_the_cli_chooses_by_the_model_and_the_data_and_an_explicit_precision_wins(
    auto_precision: None, machine: Machine, capfd: pytest.CaptureFixture[str]
) -> None:
    machine("Intel Xeon, AMX")
    assert chosen("--data.batch_size", "32") == "bf16-mixed"
    assert "Precision bf16-mixed: a CPU with native bf16" in capfd.readouterr().out
    assert chosen("--data.batch_size", "4") == "32-true"
    assert chosen("--data.batch_size", "4", "--model.finetune", "head") == "bf16-mixed"
    assert chosen("--data.batch_size", "4", "--model.freeze_batchnorm", "true") == "bf16-mixed"
    assert chosen("--data.batch_size", "32", "--trainer.precision", "32-true") == "32-true"
    machine("AMD EPYC, AVX2")
    assert chosen("--data.batch_size", "32") == "32-true"
    assert chosen("--data.batch_size", "4", "--trainer.precision", "bf16-mixed") == "bf16-mixed"


def test_small_batches_for_batchnorm_warn_before_training(
    image_folder: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    main(fit_args(image_folder, tmp_path / "runs", "--trainer.max_epochs", "1", "--model.backbone", "resnet18"))
    assert capfd.readouterr().err.count("Batches of 4 images per device are small for BatchNorm") == 1
    frozen = fit_args(image_folder, tmp_path / "runs", "--trainer.max_epochs", "1", "--model.finetune", "head")
    main([*frozen, "--model.backbone", "resnet18"])
    assert "small for BatchNorm" not in capfd.readouterr().err


def test_divergence_names_the_precision_and_the_batch(
    image_folder: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    args = fit_args(image_folder, tmp_path / "runs", "--model.backbone", "resnet18", "--model.optimizer.lr", "1e30")
    assert exit_code([*args, "--trainer.precision", "bf16-mixed"]) == 2
    err = capfd.readouterr().err
    assert re.search(r"training loss is \S+ at epoch 0, step \d+ \(precision bf16-mixed, batches of 4 images", err)
    assert "--trainer.precision 32-true shows whether" in err and "--data.batch_size 16 or more" in err
    assert exit_code([*args, "--data.batch_size", "16"]) == 2  # fp32, a batch BatchNorm copes with
    err = capfd.readouterr().err
    assert "(precision 32-true, batches of 16 images" in err
    assert "--trainer.precision 32-true shows" not in err and "small for BatchNorm" not in err


def test_fit_test_predict_export_in_bf16_on_every_machine(
    auto_precision: None,
    machine: Machine,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """bf16 end to end: natively on a bf16 CPU, emulated (same numerics, slower) elsewhere."""
    root = make_image_folder(tmp_path / "images", COLORS, per_class=12)
    runs = tmp_path / "runs"
    bf16 = ["--trainer.precision", "bf16-mixed"]
    common = ["--trainer.default_root_dir", str(runs), *QUIET]
    main(fit_args(root, runs, "--model.backbone", "resnet18", "--data.batch_size", "16", *bf16))
    checkpoint = run_dirs(runs)[0] / "checkpoints" / "last.ckpt"
    assert torch.load(checkpoint, weights_only=True)["state_dict"]["head.weight"].dtype == torch.float32

    main(["test", "--ckpt_path", str(checkpoint), *common, *bf16])
    assert ACCURACY_LINE.search(capfd.readouterr().out)
    main(["predict", "--ckpt_path", str(checkpoint), "--data.predict_dir", str(root), *common, *bf16])
    # Evaluation without --trainer.precision is fp32 even on a bf16 CPU.
    machine("Intel Xeon, AMX")
    main(["predict", "--ckpt_path", str(checkpoint), "--data.predict_dir", str(root), *common])
    assert "Precision 32-true: evaluation on a CPU runs in fp32" in capfd.readouterr().out

    onnx = tmp_path / "model.onnx"
    main(["export", "--ckpt_path", str(checkpoint), "--output", str(onnx)])
    main(
        ["predict", "--ckpt_path", str(onnx), "--data.predict_dir", str(root), "--trainer.default_root_dir", str(runs)]
    )
    in_bf16, in_fp32, from_onnx = (read_csv(run / "predictions.csv") for run in run_dirs(runs)[-3:])
    assert len(in_bf16) == len(in_fp32) == len(from_onnx) == 36
    for a, b, c in zip(in_bf16, in_fp32, from_onnx, strict=True):
        assert a["path"] == b["path"] == c["path"] and b["prediction"] == c["prediction"]
        # fp32 against fp32: the same numbers up to summation order.
        assert float(b["probability"]) == pytest.approx(float(c["probability"]), abs=1e-4)
        # bf16 keeps 8 significant bits (about 0.4 % per rounding): close, not equal.
        assert float(a["probability"]) == pytest.approx(float(b["probability"]), abs=0.05)


def test_loader_workers_follow_the_device_unless_given(image_folder: Path) -> None:
    from types import SimpleNamespace

    from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator

    from tl_project.data import ImageDataModule

    cores = runtime.usable_cores()
    assert runtime.default_num_workers(on_gpu=False) == 1
    assert runtime.default_num_workers(on_gpu=True) == min(8, cores)
    data = ImageDataModule(dataset=None, root=str(image_folder))
    assert data.num_workers == 1  # no Trainer yet: a CPU
    data.trainer = SimpleNamespace(accelerator=CUDAAccelerator())  # type: ignore[assignment]
    assert data.num_workers == min(8, cores)
    data.trainer = SimpleNamespace(accelerator=CPUAccelerator())  # type: ignore[assignment]
    assert data.num_workers == 1
    assert ImageDataModule(dataset=None, root=str(image_folder), num_workers=3).num_workers == 3
    assert data.hparams["num_workers"] is None  # the choice is made per run, not saved
