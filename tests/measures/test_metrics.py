"""Metrics against plain loops, hand-computed hierarchies and pytorch-metric-learning."""
from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from huse_pipeline.data.hierarchy import Hierarchy, hierarchical_sets
from huse_pipeline.eval.evaluate import retrieval_metrics
from huse_pipeline.measures import metrics
from huse_pipeline.measures.retrieval import l2_normalize


def sets_for(tree: np.ndarray) -> dict[int, torch.Tensor]:
    return {k: torch.as_tensor(hierarchical_sets(tree, k)) for k in metrics.HP_KS}


# ------------------------------------------------------------------------------ classification


def test_accuracy_topk_and_ties_go_to_lower_class():
    scores = torch.tensor([[0.1, 0.7, 0.2], [0.4, 0.4, 0.2], [0.4, 0.4, 0.2], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 0, 1, 0])
    assert metrics.true_class_rank(scores, labels).tolist() == [1, 1, 2, 3]
    assert metrics.accuracy(scores, labels) == 0.5
    assert metrics.topk_accuracy(scores, labels, 2) == 0.75
    assert metrics.topk_accuracy(scores, labels, 3) == 1.0


def test_macro_accuracy_is_mean_recall_over_present_classes():
    scores = torch.eye(4)[[0, 0, 0, 1, 2, 2]]  # predictions
    labels = torch.tensor([0, 0, 1, 1, 2, 2])  # class 3 absent
    count, recall = metrics.per_class_accuracy(scores, labels, 4)
    assert count.tolist() == [2, 2, 2, 0]
    assert recall[:3].tolist() == [1.0, 0.5, 1.0] and math.isnan(recall[3])
    assert metrics.macro_accuracy(scores, labels) == pytest.approx(2.5 / 3)
    assert metrics.accuracy(scores, labels) == pytest.approx(5 / 6)


def test_fusion_weight_tuning_and_ties():
    labels = torch.tensor([0, 1])
    right = torch.eye(2)
    # both modalities right: every weight ties -> 0.5
    assert metrics.tune_fusion_weight(right, right, labels) == 0.5
    # item 1: image weakly right (0.6), text sure and wrong: right iff 0.6 w > 0.4 w + (1 - w), w > 5/6
    image = torch.tensor([[1.0, 0.0], [0.4, 0.6]])
    text = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    w = metrics.tune_fusion_weight(image, text, labels)
    assert w == pytest.approx(0.85)
    assert metrics.accuracy(metrics.fuse(image, text, w), labels) == 1.0
    assert metrics.accuracy(metrics.fuse(image, text, 0.5), labels) == 0.5
    # symmetric case: weights <= 1/6 and >= 5/6 both win -> the two closest to 0.5 tie -> the lower
    assert metrics.tune_fusion_weight(torch.eye(2)[[0, 0]], torch.eye(2)[[1, 1]], torch.tensor([0, 1])) == 0.5
    assert metrics.fusion_grid(0.05)[10] == 0.5 and len(metrics.fusion_grid(0.05)) == 21


# ------------------------------------------------------------------------ class-level retrieval


def reference_class_metrics(sim: np.ndarray, labels: np.ndarray, in_modal: bool, tree: np.ndarray) -> dict:
    """Plain loops over queries: sort the gallery by (-sim, index), drop the query if in-modal."""
    per = {k: [] for k in ["R@1", "R@5", "R@10", "MAP@R", "HP@2", "HP@5", "HP@10", "severity"]}
    n_classes = tree.shape[0]
    for q in range(len(labels)):
        order = sorted((j for j in range(len(labels)) if not (in_modal and j == q)), key=lambda j: (-sim[q, j], j))
        rel = [labels[j] == labels[q] for j in order]
        r = sum(rel)
        for k in (1, 5, 10):
            per[f"R@{k}"].append(float(any(rel[:k])) if r else math.nan)
        if r:
            ap = sum(sum(rel[:i + 1]) / (i + 1) for i in range(r) if rel[i]) / r
            per["MAP@R"].append(ap)
        for k in (2, 5, 10):
            # S_K(y): smallest radius whose ball holds at least min(K, C) classes
            radius = sorted(tree[labels[q]])[min(k, n_classes) - 1]
            ok = [tree[labels[q], labels[j]] <= radius for j in order[:k]]
            per[f"HP@{k}"].append(sum(ok) / len(ok))
        if r and labels[order[0]] != labels[q]:  # a lone in-modal query's mistake is forced: left out
            per["severity"].append(tree[labels[q], labels[order[0]]])
    return {k: (float(np.nanmean(v)) if len(v) and not np.all(np.isnan(v)) else None) for k, v in per.items()}


