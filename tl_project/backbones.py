"""Build a torchvision classifier from (name, weights) and cut off its final layer.

`build_backbone` returns the network without its classification layer (that layer
becomes `nn.Identity`, so the network outputs features) and the number of
features, read from the layer it removed. `weights` is one of:

- a torchvision weights name of that model (`IMAGENET1K_V2`, `DEFAULT`, ...),
  loaded through torchvision's own cache (`$TORCH_HOME/hub/checkpoints/`);
- a path to a torchvision-format state_dict (`.pth`/`.pt`), whatever its head;
- a path to a tl_project `.ckpt`: its backbone is reused, its head dropped;
- `None` for random initialisation.

Every file is read with `weights_only=True`. Nothing falls back: weights that
cannot be had raise `UserError` with the file that is missing and the alternatives.

`weights_preprocessing` gives the input preprocessing that goes with the weights:
the torchvision preset of a weights name, the saved one of a tl_project checkpoint,
ImageNet's classic preset otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torchvision
from torch import nn

from tl_project.checkpoints import load_trusted
from tl_project.errors import UserError
from tl_project.runtime import say
from tl_project.transforms import IMAGENET, Preprocessing

WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
# Auxiliary classifiers that only exist to add training losses; we train one head.
AUX_HEADS = ("AuxLogits", "aux1", "aux2")


def classification_models() -> list[str]:
    """Names of the torchvision classification models."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def weights_names(backbone: str) -> list[str]:
    """The torchvision weights names of `backbone`, `DEFAULT` included."""
    enum = torchvision.models.get_model_weights(backbone)
    return [*(w.name for w in enum), "DEFAULT"]


def is_weights_path(weights: str) -> bool:
    """Whether `weights` names a file rather than a torchvision weights name."""
    return weights.endswith(WEIGHT_FILE_SUFFIXES) or os.sep in weights or Path(weights).is_file()


def find_head(model: nn.Module) -> tuple[str, nn.Linear]:
    """The final classification layer: the last `nn.Linear` in the model's definition order."""
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    linears = [(n, m) for n, m in linears if not n.startswith(AUX_HEADS)]
    if not linears:
        raise UserError(
            f"{type(model).__name__} has no final nn.Linear layer to replace. "
            "Choose a backbone whose classifier ends in a Linear layer (e.g. resnet50, "
            "efficientnet_b0, convnext_tiny, vit_b_16)."
        )
    return linears[-1]


def _replace(model: nn.Module, name: str, module: nn.Module | None) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def build_backbone(name: str, weights: str | None) -> tuple[nn.Module, int]:
    """Torchvision model `name` with `weights`, final layer replaced by `nn.Identity`.

    Returns the model and `in_features` of the layer it replaced.
    """
    if name not in classification_models():
        raise UserError(
            f"Unknown backbone {name!r}. Choose a torchvision classification model: "
            + ", ".join(classification_models())
        )
    state_dict = None
    if weights is None:
        model = torchvision.models.get_model(name, weights=None)
    elif is_weights_path(weights):
        model = torchvision.models.get_model(name, weights=None)
        state_dict = read_weights_file(weights, name)
    else:
        model = _pretrained(name, weights)

    head_name, head = find_head(model)
    _replace(model, head_name, nn.Identity())
    _drop_aux_heads(model)
    if state_dict is not None:
        _load_backbone_state(model, state_dict, head_name, weights or "")
    return model, head.in_features


def _drop_aux_heads(model: nn.Module) -> None:
    """Remove Inception/GoogLeNet auxiliary classifiers so `forward` returns one tensor."""
    if hasattr(model, "aux_logits"):
        model.aux_logits = False  # type: ignore[assignment]
        for aux in AUX_HEADS:
            if hasattr(model, aux):
                setattr(model, aux, None)


def weights_preprocessing(name: str, weights: str | None) -> Preprocessing:
    """The preprocessing the network was trained with, as far as `weights` tells it."""
    if weights is None:
        return IMAGENET
    if is_weights_path(weights):
        content = load_trusted(Path(weights).expanduser(), what="weights file") if Path(weights).is_file() else None
        saved = content.get("hyper_parameters", {}).get("preprocessing") if isinstance(content, Mapping) else None
        return Preprocessing.from_dict(saved) if saved else IMAGENET
    return Preprocessing.of_weights(_weights_enum(name, weights))


