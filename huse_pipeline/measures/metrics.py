"""Evaluation metrics of paper §4.3-4.5 (and the complements usually reported beside them: MAP@R, mistake severity, fidelity) as pure functions.

Classification accuracy (per modality and fused), class-level retrieval (R@K, MAP@R), hierarchical
precision HP@K, mistake severity, instance-level recall and median rank, and the fidelity of the
universal space to the semantic graph and the class tree. Tensors in; per-query tensors or floats out.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

RECALL_KS = (1, 5, 10)
HP_KS = (2, 5, 10)


# ------------------------------------------------------------------------------ classification


def true_class_rank(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N, C) class scores, (N,) labels -> (N,) 1-based rank of the true class.

    A class ranks ahead of the true class if its score is higher, or equal with a lower class
    index (the same tie rule as argmax, which returns the first maximum).
    """
    true = scores.gather(1, labels[:, None])  # (N, 1)
    cls = torch.arange(scores.shape[1], device=scores.device)[None, :]  # (1, C)
    ahead = (scores > true) | ((scores == true) & (cls < labels[:, None]))
    return 1 + ahead.sum(dim=1)


def accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy: fraction of items whose highest-scoring class is theirs (ties -> lower class)."""
    return float((true_class_rank(scores, labels) == 1).double().mean())


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Top-k accuracy: fraction of items whose class is among the k highest scores (ties -> lower class)."""
    return float((true_class_rank(scores, labels) <= k).double().mean())


