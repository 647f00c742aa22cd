"""Fine-tuning policies end to end: gradual unfreezing (phases, learning rates, resume) and the
feature cache of a frozen backbone."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from torch.utils.data import DataLoader

from tests.helpers import fit_args, run_dirs
from tl_project import main

# --- gradual unfreezing ---


@pytest.fixture
def initial_weights(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "init.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)  # fit_args' backbone
    return path


def gradual(root: Path, runs: Path, weights: Path, *extra: str) -> list[str]:
    args = fit_args(root, runs, "--model.finetune", "gradual", "--model.unfreeze_at_epoch", "1", *extra)
    args[args.index("--model.weights") + 1] = str(weights)
    return args


def test_gradual_unfreezing_phases_and_learning_rates(
    image_folder: Path, tmp_path: Path, initial_weights: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    runs = tmp_path / "runs"
    main(gradual(image_folder, runs, initial_weights, "--trainer.max_epochs", "1"))
    after_head_phase = torch.load(run_dirs(runs)[0] / "checkpoints" / "last.ckpt", weights_only=True)
    start = torch.load(initial_weights, weights_only=True)
    for key, value in after_head_phase["state_dict"].items():
        if key.startswith("backbone."):  # weights and BatchNorm statistics untouched
            assert torch.equal(value, start[key.removeprefix("backbone.")]), key
    groups = after_head_phase["optimizer_states"][0]["param_groups"]
    assert groups[0]["lr"] == pytest.approx(0.001) and groups[1]["lr"] == pytest.approx(0.0001)

    main(gradual(image_folder, runs, initial_weights, "--trainer.max_epochs", "2", "--ckpt_path", "last"))
    after_unfreeze = torch.load(run_dirs(runs)[1] / "checkpoints" / "last.ckpt", weights_only=True)
    changed = [
        key
        for key, value in after_unfreeze["state_dict"].items()
        if key.startswith("backbone.") and not torch.equal(value, start[key.removeprefix("backbone.")])
    ]
    assert "backbone.conv1.weight" in changed and "backbone.bn1.running_mean" in changed
    out = capfd.readouterr().out
    assert re.search(
        r"Epoch 0: backbone frozen; 1,539 trainable parameters; learning rates head 0.001, backbone 0.0001", out
    )
    assert re.search(r"Epoch 1: backbone training; 11,178,051 trainable parameters", out)


def test_gradual_unfreezing_resumes_to_the_same_result(
    image_folder: Path, tmp_path: Path, initial_weights: Path
) -> None:
    # Resuming after the unfreeze epoch keeps the backbone training (unlike a re-applied freeze).
    main(gradual(image_folder, tmp_path / "straight", initial_weights, "--trainer.max_epochs", "3"))
    main(gradual(image_folder, tmp_path / "split", initial_weights, "--trainer.max_epochs", "2"))
    main(gradual(image_folder, tmp_path / "split", initial_weights, "--trainer.max_epochs", "3", "--ckpt_path", "last"))
    straight = torch.load(run_dirs(tmp_path / "straight")[0] / "checkpoints" / "last.ckpt", weights_only=True)
    resumed = torch.load(run_dirs(tmp_path / "split")[1] / "checkpoints" / "last.ckpt", weights_only=True)
    assert straight["epoch"] == resumed["epoch"] == 2
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key


def test_gradual_under_ddp_needs_ddp_told_of_unused_parameters(tmp_path: Path) -> None:
    """The rule reads the wrapped model's public `find_unused_parameters` (a one-process group)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from tl_project.errors import UserError
    from tl_project.finetune import FinetunePolicy

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        told = DistributedDataParallel(torch.nn.Linear(2, 2), find_unused_parameters=True)
        untold = DistributedDataParallel(torch.nn.Linear(2, 2))
        FinetunePolicy(mode="gradual").check_strategy(told)
        FinetunePolicy(mode="full").check_strategy(untold)
        FinetunePolicy(mode="gradual").check_strategy(torch.nn.Linear(2, 2))  # no DDP
        with pytest.raises(UserError, match=r"pass --trainer\.strategy ddp_find_unused_parameters_true"):
            FinetunePolicy(mode="gradual").check_strategy(untold)
    finally:
        dist.destroy_process_group()


# --- feature cache ---


