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


def stratified_folds(labels: Sequence[int], folds: int, seed: int) -> list[list[int]]:
    """Indices in `folds` disjoint folds covering all, each holding its share of every class
    (dealt round-robin after a seeded shuffle of each class); deterministic from `seed`."""
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    generator = random.Random(seed)
    parts: list[list[int]] = [[] for _ in range(folds)]
    offset = 0
    for label in sorted(by_class):
        indices = by_class[label]
        generator.shuffle(indices)
        for i, index in enumerate(indices):
            parts[(offset + i) % folds].append(index)
        offset += len(indices)  # the next class starts where this one ended: fold sizes stay even
    return [sorted(part) for part in parts]


def fold_split(labels: Sequence[int], folds: int, fold: int, seed: int) -> tuple[list[int], list[int]]:
    """(train, validation) indices of cross-validation fold `fold` of `folds`."""
    parts = stratified_folds(labels, folds, seed)
    return sorted(i for k, part in enumerate(parts) if k != fold for i in part), parts[fold]


def permutation(n: int, seed: int) -> list[int]:
    """`range(n)` in a random order, deterministic from `seed`."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order
