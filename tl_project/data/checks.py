"""The data check: look at every image once, before training, and report what is wrong.

Problems make an image unusable and fall under `data.on_bad_image`:
- `empty`: a zero-byte file;
- `too large`: more pixels than the limit (a decompression bomb is refused from its
  header, never decoded);
- `unreadable`: corrupt or truncated, or not an image at all;
- `conflicting labels`: the same bytes under two labels (an image put in two class
  folders, or listed twice in a labels CSV under two names): one image with two answers.

Warnings do not stop anything but are worth knowing:
- `extension`: the content is another format than the extension says;
- `duplicate`: the same bytes twice within a split;
- `leakage`: the same bytes in two splits (a test image the model trained on).

How thoroughly (`data.verify`): `full` decodes every image and hashes its bytes;
`header` reads only the header (format and size: finds empty, too large, non-image
files, not truncated ones, and no duplicates); `off` looks at nothing, and images that
fail to load are skipped then, with a summary (`ImageDataModule`). What a check found
is kept in a manifest (`data/manifest.py`), so unchanged files are not looked at
again; the files to look at are shared out between the DDP processes and, within
each, between worker processes.

`python -m tl_project check --data.root DIR` prints the full report with class counts.
"""

from __future__ import annotations

import hashlib
import io
import json
from array import array
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import astuple, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import torch
from PIL import Image, UnidentifiedImageError

from tl_project.data.images import EXTENSION_FORMATS
from tl_project.data.manifest import Manifest, file_keys
from tl_project.errors import UserError
from tl_project.runtime import gather_objects, rank_and_world, warn

# A largest / smallest class ratio from which the report suggests data.balance.
IMBALANCED = 3.0


@dataclass(frozen=True)
class Finding:
    """One thing found about one image (or a pair, for duplicates)."""

    kind: str
    path: str
    detail: str

    def __str__(self) -> str:
        return f"  {self.kind:<11} {self.path}: {self.detail}"


@dataclass
class DataReport:
    """What `check_images` found: problems, warnings and class counts per split."""

    problems: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    level: str = "full"

    @property
    def bad_paths(self) -> set[str]:
        return {f.path for f in self.problems}

    def to_json(self) -> str:
        findings = {kind: [astuple(f) for f in getattr(self, kind)] for kind in ("problems", "warnings")}
        return json.dumps({**findings, "counts": self.counts, "level": self.level})

    @classmethod
    def from_json(cls, text: str) -> DataReport:
        saved = json.loads(text)
        problems, warnings = ([Finding(*f) for f in saved[kind]] for kind in ("problems", "warnings"))
        return cls(problems, warnings, saved["counts"], saved["level"])

    def format(self, class_names: Sequence[str]) -> str:
        """The report as text: counts table, imbalance, problems, warnings."""
        splits = [s for s in self.counts if self.counts[s]]
        total = sum(sum(c.values()) for c in self.counts.values())
        lines = [f"Checked {total} images: " + ", ".join(f"{s} {sum(self.counts[s].values())}" for s in splits)]
        width = max([len("class"), *(len(n) for n in class_names)])
        lines.append("  " + "class".ljust(width) + "".join(f"{s:>8}" for s in splits))
        for name in class_names:
            lines.append("  " + name.ljust(width) + "".join(f"{self.counts[s].get(name, 0):>8}" for s in splits))
        train = [n for n in self.counts.get("train", {}).values() if n] or [0]
        if min(train):
            ratio = max(train) / min(train)
            hint = " (large: --data.balance sampler or loss evens it out in training)" if ratio >= IMBALANCED else ""
            lines.append(f"Class imbalance (train, largest / smallest class): {ratio:.2f}{hint}")
        if self.problems:
            lines += [f"Unusable images ({len(self.problems)}):", *map(str, self.problems)]
        if self.warnings:
            lines += [f"Warnings ({len(self.warnings)}):", *map(str, self.warnings)]
        if not self.problems and not self.warnings:
            lines.append("No problems found.")
        if self.level == "header":
            lines.append("Headers only (--data.verify header): truncated images, duplicates and leakage not checked.")
        return "\n".join(lines)


class Inspection(NamedTuple):
    """What one look at one file found: the problem (None when usable) and its detail, the
    size and format from the header, the content hash (full checks only), and whether the
    format is another than the file's extension promises (judged once, when looked at).
    A tuple: the manifest keeps it as its row's last fields, and a million are made quickly."""

    problem: str | None = None
    detail: str = ""
    width: int = 0
    height: int = 0
    format: str | None = None
    digest: str | None = None
    wrong_extension: str = ""

    def findings(self, path: str, max_pixels: int) -> tuple[Finding | None, Finding | None]:
        """(problem or None, warning or None) of the file at `path` under the pixel limit."""
        if self.problem:
            return Finding(self.problem, path, self.detail), None
        if self.width * self.height > max_pixels:
            detail = f"{self.width} x {self.height} pixels, over the limit of {max_pixels} (--data.max_image_pixels)"
            return Finding("too large", path, detail), None
        if self.wrong_extension:
            return None, Finding("extension", path, self.wrong_extension)
        return None, None

    def stale(self, max_pixels: int) -> bool:
        """Whether a saved inspection must be done again: refused as too large under a lower limit."""
        return self.problem == "too large" and self.width * self.height <= max_pixels


