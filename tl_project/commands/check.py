"""`check`: decode every image of an image folder (or of a labels CSV) once and report; exit 1
on problems. With `--data.labels`, images under `--data.root` that the CSV does not name are
reported too: they are never trained on."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from tl_project.data.images import list_images
from tl_project.data.sources import TableSource
from tl_project.errors import UserError
from tl_project.launch import launched
from tl_project.lightning_cli import data_module
from tl_project.runtime import say


def run(command: str, args: list[str], description: str, from_sys_argv: bool) -> None:
    """`check`: decode every image of an image folder once and report; exit 1 on problems."""
    with launched(command, args, from_sys_argv) as args:
        data, _ = data_module(command, description, args)
        if data.verify == "off":
            raise UserError("check with --data.verify off would look at nothing: pass --data.verify full (or header).")
        splits = data.folder_splits()
        report = data.check(splits, data.class_names, data.root)
        say(report.format(data.class_names))
        if isinstance(data.source, TableSource) and data.root is not None:
            say(unnamed_images(data.root, {path for samples in splits.values() for path, _ in samples}))
        if data.exclusion:
            counts = Counter(data.exclusion.labels)
            listed = ", ".join(f"{name} {counts.get(k, 0)}" for k, name in enumerate(data.class_names))
            say(f"Left out by --data.exclude (checked: the rest), per class: {listed}")
        raise SystemExit(1 if report.problems else 0)


def unnamed_images(root: Path, named: set[str]) -> str:
    """What `check` says of the images under `root` that the labels CSV does not name."""
    unnamed = [path for path in list_images(root) if str(Path(path).resolve()) not in named]
    if not unnamed:
        return f"Every image under {root} is named in the labels CSV."
    shown = ", ".join(unnamed[:5]) + (f", ... ({len(unnamed) - 5} more)" if len(unnamed) > 5 else "")
    return (
        f"{len(unnamed)} images under {root} are not in the labels CSV and are not used: {shown}. "
        "Add rows for them, or ignore this."
    )
