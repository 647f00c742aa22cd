"""Predictions written as they are made, and a run that picks up where a killed one stopped.

`PredictionFile(FILE, ...)` streams each batch's rows to a part file beside FILE
(`FILE.part<attempt>-<rank>`: the dataset index, then the row), flushed after every batch,
with a small record `FILE.progress.json` (how many images, a digest of their paths, the
attempts so far). When every image has its row, the parts are merged in index order
(`heapq.merge`: memory stays flat in the number of images) into FILE, atomically, and the
parts and the record are removed: FILE then equals an uninterrupted run's, each image once.

Run again after a kill, the same command finds the record, keeps every complete row of
the parts (a row cut by the kill is dropped), and predicts only the images without one. A
complete FILE is never overwritten. Under DDP every process writes its own part and rank
zero merges.
"""

from __future__ import annotations

import csv
import hashlib
import heapq
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from tl_project.errors import UserError
from tl_project.runtime import say


def header(k: int) -> list[str]:
    """predictions.csv's columns for the top-k; `answered`: whether the top class's probability
    reaches the model's answer threshold (model.target_accuracy or --min_probability)."""
    columns = ["path", "prediction", "probability", "answered"]
    for rank in range(1, k + 1):
        columns += [f"top{rank}", f"top{rank}_probability"]
    return columns


def multilabel_header(names: Sequence[str]) -> list[str]:
    """predictions.csv's columns for multi-label: the path, the predicted set, each class's probability."""
    return ["path", "labels", *names]


def multilabel_row(
    path: str, chosen: Sequence[bool], probabilities: Sequence[float], names: Sequence[str], delimiter: str
) -> list[str]:
    """A multi-label row: the classes at or above their thresholds, joined by `delimiter`, then every probability."""
    labels = delimiter.join(name for name, yes in zip(names, chosen, strict=True) if yes)
    return [path, labels, *(f"{p:.6f}" for p in probabilities)]


def answer_threshold_in_force(given: float | None, saved: float, multi_label: bool) -> float:
    """The probability an answer needs: `--min_probability` where given, else the model's own
    (fit --model.target_accuracy; 0 answers every image). A multi-label model refuses one."""
    if given is None:
        return saved
    if multi_label:
        raise UserError(
            "--min_probability marks single-label answers; a multi-label model answers each class at its own "
            "threshold (chosen on validation): leave it out."
        )
    return given


def row(
    path: str, classes: Sequence[int], probabilities: Sequence[float], names: Sequence[str], min_probability: float
) -> list[str]:
    """predictions.csv's row of one image: path, prediction, probability, answered, then the top-k."""
    answered = "true" if probabilities[0] >= min_probability else "false"
    line = [path, names[classes[0]], f"{probabilities[0]:.6f}", answered]
    for c, p in zip(classes, probabilities, strict=True):
        line += [names[c], f"{p:.6f}"]
    return line


def digest(paths: Sequence[Any]) -> str:
    return hashlib.sha256("\n".join(map(str, paths)).encode()).hexdigest()


