"""tl_project: fine-tune a pretrained torchvision classifier on your own images.

python -m tl_project fit --config configs/base.yaml
python -m tl_project test --ckpt_path runs/version_0/checkpoints/best.ckpt
"""

from tl_project.cli import main
from tl_project.data import ImageDataModule
from tl_project.errors import UserError
from tl_project.model import TransferLearningModel

__version__ = "0.1.0"

__all__ = ["ImageDataModule", "TransferLearningModel", "UserError", "__version__", "main"]