def random_setup(seed: int, n: int = 40, d: int = 6):
    rng = np.random.default_rng(seed)
    names = ["a<p<1", "a<p<2", "a<q<3", "a<q<4", "b<r<5", "b<s<6", "b<s<7"]
    labels = rng.integers(0, len(names), n)
    labels[0] = 6
    labels[labels == 6] = 5
    labels[0] = 6  # class 6 has exactly one item: a lone in-modal query
    tree = Hierarchy(tuple(names)).tree_distance()
    return rng.standard_normal((n, d)).astype(np.float32), rng.standard_normal((n, d)).astype(np.float32), labels, tree


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("task", ["img2img", "img2txt"])
@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
def test_class_retrieval_matches_plain_loop(seed, task, chunk):
    image, text, labels, tree = random_setup(seed)
    q = l2_normalize(torch.from_numpy(image))
    g = q if task == "img2img" else l2_normalize(torch.from_numpy(text))
    lab = torch.from_numpy(labels)
    got = retrieval_metrics(q, g, lab, task == "img2img", torch.as_tensor(tree), tree.shape[0], chunk, chunk)
    sim = (q.double() @ g.double().T).numpy()
    want = reference_class_metrics(sim, labels, task == "img2img", tree)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key


def test_chunking_gives_exactly_the_same_numbers():
    image, text, labels, tree = random_setup(4, n=60)
    q, g = l2_normalize(torch.from_numpy(image)), l2_normalize(torch.from_numpy(text))
    lab, tr = torch.from_numpy(labels), torch.as_tensor(tree)
    for in_modal in (True, False):
        gal = q if in_modal else g
        full = retrieval_metrics(q, gal, lab, in_modal, tr, 7, 10_000, 10_000)
        for chunk in (1, 3, 7):
            assert retrieval_metrics(q, gal, lab, in_modal, tr, 7, chunk, chunk) == full


def test_identity_similarity_gives_perfect_scores():
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2])
    tree = Hierarchy(("a<x", "a<y", "b<z")).tree_distance()
    emb = torch.eye(3)[labels]  # one point per class: same class <=> similarity 1
    got = retrieval_metrics(emb, emb, labels, True, torch.as_tensor(tree), 3)
    assert got["R@1"] == got["R@5"] == got["MAP@R"] == 1.0
    assert got["severity"] is None  # no top-1 is wrong
    # HP@2: S_2(x) = {x, y}; a query of x retrieves its 1 classmate then 2+ other items
    assert got["HP@2"] == 1.0


def test_a_lone_in_modal_query_has_no_severity():
    """A class with one item cannot retrieve a classmate in-modal: its wrong top-1 is forced and
    must not count as a mistake of the space (it did: R@1 1.0 next to severity 2.0)."""
    labels = torch.tensor([0, 0, 1])
    tree = torch.as_tensor(Hierarchy(("a<x", "b<y")).tree_distance())
    emb = torch.eye(2)[labels]  # perfectly separated classes
    got = retrieval_metrics(emb, emb, labels, True, tree, 2)
    assert got["R@1"] == 1.0 and got["severity"] is None
    # a real mistake next to the lone query still counts, and only it
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    got = retrieval_metrics(emb, emb, torch.tensor([0, 0, 1, 2]), True,
                            torch.as_tensor(Hierarchy(("a<x", "a<z", "b<y")).tree_distance()), 3)
    assert got["severity"] == pytest.approx(2.0)  # item 1 (a<x) -> a<z, distance 2; the lone a<z and b<y queries left out


