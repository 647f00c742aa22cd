"""ImageDataModule: classes, splits, image modes, named datasets, bad input."""

from __future__ import annotations

import gzip
import shutil
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision.transforms.functional import pil_to_tensor

from tests.conftest import COLORS, make_image_folder
from tests.helpers import exit_code
from tl_project.data import ImageDataModule
from tl_project.data.images import load_image, to_rgb
from tl_project.data.splits import stratified_split
from tl_project.errors import UserError

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def _folder_module(root: Path, **kwargs: object) -> ImageDataModule:
    kwargs = {"dataset": None, "root": str(root), "image_size": 32, "batch_size": 4, "num_workers": 0, **kwargs}
    return ImageDataModule(**kwargs)  # type: ignore[arg-type]


def _labels(dataset: object) -> list[int]:
    return [label for _, label in dataset.samples]  # type: ignore[attr-defined]


# --- splits ---


def test_stratified_split_is_deterministic_disjoint_and_stratified() -> None:
    labels = [0] * 50 + [1] * 30 + [2] * 20
    rest, val, test = stratified_split(labels, [0.1, 0.2], seed=1)
    assert stratified_split(labels, [0.1, 0.2], seed=1) == [rest, val, test]
    assert stratified_split(labels, [0.1, 0.2], seed=2) != [rest, val, test]
    assert sorted(rest + val + test) == list(range(100))
    assert Counter(labels[i] for i in val) == {0: 5, 1: 3, 2: 2}
    assert Counter(labels[i] for i in test) == {0: 10, 1: 6, 2: 4}


def test_stratified_split_keeps_one_training_image_per_class() -> None:
    rest, val = stratified_split([0, 1, 1], [0.9], seed=0)
    assert sorted(rest + val) == [0, 1, 2]
    assert {0, 1} <= {[0, 1, 1][i] for i in rest}


# --- image folders ---


def test_classes_known_right_after_the_constructor(image_folder: Path) -> None:
    data = _folder_module(image_folder)
    assert data.class_names == ["cat", "dog", "fish"] and data.num_classes == 3


def test_flat_folder_split_into_train_val_test(image_folder: Path) -> None:
    data = _folder_module(image_folder, val_split=0.2, test_split=0.2)
    data.setup("fit")
    data.setup("test")
    sizes = {split: len(data.datasets[split]) for split in ("train", "val", "test")}
    assert sizes == {"train": 18, "val": 6, "test": 6}
    assert Counter(_labels(data.datasets["test"])) == {0: 2, 1: 2, 2: 2}
    # A later run with the same seed holds out exactly the same test images.
    again = _folder_module(image_folder, val_split=0.2, test_split=0.2)
    again.setup("test")
    assert again.datasets["test"].samples == data.datasets["test"].samples  # type: ignore[attr-defined]


def test_split_folders_are_used_and_missing_ones_carved_from_train(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "train", COLORS, per_class=10)
    make_image_folder(tmp_path / "test", COLORS, per_class=3)
    data = _folder_module(tmp_path, val_split=0.2)
    data.setup("fit")
    data.setup("test")
    assert len(data.datasets["test"]) == 9
    assert all("/test/" in str(p) for p, _ in data.datasets["test"].samples)  # type: ignore[attr-defined]
    assert len(data.datasets["val"]) == 6 and len(data.datasets["train"]) == 24


def test_batches_are_normalised_rgb_at_image_size(image_folder: Path) -> None:
    data = _folder_module(image_folder)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch[0].dtype == torch.uint8  # workers send bytes; floats are made on the device
    images, labels, indices = data.on_after_batch_transfer(batch)
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
    assert labels.dtype == torch.int64
    assert sorted(indices.tolist()) == sorted(set(indices.tolist()))  # each item knows its dataset index
    assert -3 < images.mean() < 3


def test_non_image_files_are_ignored(image_folder: Path) -> None:
    for junk in ("notes.txt", ".DS_Store", "Thumbs.db", "._000.png"):
        (image_folder / "cat" / junk).write_bytes(b"not an image")
    (image_folder / "cat" / ".ipynb_checkpoints").mkdir()
    shutil.copy(image_folder / "cat" / "000.png", image_folder / "cat" / ".ipynb_checkpoints" / "000.png")
    data = _folder_module(image_folder)
    data.setup("fit")
    data.setup("test")
    assert sum(len(data.datasets[split]) for split in ("train", "val", "test")) == 30


def _pil_rgb(path: Path) -> torch.Tensor:
    """The reference decode: PIL, EXIF applied, `to_rgb`."""
    with Image.open(path) as opened:
        return pil_to_tensor(to_rgb(ImageOps.exif_transpose(opened)))