def per_class_accuracy(scores: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(count (C,), recall (C,)) over the items of each class; recall is NaN for absent classes."""
    correct = (true_class_rank(scores, labels) == 1).double()
    count = torch.bincount(labels, minlength=num_classes).double()
    hits = torch.bincount(labels, weights=correct, minlength=num_classes)
    recall = torch.where(count > 0, hits / count.clamp_min(1), torch.full_like(count, float("nan")))
    return count.long().cpu().numpy(), recall.cpu().numpy()


def macro_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean per-class recall (top-1) over the classes present in `labels`."""
    _, recall = per_class_accuracy(scores, labels, scores.shape[1])
    return float(np.nanmean(recall))


def fuse(image_prob: torch.Tensor, text_prob: torch.Tensor, image_weight: float) -> torch.Tensor:
    """(N, C) fused class probabilities w * p_image + (1 - w) * p_text (paper §4.1.3 inference)."""
    return image_weight * image_prob + (1.0 - image_weight) * text_prob


def fusion_grid(step: float = 0.05) -> np.ndarray:
    """Candidate image weights 0, step, ..., 1 (rounded, so 0.5 is on the grid for step 0.05)."""
    n = int(round(1.0 / step))
    return np.round(np.linspace(0.0, 1.0, n + 1), 10)


def tune_fusion_weight(image_prob: torch.Tensor, text_prob: torch.Tensor, labels: torch.Tensor,
                       step: float = 0.05) -> float:
    """The image weight w on `fusion_grid(step)` with the best fused accuracy (on validation data).

    Ties go to the weight closest to 0.5 (equal modalities), then to the lower weight.
    """
    grid = fusion_grid(step)
    acc = np.array([accuracy(fuse(image_prob, text_prob, float(w)), labels) for w in grid])
    best = np.flatnonzero(acc == acc.max())
    return float(grid[min(best, key=lambda i: (abs(grid[i] - 0.5), grid[i]))])


# ------------------------------------------------------------------------ class-level retrieval


def recall_at_k(hits: torch.Tensor, k: int) -> torch.Tensor:
    """(Q, K) bool hits of the ranked list -> (Q,) float: 1 if any of the first k is a hit."""
    return hits[:, :k].any(dim=1).double()


def map_at_r(hits: torch.Tensor, n_relevant: torch.Tensor) -> torch.Tensor:
    """MAP@R (Musgrave et al. 2020) per query: (1/R) sum_{i<=R} P(i) rel(i).

    hits: (Q, K) bool relevance of the ranked list, K >= max R; n_relevant: (Q,) R, the number
    of relevant gallery items of each query. Queries with R = 0 get NaN.
    """
    k = hits.shape[1]
    if n_relevant.numel() and int(n_relevant.max()) > k:
        raise ValueError(f"MAP@R needs the top max(R) = {int(n_relevant.max())} items, got {k}")
    pos = torch.arange(1, k + 1, device=hits.device, dtype=torch.float64)  # (K,)
    rel = hits.double()
    precision = rel.cumsum(dim=1) / pos  # (Q, K) P(i)
    within = pos[None, :] <= n_relevant[:, None]  # (Q, K) i <= R
    total = (precision * rel * within).sum(dim=1)
    r = n_relevant.double()
    return torch.where(r > 0, total / r.clamp_min(1), torch.full_like(r, float("nan")))


def hierarchical_precision(ranked_labels: torch.Tensor, query_labels: torch.Tensor, hp_sets: torch.Tensor,
                           k: int) -> torch.Tensor:
    """HP@K per query (DeViSE, Frome et al. 2013; paper §4.5): fraction of the first K retrieved items whose class is
    in S_K(query class). ranked_labels: (Q, >=K) (fewer columns: the whole list is used);
    hp_sets: (C, C) bool from `hierarchy.hierarchical_sets(tree_dist, K)`."""
    top = ranked_labels[:, :k]  # (Q, K)
    return hp_sets[query_labels[:, None], top].double().mean(dim=1)


def mistake_severity(top1_labels: torch.Tensor, query_labels: torch.Tensor, tree_dist: torch.Tensor) -> torch.Tensor:
    """Per query: tree distance between the query's class and its top-1 item's class if they differ
    (a mistake), NaN if the top-1 is right (Bertinetto et al., "Making Better Mistakes", 2020)."""
    dist = tree_dist[query_labels, top1_labels].double()
    return torch.where(top1_labels != query_labels, dist, torch.full_like(dist, float("nan")))


def class_retrieval_per_query(
    ranked_labels: torch.Tensor,
    query_labels: torch.Tensor,
    n_relevant: torch.Tensor,
    tree_dist: torch.Tensor,
    hp_sets: dict[int, torch.Tensor],
    ks: Sequence[int] = RECALL_KS,
) -> dict[str, torch.Tensor]:
    """Class-level retrieval metrics of each query, (Q,) float64 each, NaN where undefined.

    ranked_labels: (Q, K) classes of the retrieved gallery items, best first, with the query
    itself already left out of in-modal galleries; K >= max(ks), max(hp_sets) and max(n_relevant).
    n_relevant: (Q,) gallery items of the query's class (not counting the query itself).
    - R@k: 1 if an item of the query's class is among the first k. Queries with no relevant item
      in the gallery (a class with one item, in-modal) are undefined (NaN) and left out of means.
    - MAP@R: see `map_at_r`, same exclusion.
    - HP@k: see `hierarchical_precision`; defined for every query.
    - severity: see `mistake_severity`; defined for the queries whose top-1 is wrong, except
      those with no relevant item in the gallery, whose top-1 cannot be right (a forced mistake
      says nothing about the space).
    """
    hits = ranked_labels == query_labels[:, None]  # (Q, K)
    defined = n_relevant > 0
    nan = torch.full(query_labels.shape, float("nan"), dtype=torch.float64, device=query_labels.device)
    out = {f"R@{k}": torch.where(defined, recall_at_k(hits, k), nan) for k in ks}
    out["MAP@R"] = map_at_r(hits, n_relevant)
    for k, sets in hp_sets.items():
        out[f"HP@{k}"] = hierarchical_precision(ranked_labels, query_labels, sets, k)
    out["severity"] = torch.where(defined, mistake_severity(ranked_labels[:, 0], query_labels, tree_dist), nan)
    return out


def mean_or_none(values: torch.Tensor | np.ndarray) -> float | None:
    """Mean over the defined (non-NaN) entries; None if there are none (written as JSON null)."""
    v = torch.as_tensor(values, dtype=torch.float64)
    v = v[~torch.isnan(v)]
    return float(v.mean()) if v.numel() else None


def class_retrieval(
    ranked_labels: torch.Tensor,
    query_labels: torch.Tensor,
    n_relevant: torch.Tensor,
    tree_dist: torch.Tensor,
    hp_sets: dict[int, torch.Tensor],
    ks: Sequence[int] = RECALL_KS,
) -> dict[str, float | None]:
    """Means of `class_retrieval_per_query` over the queries where each is defined."""
    per_query = class_retrieval_per_query(ranked_labels, query_labels, n_relevant, tree_dist, hp_sets, ks)
    return {key: mean_or_none(v) for key, v in per_query.items()}


# --------------------------------------------------------------------- instance-level retrieval


def instance_retrieval(ranks: torch.Tensor, ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """From (Q,) 1-based ranks of each query's own paired item (its only hit): inst_R@k, the
    fraction with rank <= k, and medr, the median rank (1 = best; mean of the middle two if Q is even)."""
    r = ranks.double()
    out = {f"inst_R@{k}": float((r <= k).double().mean()) for k in ks}
    out["medr"] = float(np.median(r.cpu().numpy()))
    return out


# ----------------------------------------------------------------------- attribute-aware search


def attribute_search(ranked: torch.Tensor, query_colour: torch.Tensor, query_label: torch.Tensor,
                     item_colour: torch.Tensor, item_label: torch.Tensor) -> dict[str, float]:
    """Shares of the retrieved items that match a "<colour> <class>" query, averaged over the queries.

    ranked: (Q, K) gallery indices of each query's top K; query_colour, query_label: (Q,) the colour id
    and the class the query names; item_colour, item_label: (G,) those of each gallery item (colour
    -1: unknown, never a match). Returns `colour_class@K`, the mean share of the top K matching both
    colour and class, `class@K` (the class only) and `colour@K` (the colour only).
    """
    k = ranked.shape[1]
    colour_hit = (item_colour[ranked] == query_colour[:, None]) & (item_colour[ranked] >= 0)  # (Q, K)
    class_hit = item_label[ranked] == query_label[:, None]  # (Q, K)
    share = lambda hit: float(hit.double().mean(dim=1).mean())  # noqa: E731
    return {f"colour_class@{k}": share(colour_hit & class_hit), f"class@{k}": share(class_hit),
            f"colour@{k}": share(colour_hit)}


# ------------------------------------------------------------------------- the universal space


def class_centroids(image_emb: torch.Tensor, text_emb: torch.Tensor, labels: torch.Tensor,
                    num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, D) class centroids and (C,) bool presence.

    centroid_c = normalise(mean of the L2-normalised image AND text embeddings of the class's
    items), i.e. both modalities pooled with equal weight per item; rows of absent classes are 0.
    """
    emb = torch.cat([F.normalize(image_emb.double(), dim=1), F.normalize(text_emb.double(), dim=1)])  # (2N, D)
    lab = torch.cat([labels, labels])
    sums = torch.zeros(num_classes, emb.shape[1], dtype=emb.dtype, device=emb.device).index_add_(0, lab, emb)
    present = torch.bincount(labels, minlength=num_classes) > 0
    return F.normalize(sums, dim=1), present


def centroid_fidelity(centroids: torch.Tensor, present: torch.Tensor, target: np.ndarray) -> float | None:
    """Spearman correlation between the cosine distances of class centroids and `target` (C, C)
    (the semantic graph A or the tree distances) over the class pairs i < j present in the split.

    None when it is undefined: fewer than two pairs, or a constant side (e.g. flat labels, whose
    tree distances are all equal).
    """
    idx = np.flatnonzero(present.cpu().numpy())
    c = centroids[idx].double()
    dist = (1.0 - c @ c.T).cpu().numpy()  # (P, P) cosine distances
    i, j = np.triu_indices(len(idx), k=1)
    if len(i) < 2:
        return None
    t = np.asarray(target, dtype=np.float64)[idx][:, idx][i, j]
    d = dist[i, j]
    if np.ptp(t) == 0 or np.ptp(d) == 0:
        return None
    rho = spearmanr(d, t).statistic
    return None if math.isnan(rho) else float(rho)


def cross_modal_gap(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """Eq. 12, the one implementation (train's gap loss and `modality_gap` call it): the mean cosine
    distance (1/N) sum_n 1 - image_n . text_n between each item's two embeddings.

    image_emb, text_emb: (N, D), L2-normalised, row n of each is item n -> 0-dim tensor in their
    dtype, differentiable. Zero when they coincide, 2 when they are opposite.
    """
    return (1.0 - (image_emb * text_emb).sum(dim=-1)).mean()


def modality_gap(image_emb: torch.Tensor, text_emb: torch.Tensor) -> float:
    """`cross_modal_gap` of (N, D) embeddings of any norm, normalised here, in float64."""
    return float(cross_modal_gap(F.normalize(image_emb.double(), dim=1), F.normalize(text_emb.double(), dim=1)))
