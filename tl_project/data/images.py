"""Image files: which files are images (the one extension table), and decoding any of
them to a uint8 RGB tensor, EXIF orientation applied.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image, ImageOps
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.functional import pil_to_tensor

from tl_project.errors import UserError

# The image files tl_project reads, by extension, with the format PIL reports for the
# content each extension promises (the data check compares them).
EXTENSION_FORMATS = {
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".png": "PNG",
    ".bmp": "BMP",
    ".gif": "GIF",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".webp": "WEBP",
    ".ppm": "PPM",
    ".pgm": "PPM",
    ".pbm": "PPM",
}
IMAGE_EXTENSIONS = frozenset(EXTENSION_FORMATS)
EXTENSION_TUPLE = tuple(EXTENSION_FORMATS)


def is_image_file(path: Path) -> bool:
    """An image by extension, and not a hidden file (`.DS_Store`, macOS `._x.jpg`)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_images(folder: Path) -> list[str]:
    """Paths of the image files under `folder`, recursively, in sorted order (as `sorted` orders
    Paths): one walk with `os.scandir`, whose entries know their type without a `stat` per
    file; hidden files and folders are skipped. Strings, not Paths: a million Path objects
    cost seconds."""
    found: list[str] = []

    def walk(directory: str) -> None:
        names: list[str] = []
        folders: set[str] = set()
        with os.scandir(directory) as scan:
            for entry in scan:
                name = entry.name
                if name[0] == ".":
                    continue
                if entry.is_dir():
                    folders.add(name)
                    names.append(name)
                elif name.lower().endswith(EXTENSION_TUPLE) and entry.is_file():
                    names.append(name)
        prefix = os.path.join(directory, "")
        for name in sorted(names):  # strings sort fastest
            if name in folders:
                walk(prefix + name)
            else:
                found.append(prefix + name)

    walk(str(folder))
    return found


def load_image(path: str | Path) -> torch.Tensor:
    """Decode the image file `path` as a uint8 RGB tensor (3 x H x W): see `decode_image_bytes`."""
    try:
        data = torchvision.io.read_file(str(path))
    except Exception as error:
        raise UserError(f"Cannot read image {path}: {error}. Remove or replace that file.") from None
    return decode_image_bytes(data, str(path))


def decode_image_bytes(data: torch.Tensor, source: str) -> torch.Tensor:
    """Decode an image file's bytes (a uint8 tensor) as a uint8 RGB tensor (3 x H x W): EXIF
    orientation applied, any mode converted; `source` names it in errors.

    JPEGs and 8/16-bit PNGs without a palette go through torchvision.io's decoders
    (libjpeg-turbo, libpng; no PIL round trip); other formats and PNG variants, and
    the rare files those decoders refuse, through PIL, to the same pixels.
    """
    try:
        mode = _torchvision_mode(data)
        if mode is not None:
            try:
                return _rgb_tensor(decode_image(data, mode=mode, apply_exif_orientation=True))
            except RuntimeError:
                pass  # e.g. a JPEG variant libjpeg-turbo does not read: PIL below
        with Image.open(io.BytesIO(data.numpy().tobytes())) as opened:
            image = ImageOps.exif_transpose(opened)
            image.load()
            return pil_to_tensor(to_rgb(image))
    except Exception as error:
        raise UserError(f"Cannot decode image {source}: {error}. Remove or replace that file.") from None


def _torchvision_mode(data: torch.Tensor) -> ImageReadMode | None:
    """How torchvision.io decodes these file bytes to match PIL's pixels, or None to use PIL."""
    head = bytes(data[:26].tolist())
    if head.startswith(b"\xff\xd8\xff"):
        return ImageReadMode.RGB  # JPEG: gray and CMYK converted by libjpeg-turbo
    if head.startswith(b"\x89PNG\r\n\x1a\n") and len(head) == 26:
        bit_depth, color_type = head[24], head[25]
        # Palette and 1/2/4-bit PNGs come back as indices or unscaled values: PIL reads them.
        if bit_depth in (8, 16) and color_type in (0, 2):
            return ImageReadMode.RGB
        if bit_depth in (8, 16) and color_type in (4, 6):
            return ImageReadMode.RGB_ALPHA
    return None


def _rgb_tensor(image: torch.Tensor) -> torch.Tensor:
    """uint8 RGB from torchvision's RGB or RGBA output: 16 bits scaled, transparency on white."""
    if image.dtype != torch.uint8:
        image = (image.to(torch.float32) / 257).round().to(torch.uint8)
    if image.shape[0] == 4:
        alpha = image[3:].to(torch.float32) / 255
        image = (image[:3] * alpha + 255 * (1 - alpha)).round().to(torch.uint8)
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB from any PIL mode: 16/32-bit scaled to 8 bits, transparency composited on white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit grayscale (PIL opens 16-bit PNGs as I;16 or I): scale 0..65535 to 0..255.
        scale = 1.0 if image.mode == "F" else 257.0
        pixels = np.asarray(image, dtype=np.float64) / scale
        image = Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")