MODES_BY_FORMAT = {
    ".png": ["RGB", "L", "P", "PA", "RGBA", "LA", "I;16", "1"],
    ".jpg": ["RGB", "L", "CMYK"],
    ".webp": ["RGB", "RGBA"],
    ".bmp": ["RGB", "L", "P", "1"],
}


@pytest.mark.parametrize(("suffix", "mode"), [(s, m) for s, modes in MODES_BY_FORMAT.items() for m in modes])
def test_every_image_mode_becomes_the_same_rgb_as_pil(tmp_path: Path, mode: str, suffix: str) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (6, 8, 4), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGBA")
    if mode == "I;16":
        image = Image.fromarray(np.random.default_rng(1).integers(0, 65536, (6, 8)).astype(np.uint16))
    elif mode == "PA":
        image = image.convert("P")
    elif mode != "RGBA":
        image = image.convert(mode)
    path = tmp_path / f"x{suffix}"
    image.save(path, **({"transparency": 3} if mode == "PA" else {}))
    rgb = load_image(path)
    assert rgb.dtype == torch.uint8 and rgb.shape == (3, 6, 8)
    # JPEG/PNG go through torchvision.io, the rest through PIL: the same pixels either way.
    assert (rgb.int() - _pil_rgb(path).int()).abs().max() <= 1


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path: Path) -> None:
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((4, 4), 32896, dtype=np.uint16)).save(path)  # mid-grey in 16 bits
    assert load_image(path)[:, 0, 0].tolist() == [128, 128, 128]


def test_transparent_pixels_become_white(tmp_path: Path) -> None:
    path = tmp_path / "clear.png"
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(path)
    assert load_image(path)[:, 0, 0].tolist() == [255, 255, 255]


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    Image.new("RGB", (40, 20), (10, 20, 30)).save(path, exif=exif)
    assert load_image(path).shape == (3, 40, 20)


def test_predict_dir_is_searched_recursively(image_folder: Path) -> None:
    data = _folder_module(image_folder, predict_dir=str(image_folder))
    data.setup("predict")
    assert len(data.predict_paths) == 30
    single = _folder_module(image_folder, predict_dir=str(image_folder / "dog" / "003.png"))
    single.setup("predict")
    assert single.predict_paths == [str(image_folder / "dog" / "003.png")]


# --- bad input ---


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"does not exist.*--data.root"):
        _folder_module(tmp_path / "nowhere")


def test_no_class_folders(tmp_path: Path) -> None:
    (tmp_path / "loose.jpg").write_bytes(b"")
    with pytest.raises(UserError, match="No class folders"):
        _folder_module(tmp_path)


def test_class_folder_without_images(image_folder: Path) -> None:
    (image_folder / "empty").mkdir()
    (image_folder / "empty" / "readme.txt").write_text("no images here")
    data = _folder_module(image_folder)
    with pytest.raises(UserError, match=r"empty has no images"):
        data.setup("fit")


def test_undecodable_image_is_named(image_folder: Path) -> None:
    broken = image_folder / "dog" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with pytest.raises(UserError, match=r"Cannot decode image .*broken.jpg"):
        load_image(broken)


