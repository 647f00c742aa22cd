"""Backbones: head found and replaced, weights from names, files and checkpoints, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from tl_project.backbones import build_backbone, find_head
from tl_project.errors import UserError


@pytest.mark.parametrize(
    ("name", "in_features", "size"),
    [
        ("resnet18", 512, 32),
        ("resnet50", 2048, 32),
        ("mobilenet_v3_small", 1024, 32),
        ("efficientnet_b0", 1280, 32),
        ("convnext_tiny", 768, 32),
        ("densenet121", 1024, 32),
        ("googlenet", 1024, 32),
        ("inception_v3", 2048, 75),
        ("vit_b_16", 768, 224),
    ],
)
def test_head_replaced_by_identity_and_features_read_from_model(name: str, in_features: int, size: int) -> None:
    model, found = build_backbone(name, weights=None)
    assert found == in_features
    assert not [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == 1000]
    if name != "vit_b_16":  # a 224 px forward pass of ViT-B is slow on 2 cores; its head is checked above
        model.train()  # Inception/GoogLeNet return auxiliary outputs in training unless they are removed
        features = model(torch.randn(2, 3, size, size))
        assert features.shape == (2, in_features)


def test_find_head_names_the_final_layer() -> None:
    assert find_head(torchvision.models.resnet18())[0] == "fc"
    assert find_head(torchvision.models.efficientnet_b0())[0] == "classifier.1"
    assert find_head(torchvision.models.vit_b_16())[0] == "heads.head"


def test_model_without_linear_head_is_refused() -> None:
    with pytest.raises(UserError, match=r"no final nn\.Linear"):
        build_backbone("squeezenet1_0", weights=None)


def test_unknown_backbone_lists_the_valid_names() -> None:
    with pytest.raises(UserError, match=r"Unknown backbone 'resnet5000'.*resnet50"):
        build_backbone("resnet5000", weights=None)


def test_unknown_weights_name_lists_the_valid_names() -> None:
    with pytest.raises(UserError) as error:
        build_backbone("resnet50", weights="IMAGENET_V9")
    message = str(error.value)
    assert "IMAGENET1K_V1" in message and "IMAGENET1K_V2" in message and "DEFAULT" in message


def test_missing_pretrained_file_says_where_it_goes_and_never_falls_back(offline: Path) -> None:
    with pytest.raises(UserError) as error:
        build_backbone("resnet50", weights="IMAGENET1K_V2")
    message = str(error.value)
    assert str(offline / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth") in message
    assert "--model.weights PATH" in message and "--model.weights null" in message


def test_pretrained_weights_load_from_the_torch_cache(standin_cache: Path, standin_resnet50_file: Path) -> None:
    # The cached file is a stand-in with random values (see conftest), loaded like the real one.
    model, _ = build_backbone("resnet50", weights="IMAGENET1K_V2")
    expected = torch.load(standin_resnet50_file, weights_only=True)
    assert torch.equal(model.conv1.weight, expected["conv1.weight"])
    assert torch.equal(model.layer4[2].bn3.running_var, expected["layer4.2.bn3.running_var"])
    # DEFAULT is an alias of IMAGENET1K_V2 for resnet50: the same file.
    default, _ = build_backbone("resnet50", weights="DEFAULT")
    assert torch.equal(default.conv1.weight, expected["conv1.weight"])


def test_state_dict_file_with_another_head_loads_its_backbone(tmp_path: Path) -> None:
    source = torchvision.models.resnet18(num_classes=7)
    path = tmp_path / "mine.pth"
    torch.save(source.state_dict(), path)
    model, _ = build_backbone("resnet18", weights=str(path))
    assert torch.equal(model.layer1[0].conv1.weight, source.layer1[0].conv1.weight)


def test_state_dict_of_another_architecture_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(UserError, match="do not fit"):
        build_backbone("resnet50", weights=str(path))


def test_missing_weights_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        build_backbone("resnet18", weights=str(tmp_path / "nope.pth"))


class _Payload:
    """Unpickling this object would write a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.write_text, (self.marker, "payload ran"))


def test_pickle_payload_in_weights_file_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": _Payload(marker)}, path)
    with pytest.raises(UserError, match="weights_only=True"):
        build_backbone("resnet18", weights=str(path))
    assert not marker.exists()


def test_offline_fit_names_the_weights_and_the_dataset_at_once(
    offline: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A first run offline: both things to fix in one message, with the true fix for each."""
    from tests.helpers import exit_code

    args = ["fit", "--config", "configs/base.yaml", "--data.root", str(tmp_path / "data")]
    assert exit_code([*args, "--trainer.default_root_dir", str(tmp_path / "runs")]) == 2
    err = capfd.readouterr().err
    assert "Pretrained weights resnet50 IMAGENET1K_V2 are not available" in err
    assert "The data has a problem too: FashionMNIST is not in" in err and "Check the network" in err
    assert "apt-get install dataset-fashion-mnist" in err and not (tmp_path / "runs").exists()