def test_permuted_identity_cross_modal():
    perm = torch.tensor([2, 0, 3, 1])
    labels = torch.arange(4)
    tree = Hierarchy(("a", "b", "c", "d")).tree_distance()  # flat: depth 1
    text = torch.eye(4)[perm]  # text of item i points at class perm[i]
    got = retrieval_metrics(torch.eye(4), text, labels, False, torch.as_tensor(tree), 4)
    # image query i's top-1 is the text j with perm[j] == i, whose class j != i for this derangement
    assert got["R@1"] == 0.0 and got["severity"] == 2.0
    assert got["MAP@R"] == 0.0  # R = 1: only position 1 counts
    assert got["R@5"] == 1.0  # the gallery has 4 items
    good = retrieval_metrics(torch.eye(4), torch.eye(4), labels, False, torch.as_tensor(tree), 4)
    assert good["R@1"] == good["MAP@R"] == 1.0 and good["severity"] is None


def test_map_at_r_by_hand():
    hits = torch.tensor([[True, False, True, True], [False, True, False, False], [True, True, False, False]])
    r = torch.tensor([3, 2, 0])
    got = metrics.map_at_r(hits, r)
    assert got[0] == pytest.approx((1 + 0 + 2 / 3) / 3)  # positions 1..3 only
    assert got[1] == pytest.approx((0 + 1 / 2) / 2)
    assert math.isnan(got[2])
    with pytest.raises(ValueError):
        metrics.map_at_r(hits[:, :1], r)


HIERARCHIES = {
    1: ("a", "b", "c"),
    2: ("A<x", "A<y", "B<z", "B<w"),
    3: ("A<p<1", "A<p<2", "A<q<3", "A<q<4", "B<r<5", "B<s<6"),
}


def test_hierarchical_precision_and_severity_by_hand_depth1():
    tree = torch.as_tensor(Hierarchy(HIERARCHIES[1]).tree_distance())  # all off-diagonal 2
    ranked = torch.tensor([[1, 2, 0], [1, 1, 1]])
    q = torch.tensor([0, 1])
    s2 = torch.as_tensor(hierarchical_sets(tree.numpy(), 2))
    s1 = torch.as_tensor(hierarchical_sets(tree.numpy(), 1))
    # S_2 needs radius 2 = every class; S_1 = the class alone
    assert metrics.hierarchical_precision(ranked, q, s2, 2).tolist() == [1.0, 1.0]
    assert metrics.hierarchical_precision(ranked, q, s1, 3).tolist() == [1 / 3, 1.0]
    sev = metrics.mistake_severity(ranked[:, 0], q, tree)
    assert sev[0] == 2 and math.isnan(sev[1])


def test_hierarchical_precision_and_severity_by_hand_depth2():
    tree = torch.as_tensor(Hierarchy(HIERARCHIES[2]).tree_distance())  # x-y 2, x-z 4
    s2 = torch.as_tensor(hierarchical_sets(tree.numpy(), 2))
    assert s2[0].tolist() == [True, True, False, False]
    ranked = torch.tensor([[1, 2, 0, 3], [2, 3, 0, 1], [0, 1, 3, 3]])
    q = torch.tensor([0, 0, 2])  # classes x, x, z
    assert metrics.hierarchical_precision(ranked, q, s2, 2).tolist() == [0.5, 0.0, 0.0]  # y in S_2(x), z not
    s3 = torch.as_tensor(hierarchical_sets(tree.numpy(), 3))  # radius 4: all
    assert metrics.hierarchical_precision(ranked, q, s3, 4).tolist() == [1.0, 1.0, 1.0]
    sev = metrics.mistake_severity(ranked[:, 0], q, tree)
    assert sev.tolist()[:2] == [2.0, 4.0] and sev.tolist()[2] == 4.0
    assert metrics.mean_or_none(sev) == pytest.approx(10 / 3)


