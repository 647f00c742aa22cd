"""timm backbones: `--model.backbone timm/NAME[.TAG]`, any model `timm.list_models()` knows.

timm is an optional extra (`pip install 'tl_project[timm]'`). A timm model is built with
`num_classes=0`, timm's own way of removing the classifier (its forward then returns the
pooled features), so no layer needs finding; `in_features` is the width of those features.

Weights, as for torchvision backbones:

- `DEFAULT` (the name's tag, else timm's default pretrained tag) or a tag such as `fb_in22k`:
  timm's pretrained weights through timm's own cache (Hugging Face's hub cache for most);
- a state dict of that timm model (`.pth`/`.pt`/`.bin` read with `weights_only=True`, or
  `.safetensors`), as `timm.create_model(NAME, pretrained=True).state_dict()` saves it;
  its classifier is dropped, whatever its number of classes;
- `None`: random initialisation.

The preprocessing is the model's own pretrained config (`timm.data.resolve_data_config`:
crop fraction, interpolation, mean and std), for the tag in use or timm's default one.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tl_project.errors import UserError
from tl_project.transforms import Preprocessing

timm: Any
try:  # the optional extra
    import timm
    import timm.data
except ImportError:  # pragma: no cover - exercised by simulating the missing extra
    timm = None

PREFIX = "timm/"
DEFAULT = "DEFAULT"
INSTALL = "pip install 'tl_project[timm]'"


def is_timm(name: str) -> bool:
    """Whether backbone `name` is a timm one (`timm/NAME[.TAG]`)."""
    return name.startswith(PREFIX)


def timm_available() -> bool:
    """Whether the timm extra is installed."""
    return timm is not None


def require_timm() -> Any:
    """The timm module, or a clear error naming the extra."""
    if timm is None:
        raise UserError(f"timm backbones need the timm package, which is not installed. Fix: {INSTALL}")
    return timm


def architectures() -> list[str]:
    """The names timm can build (empty without timm)."""
    return timm.list_models() if timm is not None else []


def split_name(name: str) -> tuple[str, str | None]:
    """`timm/convnext_tiny.fb_in22k` -> (`convnext_tiny`, `fb_in22k`); the tag may be absent."""
    architecture, _, tag = name.removeprefix(PREFIX).partition(".")
    require_timm()
    if not timm.is_model(architecture):
        close = difflib.get_close_matches(architecture, architectures(), n=5, cutoff=0.6)
        hint = f"Did you mean {', '.join(PREFIX + c for c in close)}?" if close else "No timm model has a close name."
        raise UserError(
            f"Unknown timm backbone {name!r}. {hint} timm.list_models() lists every name "
            "(with wildcards: timm.list_models('convnext*'))."
        )
    return architecture, tag or None


def pretrained_tag(name: str, weights: str) -> str:
    """The pretrained tag that `weights` (DEFAULT or a tag) asks for, checked against timm's list."""
    architecture, tag = split_name(name)
    if weights != DEFAULT:
        if tag and weights != tag:
            raise UserError(
                f"--model.backbone {name} names the tag {tag!r} and --model.weights names {weights!r}. "
                f"Pass one: --model.weights DEFAULT takes the backbone's tag."
            )
        tag = weights
    tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{architecture}.*")]
    if not tags:
        raise UserError(
            f"timm has no pretrained weights for {architecture}. Pass --model.weights FILE (a state dict of "
            "that model) or --model.weights null for random initialisation."
        )
    if tag is None:
        default = timm.models.get_pretrained_cfg(architecture)
        return str(default.tag if default and default.tag else tags[0])
    if tag not in tags:
        raise UserError(
            f"timm has no weights {tag!r} for {architecture}. Its pretrained tags: {', '.join(tags)}; "
            "or pass --model.weights FILE, or null for random initialisation."
        )
    return tag


def build(name: str, weights: str | None) -> tuple[nn.Module, int]:
    """timm model `name` without its classifier, and the width of its features. `weights`:
    DEFAULT or a tag (timm's pretrained weights), or None (random values, or a file's to come)."""
    architecture, _ = split_name(name)
    if weights is None:
        model = timm.create_model(architecture, pretrained=False, num_classes=0)
    else:
        model = _pretrained(architecture, pretrained_tag(name, weights))
    width: Any = getattr(model, "head_hidden_size", None) or model.num_features
    return model, int(width)


def _pretrained(architecture: str, tag: str) -> nn.Module:
    try:
        return timm.create_model(f"{architecture}.{tag}", pretrained=True, num_classes=0)
    except Exception as error:  # offline: a hub or URL error of some kind
        raise UserError(
            f"Pretrained weights timm/{architecture}.{tag} are not available: timm could not load them "
            f"({type(error).__name__}: {str(error)[:300]}).\n"
            f"Fix: run once where the internet is reachable (timm keeps them in {cache_folder()}), "
            f"or pass --model.weights PATH to a state dict of {architecture} (.pth/.pt/.safetensors), "
            "or --model.weights null to train from random initialisation."
        ) from None


def cache_folder() -> str:
    """Where timm keeps downloaded weights: Hugging Face's hub cache."""
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - timm requires huggingface_hub
        return str(Path(torch.hub.get_dir()) / "checkpoints")
    return str(constants.HF_HUB_CACHE)


def classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    """The state-dict prefixes of the classifier timm removed (`classifier`, `head.fc`, ...)."""
    config: Any = getattr(model, "pretrained_cfg", None) or {}
    names = config.get("classifier") or ()
    return tuple(f"{n}." for n in ([names] if isinstance(names, str) else names))


def preprocessing(name: str, tag: str | None) -> Preprocessing:
    """The preprocessing in timm's pretrained config of `tag` (the name's, else timm's default)."""
    architecture, name_tag = split_name(name)
    tag = tag or name_tag
    config = timm.models.get_pretrained_cfg(f"{architecture}.{tag}" if tag else architecture)
    resolved = timm.data.resolve_data_config(pretrained_cfg=config.to_dict() if config else {})
    return Preprocessing(
        crop_pct=float(resolved["crop_pct"]),
        interpolation=str(resolved["interpolation"]),
        mean=tuple(float(m) for m in resolved["mean"]),
        std=tuple(float(s) for s in resolved["std"]),
    )


def fixed_input_size(model: nn.Module) -> int | None:
    """The one input size a timm model takes (ViTs and others with fixed position embeddings)."""
    config: Any = getattr(model, "pretrained_cfg", None) or {}
    return int(config["input_size"][-1]) if config.get("fixed_input_size") else None