class PredictionFile:
    """FILE, written in parts as batches finish, resumable (see the module's text)."""

    def __init__(
        self,
        path: Path,
        paths: Sequence[Any],
        class_names: Sequence[str],
        rank: int = 0,
        label_delimiter: str | None = None,
        min_probability: float = 0.0,
    ) -> None:
        """`label_delimiter`: multi-label rows (the predicted set joined by it), else top-k rows,
        answered where the top probability reaches `min_probability`."""
        self.path, self.paths, self.names, self.rank = Path(path), list(paths), list(class_names), rank
        self.min_probability = min_probability
        self.delimiter = label_delimiter
        self.record = Path(f"{self.path}.progress.json")
        self.handle: IO[str] | None = None
        self.writer: Any = None
        self.k = min(5, len(self.names))

    def parts(self) -> list[Path]:
        return sorted(self.path.parent.glob(f"{self.path.name}.part*"))

    def prepare(self) -> int:
        """On rank zero, before the others look: refuse a complete FILE, check or start the record,
        cut rows a kill left half-written; the attempt number of this run."""
        if self.path.exists():
            raise UserError(f"{self.path} exists and is complete; pass another --output (it is never overwritten).")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        state: dict[str, Any] = {"images": len(self.paths), "digest": digest(self.paths), "attempts": 0}
        if self.record.exists():
            saved = json.loads(self.record.read_text())
            if (saved["images"], saved["digest"]) != (state["images"], state["digest"]):
                raise UserError(
                    f"{self.record} was started for other images ({saved['images']}, not these {len(self.paths)}, "
                    f"or in another order): predict the same images to continue it, or delete {self.path}.part* "
                    f"and {self.record} to start again."
                )
            state["attempts"] = saved["attempts"]
            for part in self.parts():
                cut_torn_row(part)
        state["attempts"] += 1
        self.record.write_text(json.dumps(state) + "\n")
        return state["attempts"]

    def done(self) -> set[int]:
        """The indices that already have a row (every process reads the same files)."""
        return {index for index, _ in self.rows()}

    def rows(self) -> Iterator[tuple[int, list[str]]]:
        """Every complete row of the parts, in index order."""
        streams = [part_rows(part) for part in self.parts()]
        seen = -1
        for index, line in heapq.merge(*streams, key=lambda item: item[0]):
            if index != seen:  # never twice
                seen = index
                yield index, line

    def begin(self, attempt: int) -> set[int]:
        """Opens this process's part of `attempt` (after `prepare`); the indices that already have
        a row, said on rank zero when there are any."""
        done = self.done()
        if done and self.rank == 0:
            say(f"Continuing {self.path}: {len(done)} of {len(self.paths)} images already predicted")
        self.open(attempt)
        return done

    def open(self, attempt: int) -> None:
        part = self.path.parent / f"{self.path.name}.part{attempt:03d}-{self.rank:03d}"
        self.handle = open(part, "a", newline="")  # noqa: SIM115 (closed by finish)
        self.writer = csv.writer(self.handle)

    def write(
        self, indices: Sequence[int], classes: Sequence[Sequence[int]], probabilities: Sequence[Sequence[float]]
    ) -> None:
        """One batch's rows, flushed to the disk's cache before the next batch."""
        assert self.writer is not None and self.handle is not None
        for index, top, values in zip(indices, classes, probabilities, strict=True):
            self.writer.writerow([index, *row(str(self.paths[index]), top, values, self.names, self.min_probability)])
        self.handle.flush()

    def write_sets(
        self, indices: Sequence[int], chosen: Sequence[Sequence[bool]], probabilities: Sequence[Sequence[float]]
    ) -> None:
        """One batch's multi-label rows, flushed as `write`'s."""
        assert self.writer is not None and self.handle is not None and self.delimiter is not None
        for index, answers, values in zip(indices, chosen, probabilities, strict=True):
            line = multilabel_row(str(self.paths[index]), answers, values, self.names, self.delimiter)
            self.writer.writerow([index, *line])
        self.handle.flush()

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None

    def finish(self) -> int:
        """On rank zero, after every process has closed its part: FILE in index order; how many rows."""
        count = 0
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header(self.k) if self.delimiter is None else multilabel_header(self.names))
            for _, line in self.rows():
                writer.writerow(line)
                count += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        for part in self.parts():
            part.unlink()
        self.record.unlink(missing_ok=True)
        say(f"Predictions for {count} images written to {self.path}")
        return count


def cut_torn_row(part: Path) -> None:
    """Drop a last row without its newline (a write cut by a kill)."""
    data = part.read_bytes()
    end = data.rfind(b"\n") + 1
    if end != len(data):
        with open(part, "r+b") as f:
            f.truncate(end)


def part_rows(part: Path) -> Iterator[tuple[int, list[str]]]:
    """(index, row) of a part file, in its order (increasing)."""
    with open(part, newline="") as f:
        for line in csv.reader(f):
            if line:
                yield int(line[0]), line[1:]
