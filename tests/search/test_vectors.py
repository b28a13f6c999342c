"""FAISS indexes against brute force: the exact index returns the brute-force top-k (ties by lower
id), HNSW and the compressed index reach and record their recall@10, the kind rule, range search."""
from __future__ import annotations

import numpy as np
import pytest

from huse_pipeline.errors import HuseError
from huse_pipeline.search import vectors


def brute_topk(queries: np.ndarray, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Plain reference: float64 inner products, sorted by score then lower index."""
    scores = queries.astype(np.float64) @ x.astype(np.float64).T
    ids = np.array([sorted(range(len(x)), key=lambda j: (-s[j], j))[:k] for s in scores])
    return np.take_along_axis(scores, ids, 1), ids


def integer_vectors(n: int, d: int, seed: int) -> np.ndarray:
    """Small integer coordinates: inner products are exact in float32, and ties are frequent."""
    return np.random.default_rng(seed).integers(-2, 3, size=(n, d)).astype(np.float32)


def clustered(n: int, d: int, seed: int, n_clusters: int = 50, spread: float = 0.35) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors around random centres (items and fresh queries from the same mixture)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, d))

    def draw(m: int) -> np.ndarray:
        x = centres[rng.integers(0, n_clusters, m)] + spread * rng.normal(size=(m, d))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    return draw(n), draw(400)


@pytest.mark.parametrize("k", [1, 5, 10])
def test_exact_index_equals_brute_force_with_ties(k):
    x = integer_vectors(3000, 6, seed=0)
    x[1500] = x[7]  # exact duplicates: ties that must go to the lower id
    x[2999] = x[7]
    q = np.concatenate([x[[7, 100]], integer_vectors(30, 6, seed=1)])
    vi, info = vectors.build_vector_index(x, "exact", q[:0], q[:10])
    scores, ids = vi.search(q, k)
    ref_scores, ref_ids = brute_topk(q, x, k)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=0)
    assert info["recall@10"] == 1.0
    # the plain exact_topk (blocks merged) agrees too, with blocks smaller than k
    _, i2 = vectors.exact_topk(q, x, k, block_rows=7)
    np.testing.assert_array_equal(i2, ref_ids)


def test_exact_search_of_an_id_range_is_exact():
    x = integer_vectors(2000, 5, seed=2)
    q = integer_vectors(20, 5, seed=3)
    vi, _ = vectors.build_vector_index(x, "exact", q[:0], q[:0])
    lo, hi = 300, 1100
    _, ids = vi.search(q, 10, (lo, hi))
    _, ref = brute_topk(q, x[lo:hi], 10)
    np.testing.assert_array_equal(ids, ref + lo)
    # a range shorter than k: the rest is -1
    s, ids = vi.search(q[:2], 10, (5, 8))
    assert (ids[:, :3] >= 5).all() and (ids[:, :3] < 8).all() and (ids[:, 3:] == -1).all()
    assert np.isneginf(s[:, 3:]).all()


@pytest.mark.parametrize("kind", ["hnsw", "compressed"])
def test_approximate_indexes_reach_and_record_their_recall(kind):
    x, q = clustered(8000, 16, seed=4)
    vi, info = vectors.build_vector_index(x, kind, q[:200], q[200:], target=0.95)
    assert info["kind"] == kind and info["recall_queries"] == 200
    # recorded on the held-out queries, and true: recompute it against brute force here
    _, truth = brute_topk(q[200:], x, 10)
    _, found = vi.search(q[200:], 10)
    measured = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)])
    assert info["recall@10"] == pytest.approx(measured, abs=2e-3)  # (the recorded one also counts near-ties)
    assert measured >= 0.95
    tuned = "efSearch" if kind == "hnsw" else "nprobe"
    assert info["tuned"] == tuned and info["params"][tuned] == vi.params[tuned]
    if kind == "compressed":  # scores are exact cosines (re-ranked against the float vectors)
        s, i = vi.search(q[:5], 10)
        np.testing.assert_allclose(s, np.einsum("qd,qkd->qk", q[:5], x[i]), atol=1e-5)
        assert info["bytes_estimate"] < vectors.index_bytes("exact", 8000, 16) / 3


def test_hnsw_range_search_stays_inside_the_range():
    x, q = clustered(5000, 16, seed=5)
    vi, _ = vectors.build_vector_index(x, "hnsw", q[:50], q[50:100], exact_max=100)  # ranges > 100 use the selector
    lo, hi = 1000, 3000
    s, ids = vi.search(q[:20], 10, (lo, hi))
    assert ((ids >= lo) & (ids < hi)).all()
    ref_s, _ = brute_topk(q[:20], x[lo:hi], 10)
    assert np.mean(np.isclose(s, ref_s, atol=1e-5)) > 0.9


def test_kind_rule():
    assert vectors.choose_kind(50_000, 512)[0] == "exact"
    assert vectors.choose_kind(vectors.EXACT_MAX_ITEMS + 1, 512)[0] == "hnsw"
    assert vectors.choose_kind(1_000_000, 512, max_memory=64 * 2**30)[0] == "hnsw"
    assert vectors.choose_kind(1_000_000, 512, max_memory=2 * 2**30)[0] == "compressed"  # 2 x 2 GB of floats do not fit
    assert vectors.choose_kind(50_000, 512, max_memory=2**20)[0] == "compressed"
    assert vectors.choose_kind(500, 512, max_memory=1)[0] == "exact"  # too few items to compress
    assert vectors.choose_kind(10, 8, requested="hnsw") == ("hnsw", "--index-kind hnsw")
    with pytest.raises(HuseError, match="at least"):
        vectors.choose_kind(10, 8, requested="compressed")
    with pytest.raises(HuseError, match="unknown index kind"):
        vectors.choose_kind(10, 8, requested="ivf")


def test_parse_memory():
    assert vectors.parse_memory("8G") == 8 * 2**30
    assert vectors.parse_memory("512MiB") == 512 * 2**20
    assert vectors.parse_memory("1.5g") == int(1.5 * 2**30)
    assert vectors.parse_memory("1000") == 1000
    assert vectors.parse_memory("none") is None and vectors.parse_memory(None) is None
    assert vectors.parse_memory("auto") == vectors.physical_memory() // 2
    with pytest.raises(HuseError, match="memory size"):
        vectors.parse_memory("lots")


def test_recall_at_k_counts_the_overlap_and_ties():
    truth = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert vectors.recall_at_k(np.array([[4, 3, 2, 1], [5, 9, -1, -1]]), truth) == pytest.approx((1 + 0.25) / 2)
    # item 3 is a copy of item 2: returning it instead of 2 is no miss once the scores are given
    x = np.eye(4, dtype=np.float32)
    x[3] = x[2]
    q = np.array([[0.1, 0.6, 0.8, 0.0]], np.float32)
    truth_scores, truth = vectors.exact_topk(q, x, 2)
    assert truth.tolist() == [[2, 3]] and vectors.recall_at_k(np.array([[3, 1]]), truth) == 0.5
    assert vectors.recall_at_k(np.array([[3, 2]]), truth, q, x, truth_scores) == 1.0
    assert vectors.recall_at_k(np.array([[3, 1]]), truth, q, x, truth_scores) == 0.5  # 1 scores less: a miss