def inspect_file(path: str | Path, level: str = "full", max_pixels: int = 89_478_485) -> Inspection:
    """Look at `path` once: its header (`header`), or decode it and hash its bytes (`full`).

    An image over `max_pixels` is refused from its header, never decoded."""
    path = Path(path)
    try:
        data = path.read_bytes() if level == "full" else b""
        if (len(data) if level == "full" else path.stat().st_size) == 0:
            return Inspection("empty", "0 bytes")
        digest = hashlib.sha256(data).hexdigest()[:32] if level == "full" else None
        with Image.open(io.BytesIO(data) if level == "full" else path) as image:
            width, height = image.size
            expected = EXTENSION_FORMATS.get(path.suffix.lower())
            wrong = f"holds a {image.format} image, not {expected}" if expected and image.format != expected else ""
            found = Inspection(None, "", width, height, image.format, digest, wrong)
            if width * height > max_pixels:
                return Inspection("too large", f"{width} x {height} pixels, not decoded", width, height)
            if level == "full":
                image.load()
            return found
    except Image.DecompressionBombError as error:
        return Inspection("too large", str(error))
    except UnidentifiedImageError:
        return Inspection("unreadable", "not an image (no format PIL can read)")
    except Exception as error:
        return Inspection("unreadable", str(error) or type(error).__name__)


# Fewer files than this are looked at in this process: starting worker processes costs more.
PARALLEL_FROM = 256


