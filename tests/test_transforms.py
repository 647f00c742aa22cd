"""Batched on-device transforms of in-memory images against the per-image worker path, and the
preprocessing that comes with the weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from tests.conftest import make_image_folder
from tl_project.data import ImageDataModule
from tl_project.data.datasets import TensorImageDataset
from tl_project.transforms import CropSampler, eval_transform, normalize, resized_crops, train_transform

ONE_LEVEL = 1 / 255 / min((0.229, 0.224, 0.225))  # one uint8 step, normalised


def _images(n: int, height: int, width: int) -> torch.Tensor:
    """Smooth images with structure (gradients and a blob), not noise: resizing them means something."""
    y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    images = []
    for i in range(n):
        blob = torch.exp(-((x - 0.3 - 0.05 * i) ** 2 + (y - 0.6) ** 2) * 20)
        images.append(torch.stack([x, y, blob]) * (200 - 10 * i) + 20)
    return torch.stack(images).round().to(torch.uint8)


@pytest.mark.parametrize(("height", "width", "size"), [(28, 28, 224), (32, 32, 64), (30, 40, 48)])
def test_eval_view_on_the_device_matches_the_worker_path(height: int, width: int, size: int) -> None:
    images = _images(6, height, width)
    worker = torch.stack([normalize(eval_transform(size)(image)) for image in images])
    sampler = CropSampler(size, train=False)
    params = torch.stack([sampler(image)[1] for image in images])
    device = resized_crops(images, params, size)
    # The worker path rounds to uint8 after resizing; the device path keeps floats.
    assert device.shape == worker.shape and (device - worker).abs().max() <= ONE_LEVEL * 1.01


def test_training_crops_on_the_device_match_the_worker_path() -> None:
    size, images = 64, _images(8, 28, 28)
    sampler = CropSampler(size, min_crop_scale=0.25)
    torch.manual_seed(0)
    params = torch.stack([sampler(image)[1] for image in images])
    device = resized_crops(images, params, size)
    worker = []
    for image, (x1, y1, x2, y2, flip) in zip(images, params.tolist(), strict=True):
        crop = TF.resized_crop(image, int(y1), int(x1), int(y2 - y1), int(x2 - x1), [size, size], antialias=True)
        worker.append(normalize(crop.flip(-1) if flip else crop))
    difference = (device - torch.stack(worker)).abs()
    # Same box, same bilinear sampling: equal inside; at the crop's edge the device path
    # reads the real neighbouring pixels where the worker path repeats the edge.
    margin = size // 8
    assert difference[..., margin:-margin, margin:-margin].max() <= ONE_LEVEL * 1.01
    assert difference.mean() < 0.05


def test_training_crops_have_the_worker_paths_statistics() -> None:
    """Over many draws, boxes, flips and pixel statistics agree with `train_transform`'s."""
    size, images = 48, _images(4, 28, 28).repeat(500, 1, 1, 1)
    sampler = CropSampler(size, min_crop_scale=0.2)
    torch.manual_seed(0)
    params = torch.stack([sampler(image)[1] for image in images])
    areas = (params[:, 2] - params[:, 0]) * (params[:, 3] - params[:, 1]) / (28 * 28)
    aspect = (params[:, 2] - params[:, 0]) / (params[:, 3] - params[:, 1])
    assert areas.min() >= 0.2 - 0.01 and areas.max() <= 1.0
    assert aspect.min() >= (3 / 4) * 0.8 and aspect.max() <= (4 / 3) * 1.25  # integer boxes round the ratio
    assert 0.4 < params[:, 4].mean() < 0.6
    device = resized_crops(images, params, size)
    torch.manual_seed(1)
    worker = torch.stack([normalize(train_transform(size, 0.2)(image)) for image in images])
    # Per channel, and per channel on the left half (a left-lying blob: flips move it).
    for view in (device, worker):
        assert view.shape == (2000, 3, size, size)
    dims = (0, 2, 3)
    assert torch.allclose(device.mean(dims), worker.mean(dims), atol=0.03)
    assert torch.allclose(device.std(dims), worker.std(dims), rtol=0.03)
    left = (device[..., : size // 2].mean(dims), worker[..., : size // 2].mean(dims))
    assert torch.allclose(*left, atol=0.03)


def test_in_memory_items_are_seeded_by_epoch_and_index() -> None:
    """(seed, epoch, index) alone decides an item's crop: resume and worker count change nothing."""
    dataset = TensorImageDataset(_images(4, 28, 28)[:, 0], torch.arange(4), CropSampler(32, 0.3), seed=7)
    image, target, index, params = dataset[(3, 2)]
    assert image.dtype == torch.uint8 and image.shape == (3, 28, 28) and (target, index) == (2, 2)
    torch.manual_seed(123)  # the global RNG state plays no part
    assert torch.equal(dataset[(3, 2)][3], params)
    assert not torch.equal(dataset[(4, 2)][3], params)


def test_data_module_crops_named_datasets_after_the_transfer() -> None:
    data = ImageDataModule(dataset="FashionMNIST", root=None, image_size=40, batch_size=4, num_workers=0)
    data.datasets["train"] = TensorImageDataset(_images(4, 28, 28)[:, 0], torch.arange(4), CropSampler(40, 0.5))
    batch = next(iter(data.train_dataloader()))
    assert batch[0].dtype == torch.uint8 and batch[0].shape == (4, 3, 28, 28) and batch[3].shape == (4, 5)
    images, targets, indices = data.on_after_batch_transfer(batch)
    assert images.shape == (4, 3, 40, 40) and images.dtype == torch.float32
    assert torch.equal(targets, batch[1]) and torch.equal(indices, batch[2])


# --- preprocessing from the weights ---


def test_default_weights_preprocess_as_torchvision_says(standin_cache: Path) -> None:
    """The seed recipe (resnet50, IMAGENET1K_V2, 224 px) evaluates exactly as the weights' own preset."""
    from types import SimpleNamespace

    import torchvision

    from tl_project.model import TransferLearningModel

    # standin_cache: random values under the official file name; only the preset matters here.
    model = TransferLearningModel(num_classes=3, backbone="resnet50", weights="IMAGENET1K_V2")
    preset = torchvision.models.ResNet50_Weights.IMAGENET1K_V2.transforms()
    assert model.preprocessing.resize_size(224) == preset.resize_size[0] == 232
    assert model.hparams["preprocessing"]["mean"] == list(preset.mean)

    folder = make_image_folder(standin_cache.parents[3] / "images", {"a": (200, 30, 90)}, per_class=2, size=300)
    data = ImageDataModule(dataset=None, root=str(folder), image_size=224, num_workers=0, val_split=0.5, test_split=0)
    data.trainer = SimpleNamespace(lightning_module=model, is_global_zero=True, num_devices=1)  # type: ignore[assignment]
    data.setup("validate")
    dataset = data.datasets["val"]  # the evaluation view
    image, _ = dataset.load(0)
    ours = data.on_after_batch_transfer((dataset.item(0)[0][None], torch.zeros(1), torch.zeros(1)))[0][0]
    theirs = preset(image)  # resize 232 (bilinear, antialiased), crop 224, scale, normalise
    assert ours.shape == theirs.shape == (3, 224, 224)
    # transforms.v2 resizes uint8 with its own kernel, which rounds some pixels the other way
    # than the preset's float path: at most one uint8 level apart. A wrong resize (256 instead
    # of 232) or crop moves whole edges, far more.
    assert torch.allclose(ours, theirs, atol=ONE_LEVEL + 1e-5)
    assert (ours - theirs).abs().mean() < 0.25 * ONE_LEVEL
    wrong_size = normalize(eval_transform(224)(image))  # ImageNet's classic 256 -> 224
    assert (wrong_size - theirs).abs().max() > 5 * ONE_LEVEL


def test_bicubic_weights_resize_bicubic(offline: Path) -> None:
    from tl_project.backbones import weights_preprocessing
    from tl_project.transforms import IMAGENET

    steps = weights_preprocessing("efficientnet_b0", "IMAGENET1K_V1")
    assert steps.interpolation == "bicubic" and steps.resize_size(224) == 256
    assert weights_preprocessing("resnet50", None) == IMAGENET
