"""Class hierarchy from label paths: tree distances and the hierarchical-precision sets."""
import itertools

import numpy as np
import pytest

from huse_pipeline.data.hierarchy import Hierarchy, hierarchical_sets
from huse_pipeline.errors import HuseError


def _brute_tree_distance(paths):
    """Edges between two nodes of the prefix tree, by walking up to the common ancestor."""
    out = np.zeros((len(paths), len(paths)), dtype=int)
    for (i, p), (j, q) in itertools.product(enumerate(paths), repeat=2):
        common = 0
        for x, y in zip(p, q):
            if x != y:
                break
            common += 1
        out[i, j] = (len(p) - common) + (len(q) - common)
    return out


def test_depth3_tree_distances_by_hand():
    h = Hierarchy(("a<b<c", "a<b<d", "a<e<f", "g<h<i"))
    expected = np.array([[0, 2, 4, 6], [2, 0, 4, 6], [4, 4, 0, 6], [6, 6, 6, 0]])
    np.testing.assert_array_equal(h.tree_distance(), expected)
    assert h.nodes == ["a", "a<b", "a<b<c", "a<b<d", "a<e", "a<e<f", "g", "g<h", "g<h<i"]


def test_flat_and_mixed_depths():
    flat = Hierarchy(("mugs", "plates", "cups"))
    np.testing.assert_array_equal(flat.tree_distance(), 2 * (1 - np.eye(3, dtype=int)))
    mixed = Hierarchy(("kitchen<mugs", "kitchen", "x<y<z"))  # a class that is the parent of another
    np.testing.assert_array_equal(mixed.tree_distance(), _brute_tree_distance(mixed.paths))
    assert mixed.tree_distance()[0, 1] == 1


def test_repeated_names_on_different_levels():
    h = Hierarchy(("accessories<watches<watches", "accessories<bags<bags", "watches<watches<x"))
    np.testing.assert_array_equal(h.tree_distance(), _brute_tree_distance(h.paths))


def test_random_trees_match_brute_force():
    rng = np.random.default_rng(0)
    paths = {tuple(f"n{rng.integers(3)}" for _ in range(rng.integers(1, 5))) for _ in range(40)}
    h = Hierarchy(tuple(sorted("<".join(p) for p in paths)))
    np.testing.assert_array_equal(h.tree_distance(), _brute_tree_distance(h.paths))


def test_malformed_class_rejected():
    with pytest.raises(HuseError):
        Hierarchy(("a<<b",))


def test_hierarchical_sets_grow_by_radius():
    # classes: 0,1 siblings; 2 cousin (same top level); 3 unrelated
    tree = Hierarchy(("a<b<c", "a<b<d", "a<e<f", "g<h<i")).tree_distance()
    s1 = hierarchical_sets(tree, 1)
    np.testing.assert_array_equal(s1, np.eye(4, dtype=bool))  # radius 0: the class itself
    s2 = hierarchical_sets(tree, 2)
    assert s2[0].tolist() == [True, True, False, False]  # radius 2 reaches the sibling
    assert s2[2].tolist() == [True, True, True, False]  # class 2 has no sibling: radius 4 (3 classes)
    assert s2[3].tolist() == [True, True, True, True]  # class 3 needs radius 6: everything
    s10 = hierarchical_sets(tree, 10)  # more than C classes asked: all classes
    assert s10.all()