def inspect_files(paths: Sequence[str], level: str, max_pixels: int, workers: int = 1) -> list[Inspection]:
    """`inspect_file` of every path, in order: under DDP each process takes its share and the
    results are gathered (all processes must call this, with the same paths); within a
    process, `workers` worker processes share it."""
    rank, world = rank_and_world()
    share = list(paths[rank::world])
    job = partial(inspect_file, level=level, max_pixels=max_pixels)
    if workers > 1 and len(share) >= PARALLEL_FROM:
        with ProcessPoolExecutor(workers) as pool:
            mine = list(pool.map(job, share, chunksize=max(1, min(256, len(share) // (4 * workers)))))
    else:
        mine = [job(path) for path in share]
    results: list[Inspection] = [Inspection()] * len(paths)
    for part_rank, part in enumerate(gather_objects(mine)):
        results[part_rank::world] = part
    return results


def check_images(
    splits: Mapping[str, Sequence[tuple[str, int]]],
    class_names: Sequence[str],
    max_pixels: int,
    level: str = "full",
    workers: int = 1,
    manifest: Manifest | None = None,
    only: Collection[str] | None = None,
) -> DataReport:
    """Check the images of the splits in `only` (all by default) and report.

    With a `manifest`, files it knows unchanged are not looked at again, and it is
    saved with what was found (by rank zero); the other splits' known content hashes
    still reveal leakage into the checked ones. When nothing changed since a report of
    the same splits and settings was saved, that report is the answer."""
    checked = [split for split in splits if only is None or split in only]
    known: dict[str, Inspection] = {}
    if manifest:
        keys = file_keys(path for samples in splits.values() for path, _ in samples)
        fingerprint = report_fingerprint(splits, class_names, checked, keys, level, max_pixels)
        saved_report = manifest.report(fingerprint)
        if all(gather_objects(saved_report is not None)):  # every process takes the same way
            assert saved_report is not None
            return DataReport.from_json(saved_report)
        saved = manifest.known(keys, level)
        known = {
            path: inspection for path, row in saved.items() if not (inspection := Inspection(*row)).stale(max_pixels)
        }
    todo = sorted({path for split in checked for path, _ in splits[split] if path not in known})
    found = dict(zip(todo, inspect_files(todo, level, max_pixels, workers), strict=True))
    if manifest:
        for path, inspection in found.items():
            manifest.record(path, keys[path], level, inspection)
    known |= found
    report = make_report(splits, class_names, checked, known, level, max_pixels)
    if manifest and rank_and_world()[0] == 0:
        manifest.save(fingerprint, report.to_json())
    return report


def report_fingerprint(
    splits: Mapping[str, Sequence[tuple[str, int]]],
    class_names: Sequence[str],
    checked: Sequence[str],
    keys: Mapping[str, tuple[int, int]],
    level: str,
    max_pixels: int,
) -> str:
    """What a report is made from, hashed: the settings, and every file's split, label, path and key (`file_keys`)."""
    digest = hashlib.sha256(json.dumps([list(class_names), list(checked), level, max_pixels]).encode())
    for split, samples in splits.items():  # whole arrays at a time: this runs over every file
        paths = [path for path, _ in samples]
        digest.update(f"\0{split}\0".encode() + "\0".join(paths).encode())
        digest.update(array("q", [label for _, label in samples]).tobytes())
        digest.update(array("q", [value for path in paths for value in keys[path]]).tobytes())
    return digest.hexdigest()


def make_report(
    splits: Mapping[str, Sequence[tuple[str, int]]],
    class_names: Sequence[str],
    checked: Sequence[str],
    known: Mapping[str, Inspection],
    level: str,
    max_pixels: int,
) -> DataReport:
    """The report of the `checked` splits from what is `known` about their files (and the others')."""

    report = DataReport(level=level)
    # Content seen so far (split, path, label): the unchecked splits' known hashes first, for leakage.
    seen: dict[str, tuple[str, str, int]] = {}
    for split in splits:
        if split not in checked:
            for path, label in splits[split]:
                digest = known[path].digest if path in known else None
                if digest:
                    seen.setdefault(digest, (split, path, label))
    for split in checked:
        labels = Counter(label for _, label in splits[split])
        report.counts[split] = {class_names[label]: labels[label] for label in sorted(labels)}
        for path, label in splits[split]:
            problem, warning = known[path].findings(path, max_pixels)
            if problem:
                report.problems.append(problem)
                continue
            if warning:
                report.warnings.append(warning)
            digest = known[path].digest
            if digest is None:
                continue
            if digest not in seen:
                seen[digest] = (split, path, label)
                continue
            first_split, first, first_label = seen[digest]
            if first_label != label:
                report.problems.append(
                    Finding(
                        "conflicting labels",
                        path,
                        f"labelled {class_names[label]}, and the same content {first} labelled "
                        f"{class_names[first_label]}: keep one",
                    )
                )
            elif first_split == split:
                report.warnings.append(Finding("duplicate", path, f"same content as {first}"))
            else:
                report.warnings.append(Finding("leakage", path, f"({split}) same content as {first} ({first_split})"))
    return report


# What a stage did not do when unusable images stop it.
UNDONE = {"fit": "trained", "validate": "validated", "test": "tested", "predict": "predicted", "optimize": "written"}


def usable(
    splits: dict[str, list[tuple[str, int]]], report: DataReport, policy: str, stage: str
) -> dict[str, list[tuple[str, int]]]:
    """`splits` without the unusable images of `report`, by the policy (data.on_bad_image): `error`
    stops on any, listing all; `skip` leaves them out and says which. Warnings are counted."""
    if report.problems and policy == "error":
        raise UserError(
            f"{len(report.problems)} unusable images; nothing was {UNDONE.get(stage, 'run')}:\n"
            + "\n".join(map(str, report.problems))
            + "\nRemove or replace them, or pass --data.on_bad_image skip to leave them out."
        )
    notes = []
    if report.problems:
        notes += [f"Skipping {len(report.problems)} unusable images (--data.on_bad_image skip):"]
        notes += [str(finding) for finding in report.problems]
    if report.warnings:
        kinds = sorted({f.kind for f in report.warnings})
        notes.append(
            f"{len(report.warnings)} data warnings ({', '.join(kinds)}); "
            "python -m tl_project check with the same --data options lists them."
        )
    if notes:
        warn("\n".join(notes))
    if not (bad := report.bad_paths):
        return splits
    return {split: [(p, label) for p, label in samples if p not in bad] for split, samples in splits.items()}


def unreadable_summary(datasets: Mapping[str, Any], skipped: Mapping[str, set[int]], level: str) -> str:
    """The warning for images left out when they failed to load (`skipped`: dataset indices by
    split, data.verify header/off), each file with why (looked at once more here)."""
    lines = []
    for split, indices in sorted(skipped.items()):
        for index in sorted(indices):
            path = datasets[split].describe(index)
            lines.append(f"  {split}: {path}: {inspect_file(path).detail}")
    return (
        f"Left out {len(lines)} image{'s' if len(lines) > 1 else ''} that could not be loaded (--data.verify {level}); "
        "remove or replace them, or check them with python -m tl_project check:\n" + "\n".join(lines)
    )


class Unreadable:
    """Images that failed to load (data.verify header/off) and left their batch, by split."""

    def __init__(self) -> None:
        self.indices: dict[str, set[int]] = {}

    def drop(self, batch: Any, split: str) -> Any:
        """`batch` without the items of images that failed to load (negative indices), noted."""
        indices = batch[2]
        if not isinstance(indices, torch.Tensor) or not bool((indices < 0).any()):
            return batch
        keep = indices >= 0
        self.indices.setdefault(split, set()).update((-1 - indices[~keep]).tolist())
        return [part[keep] if isinstance(part, torch.Tensor) else part for part in batch]

    def summary(self, datasets: Mapping[str, Any], level: str) -> str | None:
        """The warning of all processes' skipped images (then forgotten), or None if there were none."""
        gathered: dict[str, set[int]] = {}
        for part in gather_objects(self.indices):
            for split, indices in part.items():
                gathered.setdefault(split, set()).update(indices)
        self.indices = {}
        return unreadable_summary(datasets, gathered, level) if gathered else None