def test_hierarchical_precision_and_severity_by_hand_depth3():
    tree = torch.as_tensor(Hierarchy(HIERARCHIES[3]).tree_distance())
    # from class 1 (index 0): 2 at 2 hops, 3 and 4 at 4, 5 and 6 at 6
    s2 = torch.as_tensor(hierarchical_sets(tree.numpy(), 2))
    s3 = torch.as_tensor(hierarchical_sets(tree.numpy(), 3))
    assert s2[0].tolist() == [True, True, False, False, False, False]
    assert s3[0].tolist() == [True, True, True, True, False, False]
    ranked = torch.tensor([[4, 2, 1, 0, 5], [1, 0, 3, 3, 3]])
    q = torch.tensor([0, 0])
    assert metrics.hierarchical_precision(ranked, q, s2, 2).tolist() == [0.0, 1.0]
    assert metrics.hierarchical_precision(ranked, q, s3, 5).tolist() == [3 / 5, 1.0]
    sev = metrics.mistake_severity(ranked[:, 0], q, tree)
    assert sev.tolist() == [6.0, 2.0]
    assert metrics.mean_or_none(torch.tensor([float("nan")])) is None


def test_recall_and_map_agree_with_pytorch_metric_learning(monkeypatch):
    # pytorch-metric-learning imports faiss.contrib.torch_utils, which patches every faiss index class of
    # the process to take torch tensors, and our FAISS indexes then fail in every later test: keep it out
    # (this comparison uses pml's torch k-NN, not faiss)
    import types

    if "faiss.contrib.torch_utils" not in sys.modules:
        monkeypatch.setitem(sys.modules, "faiss.contrib.torch_utils", types.ModuleType("faiss.contrib.torch_utils"))
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN

    calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"), k="max_bin_count",
                              device=torch.device("cpu"), knn_func=CustomKNN(CosineSimilarity()))
    rng = np.random.default_rng(11)
    labels_np = rng.integers(0, 5, 80)
    labels_np[0] = 5  # a lone class
    image = torch.from_numpy(rng.standard_normal((80, 8)).astype(np.float32))
    text = torch.from_numpy(rng.standard_normal((80, 8)).astype(np.float32))
    labels = torch.from_numpy(labels_np)
    tree = torch.as_tensor(Hierarchy(tuple("abcdef")).tree_distance())
    qi, qt = l2_normalize(image), l2_normalize(text)
    ours = retrieval_metrics(qi, qi, labels, True, tree, 6, 7, 9)
    theirs = calc.get_accuracy(qi, labels, qi, labels, ref_includes_query=True)
    assert ours["R@1"] == pytest.approx(theirs["precision_at_1"], abs=1e-6)
    assert ours["MAP@R"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-6)
    ours = retrieval_metrics(qi, qt, labels, False, tree, 6, 7, 9)
    theirs = calc.get_accuracy(qi, labels, qt, labels, ref_includes_query=False)
    assert ours["R@1"] == pytest.approx(theirs["precision_at_1"], abs=1e-6)
    assert ours["MAP@R"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-6)


def test_map_at_r_sees_the_whole_largest_class():
    # one class of 30 items: MAP@R needs the top 29 (in-modal), more than max(K) = 10
    labels = torch.tensor([0] * 30 + [1] * 3)
    angles = torch.cat([0.01 * torch.arange(30.0), torch.tensor([0.105, 0.155, 0.205])])  # class 1 inside class 0
    emb = torch.stack([angles.cos(), angles.sin()], 1)
    tree = torch.as_tensor(Hierarchy(("a", "b")).tree_distance())
    got = retrieval_metrics(l2_normalize(emb), l2_normalize(emb), labels, True, tree, 2)
    sim = (l2_normalize(emb).double() @ l2_normalize(emb).double().T).numpy()
    want = reference_class_metrics(sim, labels.numpy(), True, tree.numpy())
    assert got["MAP@R"] == pytest.approx(want["MAP@R"], abs=1e-12) and got["MAP@R"] < 1.0


