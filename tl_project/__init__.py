"""tl_project: fine-tune a pretrained torchvision classifier on your own images.

python -m tl_project fit --config configs/base.yaml
python -m tl_project test --ckpt_path runs/version_0/checkpoints/best.ckpt

`main`, `ImageDataModule`, `TransferLearningModel` and `UserError` are importable from here;
the two Lightning classes are imported when first used, so that the command table
(`python -m tl_project --help`) prints without loading Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from tl_project.cli import main
from tl_project.errors import UserError

if TYPE_CHECKING:
    from tl_project.data import ImageDataModule
    from tl_project.model import TransferLearningModel

__version__ = "0.1.0"

__all__ = ["ImageDataModule", "TransferLearningModel", "UserError", "__version__", "main"]

_LAZY = {"ImageDataModule": "tl_project.data", "TransferLearningModel": "tl_project.model"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tl_project' has no attribute {name!r}")
