"""`check`: decode every image of an image folder once and report; exit 1 on problems."""

from __future__ import annotations

from collections import Counter

from tl_project.errors import UserError
from tl_project.lightning_cli import data_module, launched
from tl_project.runtime import say


def run(command: str, args: list[str], description: str, from_sys_argv: bool) -> None:
    """`check`: decode every image of an image folder once and report; exit 1 on problems."""
    with launched(command, args, from_sys_argv) as args:
        data, _ = data_module(command, description, args)
        if data.check_level == "off":
            raise UserError("check with --data.check off would look at nothing: pass --data.check full (or header).")
        report = data.check(data.folder_splits(), data.class_names, data.root)
        say(report.format(data.class_names))
        if data.exclusion:
            counts = Counter(data.exclusion.labels)
            listed = ", ".join(f"{name} {counts.get(k, 0)}" for k, name in enumerate(data.class_names))
            say(f"Left out by --data.exclude (checked: the rest), per class: {listed}")
        raise SystemExit(1 if report.problems else 0)
