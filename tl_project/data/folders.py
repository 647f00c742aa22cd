"""Image folders: the split folders, the classes, the (path, label) samples of each split,
and the images to predict.

Layouts: `root/<class>/*` (val and test carved out of it by fraction, stratified and
seeded), or `root/{train,val,test}/<class>/*` (a split without a folder is carved
out of train).
"""

from __future__ import annotations

from pathlib import Path

from tl_project.data.images import IMAGE_EXTENSIONS, is_image_file, list_images
from tl_project.data.splits import SPLITS, stratified_split
from tl_project.errors import UserError

# (path, label) samples by split.
Splits = dict[str, list[tuple[str, int]]]


def split_dirs(root: Path | None) -> dict[str, Path]:
    """The folders of the splits that have one: `root/train` etc., or `root` alone as train."""
    if root is not None and root.is_file():
        raise UserError(
            f"--data.root {root} is a file, not a folder. For a CSV of labels pass --data.labels {root} "
            "(and --data.root the folder its paths start from); otherwise pass the image folder."
        )
    if root is None or not root.is_dir():
        raise UserError(
            f"Image folder {root} does not exist. Pass --data.root DIR with "
            "DIR/<class>/*.jpg or DIR/{train,val,test}/<class>/*.jpg, or a named --data.dataset."
        )
    if (root / "train").is_dir():
        return {s: root / s for s in SPLITS if (root / s).is_dir()}
    return {"train": root}


def folder_classes(root: Path | None) -> list[str]:
    """The class names: the sorted folder names under train."""
    train = split_dirs(root)["train"]
    names = sorted(p.name for p in train.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise UserError(
            f"No class folders in {train}. Put each class's images in its own folder: {train}/<class>/*.jpg."
        )
    return names


def folder_samples(folder: Path, class_names: list[str], is_train: bool) -> list[tuple[str, int]]:
    """(path, label) of every image under `folder/<class>/`; train must have images in every class."""
    known = set(class_names)
    extra = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name not in known and p.name[0] != ".")
    if extra:
        raise UserError(
            f"{folder} has class folders {extra} that are not among the classes {class_names}. "
            "Every split must use the class folders of train."
        )
    samples = []
    for label, name in enumerate(class_names):
        class_dir = folder / name
        images = list_images(class_dir) if class_dir.is_dir() else []
        if not images and is_train:
            raise UserError(
                f"Class folder {class_dir} has no images (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))}). "
                "Add images or remove the folder."
            )
        samples += [(path, label) for path in images]
    return samples


def folder_splits(root: Path | None, class_names: list[str], val_split: float, test_split: float, seed: int) -> Splits:
    """(path, label) samples of train, val and test from the image folder."""
    dirs = split_dirs(root)
    samples = {split: folder_samples(folder, class_names, split == "train") for split, folder in dirs.items()}
    return carve(samples, val_split, test_split, seed)


def carve(samples: Splits, val_split: float, test_split: float, seed: int) -> Splits:
    """`samples` with val and test, where they have no entry of their own, carved out of train by
    fraction (stratified by class, deterministic from `seed`)."""
    samples = dict(samples)
    carve = [s for s in ("val", "test") if s not in samples]
    fractions = [val_split if s == "val" else test_split for s in carve]
    train = samples["train"]
    parts = stratified_split([label for _, label in train], fractions, seed)
    samples["train"] = [train[i] for i in parts[0]]
    for split, indices in zip(carve, parts[1:], strict=True):
        samples[split] = [train[i] for i in indices]
    return samples


def predict_paths(predict_dir: str | None) -> list[str]:
    """The images to predict: `predict_dir` searched recursively, or one image file."""
    if predict_dir is None:
        raise UserError("predict needs images: pass --data.predict_dir DIR (or one image file).")
    target = Path(predict_dir).expanduser()
    if target.is_file():
        if not is_image_file(target):
            raise UserError(f"{target} is not an image file ({', '.join(sorted(IMAGE_EXTENSIONS))}).")
        return [str(target)]
    if not target.is_dir():
        raise UserError(f"predict_dir {target} does not exist. Pass an existing folder or image file.")
    paths = list_images(target)
    if not paths:
        raise UserError(f"No images in {target} (searched recursively for {', '.join(sorted(IMAGE_EXTENSIONS))}).")
    return paths
