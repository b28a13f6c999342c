"""Exact cosine retrieval in chunks, for the retrieval protocol of paper §4.3-4.5 (and later serving).

Similarities are computed block by block (query chunk x gallery chunk), so memory is bounded by
the chunk sizes whatever the split size; top-k lists are merged across gallery chunks and the rank
of a target item is counted exactly. Ties are broken by lower gallery index, always. `iter_topk` and
`target_ranks` hold the gallery; `GalleryScan` takes it a block at a time (a gallery streamed from a
file) and computes the same tiles, so both give the same answers.

Precision (`similarity`): `float64` accumulates in float64 and rounds to float32, so a (query, item)
pair gets the same score in every chunking; `float32` is a plain float32 matmul, 2-3x faster on a
CPU (far more on a GPU), whose last bit can depend on the tile a pair is computed in. Both paths cut
the gallery into the same tiles (multiples of gallery_chunk from item 0, the queries into
query_chunk rows), so `float32` answers do not depend on whether the gallery was streamed, and equal
items inside a tile still tie exactly.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

DEFAULT_QUERY_CHUNK = 1024
DEFAULT_GALLERY_CHUNK = 16384
PRECISIONS = ("float64", "float32")


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N, D) rows scaled to unit L2 norm (a zero row stays zero)."""
    return F.normalize(x, dim=-1)


def similarity(query: torch.Tensor, gallery: torch.Tensor, precision: str = "float64") -> torch.Tensor:
    """(Q, D) x (G, D) -> (Q, G) float32 dot products (cosine similarity for unit-norm rows).

    `float64` (the default): accumulated in float64 and rounded to float32. BLAS kernels sum in a
    shape-dependent order, so plain float32 results differ in the last bit between chunk shapes.
    After the rounding a (query, item) pair gets the same value in every chunking, and identical
    gallery items (e.g. duplicate titles) tie exactly, so the tie rule below applies to them.
    `float32`: one float32 matmul (TF32 is not used: torch's default), see the module docstring.
    """
    if precision == "float32":
        return query.float() @ gallery.float().T
    if precision != "float64":
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
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


