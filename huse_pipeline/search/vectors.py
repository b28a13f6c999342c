"""FAISS indexes over unit vectors (inner product = cosine), the rule that picks their kind, and the
measurement of their recall@10 against exact search. No torch here: the benchmark's synthetic
index and `huse index` build through the same functions.

The rule (`choose_kind`; README "Using the space"), per modality, N items of dimension D:

* ``exact`` (`IndexFlatIP`, every query scans all N) while N <= EXACT_MAX_ITEMS and the float
  vectors fit the memory budget;
* ``hnsw`` (`IndexHNSWFlat`, inner product, M = HNSW_M) above it, with efSearch the smallest of
  EF_SEARCH_LADDER whose recall@10 on tuning queries reaches the target;
* ``compressed`` (IVF-PQ, 64-byte codes for D = 512, then the best RERANK_FACTOR x k candidates
  re-scored exactly against the stored float vectors, memory-mapped from disk) when the vectors
  of both modalities with their HNSW links do not fit the budget; nprobe tuned like efSearch.

`--index-kind` overrides the rule.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

from huse_pipeline.errors import HuseError

log = logging.getLogger(__name__)

KINDS = ("exact", "hnsw", "compressed")
# A query against an exact index streams all N x D floats: on the 2-core development machine one query of
# 100k x 512 took 10 ms of CPU (26 ms wall on the shared machine), 200k twice that (BENCHMARKS.md), so
# exact stays the choice up to 100k and HNSW takes over where a scan would eat a 30 ms budget.
EXACT_MAX_ITEMS = 100_000
HNSW_M = 32  # neighbours per node: 2 x 32 int32 links per vector on the bottom layer
HNSW_EF_CONSTRUCTION = 80
EF_SEARCH_LADDER = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
NPROBE_LADDER = (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
RERANK_FACTOR = 8  # compressed: k x this many candidates are re-scored with the exact float vectors
RECALL_K = 10
RECALL_TARGET = 0.95
COMPRESSED_MIN_ITEMS = 1000  # fewer items than this cannot train the IVF-PQ quantisers


# --------------------------------------------------------------------------------- the rule


def parse_memory(text: str | int | None) -> int | None:
    """'8G', '512M', '3.5GB', '1000000' (bytes) -> bytes; None, '' or 'none' -> None (no budget);
    'auto' -> half of this machine's physical memory."""
    if text is None or isinstance(text, int):
        return text
    value = str(text).strip().lower().removesuffix("b").removesuffix("i")
    if value in ("", "none", "unlimited"):
        return None
    if value == "auto":
        return physical_memory() // 2
    scale = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    try:
        if value[-1] in scale:
            return int(float(value[:-1]) * scale[value[-1]])
        return int(float(value))
    except (ValueError, IndexError):
        raise HuseError(f"cannot read the memory size {text!r}: write e.g. 8G, 512M or auto") from None


def physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def pq_shape(dim: int, n: int) -> tuple[int, int]:
    """(sub-quantisers m, bits each) of the compressed index: m the largest divisor of D up to
    min(64, D/2) (64 one-byte codes for D = 512, 32x smaller than the floats); fewer bits when there
    are too few items to train 256 centroids."""
    m = max(d for d in range(1, max(1, min(64, dim // 2)) + 1) if dim % d == 0)
    nbits = int(min(8, max(1, math.floor(math.log2(max(2, n / 39))))))
    return m, nbits


def ivf_lists(n: int) -> int:
    """Inverted lists of the compressed index: about sqrt(N), at least 39 training items each."""
    return int(max(1, min(round(math.sqrt(n)), n // 39)))


def index_bytes(kind: str, n: int, dim: int) -> int:
    """Estimated memory of one modality's index of `kind` over N vectors of dimension D."""
    if kind == "exact":
        return n * dim * 4
    if kind == "hnsw":
        return n * (dim * 4 + int(2 * HNSW_M * 4 * (1 + 1 / HNSW_M)) + 16)  # vectors + links (+ upper layers)
    m, nbits = pq_shape(dim, n)
    return n * (math.ceil(m * nbits / 8) + 8) + ivf_lists(n) * dim * 4  # codes + ids + centroids
    # (re-ranking reads the float vectors from the memory-mapped file: page cache, not counted)


def choose_kind(n: int, dim: int, requested: str = "auto", max_memory: int | None = None,
                exact_max: int = EXACT_MAX_ITEMS, modalities: int = 2) -> tuple[str, str]:
    """(kind, why) by the rule in this module's docstring; `requested` other than auto wins."""
    if requested != "auto":
        if requested not in KINDS:
            raise HuseError(f"unknown index kind {requested!r}; choose auto, {', '.join(KINDS)}")
        if requested == "compressed" and n < COMPRESSED_MIN_ITEMS:
            raise HuseError(f"a compressed index needs at least {COMPRESSED_MIN_ITEMS} items ({n} here): "
                            "use --index-kind exact")
        return requested, f"--index-kind {requested}"

    def fits(kind: str) -> bool:
        return max_memory is None or modalities * index_bytes(kind, n, dim) <= max_memory

    budget = "no memory budget" if max_memory is None else f"budget {max_memory / 2**30:.2f} GiB"
    if n <= exact_max and fits("exact"):
        return "exact", f"{n} items <= {exact_max} (exact stays fast) and the vectors fit ({budget})"
    if fits("hnsw"):
        why = f"{n} items > {exact_max}" if n > exact_max else "exact vectors do not fit"
        return "hnsw", f"{why}; HNSW vectors and links fit ({budget})"
    if n < COMPRESSED_MIN_ITEMS:
        return "exact", f"too few items ({n}) for a compressed index; exact although over {budget}"
    return "compressed", f"{modalities} x {index_bytes('hnsw', n, dim) / 2**30:.2f} GiB of HNSW vectors exceed the {budget}"


# ------------------------------------------------------------------------------ exact search


def _merge_topk(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k best (score, id) of the columns, highest score first, ties by lower id."""
    order = np.lexsort((ids, -scores), axis=-1)[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def sort_hits(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order each row by score (highest first), ties by lower id; missing hits (id -1) last."""
    key = np.where(ids < 0, np.inf, -scores)
    order = np.lexsort((np.where(ids < 0, np.iinfo(np.int64).max, ids), key), axis=-1)
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def _block_topk(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of `scores` (Q, B), the k highest (scores, columns), ties at the k-th score going to the
    lower columns (the order within is left to `_merge_topk`)."""
    k = min(k, scores.shape[1])
    cols = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    kth = np.take_along_axis(scores, cols, 1).min(1)  # (Q,) the k-th highest score
    for r in np.flatnonzero((scores >= kth[:, None]).sum(1) > k):  # a tie straddles the k-th place
        cand = np.flatnonzero(scores[r] >= kth[r])
        cols[r] = cand[np.lexsort((cand, -scores[r, cand]))[:k]]
    return np.take_along_axis(scores, cols, 1), cols


def exact_topk(queries: np.ndarray, vectors: np.ndarray, k: int, block_rows: int = 65536,
               offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product over `vectors` (N, D), a memory-mapped array is fine (read in
    blocks of rows): (Q, k) scores and ids (+ `offset`), best first, ties by lower id, -1 beyond N."""
    queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    q = len(queries)
    best_s = np.full((q, 0), -np.inf, np.float32)
    best_i = np.full((q, 0), -1, np.int64)
    for start in range(0, len(vectors), block_rows):
        block = np.asarray(vectors[start:start + block_rows], dtype=np.float32)
        s, i = _block_topk(queries @ block.T, k)  # (Q, B) inner products
        best_s, best_i = _merge_topk(np.concatenate([best_s, s], 1), np.concatenate([best_i, i + start], 1), k)
    if best_s.shape[1] < k:  # fewer than k vectors
        pad = k - best_s.shape[1]
        best_s = np.concatenate([best_s, np.full((q, pad), -np.inf, np.float32)], 1)
        best_i = np.concatenate([best_i, np.full((q, pad), -1 - offset, np.int64)], 1)
    return best_s, best_i + offset


TIE_TOLERANCE = 1e-5  # cosines this close to the k-th exact one count as ties


def recall_at_k(found: np.ndarray, truth: np.ndarray, queries: np.ndarray | None = None,
                vectors: np.ndarray | None = None, truth_scores: np.ndarray | None = None) -> float:
    """recall@k: the mean over queries of the share of the k found ids that are among the exact top k,
    for (Q, k) id arrays (`truth` from exact search, -1 = none).

    With `queries`, `vectors` and the exact `truth_scores` (Q, k), a found id also counts when its
    exact score is within TIE_TOLERANCE of the k-th exact score (as ann-benchmarks counts): items with
    equal embeddings (a catalogue's duplicate titles) are interchangeable, and which of them an
    index returns is not an error."""
    k = truth.shape[1]
    hits = np.array([[f in set(t[t >= 0]) for f in row] for row, t in zip(found, truth)], dtype=bool)
    hits &= found >= 0
    if queries is not None and vectors is not None and truth_scores is not None:
        kth = truth_scores[:, -1]  # (Q,)
        valid = found >= 0
        uniq = np.unique(found[valid])
        if len(uniq):
            vecs = np.asarray(vectors[uniq], dtype=np.float32)
            pos = np.searchsorted(uniq, np.where(valid, found, uniq[0]))
            scores = np.einsum("qd,qkd->qk", np.asarray(queries, dtype=np.float32), vecs[pos])
            hits |= valid & (scores >= kth[:, None] - TIE_TOLERANCE)
    return float(hits.sum() / (len(found) * k)) if len(found) else 0.0


# ---------------------------------------------------------------------------- the index


@dataclass
class VectorIndex:
    """One modality's FAISS index over `vectors` (N, D) unit norm, stored row i = id i.

    `params`: efSearch (hnsw) or nprobe and rerank (compressed). `search` optionally restricts the
    results to a contiguous id range [lo, hi): items are stored sorted by class, so a class-path
    prefix is such a range. A range of at most `exact_max` ids is searched exactly over the stored
    vectors; a larger one through the index with an `IDSelectorRange`.
    """

    kind: str
    index: faiss.Index
    vectors: np.ndarray  # (N, D) float32, usually memory-mapped from the index folder
    params: dict[str, Any] = field(default_factory=dict)
    exact_max: int = EXACT_MAX_ITEMS

    @property
    def n(self) -> int:
        return int(self.index.ntotal)

    def _search_params(self, sel: faiss.IDSelector | None = None) -> faiss.SearchParameters | None:
        if self.kind == "hnsw":
            return faiss.SearchParametersHNSW(efSearch=int(self.params["efSearch"]), sel=sel)
        if self.kind == "compressed":
            return faiss.SearchParametersIVF(nprobe=int(self.params["nprobe"]), sel=sel)
        return faiss.SearchParameters(sel=sel) if sel is not None else None

    def search(self, queries: np.ndarray, k: int, id_range: tuple[int, int] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """queries (Q, D) unit norm -> (Q, k) scores (cosine) and ids, best first, ties by lower id;
        id -1 (score -inf) where there are fewer than k candidates."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        lo, hi = id_range if id_range is not None else (0, self.n)
        if hi <= lo:
            return np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1, np.int64)
        if id_range is not None and (hi - lo <= self.exact_max or self.kind == "exact"):
            return exact_topk(queries, self.vectors[lo:hi], k, offset=lo)
        sel = faiss.IDSelectorRange(lo, hi) if id_range is not None else None
        if self.kind == "compressed":
            return self._search_reranked(queries, k, sel)
        params = self._search_params(sel)
        if self.kind == "hnsw":  # efSearch must be at least k
            params.efSearch = max(params.efSearch, k)
        kk = k + 1 if self.kind == "exact" else k  # one more to see a tie at the k-th place
        scores, ids = self.index.search(queries, kk, params=params)
        scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
        scores, ids = sort_hits(scores, ids.astype(np.int64))
        if self.kind == "exact" and kk <= self.n:
            # FAISS breaks a tie at the k-th place arbitrarily: recompute those queries, ties by lower id
            tied = np.flatnonzero(scores[:, k - 1] == scores[:, k])
            if len(tied):
                scores[tied, :k], ids[tied, :k] = exact_topk(queries[tied], self.vectors, k)
        return scores[:, :k], ids[:, :k]

    def _search_reranked(self, queries: np.ndarray, k: int, sel: faiss.IDSelector | None
                         ) -> tuple[np.ndarray, np.ndarray]:
        """IVF-PQ candidates (k x rerank), re-scored exactly against the stored float vectors."""
        n_cand = max(k, k * int(self.params.get("rerank", RERANK_FACTOR)))
        _, cand = self.index.search(queries, n_cand, params=self._search_params(sel))  # (Q, n_cand)
        cand = cand.astype(np.int64)
        valid = cand >= 0
        uniq = np.unique(cand[valid])
        vecs = np.asarray(self.vectors[uniq], dtype=np.float32) if len(uniq) else np.zeros((0, queries.shape[1]), np.float32)
        pos = np.searchsorted(uniq, np.where(valid, cand, uniq[0] if len(uniq) else 0))
        scores = np.einsum("qd,qcd->qc", queries, vecs[pos]) if len(uniq) else np.zeros(cand.shape, np.float32)
        scores = np.where(valid, scores, -np.inf).astype(np.float32)
        scores, cand = sort_hits(scores, np.where(valid, cand, -1))
        return scores[:, :k], cand[:, :k]


def _tune(index: VectorIndex, name: str, ladder: tuple[int, ...], queries: np.ndarray,
          truth: tuple[np.ndarray, np.ndarray], target: float) -> tuple[int, float]:
    """The smallest value on `ladder` for params[name] whose recall@k on `queries` reaches `target`
    (the largest if none does); returns it and its recall."""
    k = truth[1].shape[1]
    recall = 0.0
    for value in ladder:
        index.params[name] = value
        recall = recall_at_k(index.search(queries, k)[1], truth[1], queries, index.vectors, truth[0])
        if recall >= target:
            return value, recall
    log.warning("%s %s: recall@%d %.3f stays below the target %.2f at the largest %s", index.kind, name, k, recall,
                target, name)
    return ladder[-1], recall


def build_vector_index(vectors: np.ndarray, kind: str, tune_queries: np.ndarray, held_out_queries: np.ndarray,
                       k: int = RECALL_K, target: float = RECALL_TARGET, block_rows: int = 65536,
                       seed: int = 0, exact_max: int = EXACT_MAX_ITEMS, progress: str | None = None
                       ) -> tuple[VectorIndex, dict[str, Any]]:
    """Build an index of `kind` over `vectors` (N, D) unit norm (a memory-mapped array is read in
    blocks), tune its search parameter on `tune_queries` and measure recall@k against exact search
    on `held_out_queries`. Returns the index and what meta.json records about it. `progress`: the
    label of a progress bar over the vectors added (none if None)."""
    from tqdm.auto import tqdm

    n, dim = vectors.shape
    if kind == "exact":
        index = faiss.IndexFlatIP(dim)
        params: dict[str, Any] = {}
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        params = {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION, "efSearch": EF_SEARCH_LADDER[0]}
    elif kind == "compressed":
        if n < COMPRESSED_MIN_ITEMS:
            raise HuseError(f"a compressed index needs at least {COMPRESSED_MIN_ITEMS} items ({n} here)")
        m, nbits = pq_shape(dim, n)
        nlist = ivf_lists(n)
        index = faiss.index_factory(dim, f"IVF{nlist},PQ{m}x{nbits}", faiss.METRIC_INNER_PRODUCT)
        faiss.downcast_index(index).do_polysemous_training = False  # Hamming filtering: unused, slow to train
        rng = np.random.default_rng(seed)
        n_train = min(n, max(64 * nlist, 256 * 39))
        sample = np.sort(rng.choice(n, n_train, replace=False))
        index.train(np.ascontiguousarray(vectors[sample], dtype=np.float32))
        params = {"nlist": nlist, "pq": f"{m}x{nbits}", "nprobe": NPROBE_LADDER[0], "rerank": RERANK_FACTOR}
    else:
        raise HuseError(f"unknown index kind {kind!r}; choose one of {', '.join(KINDS)}")
    with tqdm(total=n, unit="item", desc=progress, disable=progress is None, dynamic_ncols=True) as bar:
        if kind == "hnsw":
            # one call: HNSW built by successive adds was much worse (recall@10 0.92 instead of 0.998 at 400k
            # clustered items) since each call inserts its own high-level nodes after the earlier calls'
            # bottom layer. A C-contiguous float32 memmap is passed as it is (no copy in memory).
            index.add(np.ascontiguousarray(vectors, dtype=np.float32))
            bar.update(n)
        for start in range(0, n if kind != "hnsw" else 0, block_rows):
            block = np.ascontiguousarray(vectors[start:start + block_rows], dtype=np.float32)
            index.add(block)
            bar.update(len(block))
    vi = VectorIndex(kind, index, vectors, params, exact_max)

    k = min(k, n)
    tuned = {}
    if kind != "exact" and len(tune_queries):
        truth = exact_topk(tune_queries, vectors, k, block_rows)
        name, ladder = ("efSearch", EF_SEARCH_LADDER) if kind == "hnsw" else ("nprobe", NPROBE_LADDER)
        ladder = tuple(v for v in ladder if kind == "hnsw" or v <= params["nlist"]) or (params.get("nlist", 1),)
        value, tune_recall = _tune(vi, name, ladder, tune_queries, truth, target)
        vi.params[name] = value
        tuned = {"tuned": name, "tune_recall@10": round(tune_recall, 4), "tune_queries": len(tune_queries)}
    recall = None
    if len(held_out_queries):
        truth_scores, truth = exact_topk(held_out_queries, vectors, k, block_rows)
        recall = recall_at_k(vi.search(held_out_queries, k)[1], truth, held_out_queries, vectors, truth_scores)
    info = {
        "kind": kind,
        "n": int(n),
        "dim": int(dim),
        "params": dict(vi.params),
        f"recall@{RECALL_K}": None if recall is None else round(recall, 4),
        "recall_queries": len(held_out_queries),
        "recall_target": target,
        "bytes_estimate": index_bytes(kind, n, dim),
        **tuned,
    }
    return vi, info


def write_faiss(index: faiss.Index, path: os.PathLike | str) -> None:
    faiss.write_index(index, str(path))


def read_faiss(path: os.PathLike | str) -> faiss.Index:
    try:
        return faiss.read_index(str(path))
    except RuntimeError as exc:
        raise HuseError(f"cannot read the FAISS index {path} ({exc}); rebuild it with `huse index`") from exc
