"""Build a classifier from (name, weights) and cut off its final layer.

`build_backbone` returns the network without its classification layer (that layer
becomes `nn.Identity`, so the network outputs features) and the number of
features, read from the model. `name` is a torchvision classification model, or
`timm/NAME[.TAG]` for any timm model (`timm_backbones.py`). `weights` is one of:

- a weights name of that model: torchvision's (`IMAGENET1K_V2`, `DEFAULT`, ...), loaded
  through torchvision's own cache (`$TORCH_HOME/hub/checkpoints/`), or for timm `DEFAULT`
  or a pretrained tag, through timm's;
- a path to a state_dict of that model (`.pth`/`.pt`/`.bin`, or `.safetensors`), whatever its head;
- a path to a tl_project `.ckpt`: its backbone is reused, its head dropped;
- `None` for random initialisation.

Every file is read with `weights_only=True` (or as safetensors). Nothing falls back: weights
that cannot be had raise `UserError` with the file that is missing and the alternatives.
An unknown name gets the closest known ones.

`weights_preprocessing` gives the input preprocessing that goes with the weights:
the torchvision preset of a weights name, timm's pretrained config of a timm model, the
saved one of a tl_project checkpoint, ImageNet's classic preset otherwise.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torchvision
from torch import nn

from tl_project.checkpoints import load_trusted
from tl_project.errors import UserError
from tl_project.runtime import say
from tl_project.timm_backbones import (
    INSTALL,
    PREFIX,
    architectures,
    classifier_prefixes,
    is_timm,
    pretrained_tag,
    split_name,
    timm_available,
)
from tl_project.timm_backbones import build as build_timm
from tl_project.timm_backbones import fixed_input_size as timm_fixed_input_size
from tl_project.timm_backbones import preprocessing as timm_preprocessing
from tl_project.transforms import IMAGENET, Preprocessing

WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".safetensors")
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
            "efficientnet_b0, convnext_tiny), or a timm model (timm/NAME)."
        )
    return linears[-1]


def _replace(model: nn.Module, name: str, module: nn.Module | None) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def check_name(name: str) -> None:
    """A torchvision classification model or `timm/NAME[.TAG]`; otherwise the closest names."""
    if is_timm(name):
        split_name(name)
        return
    if name in classification_models():
        return
    known = classification_models() + [PREFIX + n for n in architectures()]
    # A timm name without its prefix is matched as written too.
    by_bare = {k.removeprefix(PREFIX): k for k in reversed(known)}
    close = [by_bare[c] for c in difflib.get_close_matches(name, list(by_bare), n=5, cutoff=0.6)]
    hint = f"Did you mean {', '.join(close)}?" if close else "No known model has a close name."
    timm_note = "" if timm_available() else f" (timm's models need the timm extra: {INSTALL})"
    raise UserError(
        f"Unknown backbone {name!r}. {hint} Pass a torchvision classification model (resnet50, "
        f"efficientnet_b0, convnext_tiny, ...) or timm/NAME for a timm model{timm_note}."
    )


def build_backbone(name: str, weights: str | None) -> tuple[nn.Module, int]:
    """Model `name` with `weights`, without its final layer (`nn.Identity` in its place).

    Returns the model and the width of its features (`in_features` of the new head).
    """
    check_name(name)
    if is_timm(name):
        file = weights if weights is not None and is_weights_path(weights) else None
        model, in_features = build_timm(name, None if file else weights)
        if file:  # its classifier, whatever its number of classes, is dropped
            _load_backbone_state(model, read_weights_file(file, name), classifier_prefixes(model), file)
        return model, in_features
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
        # A torchvision-format file still carries its old head (and aux heads): dropped, whatever
        # their number of classes.
        skip = (f"{head_name}.", *(f"{aux}." for aux in AUX_HEADS))
        _load_backbone_state(model, state_dict, skip, weights or "")
    return model, head.in_features


def _drop_aux_heads(model: nn.Module) -> None:
    """Remove Inception/GoogLeNet auxiliary classifiers so `forward` returns one tensor."""
    if hasattr(model, "aux_logits"):
        model.aux_logits = False  # type: ignore[assignment]
        for aux in AUX_HEADS:
            if hasattr(model, aux):
                setattr(model, aux, None)


def weights_preprocessing(name: str, weights: str | None) -> Preprocessing:
    """The preprocessing the network was trained with, as far as `weights` tells it; for a timm
    model, its pretrained config's."""
    if weights is not None and Path(weights).suffix == ".ckpt" and Path(weights).is_file():
        content = load_trusted(Path(weights).expanduser(), what="weights file")
        saved = content.get("hyper_parameters", {}).get("preprocessing") if isinstance(content, Mapping) else None
        if saved:
            return Preprocessing.from_dict(saved)
    if is_timm(name):
        tag = pretrained_tag(name, weights) if weights and not is_weights_path(weights) else None
        return timm_preprocessing(name, tag)
    if weights is None or is_weights_path(weights):
        return IMAGENET
    return Preprocessing.of_weights(_weights_enum(name, weights))


def fixed_input_size(model: nn.Module) -> int | None:
    """The one image size `model` takes, if it takes only one (ViTs' position embeddings)."""
    if isinstance(model, torchvision.models.VisionTransformer):
        return int(model.image_size)
    return timm_fixed_input_size(model)


def check_input_size(model: nn.Module, backbone: str, image_size: int) -> None:
    """Refuse an image size that the backbone cannot take, before anything runs."""
    size = fixed_input_size(model)
    if size is not None and size != image_size:
        raise UserError(
            f"Backbone {backbone} takes {size} px images only, and --data.image_size is {image_size}. "
            f"Pass --data.image_size {size}, or choose a backbone that takes any size (resnet50, "
            "efficientnet_b0, convnext_tiny, ...)."
        )


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
    """The state_dict in `path`: a state_dict file of the model (`.safetensors` too), or the
    backbone of a tl_project checkpoint."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(
            f"Weights file {path} does not exist. Pass an existing .pth/.pt/.safetensors/.ckpt file, "
            "a weights name, or null."
        )
    if file.suffix == ".safetensors":
        return read_safetensors(file)
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


def _load_backbone_state(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], skip: tuple[str, ...], source: str
) -> None:
    """`state_dict` less the keys under the `skip` prefixes (the old head) into `model`: all of it must fit."""
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


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of a `.safetensors` file (safetensors holds tensors only: nothing to run)."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise UserError(
            f"{file} is a safetensors file, and the safetensors package is not installed. Fix: {INSTALL}"
        ) from None
    try:
        return load_file(str(file))
    except Exception as error:
        raise UserError(f"{file} is not a readable safetensors file ({error}).") from None
