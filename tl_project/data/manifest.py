"""The data check's memory: per image file its size, modification time and what the check
found, so that a second command on an unchanged folder decodes nothing.

One SQLite file per image folder, in the cache folder (`data.cache_dir`, by default
`$XDG_CACHE_HOME/tl_project` or `~/.cache/tl_project`; the image folder itself may be
read-only): `checks/<hash of the folder's absolute path>.sqlite`, a row per file keyed
by its path relative to the folder. A row is reused while the file keeps its size and
modification time (to the nanosecond) and was checked at least as thoroughly as now
asked; a changed or added file is checked again, and rows of removed files are dropped
when the manifest is saved. Saving writes only the rows that changed, in one transaction.
A command on an unchanged folder finds its whole report saved and reads no row.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from collections.abc import Iterable, Sequence
from contextlib import closing
from functools import cached_property
from pathlib import Path
from typing import Any

from tl_project.runtime import warn

VERSION = 3  # files: name, size, mtime, level, then `checks.Inspection`'s fields; reports
# How thoroughly a file was checked: a full decode also answers what the header answers.
LEVELS = {"header": 1, "full": 2}
# `checks.Inspection`'s fields, in order.
RESULT_COLUMNS = ("problem", "detail", "width", "height", "format", "digest", "wrong_extension")
COLUMNS = ("name", "size", "mtime", "level", *RESULT_COLUMNS)


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/tl_project`, or `~/.cache/tl_project`."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "tl_project"


def file_keys(paths: Iterable[str]) -> dict[str, tuple[int, int]]:
    """What says each file is unchanged: path -> (size, modification time in ns). One `stat` per
    file, in one comprehension: this runs over every file of a folder."""
    stat = os.stat
    return {path: ((st := stat(path)).st_size, st.st_mtime_ns) for path in paths}


class Manifest:
    """Check results of the files under `base`, read from and saved to `file`.

    Besides a row per file it keeps the last few reports, each under the fingerprint of
    what it was made from (every listed file's name, split, label, size and modification
    time, and the check's settings): a command that finds its fingerprint there reads
    nothing else. Any change to the rows drops the reports."""

    REPORTS_KEPT = 8

    def __init__(self, base: Path, cache_dir: Path | None = None) -> None:
        self.base = base.resolve()
        # Paths listed under `base` start with it as given: their relative name is a slice.
        self.prefix = os.path.join(str(base), "")
        name = hashlib.sha256(str(self.base).encode()).hexdigest()[:16]
        self.file = (cache_dir or default_cache_dir()) / "checks" / f"{name}.sqlite"
        self.valid = self._valid()
        self.recorded: dict[str, tuple[Any, ...]] = {}
        self.listed: set[str] | None = None  # the folder's files now, by name (see `known`)

    def _open(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.file}?mode=ro", uri=True, timeout=60)

    def _valid(self) -> bool:
        """Whether `file` is a manifest of this version for `base`; one that is not is removed."""
        if not self.file.is_file():
            return False
        try:
            with closing(self._open()) as connection:
                meta = dict(connection.execute("SELECT key, value FROM meta"))
                if meta == {"version": str(VERSION), "base": str(self.base)}:
                    return True
        except sqlite3.Error as error:
            warn(f"The data check's manifest {self.file} is unreadable ({error}); every image is checked again.")
        self.file.unlink(missing_ok=True)  # another version's or unreadable: start again
        return False

    @cached_property
    def rows(self) -> dict[str, tuple[Any, ...]]:
        """name -> (size, mtime, level, *result), read when first needed."""
        if not self.valid:
            return {}
        with closing(self._open()) as connection:
            return {row[0]: row[1:] for row in connection.execute(f"SELECT {', '.join(COLUMNS)} FROM files")}

    def report(self, fingerprint: str) -> str | None:
        """The report saved under `fingerprint`, if any (as saved: a string)."""
        if not self.valid:
            return None
        try:
            with closing(self._open()) as connection:
                found = connection.execute(
                    "SELECT report FROM reports WHERE fingerprint = ?", (fingerprint,)
                ).fetchone()
        except sqlite3.Error:
            return None
        return found[0] if found else None

    def relative(self, path: str | Path) -> str:
        """The name of `path` in the manifest: relative to `base`."""
        name = os.fspath(path)
        return name[len(self.prefix) :] if name.startswith(self.prefix) else os.path.relpath(name, self.base)

    def known(self, keys: dict[str, tuple[int, int]], level: str) -> dict[str, Sequence[Any]]:
        """The saved results of the unchanged files among `keys` (`file_keys` of every file of the
        folder now: `save` keeps their rows only) that were checked at `level` or better."""
        rows, least = self.rows, LEVELS[level]
        saved: dict[str, Sequence[Any]] = {}
        listed = self.listed = set()
        for path, key in keys.items():
            name = self.relative(path)
            listed.add(name)
            row = rows.get(name)
            if row is not None and row[0] == key[0] and row[1] == key[1] and LEVELS[row[2]] >= least:
                saved[path] = row[3:]
        return saved

    def record(self, path: str, key: tuple[int, int], level: str, result: Iterable[Any]) -> None:
        """What the check found in the file at `path` (with its key from `file_keys`), at `level`."""
        name = self.relative(path)
        self.rows[name] = self.recorded[name] = (*key, level, *result)

    def save(self, fingerprint: str, report: str) -> None:
        """Write the recorded rows, delete those of files no longer listed (see `known`) and keep
        `report` under `fingerprint`, in one transaction; warn if it cannot."""
        removed = self.rows.keys() - self.listed if self.listed is not None else set()
        self.file.with_suffix(".json").unlink(missing_ok=True)  # an earlier version's manifest
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            with closing(self._connect()) as connection, connection:  # one transaction: all or nothing
                connection.execute("DELETE FROM meta")
                connection.executemany(
                    "INSERT INTO meta VALUES (?, ?)", [("version", str(VERSION)), ("base", str(self.base))]
                )
                if self.recorded or removed:  # the saved reports are of other rows
                    connection.execute("DELETE FROM reports")
                connection.executemany("DELETE FROM files WHERE name = ?", ((name,) for name in removed))
                connection.executemany(
                    f"INSERT OR REPLACE INTO files VALUES ({', '.join('?' * len(COLUMNS))})",
                    ((name, *row) for name, row in self.recorded.items()),
                )
                connection.execute(
                    "INSERT OR REPLACE INTO reports VALUES (?, ?, ?)", (fingerprint, report, time.time())
                )
                connection.execute(
                    "DELETE FROM reports WHERE fingerprint NOT IN "
                    "(SELECT fingerprint FROM reports ORDER BY saved DESC LIMIT ?)",
                    (self.REPORTS_KEPT,),
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
        self.valid = True

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.file, timeout=60)
        connection.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        connection.execute(f"CREATE TABLE IF NOT EXISTS files ({', '.join(COLUMNS)}, PRIMARY KEY (name)) WITHOUT ROWID")
        connection.execute("CREATE TABLE IF NOT EXISTS reports (fingerprint TEXT PRIMARY KEY, report TEXT, saved REAL)")
        return connection
