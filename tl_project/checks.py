"""The data check: decode every image once, before training, and report what is wrong.

Problems make an image unusable and fall under `data.on_bad_image`:
- `empty`: a zero-byte file;
- `too large`: more pixels than the limit (a decompression bomb is refused from its
  header, never decoded);
- `unreadable`: corrupt or truncated, or not an image at all.

Warnings do not stop anything but are worth knowing:
- `extension`: the content is another format than the extension says;
- `duplicate`: the same bytes twice within a split;
- `leakage`: the same bytes in two splits (a test image the model trained on).

`python -m tl_project check --data.root DIR` prints the full report with class counts.
"""

from __future__ import annotations

import hashlib
import io
from collections import defaultdict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from tl_project.data.images import EXTENSION_FORMATS
from tl_project.errors import UserError
from tl_project.runtime import warn


@dataclass(frozen=True)
class Finding:
    """One thing found about one image (or a pair, for duplicates)."""

    kind: str
    path: Path
    detail: str

    def __str__(self) -> str:
        return f"  {self.kind:<11} {self.path}: {self.detail}"


@dataclass
class DataReport:
    """What `check_images` found: problems, warnings and class counts per split."""

    problems: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def bad_paths(self) -> set[Path]:
        return {f.path for f in self.problems}

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
            lines.append(f"Class imbalance (train, largest / smallest class): {max(train) / min(train):.2f}")
        if self.problems:
            lines += [f"Unusable images ({len(self.problems)}):", *map(str, self.problems)]
        if self.warnings:
            lines += [f"Warnings ({len(self.warnings)}):", *map(str, self.warnings)]
        if not self.problems and not self.warnings:
            lines.append("No problems found.")
        return "\n".join(lines)


def inspect_image(path: Path, max_pixels: int) -> tuple[Finding | None, Finding | None, str]:
    """Decode `path` once: (problem or None, warning or None, sha256 of its bytes)."""
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if not data:
        return Finding("empty", path, "0 bytes"), None, digest
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                detail = f"{width} x {height} pixels, over the limit of {max_pixels} (--data.max_image_pixels)"
                return Finding("too large", path, detail), None, digest
            found = image.format
            image.load()
    except Image.DecompressionBombError as error:
        return Finding("too large", path, str(error)), None, digest
    except UnidentifiedImageError:
        return Finding("unreadable", path, "not an image (no format PIL can read)"), None, digest
    except Exception as error:
        return Finding("unreadable", path, str(error) or type(error).__name__), None, digest
    expected = EXTENSION_FORMATS.get(path.suffix.lower())
    if expected and found and found != expected:
        return None, Finding("extension", path, f"holds a {found} image, not {expected}"), digest
    return None, None, digest


def check_images(
    splits: Mapping[str, Sequence[tuple[Path, int]]],
    class_names: Sequence[str],
    max_pixels: int,
    workers: int = 1,
) -> DataReport:
    """Decode every image of every split once (in `workers` threads) and report."""
    report = DataReport()
    jobs = [(split, path, label) for split, samples in splits.items() for path, label in samples]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = list(pool.map(lambda job: inspect_image(job[1], max_pixels), jobs))
    seen: dict[str, tuple[str, Path]] = {}
    counts: dict[str, dict[str, int]] = {split: defaultdict(int) for split in splits}
    for (split, path, label), (problem, warning, digest) in zip(jobs, results, strict=True):
        counts[split][class_names[label]] += 1
        if problem:
            report.problems.append(problem)
            continue
        if warning:
            report.warnings.append(warning)
        if digest in seen:
            first_split, first = seen[digest]
            if first_split == split:
                report.warnings.append(Finding("duplicate", path, f"same content as {first}"))
            else:
                report.warnings.append(Finding("leakage", path, f"({split}) same content as {first} ({first_split})"))
        else:
            seen[digest] = (split, path)
    report.counts = {split: dict(c) for split, c in counts.items()}
    return report


# What a stage did not do when unusable images stop it.
UNDONE = {"fit": "trained", "validate": "validated", "test": "tested", "predict": "predicted"}


def usable(
    splits: dict[str, list[tuple[Path, int]]], report: DataReport, policy: str, stage: str
) -> dict[str, list[tuple[Path, int]]]:
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
    bad = report.bad_paths
    return {split: [(p, label) for p, label in samples if p not in bad] for split, samples in splits.items()}