def _candidates(kth: torch.Tensor, scores: torch.Tensor, start: int,
                k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The items of one gallery tile scores (q, g), items start..start+g-1, that may enter top-k lists
    whose k-th best is kth (q, 1) (-inf: not full yet): (q, m) scores and indices, each row in
    ascending index order, padded with (-inf, -1); None when no item qualifies.

    Only items scoring above a row's k-th best can enter (a tied later item loses to the kept one).
    While the lists fill up, the tile is cut to its top k by `_chunk_topk`; once they are full, few
    items qualify as a rule, and just those are gathered. (Padding entries may then sit after real
    ones; they tie only with each other and never outrank a real item.)
    """
    q, g = scores.shape
    rows = cols = None
    if not torch.isinf(kth).any():
        rows, cols = (scores > kth).nonzero(as_tuple=True)  # row-major: ascending columns within each row
        if len(rows) == 0:
            return None
    if rows is None or 4 * len(rows) > q * g:  # most of the tile qualifies: cut it to its top k
        return _chunk_topk(scores, start, k)  # (q, <=k), indices above every kept one
    counts = torch.bincount(rows, minlength=q)  # (q,) items that qualify, per row
    slot = torch.arange(len(rows), device=scores.device) - (torch.cumsum(counts, 0) - counts)[rows]
    most = int(counts.max())
    chunk_s = torch.full((q, most), float("-inf"), dtype=scores.dtype, device=scores.device)
    chunk_i = torch.full((q, most), -1, dtype=torch.long, device=scores.device)
    chunk_s[rows, slot] = scores[rows, cols]
    chunk_i[rows, slot] = cols + start
    return chunk_s, chunk_i


def _merge_tile(best_s: torch.Tensor, best_i: torch.Tensor, scores: torch.Tensor, start: int,
                k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The running top k (q, k) of some queries, in ascending index order, merged with one gallery tile
    scores (q, g) whose items start..start+g-1 all lie above every kept index (`_candidates`): the
    exact top k by (score, then lower index)."""
    cand = _candidates(best_s.min(dim=1, keepdim=True).values, scores, start, k)
    if cand is None:
        return best_s, best_i
    return _keep_topk(torch.cat([best_s, cand[0]], 1), torch.cat([best_i, cand[1]], 1), k)


def _ahead(scores: torch.Tensor, t_score: torch.Tensor, target: torch.Tensor, exclude: torch.Tensor | None,
           start: int) -> torch.Tensor:
    """(q,) gallery items of one tile (q, g), items start..start+g-1, ranked ahead of each query's target:
    a higher score, or an equal score and a lower index; neither the target nor `exclude` counts.

    One comparison per score: a row whose target comes after the whole tile counts score >= target's
    (the threshold moved to the next float down), a row whose target came before it score > target's;
    the few rows whose target lies in the tile take the rule item by item.
    """
    g = scores.shape[1]
    end = start + g
    after = target >= end  # (q,) every item of the tile has a lower index than the target
    inside = (target >= start) & ~after
    threshold = torch.where(after[:, None], torch.nextafter(t_score, torch.full_like(t_score, float("-inf"))),
                            t_score)  # (q, 1)
    small = torch.int16 if g < 2**15 else torch.int32  # narrow sums of int8 are the fast ones on a CPU
    count = (scores > threshold).view(torch.int8).sum(dim=1, dtype=small).long()  # (q,)
    rows = inside.nonzero().squeeze(1)
    if len(rows):
        idx = torch.arange(start, end, device=scores.device)[None, :]  # (1, g)
        s, t = scores[rows], t_score[rows]
        ahead = (s > t) | ((s == t) & (idx < target[rows, None]))
        ahead &= idx != target[rows, None]
        if exclude is not None:
            ahead &= idx != exclude[rows, None]
        count[rows] = ahead.sum(dim=1)
    if exclude is not None:  # the excluded item, where it lies in the tile of a row counted by the threshold
        out = ((exclude >= start) & (exclude < end) & ~inside).nonzero().squeeze(1)
        if len(out):
            count[out] -= (scores[out, exclude[out] - start] > threshold[out, 0]).long()
    return count


def iter_topk(
    query: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    exclude: torch.Tensor | None = None,
    query_chunk: int = DEFAULT_QUERY_CHUNK,
    gallery_chunk: int = DEFAULT_GALLERY_CHUNK,
    progress: str | None = None,
    precision: str = "float64",
) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """Yield (query slice, scores (q, k), gallery index (q, k)) for each chunk of queries.

    query: (Q, D), gallery: (G, D), unit-norm rows on the same device. Each row lists the k most
    similar gallery items, best first; ties go to the lower gallery index. `exclude` (Q,) names
    one gallery index per query that is never returned (the query itself in in-modal retrieval;
    -1 for none). k is capped at the number of candidates (G, or G - 1 with `exclude`).
    Memory: O(query_chunk x (gallery_chunk + k)). Each gallery chunk is cut to its own top k by
    torch.topk first (to fewer once the lists fill up: `_merge_tile`), then merged with the running
    best. `progress`: label of a progress bar over the query chunks (shown when the loop runs longer
    than 2 s), or None for none. `precision`: see `similarity`.
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
            s = _exclude(similarity(q, gallery[g0:g0 + gallery_chunk], precision), ex, g0)  # (q, g)
            best_s, best_i = _merge_tile(best_s, best_i, s, g0, k)
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
    precision: str = "float64",
) -> tuple[torch.Tensor, torch.Tensor]:
    """All of `iter_topk` at once: (scores (Q, k), gallery index (Q, k)). Holds O(Q x k)."""
    parts = list(iter_topk(query, gallery, k, exclude, query_chunk, gallery_chunk, precision=precision))
    return torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])


def target_ranks(
    query: torch.Tensor,
    gallery: torch.Tensor,
    target: torch.Tensor,
    exclude: torch.Tensor | None = None,
    query_chunk: int = DEFAULT_QUERY_CHUNK,
    gallery_chunk: int = DEFAULT_GALLERY_CHUNK,
    progress: str | None = None,
    precision: str = "float64",
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
        t_score = _target_score(q, gallery[t], precision)  # (q, 1)
        for g0 in range(0, gallery.shape[0], gallery_chunk):
            s = similarity(q, gallery[g0:g0 + gallery_chunk], precision)  # (q, g)
            ranks[q0:q0 + q.shape[0]] += _ahead(s, t_score, t, ex, g0)
    return ranks


def _target_score(query: torch.Tensor, target_emb: torch.Tensor, precision: str) -> torch.Tensor:
    """(q, D), (q, D) the queries and their targets' rows -> (q, 1) each query's score of its target.
    Same computation as the gallery tiles, so the target's own score agrees with them (float64)."""
    return similarity(query, target_emb, precision).diagonal()[:, None]


class GalleryScan:
    """`iter_topk` and `target_ranks` for a gallery that arrives a block at a time, in ascending order
    (a split streamed from a feature file and embedded on the fly): only the queries, their top-k
    lists (Q x k) and their rank counters are held.

    query: (Q, D) unit-norm rows. k: length of each list (None: ranks only), capped as in iter_topk
    at n_gallery (- 1 with `exclude`). exclude: (Q,) one gallery index per query never returned nor
    counted (-1: none). target, target_emb: (Q,) gallery index of each query's target and (Q, D) its
    row (known ahead: the query's own paired item), for `ranks()`. Each block must start at a multiple
    of gallery_chunk (the last may be short): it is cut into the same gallery tiles, and the queries
    into the same query chunks, as iter_topk and target_ranks cut them, so every answer equals theirs.
    """

    def __init__(self, query: torch.Tensor, n_gallery: int, k: int | None, exclude: torch.Tensor | None = None,
                 target: torch.Tensor | None = None, target_emb: torch.Tensor | None = None,
                 query_chunk: int = DEFAULT_QUERY_CHUNK, gallery_chunk: int = DEFAULT_GALLERY_CHUNK,
                 precision: str = "float64") -> None:
        self.query, self.n_gallery, self.exclude = query, n_gallery, exclude
        self.query_chunk, self.gallery_chunk, self.precision = query_chunk, gallery_chunk, precision
        self.seen = 0  # gallery items added so far
        n, dev = query.shape[0], query.device
        self.k = None if k is None else min(k, n_gallery - (1 if exclude is not None else 0))
        if self.k is not None and self.k <= 0:
            raise ValueError(f"cannot retrieve from a gallery of {n_gallery} item(s)")
        # Padding entries (-inf, index -1) sort before every real item, keeping index order.
        self.best_s = None if k is None else torch.full((n, self.k), float("-inf"), device=dev)
        self.best_i = None if k is None else torch.full((n, self.k), -1, dtype=torch.long, device=dev)
        self.target = target
        self._pending: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # query chunk -> tiles' candidates
        self._kth: dict[int, torch.Tensor] = {}  # query chunk -> (q, 1) k-th best at its last merge
        self._ranks = self._t_score = None
        if target is not None:
            self._ranks = torch.ones(n, dtype=torch.long, device=dev)
            self._t_score = torch.cat([_target_score(query[q0:q0 + query_chunk], target_emb[q0:q0 + query_chunk],
                                                     precision) for q0 in range(0, n, query_chunk)])  # (Q, 1)

    def add(self, start: int, block: torch.Tensor) -> None:
        """Gallery items start .. start + len(block) - 1, (g, D) unit-norm rows on the queries' device."""
        if start != self.seen or start % self.gallery_chunk:
            raise ValueError(f"gallery blocks must come in order, starting at multiples of {self.gallery_chunk}; "
                             f"got {start} after {self.seen} items")
        for t0 in range(0, block.shape[0], self.gallery_chunk):
            tile, g0 = block[t0:t0 + self.gallery_chunk], start + t0
            for q0 in range(0, self.query.shape[0], self.query_chunk):
                sl = slice(q0, q0 + self.query_chunk)
                ex = self.exclude[sl] if self.exclude is not None else None
                s = similarity(self.query[sl], tile, self.precision)  # (q, g)
                if self._ranks is not None:
                    self._ranks[sl] += _ahead(s, self._t_score[sl], self.target[sl], ex, g0)
                if self.best_s is not None:
                    self._offer(q0, sl, _exclude(s, ex, g0), g0)
        self.seen += block.shape[0]

    def _offer(self, q0: int, sl: slice, scores: torch.Tensor, g0: int) -> None:
        """Hold a tile's candidates for one query chunk; merge them into the lists once they add up to k
        (against the k-th best of the last merge: a lower bar than the current one, so nothing is lost)."""
        kth = self._kth.get(q0)
        if kth is None:
            kth = self._kth[q0] = self.best_s[sl].min(dim=1, keepdim=True).values
        cand = _candidates(kth, scores, g0, self.k)
        if cand is None:
            return
        pending = self._pending.setdefault(q0, [])
        pending.append(cand)
        if sum(c[0].shape[1] for c in pending) >= self.k or torch.isinf(kth).any():
            self._merge(q0, sl)

    def _merge(self, q0: int, sl: slice) -> None:
        pending = self._pending.pop(q0, [])
        if pending:
            self.best_s[sl], self.best_i[sl] = _keep_topk(torch.cat([self.best_s[sl], *(c[0] for c in pending)], 1),
                                                          torch.cat([self.best_i[sl], *(c[1] for c in pending)], 1),
                                                          self.k)
            self._kth[q0] = self.best_s[sl].min(dim=1, keepdim=True).values

    def _check_complete(self) -> None:
        if self.seen != self.n_gallery:
            raise ValueError(f"the scan has seen {self.seen} of {self.n_gallery} gallery items")

    def topk(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores (Q, k), gallery index (Q, k)), best first, ties by lower index: `topk`'s answer."""
        self._check_complete()
        for q0 in list(self._pending):
            self._merge(q0, slice(q0, q0 + self.query_chunk))
        order = torch.sort(self.best_s, dim=1, descending=True, stable=True).indices
        return self.best_s.gather(1, order), self.best_i.gather(1, order)

    def ranks(self) -> torch.Tensor:
        """(Q,) int64 rank of each query's target: `target_ranks`'s answer."""
        self._check_complete()
        return self._ranks
