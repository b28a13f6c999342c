"""Chunked exact retrieval: against a sorted plain-loop reference, chunk-size invariance, tie rules."""
from __future__ import annotations

import pytest
import torch

from huse_pipeline.measures.retrieval import GalleryScan, iter_topk, l2_normalize, similarity, target_ranks, topk

CHUNKS = [(1, 1), (3, 7), (7, 3), (1000, 1000)]


def reference_ranking(sim: torch.Tensor, exclude: list[int] | None) -> list[list[int]]:
    """Every gallery index per query, sorted by (-similarity, index), the excluded one left out."""
    out = []
    for a in range(sim.shape[0]):
        cand = [j for j in range(sim.shape[1]) if exclude is None or j != exclude[a]]
        out.append(sorted(cand, key=lambda j: (-float(sim[a, j]), j)))
    return out


def tied_embeddings(n: int, seed: int) -> torch.Tensor:
    """Small-integer vectors: many exact ties and duplicate rows (like duplicate product titles)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 2, (n, 3), generator=g).float()


@pytest.mark.parametrize("chunks", CHUNKS)
@pytest.mark.parametrize("in_modal", [True, False])
@pytest.mark.parametrize("k", [1, 4, 18])
def test_topk_matches_plain_sort_with_ties(chunks, in_modal, k):
    query = tied_embeddings(19, 0)
    gallery = query if in_modal else tied_embeddings(23, 1)
    exclude = torch.arange(19) if in_modal else None
    scores, index = topk(query, gallery, k, exclude, *chunks)
    ref = reference_ranking(similarity(query, gallery), exclude.tolist() if in_modal else None)
    assert index.tolist() == [r[:k] for r in ref]
    assert torch.equal(scores, similarity(query, gallery).gather(1, index))


@pytest.mark.parametrize("chunks", CHUNKS)
def test_chunked_is_exactly_unchunked_on_random_floats(chunks):
    g = torch.Generator().manual_seed(3)
    query = l2_normalize(torch.randn(37, 16, generator=g))
    gallery = l2_normalize(torch.randn(41, 16, generator=g))
    gallery[10] = gallery[2]  # an exact duplicate must tie in every chunking
    full_s, full_i = topk(query, gallery, 12, None, 10_000, 10_000)
    s, i = topk(query, gallery, 12, None, *chunks)
    assert torch.equal(i, full_i) and torch.equal(s, full_s)
    target = torch.arange(37) % 41
    assert torch.equal(target_ranks(query, gallery, target, None, *chunks),
                       target_ranks(query, gallery, target, None, 10_000, 10_000))


def test_duplicate_rows_score_identically_whatever_the_chunk():
    g = torch.Generator().manual_seed(5)
    gallery = l2_normalize(torch.randn(50, 64, generator=g))
    gallery[33] = gallery[4]
    query = l2_normalize(torch.randn(9, 64, generator=g))
    _, index = topk(query, gallery, 50, None, 2, 5)
    for row in index.tolist():  # the duplicate pair is adjacent, lower index first
        assert row.index(33) == row.index(4) + 1


@pytest.mark.parametrize("chunks", CHUNKS)
def test_all_equal_similarities_return_lowest_indices_first(chunks):
    query, gallery = torch.ones(4, 2), torch.ones(9, 2)
    _, index = topk(query, gallery, 5, None, *chunks)
    assert index.tolist() == [[0, 1, 2, 3, 4]] * 4
    _, index = topk(gallery, gallery, 3, torch.arange(9), *chunks)
    assert index[0].tolist() == [1, 2, 3] and index[1].tolist() == [0, 2, 3] and index[5].tolist() == [0, 1, 2]
    ranks = target_ranks(query, gallery, torch.tensor([0, 3, 8, 5]), None, *chunks)
    assert ranks.tolist() == [1, 4, 9, 6]  # ties with lower index count as ahead


def test_identity_and_permuted_identity():
    eye = torch.eye(6)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    _, index = topk(eye, eye[perm], 1)
    assert index[:, 0].tolist() == torch.argsort(perm).tolist()  # query i finds where row i went
    assert target_ranks(eye, eye[perm], torch.argsort(perm)).tolist() == [1] * 6
    assert target_ranks(eye, eye[perm], perm).tolist() != [1] * 6


@pytest.mark.parametrize("chunks", CHUNKS)
@pytest.mark.parametrize("with_exclude", [False, True])
def test_target_ranks_match_position_in_reference_ranking(chunks, with_exclude):
    query = tied_embeddings(17, 2)
    gallery = tied_embeddings(17, 4)
    target = torch.tensor([(3 * i + 1) % 17 for i in range(17)])
    exclude = torch.tensor([(3 * i + 2) % 17 for i in range(17)]) if with_exclude else None
    ranks = target_ranks(query, gallery, target, exclude, *chunks)
    ref = reference_ranking(similarity(query, gallery), exclude.tolist() if with_exclude else None)
    assert ranks.tolist() == [ref[a].index(int(target[a])) + 1 for a in range(17)]


def test_k_is_capped_and_iter_yields_every_query_once():
    x = tied_embeddings(5, 7)
    chunks = list(iter_topk(x, x, 100, torch.arange(5), query_chunk=2, gallery_chunk=2))
    assert [c[0] for c in chunks] == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert all(c[2].shape[1] == 4 for c in chunks)  # G - 1 candidates
    for sl, _, index in chunks:
        for row, q in zip(index.tolist(), range(sl.start, sl.stop)):
            assert sorted(row) == [j for j in range(5) if j != q]
    with pytest.raises(ValueError):
        topk(x[:1], x[:1], 1, torch.arange(1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")
def test_cuda_matches_cpu():
    query = tied_embeddings(30, 8)
    s_cpu, i_cpu = topk(query, query, 7, torch.arange(30), 4, 6)
    s_gpu, i_gpu = topk(query.cuda(), query.cuda(), 7, torch.arange(30).cuda(), 4, 6)
    assert torch.equal(i_gpu.cpu(), i_cpu) and torch.equal(s_gpu.cpu(), s_cpu)


# ------------------------------------------------------------- a gallery that arrives in blocks


def scan(query, gallery, k, exclude=None, target=None, blocks=1, chunks=(3, 4), precision="float64"):
    """GalleryScan fed `gallery` in blocks of `blocks` gallery chunks."""
    qc, gc = chunks
    s = GalleryScan(query, gallery.shape[0], k, exclude, target, None if target is None else gallery[target], qc, gc,
                    precision)
    step = blocks * gc
    for b0 in range(0, gallery.shape[0], step):
        s.add(b0, gallery[b0:b0 + step])
    return s


@pytest.mark.parametrize("chunks", [(1, 1), (3, 4), (7, 3), (100, 100)])
@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_gallery_scan_gives_topk_and_target_ranks(chunks, precision):
    query = tied_embeddings(19, 0)  # ties and duplicates: the tie rule decides most places
    gallery = tied_embeddings(23, 1)
    target = torch.tensor([(5 * i + 2) % 23 for i in range(19)])
    for blocks in (1, 2, 10):
        s = scan(query, gallery, 9, None, target, blocks, chunks, precision)
        want_s, want_i = topk(query, gallery, 9, None, *chunks, precision=precision)
        got_s, got_i = s.topk()
        assert torch.equal(got_i, want_i) and torch.equal(got_s, want_s)
        assert torch.equal(s.ranks(), target_ranks(query, gallery, target, None, *chunks, precision=precision))
    # in-modal, the query excluded
    s = scan(query, query, 5, torch.arange(19), None, 1, chunks, precision)
    assert torch.equal(s.topk()[1], topk(query, query, 5, torch.arange(19), *chunks, precision=precision)[1])


def test_gallery_scan_on_random_floats_and_ranks_only():
    g = torch.Generator().manual_seed(9)
    query = l2_normalize(torch.randn(33, 16, generator=g))
    gallery = l2_normalize(torch.randn(70, 16, generator=g))
    gallery[40] = gallery[3]
    target = torch.arange(33) * 2
    for precision in ("float64", "float32"):
        s = scan(query, gallery, None, None, target, 3, (8, 8), precision)
        assert torch.equal(s.ranks(), target_ranks(query, gallery, target, None, 8, 8, precision=precision))
        assert s.best_s is None
        s = scan(query, gallery, 70, None, None, 2, (8, 8), precision)
        assert torch.equal(s.topk()[1], topk(query, gallery, 70, None, 8, 8, precision)[1])


def test_float32_answers_match_float64_where_float32_is_exact():
    query, gallery = tied_embeddings(15, 3), tied_embeddings(31, 4)  # small integers: exact in float32
    for chunks in CHUNKS:
        assert torch.equal(topk(query, gallery, 6, None, *chunks, precision="float32")[1],
                           topk(query, gallery, 6, None, *chunks)[1])
    assert similarity(query, gallery, "float32").dtype == torch.float32
    with pytest.raises(ValueError, match="precision"):
        similarity(query, gallery, "bfloat16")


def test_gallery_scan_refuses_misaligned_or_incomplete_galleries():
    x = tied_embeddings(10, 5)
    s = GalleryScan(x, 10, 3, query_chunk=4, gallery_chunk=4)
    with pytest.raises(ValueError, match="multiples of 4"):
        s.add(2, x[2:6])
    s.add(0, x[:4])
    with pytest.raises(ValueError, match="seen 4 of 10"):
        s.topk()
    with pytest.raises(ValueError, match="in order"):
        s.add(8, x[8:])
    with pytest.raises(ValueError):
        GalleryScan(x[:1], 1, 1, exclude=torch.zeros(1, dtype=torch.long))
