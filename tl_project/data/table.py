"""A CSV of labels (`--data.labels FILE`): one row per image, as Kaggle-style datasets and
labelling tools export them.

Columns, by header: `path` (or `file_name`, as Hugging Face's `imagefolder` writes it), the
image relative to `--data.root` (absolute paths allowed; a relative path that leaves the
root is refused), `label`, and optionally `split` (`train`/`val`/`test`), which then takes
the place of the random split (a split with no row is carved out of train, as for folders).
Every problem of the table is reported at once, with its row numbers (the header is row 1).

Multi-label (`--data.multi_label true`): the `label` cell holds several classes separated by
`--data.label_delimiter` (a space by default); the classes are all the names used.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from tl_project.data.splits import SPLITS
from tl_project.errors import UserError

PATH_COLUMNS = ("path", "file_name")
SHOWN = 10  # problems listed by name; the rest are counted


@dataclass(frozen=True)
class Row:
    """One image of the table: its file, its label (the cell as written), its split (None:
    carved at random), its row number."""

    path: str
    label: str
    split: str | None
    number: int

    def labels(self, delimiter: str | None) -> tuple[str, ...]:
        """The row's classes: the label itself, or with a `delimiter` (multi-label) the sorted,
        distinct names of its cell."""
        if delimiter is None:
            return (self.label,)
        return tuple(sorted({name.strip() for name in self.label.split(delimiter) if name.strip()}))


def read_table(file: Path, root: Path | None, delimiter: str | None = None) -> list[Row]:
    """The rows of the labels CSV `file`, every one checked; images resolved against `root`;
    with a `delimiter`, label cells hold several classes."""
    if not file.is_file():
        raise UserError(
            f"Labels file {file} does not exist. Pass --data.labels FILE: a CSV with the columns path (or "
            "file_name) and label, and optionally split."
        )
    if root is not None and not root.is_dir():
        raise UserError(
            f"--data.root {root} is not a folder: with --data.labels it is the folder the paths start from."
        )
    with open(file, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        path_column = next((c for c in PATH_COLUMNS if c in columns), None)
        if path_column is None or "label" not in columns:
            raise UserError(
                f"{file} has the columns {columns or 'none'}; it needs path (or file_name) and label, and may "
                "have split. The first line is the header."
            )
        has_split = "split" in columns
        raw = [({k.strip(): (v or "").strip() for k, v in row.items() if k}, n) for n, row in enumerate(reader, 2)]
    problems: list[str] = []
    rows: list[Row] = []
    seen: dict[str, Row] = {}
    base = (root or file.parent).resolve()
    for values, number in raw:
        name, label = values.get(path_column, ""), values.get("label", "")
        split = values.get("split") or None if has_split else None
        if not name or not label:
            problems.append(f"row {number}: empty {path_column if not name else 'label'}")
            continue
        if split is not None and split not in SPLITS:
            problems.append(f"row {number}: split {split!r} is none of {', '.join(SPLITS)}")
            continue
        path = Path(name).expanduser()
        resolved = path if path.is_absolute() else (base / path).resolve()
        if not path.is_absolute() and not resolved.is_relative_to(base):
            problems.append(f"row {number}: {name} leaves {base}")
            continue
        if not resolved.is_file():
            problems.append(f"row {number}: {resolved} does not exist")
            continue
        row = Row(str(resolved), label, split, number)
        if not row.labels(delimiter):
            problems.append(f"row {number}: no class in the label {label!r} (classes separated by {delimiter!r})")
            continue
        if (earlier := seen.get(row.path)) is not None:
            differ = earlier.labels(delimiter) != row.labels(delimiter)
            what = f"with the labels {earlier.label!r} and {label!r}" if differ else "twice"
            problems.append(f"rows {earlier.number} and {number}: {name} is listed {what}")
            continue
        seen[row.path] = row
        rows.append(row)
    if problems:
        listed = "\n  ".join(problems[:SHOWN])
        more = f"\n  ... and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
        raise UserError(f"{file}: {len(problems)} bad rows:\n  {listed}{more}\nFix the table and run again.")
    if not rows:
        raise UserError(f"{file} has no rows: add one line per image under the header.")
    return rows


def table_classes(rows: list[Row], delimiter: str | None = None) -> list[str]:
    """The class names: the sorted labels (every name used, for multi-label)."""
    return sorted({name for row in rows for name in row.labels(delimiter)})


def check_training_images(rows: list[Row], class_names: list[str], file: Path, delimiter: str | None = None) -> None:
    """Every class needs a training image (rows without a split may train)."""
    training = {name for row in rows if row.split in (None, "train") for name in row.labels(delimiter)}
    if missing := [name for name in class_names if name not in training]:
        raise UserError(
            f"{file}: the classes {missing} have no training image (every row of theirs has split val or test). "
            "Mark some of their rows train, or leave their split empty."
        )
