"""Exact cosine retrieval in chunks, for the retrieval protocol of paper §4.3-4.5 (and later serving).

Similarities are computed block by block (query chunk x gallery chunk), so memory is bounded by
the chunk sizes whatever the split size; top-k lists are merged across gallery chunks and the rank
of a target item is counted exactly. Ties are broken by lower gallery index, always.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

DEFAULT_QUERY_CHUNK = 1024
DEFAULT_GALLERY_CHUNK = 16384


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N, D) rows scaled to unit L2 norm (a zero row stays zero)."""
    return F.normalize(x, dim=-1)


def similarity(query: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """(Q, D) x (G, D) -> (Q, G) float32 dot products (cosine similarity for unit-norm rows).

    Accumulated in float64 and rounded to float32: BLAS kernels sum in a shape-dependent order,
    so plain float32 results differ in the last bit between chunk shapes. After the rounding a
    (query, item) pair gets the same value in every chunking, and identical gallery items (e.g.
    duplicate titles) tie exactly, so the tie rule below applies to them.
    """
    return (query.double() @ gallery.double().T).float()


def _exclude(scores: torch.Tensor, exclude: torch.Tensor | None, start: int) -> torch.Tensor:
    """Set scores[i, exclude[i] - start] to -inf (in place) where that item lies in this chunk (q, g)."""
    if exclude is None:
        return scores
    rows = ((exclude >= start) & (exclude < start + scores.shape[1])).nonzero().squeeze(1)
    if len(rows):
        scores[rows, exclude[rows] - start] = float("-inf")
    return scores


def _keep_topk(scores: torch.Tensor, index: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the k best of candidates (q, M) whose columns are in ascending gallery-index order.

    torch.topk does not say which of several tied values it returns, so it only finds the k-th
    best value; everything above it is kept, and of the items equal to it the lowest-indexed
    ones. The result (q, k) stays in ascending index order.
    """
    kth = torch.topk(scores, k, dim=1).values[:, -1:]  # (q, 1) the k-th best value
    above = scores > kth
    tied = scores == kth
    need = k - above.sum(dim=1, keepdim=True)  # (q, 1) places left for tied items
    keep = above | (tied & (tied.cumsum(dim=1) <= need))  # exactly k per row
    q = scores.shape[0]
    return scores[keep].view(q, k), index[keep].view(q, k)  # boolean indexing keeps column order


def _chunk_topk(scores: torch.Tensor, start: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of one gallery chunk (q, g) -> (q, k) scores and gallery indices, in index order.

    torch.topk is exact whenever the k-th value is not shared with an item it left out; only the
    rows where it is (ties across the cut) go through the slower explicit tie rule.
    """
    k = min(k, scores.shape[1])
    values, pos = torch.topk(scores, k, dim=1)  # (q, k), ties in unspecified order
    kth = values[:, -1:]
    ambiguous = (scores >= kth).sum(dim=1) > k  # (q,) an item tied with the k-th was left out
    if ambiguous.any():
        rows = ambiguous.nonzero().squeeze(1)
        cols = torch.arange(scores.shape[1], device=scores.device).expand(len(rows), -1)
        values[rows], pos[rows] = _keep_topk(scores[rows], cols, k)
    pos, order = pos.sort(dim=1)  # ascending index order, as _keep_topk expects of its input
    return values.gather(1, order), pos + start


def iter_topk(
    query: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    exclude: torch.Tensor | None = None,
    query_chunk: int = DEFAULT_QUERY_CHUNK,
    gallery_chunk: int = DEFAULT_GALLERY_CHUNK,
    progress: str | None = None,
) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """Yield (query slice, scores (q, k), gallery index (q, k)) for each chunk of queries.

    query: (Q, D), gallery: (G, D), unit-norm rows on the same device. Each row lists the k most
    similar gallery items, best first; ties go to the lower gallery index. `exclude` (Q,) names
    one gallery index per query that is never returned (the query itself in in-modal retrieval;
    -1 for none). k is capped at the number of candidates (G, or G - 1 with `exclude`).
    Memory: O(query_chunk x (gallery_chunk + k)). Each gallery chunk is cut to its own top k by
    torch.topk first, then merged with the running best. `progress`: label of a progress bar over
    the query chunks (shown when the loop runs longer than 2 s), or None for none.
    """
    n_query, n_gallery = query.shape[0], gallery.shape[0]
    k = min(k, n_gallery - (1 if exclude is not None else 0))
    if k <= 0:
        raise ValueError(f"cannot retrieve from a gallery of {n_gallery} item(s)")
    starts = range(0, n_query, query_chunk)
    for q0 in tqdm(starts, desc=progress, disable=progress is None, leave=False, delay=2.0):
        q = query[q0:q0 + query_chunk]  # (q, D)
        ex = exclude[q0:q0 + query_chunk] if exclude is not None else None
        # Padding entries (-inf, index -1) sort before every real item, keeping index order.
        best_s = torch.full((q.shape[0], k), float("-inf"), device=q.device)
        best_i = torch.full((q.shape[0], k), -1, dtype=torch.long, device=q.device)
        for g0 in range(0, n_gallery, gallery_chunk):
            s = _exclude(similarity(q, gallery[g0:g0 + gallery_chunk]), ex, g0)  # (q, g)
            chunk_s, chunk_i = _chunk_topk(s, g0, k)  # (q, <=k), indices above every kept one
            best_s, best_i = _keep_topk(torch.cat([best_s, chunk_s], 1), torch.cat([best_i, chunk_i], 1), k)
        # Best first; the stable sort keeps equal scores in ascending index order.
        order = torch.sort(best_s, dim=1, descending=True, stable=True).indices
        yield slice(q0, q0 + q.shape[0]), best_s.gather(1, order), best_i.gather(1, order)


def topk(
    query: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    exclude: torch.Tensor | None = None,
    query_chunk: int = DEFAULT_QUERY_CHUNK,
    gallery_chunk: int = DEFAULT_GALLERY_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """All of `iter_topk` at once: (scores (Q, k), gallery index (Q, k)). Holds O(Q x k)."""
    parts = list(iter_topk(query, gallery, k, exclude, query_chunk, gallery_chunk))
    return torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])


def target_ranks(
    query: torch.Tensor,
    gallery: torch.Tensor,
    target: torch.Tensor,
    exclude: torch.Tensor | None = None,
    query_chunk: int = DEFAULT_QUERY_CHUNK,
    gallery_chunk: int = DEFAULT_GALLERY_CHUNK,
    progress: str | None = None,
) -> torch.Tensor:
    """(Q,) int64 rank (1 = best) of gallery item target[i] for query i, counted exactly.

    rank = 1 + #{gallery items j != target: s_j > s_target, or s_j == s_target and j < target},
    i.e. the position the target would take in the tie-broken ranking of `iter_topk`. `exclude`
    (Q,) removes one gallery item per query from the count (-1 for none).
    """
    ranks = torch.ones(query.shape[0], dtype=torch.long, device=query.device)
    starts = range(0, query.shape[0], query_chunk)
    for q0 in tqdm(starts, desc=progress, disable=progress is None, leave=False, delay=2.0):
        q = query[q0:q0 + query_chunk]  # (q, D)
        t = target[q0:q0 + query_chunk]  # (q,)
        ex = exclude[q0:q0 + query_chunk] if exclude is not None else None
        # Same computation as the gallery blocks below, so the target's own score agrees with them.
        t_score = similarity(q, gallery[t]).diagonal()[:, None]  # (q, 1)
        for g0 in range(0, gallery.shape[0], gallery_chunk):
            s = similarity(q, gallery[g0:g0 + gallery_chunk])  # (q, g)
            idx = torch.arange(g0, g0 + s.shape[1], device=s.device)[None, :]  # (1, g)
            ahead = (s > t_score) | ((s == t_score) & (idx < t[:, None]))
            ahead &= idx != t[:, None]
            if ex is not None:
                ahead &= idx != ex[:, None]
            ranks[q0:q0 + q.shape[0]] += ahead.sum(dim=1)
    return ranks