def test_predict_dir_without_images(image_folder: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    data = _folder_module(image_folder, predict_dir=str(tmp_path / "empty"))
    with pytest.raises(UserError, match="No images in"):
        data.setup("predict")
    with pytest.raises(UserError, match=r"--data\.predict_dir"):
        _folder_module(image_folder).setup("predict")


def test_expected_classes_that_differ_name_both_lists(image_folder: Path) -> None:
    with pytest.raises(UserError, match=r"(?s)\['ant', 'bee'\].*\['cat', 'dog', 'fish'\]"):
        _folder_module(image_folder, classes=["ant", "bee"])


def test_expected_classes_allow_predicting_without_the_training_folder(image_folder: Path, tmp_path: Path) -> None:
    data = _folder_module(tmp_path / "gone", classes=["a", "b"], predict_dir=str(image_folder))
    assert data.class_names == ["a", "b"]
    data.setup("predict")
    with pytest.raises(UserError, match="does not exist"):
        data.setup("fit")


def test_bad_fractions() -> None:
    with pytest.raises(UserError, match="below 1"):
        ImageDataModule(val_split=0.5, test_split=0.5)
    with pytest.raises(UserError, match="Unknown dataset 'ImageNet22k'"):
        ImageDataModule(dataset="ImageNet22k")


# --- named datasets ---


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _fake_fashion_mnist(folder: Path, train: int = 100, test: int = 20) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", train), ("t10k", test)):
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return folder


@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_fashion_mnist_from_raw_idx_files(tmp_path: Path, layout: str) -> None:
    folder = tmp_path if layout == "flat" else tmp_path / "FashionMNIST" / "raw"
    _fake_fashion_mnist(folder)
    data = ImageDataModule(
        dataset="FashionMNIST", root=str(tmp_path), download=False, image_size=32, batch_size=8, num_workers=0
    )
    assert data.num_classes == 10 and data.class_names[0] == "T-shirt/top"
    data.prepare_data()
    data.setup("fit")
    assert len(data.datasets["train"]) == 90 and len(data.datasets["val"]) == 10
    assert Counter(int(data.datasets["val"].labels[i]) for i in range(10)) == dict.fromkeys(range(10), 1)  # type: ignore[attr-defined]
    images, _, _ = data.on_after_batch_transfer(next(iter(data.val_dataloader())))
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32
    data.setup("test")
    assert len(data.datasets["test"]) == 20


def test_cifar_classes_known_before_the_download(tmp_path: Path) -> None:
    assert ImageDataModule(dataset="CIFAR10", root=str(tmp_path)).class_names[:2] == ["airplane", "automobile"]
    cifar100 = ImageDataModule(dataset="CIFAR100", root=str(tmp_path), download=False)
    assert cifar100.num_classes == 100 and cifar100.class_names[-1] == "worm"
    with pytest.raises(UserError, match=r"CIFAR100 is not in .*--data.download true"):
        cifar100.setup("fit")


def test_named_dataset_missing_offline_says_how_to_get_it(tmp_path: Path) -> None:
    data = ImageDataModule(dataset="FashionMNIST", root=str(tmp_path), download=False)
    with pytest.raises(UserError, match=r"FashionMNIST is not in .*apt-get install dataset-fashion-mnist"):
        data.setup("fit")


def test_failed_download_says_how_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("torchvision.datasets.utils.download_url", _no_download)
    monkeypatch.setattr("torchvision.datasets.mnist.download_and_extract_archive", _no_download)
    with pytest.raises(UserError, match=r"download failed.*/usr/share/datasets/fashion-mnist") as error:
        ImageDataModule(dataset="FashionMNIST", root=str(tmp_path)).prepare_data()
    assert "--data.download true" not in str(error.value)  # it was true: the fix is elsewhere


def test_a_folder_given_as_root_is_a_folder_and_never_a_download_target(
    image_folder: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    assert ImageDataModule(root=str(image_folder)).class_names == ["cat", "dog", "fish"]  # no dataset named
    before = sorted(p.relative_to(image_folder) for p in image_folder.rglob("*"))
    with pytest.raises(
        UserError, match=r"holds your images .* would download FashionMNIST into it.*--data.dataset null"
    ):
        ImageDataModule(dataset="FashionMNIST", root=str(image_folder)).prepare_data()
    runs = str(tmp_path / "runs")
    args = ["fit", "--config", "base", "--data.root", str(image_folder), "--trainer.default_root_dir", runs]
    args += ["--model.backbone", "resnet18", "--model.weights", "null"]  # the data's problem, not the weights'
    assert exit_code(args) == 2 and "Nothing was written." in capfd.readouterr().err
    assert sorted(p.relative_to(image_folder) for p in image_folder.rglob("*")) == before


def _no_download(*args: object, **kwargs: object) -> None:
    raise OSError("offline test: no network")


@pytest.mark.skipif(
    not DEBIAN_FASHION_MNIST.is_dir(), reason="needs Debian's dataset-fashion-mnist (.ci/run installs it)"
)
def test_real_fashion_mnist_from_debian_package() -> None:
    data = ImageDataModule(
        dataset="FashionMNIST", root=str(DEBIAN_FASHION_MNIST), download=False, image_size=32, num_workers=0
    )
    data.setup("fit")
    data.setup("test")
    sizes = {split: len(data.datasets[split]) for split in ("train", "val", "test")}
    assert sizes == {"train": 54000, "val": 6000, "test": 10000}
    images, labels, _ = data.on_after_batch_transfer(next(iter(data.test_dataloader())))
    assert images.shape == (32, 3, 32, 32) and labels.max() < 10
    # The module reads the system folder in place: nothing is written there.
    assert sorted(p.name for p in DEBIAN_FASHION_MNIST.iterdir()) == sorted(
        f"{p}-{k}-idx{d}-ubyte.gz" for p in ("train", "t10k") for k, d in (("images", 3), ("labels", 1))
    )