def _weights_enum(name: str, weights_name: str) -> torchvision.models.WeightsEnum:
    enum = torchvision.models.get_model_weights(name)
    try:
        return enum[weights_name]
    except KeyError:
        raise UserError(
            f"Unknown weights {weights_name!r} for backbone {name!r}. Valid names: "
            + ", ".join(weights_names(name))
            + "; or a path to a .pth/.pt/.ckpt file; or null for random initialisation."
        ) from None


def hub_file(weights: torchvision.models.WeightsEnum) -> Path:
    """Where torchvision caches `weights`: `$TORCH_HOME/hub/checkpoints/<file>`."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def _pretrained(name: str, weights_name: str) -> nn.Module:
    weights = _weights_enum(name, weights_name)
    cached = hub_file(weights)
    if not cached.is_file():
        say(f"Downloading {weights.url} to {cached}")
        # The file name carries the start of its SHA-256, as torchvision checks it.
        match = torch.hub.HASH_REGEX.search(cached.name)
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(weights.url, str(cached), match.group(1) if match else None)
        except Exception as error:  # offline: URLError; others: HTTPError, OSError, ...
            raise UserError(
                f"Pretrained weights {name} {weights.name} are not available: the file {cached} "
                f"is missing and downloading it from {weights.url} failed ({error}).\n"
                f"Fix: put that file at {cached} (set $TORCH_HOME to choose another cache), "
                "or pass --model.weights PATH to a .pth/.pt/.ckpt file, "
                "or --model.weights null to train from random initialisation."
            ) from None
    # torchvision reads its cache with weights_only=False: vet the file first.
    load_trusted(cached, what="cached weights file")
    try:
        return torchvision.models.get_model(name, weights=weights)
    except Exception as error:
        raise UserError(f"Could not load the cached weights file {cached}: {error}") from error


def read_weights_file(path: str, backbone: str) -> dict[str, torch.Tensor]:
    """The state_dict in `path`: a torchvision-format file, or the backbone of a tl_project checkpoint."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(
            f"Weights file {path} does not exist. Pass an existing .pth/.pt/.ckpt file, "
            "a torchvision weights name, or null."
        )
    content = load_trusted(file, what="weights file")
    if isinstance(content, Mapping) and "state_dict" in content and "hyper_parameters" in content:
        saved = content["hyper_parameters"].get("backbone")
        if saved != backbone:
            raise UserError(
                f"Checkpoint {path} holds a {saved!r} backbone, not {backbone!r}. "
                f"Pass --model.backbone {saved} or another weights file."
            )
        prefix = "backbone."
        return {k[len(prefix) :]: v for k, v in content["state_dict"].items() if k.startswith(prefix)}
    if isinstance(content, Mapping) and all(isinstance(v, torch.Tensor) for v in content.values()):
        return dict(content)
    raise UserError(
        f"{path} is neither a state_dict (a dict of tensors) nor a tl_project checkpoint. "
        "Save weights with torch.save(model.state_dict(), path)."
    )


def _load_backbone_state(model: nn.Module, state_dict: Mapping[str, torch.Tensor], head_name: str, source: str) -> None:
    # A torchvision-format file still carries its old head (and aux heads): drop them,
    # whatever their number of classes.
    skip = (f"{head_name}.", *(f"{aux}." for aux in AUX_HEADS))
    state = {k: v for k, v in state_dict.items() if not k.startswith(skip)}
    fix = "Pass weights saved from the same architecture, or the matching --model.backbone."
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches raise even with strict=False
        raise UserError(f"Weights in {source} do not fit {type(model).__name__}: {error}\n{fix}") from None
    if missing or unexpected:
        raise UserError(
            f"Weights in {source} do not fit {type(model).__name__}: {len(missing)} missing keys "
            f"{missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}. {fix}"
        )
