"""Stratified, seeded train/val/test splits."""

from __future__ import annotations

import random
from collections.abc import Sequence

SPLITS = ("train", "val", "test")


def stratified_split(labels: Sequence[int], fractions: Sequence[float], seed: int) -> list[list[int]]:
    """Split indices into `[rest, *parts]`, each part taking its fraction of every class.

    Deterministic from `seed`; every class keeps at least one index in `rest`.
    """
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    generator = random.Random(seed)
    parts: list[list[int]] = [[] for _ in range(len(fractions) + 1)]
    for label in sorted(by_class):
        indices = by_class[label]
        generator.shuffle(indices)
        start = 0
        for part, fraction in zip(parts[1:], fractions, strict=True):
            take = min(round(len(indices) * fraction), len(indices) - start - 1)
            part.extend(indices[start : start + max(take, 0)])
            start += max(take, 0)
        parts[0].extend(indices[start:])
    return [sorted(part) for part in parts]