# --------------------------------------------------------------------- instance-level retrieval


def test_instance_retrieval_by_hand():
    got = metrics.instance_retrieval(torch.tensor([1, 2, 3, 10, 11]))
    assert got == {"inst_R@1": 0.2, "inst_R@5": 0.6, "inst_R@10": 0.8, "medr": 3.0}
    assert metrics.instance_retrieval(torch.tensor([1, 4]))["medr"] == 2.5


# ------------------------------------------------------------------------- the universal space


def test_modality_gap():
    x = torch.randn(5, 4)
    assert metrics.modality_gap(x, 3 * x) == pytest.approx(0.0, abs=1e-12)
    assert metrics.modality_gap(x, -x) == pytest.approx(2.0)
    assert metrics.modality_gap(torch.eye(2), torch.eye(2)[[1, 0]]) == pytest.approx(1.0)


def test_class_centroids_pool_both_modalities():
    image = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[0.0, 5.0], [0.0, 1.0], [0.0, 2.0]])
    centroids, present = metrics.class_centroids(image, text, torch.tensor([0, 0, 1]), 3)
    assert present.tolist() == [True, True, False]
    assert torch.allclose(centroids[0], torch.tensor([1.0, 1.0], dtype=torch.float64) / 2 ** 0.5)
    assert torch.allclose(centroids[1], torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert torch.all(centroids[2] == 0)


def test_centroid_fidelity():
    angles = torch.tensor([0.0, 0.3, 1.1, 2.0, 0.5])  # no two equal differences
    centroids = torch.stack([angles.cos(), angles.sin()], 1)
    present = torch.tensor([True, True, True, True, False])
    target = (angles[:, None] - angles[None, :]).abs().numpy()  # monotone in the cosine distance
    assert metrics.centroid_fidelity(centroids, present, target) == pytest.approx(1.0)
    assert metrics.centroid_fidelity(centroids, present, -target) == pytest.approx(-1.0)
    noisy = target + np.random.default_rng(0).normal(0, 0.5, target.shape)
    i, j = np.triu_indices(4, 1)
    d = (1 - centroids[:4] @ centroids[:4].T).numpy()[i, j]
    assert metrics.centroid_fidelity(centroids, present, noisy) == pytest.approx(spearmanr(d, noisy[:4, :4][i, j]).statistic)
    flat = Hierarchy(tuple("abcde")).tree_distance()
    assert metrics.centroid_fidelity(centroids, present, flat) is None  # constant tree distances
    assert metrics.centroid_fidelity(centroids, torch.tensor([True, True, False, False, False]), target) is None


def test_attribute_search_by_hand():
    """Two queries, top 3 each: the shares of items matching both attributes, the class, the colour."""
    item_colour = torch.tensor([0, 1, 0, -1, 1])
    item_label = torch.tensor([2, 2, 5, 2, 2])
    ranked = torch.tensor([[0, 1, 2], [4, 3, 0]])  # query 0: colour 0 class 2; query 1: colour 1 class 2
    out = metrics.attribute_search(ranked, torch.tensor([0, 1]), torch.tensor([2, 2]), item_colour, item_label)
    # query 0: both {0}, class {0, 1}, colour {0, 2}; query 1: both {4}, class {4, 3, 0}, colour {4}
    assert out == pytest.approx({"colour_class@3": (1 / 3 + 1 / 3) / 2, "class@3": (2 / 3 + 1) / 2,
                                 "colour@3": (2 / 3 + 1 / 3) / 2})
    # an unknown colour (-1) never matches, even a query for colour -1
    none = metrics.attribute_search(torch.tensor([[3]]), torch.tensor([-1]), torch.tensor([2]), item_colour, item_label)
    assert none["colour@1"] == 0.0 and none["class@1"] == 1.0
