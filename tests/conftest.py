"""Shared fixtures: tiny generated image folders, an isolated torch cache, offline guards,
one precision on every machine.

Every test runs offline: torch's downloader is replaced by one that fails the way an
offline machine does, and `TORCH_HOME` points at an empty per-test cache.

Every command a test runs, in-process or in a subprocess, runs in fp32 unless it
passes --trainer.precision: the default precision follows the CPU (`runtime.py`), and
a test's result must not. Tests of the precision choice remove that setting
(`auto_precision`) and simulate each kind of machine.
"""

from __future__ import annotations

import os

# Waiting OpenMP threads sleep instead of spinning: with two pytest-xdist workers (`make test`)
# and the subprocesses of the multi-process tests, more torch threads than cores run at once,
# and spinning ones slow the others down several times. Set before torch is imported; the
# workers and every command a test starts inherit it. Results do not change (same threads).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Under pytest-xdist, the workers share the cores: torch's threads per process are the cores
# divided among the workers (one each for `make test`'s two on two cores), not all cores each.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    os.environ.setdefault(
        "OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    )

import shutil
import urllib.error
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from huggingface_hub import constants as hf_constants
from PIL import Image

from tl_project.backbones import hub_file

# Three classes that differ in colour, so a few steps of training can tell them apart.
COLORS = {"cat": (220, 60, 60), "dog": (60, 220, 60), "fish": (60, 60, 220)}


def make_image_folder(root: Path, classes: dict[str, tuple[int, int, int]], per_class: int, size: int = 40) -> Path:
    """Write `per_class` noisy PNGs of each class colour under `root/<class>/`."""
    rng = np.random.default_rng(0)
    for name, color in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            noise = rng.integers(-30, 30, (size, size, 3))
            pixels = np.clip(np.array(color) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session", autouse=True)
def remove_temporary_folders(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[None]:
    """After a run without failures nothing stays in /tmp: the module fixtures' folders (checkpoints,
    exports, 900-image folders) too, which the failed-only retention of tmp_path keeps."""
    yield
    if request.session.testsfailed == 0:
        shutil.rmtree(tmp_path_factory.getbasetemp(), ignore_errors=True)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """root/{cat,dog,fish}/*.png, 10 images a class."""
    return make_image_folder(tmp_path / "images", COLORS, per_class=10)


def no_network(url: str, *args: object, **kwargs: object) -> None:
    raise urllib.error.URLError(f"offline test: no network for {url}")


# Options from the environment rank below config files and flags (LightningCLI's default_env).
PRECISION_VARIABLES = [
    f"TL_PROJECT_{command}__TRAINER__PRECISION" for command in ("FIT", "VALIDATE", "TEST", "PREDICT", "TUNE", "CV")
]


def use_temporary_caches(patch: pytest.MonkeyPatch, factory: pytest.TempPathFactory) -> Path:
    """An empty torch cache, Hugging Face hub cache (timm's, offline: no request leaves) and
    data-check cache (for the manifests) under the run's temporary folder; the torch cache's path."""
    torch_home = factory.mktemp("torch_home")
    patch.setenv("TORCH_HOME", str(torch_home))
    patch.setenv("XDG_CACHE_HOME", str(factory.mktemp("cache")))
    hub = factory.mktemp("hf_hub")
    patch.setenv("HF_HUB_CACHE", str(hub))
    patch.setenv("HF_HUB_OFFLINE", "1")  # for processes the tests start
    # huggingface_hub read its environment when imported: set what it reads at call time.
    patch.setattr(hf_constants, "HF_HUB_CACHE", str(hub))
    patch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return torch_home


@pytest.fixture(scope="session", autouse=True)
def session_environment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """fp32, offline and temporary caches for the whole run, so that module and session fixtures
    (which run before any test's own fixtures) run commands as the tests do: every command in
    fp32 unless it passes --trainer.precision, whatever the CPU; no download; the torch cache
    and the data check's manifests under the run's temporary folder, not in ~/.cache. And no
    test leaves a run folder in the working directory."""
    before = set(Path("runs").glob("version_*"))
    with pytest.MonkeyPatch.context() as patch:
        for name in PRECISION_VARIABLES:
            patch.setenv(name, "32-true")
        use_temporary_caches(patch, tmp_path_factory)
        patch.setattr(torch.hub, "download_url_to_file", no_network)
        yield
    # A command without --trainer.default_root_dir writes runs/ in the working directory.
    left = sorted(set(Path("runs").glob("version_*")) - before)
    assert not left, f"tests wrote run folders into {Path.cwd() / 'runs'}: {left}; pass --trainer.default_root_dir"


@pytest.fixture(autouse=True)
def offline(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test its own empty torch cache and data-check cache (the downloader fails like an
    offline machine's, `session_environment`)."""
    return use_temporary_caches(monkeypatch, tmp_path_factory)


@pytest.fixture
def auto_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    """Commands choose their precision from the (simulated) machine, as for a user."""
    for name in PRECISION_VARIABLES:
        monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def standin_resnet50_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A STAND-IN for the ImageNet weights file: random values from torchvision's own resnet50().

    Same format and official file name as the real IMAGENET1K_V2 file, so torchvision
    loads it from its cache; the values are random, not pretrained.
    """
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("standin") / "resnet50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), path)
    return path


@pytest.fixture
def standin_cache(offline: Path, standin_resnet50_file: Path) -> Path:
    """TORCH_HOME holding the stand-in under `hub/checkpoints/resnet50-11ad3fa6.pth`."""
    target = hub_file(torchvision.models.ResNet50_Weights.IMAGENET1K_V2)
    assert target.parent.parent.parent == offline
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(standin_resnet50_file)
    return target
