"""The data check's memory: per image file its size, modification time and what the check
found, so that a second command on an unchanged folder decodes nothing.

One JSON file per image folder, in the cache folder (`data.cache_dir`, by default
`$XDG_CACHE_HOME/tl_project` or `~/.cache/tl_project`; the image folder itself may be
read-only): `checks/<hash of the folder's absolute path>.json`. A row is reused while
the file keeps its size and modification time (to the nanosecond) and was checked at
least as thoroughly as now asked; a changed or added file is checked again, and rows
of removed files are dropped when the manifest is saved.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tl_project.runtime import warn

VERSION = 2  # rows: size, mtime, level, then `checks.Inspection`'s fields
# How thoroughly a file was checked: a full decode also answers what the header answers.
LEVELS = {"header": 1, "full": 2}


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/tl_project`, or `~/.cache/tl_project`."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "tl_project"


def file_key(path: Path) -> tuple[int, int]:
    """What says a file is unchanged: (size, modification time in ns)."""
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


class Manifest:
    """Check results of the files under `base`, read from and saved to `file`."""

    def __init__(self, base: Path, cache_dir: Path | None = None) -> None:
        self.base = base.resolve()
        # Paths listed under `base` start with it as given: their relative name is a slice.
        self.prefix = os.path.join(str(base), "")
        self.changed = False
        name = hashlib.sha256(str(self.base).encode()).hexdigest()[:16]
        self.file = (cache_dir or default_cache_dir()) / "checks" / f"{name}.json"
        self.rows: dict[str, list[Any]] = self._read()

    def _read(self) -> dict[str, list[Any]]:
        try:
            saved = json.loads(self.file.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as error:
            warn(f"The data check's manifest {self.file} is unreadable ({error}); every image is checked again.")
            return {}
        if not isinstance(saved, dict) or saved.get("version") != VERSION or saved.get("base") != str(self.base):
            return {}
        return dict(saved.get("files") or {})

    def _relative(self, path: Path) -> str:
        name = str(path)
        return name[len(self.prefix) :] if name.startswith(self.prefix) else os.path.relpath(path, self.base)

    def lookup(self, path: Path, key: tuple[int, int], level: str) -> list[Any] | None:
        """The saved result for `path` if the file is unchanged and was checked at `level` or better."""
        row = self.rows.get(self._relative(path))
        if row is None or tuple(row[:2]) != key or LEVELS[row[2]] < LEVELS[level]:
            return None
        return list(row[3:])

    def record(self, path: Path, key: tuple[int, int], level: str, result: Iterable[Any]) -> None:
        self.rows[self._relative(path)] = [*key, level, *result]
        self.changed = True

    def save(self, listed: Iterable[Path]) -> None:
        """Write the rows of the `listed` files (the folder's images now), atomically; warn if it cannot."""
        keep = {self._relative(path) for path in listed}
        rows = {name: row for name, row in self.rows.items() if name in keep}
        if not self.changed and len(rows) == len(self.rows) and self.file.is_file():
            return  # nothing new, nothing removed
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=self.file.parent, suffix=".tmp", delete=False) as out:
                json.dump({"version": VERSION, "base": str(self.base), "files": rows}, out, separators=(",", ":"))
            os.replace(out.name, self.file)
        except OSError as error:
            warn(
                f"Cannot save the data check's manifest in {self.file.parent} ({error}); the next command checks "
                "every image again. Pass --data.cache_dir with a writable folder."
            )
