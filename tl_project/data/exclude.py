"""`--data.exclude FILE`: images left out of training and validation (never out of test).

FILE is a CSV with a `path` column (a `label_issues.csv` or `out_of_fold.csv` that `cv`
wrote, or any other), or a text file with one image per line (`#` starts a comment).
An image is its file path (relative paths are taken from the current folder), or for a
named dataset its name `<Dataset>/train/<index in the official train split>`, as `cv`
writes it.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path

from tl_project.errors import UserError
from tl_project.runtime import say


def image_key(name: str | Path) -> str:
    """How an image is compared: a file's absolute path; a named dataset's image as written."""
    text = str(name)
    if "/train/" in text and text.split("/train/", 1)[1].isdigit() and not Path(text).exists():
        return text  # e.g. FashionMNIST/train/123
    return os.path.abspath(os.path.expanduser(text))


def read_exclude(file: str) -> frozenset[str]:
    """The images FILE lists, as `image_key`s."""
    path = Path(file).expanduser()
    if not path.is_file():
        raise UserError(f"--data.exclude {file}: no such file. Pass a label_issues.csv, a CSV with a path column, "
                        "or a text file with one image path per line.")  # fmt: skip
    lines = path.read_text().splitlines()
    header = next(csv.reader(lines[:1]), [])
    if "path" in header:
        column = header.index("path")
        names: Iterable[str] = (row[column] for row in csv.reader(lines[1:]) if len(row) > column and row[column])
    else:
        names = (line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))
    return frozenset(image_key(name) for name in names)


def without_excluded(names: list[str], excluded: frozenset[str]) -> tuple[list[int], list[int]]:
    """(kept, excluded) positions of `names`."""
    kept: list[int] = []
    dropped: list[int] = []
    for i, name in enumerate(names):
        (dropped if image_key(name) in excluded else kept).append(i)
    return kept, dropped


def exclusion_summary(file: str, listed: int, dropped: int, in_test: int) -> str:
    """What `--data.exclude` did, in one line."""
    elsewhere = listed - dropped - in_test
    return (
        f"--data.exclude {file}: {dropped} of its {listed} images left out of training and validation"
        + (f"; {in_test} are test images and stay in the test set" if in_test else "")
        + (f"; {elsewhere} are not in this data (paths are read from the current folder)" if elsewhere else "")
        + "."
    )


class Exclusion:
    """The images `--data.exclude FILE` names (`keys`), and those it left out (set by the source)."""

    def __init__(self, file: str | None) -> None:
        self.file = file
        self.names: list[str] = []  # the images left out, as the data names them
        self.labels: list[int] = []

    def __bool__(self) -> bool:
        return bool(self.file)

    @cached_property
    def keys(self) -> frozenset[str]:
        """Read when training or validation images are first chosen (test and predict from a
        checkpoint do not need the file)."""
        return read_exclude(self.file) if self.file else frozenset()

    def note(self, names: list[str], labels: list[int], in_test: int) -> None:
        """What the source left out (said once)."""
        if names != self.names and self.file:
            say(exclusion_summary(self.file, len(self.keys), len(names), in_test))
        self.names, self.labels = names, labels

    def record(self) -> dict[str, object]:
        """What checkpoints keep: the file and the images it left out."""
        return {"exclude": self.file, "excluded": self.names} if self.file else {}