def _fit_frozen(model: Any, image_folder: Path, tmp_path: Path, epochs: int, image_size: int = 32) -> Any:
    """Fit without validation, logs or checkpoints on the folder's eval view; returns the data module."""
    import lightning as L

    from tl_project import ImageDataModule

    data = ImageDataModule(
        dataset=None, root=str(image_folder), image_size=image_size, batch_size=4, num_workers=0, augment=False
    )
    quiet = {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    L.Trainer(max_epochs=epochs, limit_val_batches=0, default_root_dir=tmp_path, **quiet).fit(model, datamodule=data)
    return data


def test_feature_cache_computes_once_then_hits_and_trains_the_same(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tl_project import TransferLearningModel
    from tl_project.data.datasets import FolderDataset

    loads: list[int] = []
    load = FolderDataset.load
    monkeypatch.setattr(FolderDataset, "load", lambda self, index: (loads.append(index), load(self, index))[1])

    def fit(cache: bool) -> tuple[TransferLearningModel, list[int], list[int]]:
        torch.manual_seed(0)
        model = TransferLearningModel(3, backbone="resnet18", weights=None, finetune="head", cache_features=cache)
        calls: list[int] = []
        model.backbone.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
        loads.clear()
        _fit_frozen(model, image_folder, tmp_path, epochs=3)
        return model, calls, sorted(loads)

    cached, cached_calls, cached_loads = fit(cache=True)
    plain, plain_calls, plain_loads = fit(cache=False)
    assert cached_calls == [4] * 6  # one pass over the 24 training images, before the first epoch
    assert cached_loads == list(range(24))  # ... which reads each image once; the epochs read none
    assert plain_calls == [4] * 18  # 6 batches in each of 3 epochs
    assert plain_loads == sorted(list(range(24)) * 3)
    # Same shuffling, batches and order: the same head, to the bit.
    assert torch.equal(cached.head.weight, plain.head.weight)


def test_feature_cache_covers_validation_and_is_shared_by_later_fits(image_folder: Path, tmp_path: Path) -> None:
    """Training and validation images go through the backbone once per fit; a later fit with the
    same backbone weights and images (cv's next fold) computes nothing again."""
    import lightning as L

    from tl_project import ImageDataModule, TransferLearningModel

    def fit(model: TransferLearningModel) -> int:
        calls: list[int] = []
        model.backbone.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
        data = ImageDataModule(dataset=None, root=str(image_folder), image_size=32, batch_size=4, num_workers=0,
                               augment=False)  # fmt: skip
        quiet = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False}
        L.Trainer(max_epochs=3, num_sanity_val_steps=0, default_root_dir=tmp_path, **quiet).fit(model, datamodule=data)
        return sum(calls)

    first = TransferLearningModel(3, backbone="resnet18", weights=None, finetune="head", cache_features=True)
    assert fit(first) == 24 + 3  # 24 training and 3 validation images, once each, for 3 epochs
    second = TransferLearningModel(3, backbone="resnet18", weights=None, finetune="head", cache_features=True)
    second.backbone.load_state_dict(first.backbone.state_dict())
    assert fit(second) == 0


def test_feature_cache_is_rebuilt_for_each_fit(image_folder: Path, tmp_path: Path) -> None:
    """Nothing outlives a fit: other data or transforms (here the image size) get their own features."""
    from tl_project import TransferLearningModel

    model = TransferLearningModel(3, backbone="resnet18", weights=None, finetune="head", cache_features=True)
    for image_size in (32, 48):
        before = model.backbone.conv1.weight.clone()
        data = _fit_frozen(model, image_folder, tmp_path, epochs=1, image_size=image_size)
        assert torch.equal(model.backbone.conv1.weight, before)  # frozen: the cache stays valid during the fit
        train = data.datasets["train"]
        batch = data.on_after_batch_transfer(next(iter(DataLoader(train, batch_size=len(train)))))
        with torch.no_grad():
            expected = model.backbone.eval()(batch[0].contiguous(memory_format=torch.channels_last))
        features = model.features.get("train")
        assert features is not None and torch.allclose(features, expected, atol=1e-5)


def test_feature_cache_refuses_changing_features(
    image_folder: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from tests.helpers import exit_code

    args = fit_args(image_folder, tmp_path / "runs", "--model.cache_features", "true", "--model.finetune", "head")
    assert exit_code(args) == 2  # augmentation on: the features would differ every epoch
    assert "--data.augment false" in capfd.readouterr().err
