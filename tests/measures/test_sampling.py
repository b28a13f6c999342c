"""Seeded class-stratified samples (measures/sampling.py): exact size, each class within one of its
share, deterministic under the seed, every position when the sample is the whole set."""
from __future__ import annotations

import numpy as np
import pytest

from huse_pipeline.measures.sampling import stratified_sample


def skewed_labels(n: int = 1000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, 13) ** 1.2  # 12 classes, Zipf-like sizes
    return rng.choice(12, size=n, p=p / p.sum())


@pytest.mark.parametrize("n", [1, 7, 100, 999])
def test_size_and_class_shares(n):
    labels = skewed_labels()
    pos = stratified_sample(labels, n, seed=3)
    assert len(pos) == n and len(np.unique(pos)) == n and np.all(np.diff(pos) > 0)
    assert pos.min() >= 0 and pos.max() < len(labels)
    share = np.bincount(labels, minlength=12) * n / len(labels)
    got = np.bincount(labels[pos], minlength=12)
    assert np.all(np.abs(got - share) < 1)  # each class within one item of its proportional share


def test_seeded_and_deterministic():
    labels = skewed_labels()
    a, b, c = (stratified_sample(labels, 50, s) for s in (0, 0, 1))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)  # another seed, another sample
    assert np.array_equal(np.bincount(labels[a], minlength=12), np.bincount(labels[c], minlength=12))


def test_whole_set_and_bad_sizes():
    labels = np.array([2, 2, 0, 1])
    assert stratified_sample(labels, 4, 0).tolist() == [0, 1, 2, 3]
    assert stratified_sample(labels, 10, 0).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        stratified_sample(labels, 0, 0)
    # largest remainder: shares 1.5 (class 2), 0.75, 0.75 of 3 -> 1 + 1 + 1
    assert sorted(labels[stratified_sample(labels, 3, 0)].tolist()) == [0, 1, 2]
