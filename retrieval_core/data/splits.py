"""Seeded stratified subsets and splits of a labelled set: every class keeps its share, to within one item.

Class quotas use the largest-remainder rule in integer arithmetic (no float rounding), ties going to the
smaller label; which items of a class are taken is a seeded permutation of that class's positions. The same
labels and seed always give the same indices, in ascending order.
"""

from __future__ import annotations

import numpy as np


def _quotas(counts: np.ndarray, size: int) -> np.ndarray:
    """``size`` shared out over the classes in proportion to ``counts`` (largest remainder, exact)."""
    n = int(counts.sum())
    scaled = counts.astype(np.int64) * size
    take, remainder = scaled // n, scaled % n
    extra = size - int(take.sum())
    # Largest remainder first, ties to the earlier class; each remainder < n, so a class never exceeds its count.
    order = np.lexsort((np.arange(len(counts)), -remainder))
    take[order[:extra]] += 1
    return take


def stratified_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Indices of a seeded ``size``-item subset whose class proportions follow ``labels``'.

    Args:
        labels: (n,) class labels (any sortable values).
        size: how many to take, 1..n.
        seed: the seed of the per-class permutations.

    Returns:
        (size,) int64 indices into ``labels``, ascending.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if not 0 < size <= len(labels):
        raise ValueError(f"size must be in 1..{len(labels)}, got {size}")
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(inverse == k))[:take] for k, take in enumerate(_quotas(counts, size))]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def stratified_split(labels: np.ndarray, test_size: int | float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded stratified split into (train, test) indices.

    Args:
        labels: (n,) class labels.
        test_size: number of test items (int), or their fraction of n (float in (0, 1), rounded to the nearest
            int). Both parts must be non-empty.
        seed: the seed of :func:`stratified_subset`, which draws the test part.

    Returns:
        (train, test): disjoint ascending int64 indices that together cover ``range(n)``.
    """
    n = len(labels)
    if isinstance(test_size, float):
        if not 0.0 < test_size < 1.0:
            raise ValueError(f"a fractional test_size must be in (0, 1), got {test_size}")
        test_size = round(test_size * n)
    if not 0 < test_size < n:
        raise ValueError(f"test_size must leave both parts non-empty (1..{n - 1} of {n}), got {test_size}")
    test = stratified_subset(labels, test_size, seed)
    train = np.setdiff1d(np.arange(n, dtype=np.int64), test, assume_unique=True)
    return train, test
