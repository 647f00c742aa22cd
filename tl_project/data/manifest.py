"""The data check's memory: per image file its size, modification time and what the check
found, so that a second command on an unchanged folder decodes nothing.

One SQLite file per image folder, in the cache folder (`data.cache_dir`, by default
`$XDG_CACHE_HOME/tl_project` or `~/.cache/tl_project`; the image folder itself may be
read-only): `checks/<hash of the folder's absolute path>.sqlite`, a row per file keyed
by its path relative to the folder. A row is reused while the file keeps its size and
modification time (to the nanosecond) and was checked at least as thoroughly as now
asked; a changed or added file is checked again, and rows of removed files are dropped
when the manifest is saved. Saving writes only the rows that changed, in one transaction.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections.abc import Iterable, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

from tl_project.runtime import warn

VERSION = 3  # rows: name, size, mtime, level, then `checks.Inspection`'s fields
# How thoroughly a file was checked: a full decode also answers what the header answers.
LEVELS = {"header": 1, "full": 2}
# `checks.Inspection`'s fields, in order.
RESULT_COLUMNS = ("problem", "detail", "width", "height", "format", "digest", "wrong_extension")
COLUMNS = ("name", "size", "mtime", "level", *RESULT_COLUMNS)


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/tl_project`, or `~/.cache/tl_project`."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "tl_project"


def file_key(path: str | Path) -> tuple[int, int]:
    """What says a file is unchanged: (size, modification time in ns)."""
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns


class Manifest:
    """Check results of the files under `base`, read from and saved to `file`."""

    def __init__(self, base: Path, cache_dir: Path | None = None) -> None:
        self.base = base.resolve()
        # Paths listed under `base` start with it as given: their relative name is a slice.
        self.prefix = os.path.join(str(base), "")
        name = hashlib.sha256(str(self.base).encode()).hexdigest()[:16]
        self.file = (cache_dir or default_cache_dir()) / "checks" / f"{name}.sqlite"
        self.rows: dict[str, tuple[Any, ...]] = self._read()  # name -> (size, mtime, level, *result)
        self.recorded: dict[str, tuple[Any, ...]] = {}
        self.listed: set[str] = set(self.rows)  # the folder's files now, by name (see `known`)

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.file, timeout=60)
        connection.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        connection.execute(f"CREATE TABLE IF NOT EXISTS files ({', '.join(COLUMNS)}, PRIMARY KEY (name)) WITHOUT ROWID")
        return connection

    def _read(self) -> dict[str, tuple[Any, ...]]:
        if not self.file.is_file():
            return {}
        try:
            with closing(sqlite3.connect(f"file:{self.file}?mode=ro", uri=True, timeout=60)) as connection:
                meta = dict(connection.execute("SELECT key, value FROM meta"))
                stale = meta != {"version": str(VERSION), "base": str(self.base)}
                if not stale:
                    return {row[0]: row[1:] for row in connection.execute(f"SELECT {', '.join(COLUMNS)} FROM files")}
        except sqlite3.Error as error:
            warn(f"The data check's manifest {self.file} is unreadable ({error}); every image is checked again.")
        self.file.unlink(missing_ok=True)  # another version's or unreadable: start again
        return {}

    def relative(self, path: str | Path) -> str:
        """The name of `path` in the manifest: relative to `base`."""
        name = os.fspath(path)
        return name[len(self.prefix) :] if name.startswith(self.prefix) else os.path.relpath(name, self.base)

    def known(self, paths: Iterable[str], level: str) -> tuple[dict[str, Sequence[Any]], dict[str, tuple[int, int]]]:
        """The saved results of the unchanged files among `paths` that were checked at `level` or
        better, and the key (`file_key`) of every path. `paths` are the folder's images now: `save`
        keeps their rows only. One loop: it runs once per file."""
        rows, prefix, start, least = self.rows, self.prefix, len(self.prefix), LEVELS[level]
        saved: dict[str, Sequence[Any]] = {}
        keys: dict[str, tuple[int, int]] = {}
        listed = self.listed = set()
        for path in paths:
            stat = os.stat(path)
            key = keys[path] = (stat.st_size, stat.st_mtime_ns)
            name = path[start:] if path.startswith(prefix) else self.relative(path)
            listed.add(name)
            row = rows.get(name)
            if row is not None and row[0] == key[0] and row[1] == key[1] and LEVELS[row[2]] >= least:
                saved[path] = row[3:]
        return saved, keys

    def record(self, path: str, key: tuple[int, int], level: str, result: Iterable[Any]) -> None:
        """What the check found in the file at `path` (with its `file_key`), at `level`."""
        name = self.relative(path)
        self.rows[name] = self.recorded[name] = (*key, level, *result)

    def save(self) -> None:
        """Write the recorded rows and delete those of files no longer listed (see `known`), in one
        transaction; warn if it cannot."""
        removed = self.rows.keys() - self.listed
        if not self.recorded and not removed and self.file.is_file():
            return  # nothing new, nothing removed
        self.file.with_suffix(".json").unlink(missing_ok=True)  # an earlier version's manifest
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            with closing(self._connect()) as connection, connection:  # one transaction: all or nothing
                connection.execute("DELETE FROM meta")
                connection.executemany(
                    "INSERT INTO meta VALUES (?, ?)", [("version", str(VERSION)), ("base", str(self.base))]
                )
                connection.executemany("DELETE FROM files WHERE name = ?", ((name,) for name in removed))
                connection.executemany(
                    f"INSERT OR REPLACE INTO files VALUES ({', '.join('?' * len(COLUMNS))})",
                    ((name, *row) for name, row in self.recorded.items()),
                )
        except (OSError, sqlite3.Error) as error:
            warn(
                f"Cannot save the data check's manifest in {self.file.parent} ({error}); the next command checks "
                "every image again. Pass --data.cache_dir with a writable folder."
            )
            return
        for name in removed:
            del self.rows[name]
        self.recorded = {}
