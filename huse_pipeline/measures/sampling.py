"""Seeded, class-stratified samples of items: the bounded validation of `huse train --val-sample` and
the queries of `huse eval --max-queries` (numpy only)."""
from __future__ import annotations

import numpy as np


def stratified_sample(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """(min(n, N),) ascending positions into `labels` (N,), drawn without replacement so that every
    class keeps its share of the sample.

    Class c gets floor(n * N_c / N) positions, and the positions left over go to the classes with the
    largest remainders (ties: lower label first), so the sample has exactly n items and a class's count
    is within one of its proportional share. Within each class the positions are drawn uniformly by
    `numpy.random.default_rng(seed)`, class by class in label order: the same labels, n and seed give
    the same sample. n >= N gives every position.
    """
    labels = np.asarray(labels)
    if n <= 0:
        raise ValueError(f"a sample needs at least one item, got n = {n}")
    if n >= len(labels):
        return np.arange(len(labels))
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    quota = counts * (n / len(labels))  # (C,) proportional shares
    take = np.floor(quota).astype(np.int64)
    remainder = quota - take
    order = np.lexsort((np.arange(len(classes)), -remainder))  # largest remainder first, then lower label
    take[order[:n - int(take.sum())]] += 1
    rng = np.random.default_rng(seed)
    by_class = np.argsort(inverse, kind="stable")  # positions grouped by class, ascending within each
    starts = np.concatenate([[0], np.cumsum(counts)])
    chosen = [rng.choice(by_class[starts[c]:starts[c + 1]], size=int(k), replace=False)
              for c, k in enumerate(take) if k]
    return np.sort(np.concatenate(chosen))
