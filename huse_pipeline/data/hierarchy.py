"""The class hierarchy implied by label paths (paper §4.5 built it from WordNet; paths give it exactly).

Every prefix of a class path is a node; a virtual root joins the top-level nodes, so flat labels
(`mugs`) form a depth-1 tree and mixed depths work. The tree distance between two classes is the
number of edges on the path between their nodes; it drives hierarchical precision, mistake
severity and the optional tree-distance graph.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from huse_pipeline.data.catalogue import DEFAULT_LABEL_SEP, parse_label
from huse_pipeline.errors import HuseError


@dataclass(frozen=True)
class Hierarchy:
    """Classes (full paths, in class-index order) and the tree their paths define."""

    classes: tuple[str, ...]
    sep: str = DEFAULT_LABEL_SEP

    def __post_init__(self) -> None:
        bad = [c for c in self.classes if parse_label(c, self.sep) is None]
        if bad:
            raise HuseError(f"malformed class path(s): {bad[:5]}")

    @property
    def paths(self) -> list[tuple[str, ...]]:
        return [parse_label(c, self.sep) for c in self.classes]  # type: ignore[misc]

    @property
    def nodes(self) -> list[str]:
        """All nodes except the virtual root: every prefix of every class path, sorted."""
        prefixes = {self.sep.join(p[:k]) for p in self.paths for k in range(1, len(p) + 1)}
        return sorted(prefixes)

    def tree_distance(self) -> np.ndarray:
        """(C, C) int matrix of edges between class nodes: depth(a) + depth(b) - 2 depth(lca)."""
        paths = self.paths
        depth = np.array([len(p) for p in paths], dtype=np.int64)
        # Two classes share the level-l ancestor iff their length-l prefixes are equal (which implies
        # equal shorter prefixes), so the depth of their lowest common ancestor is a count of levels.
        common = np.zeros((len(paths), len(paths)), dtype=np.int64)
        for level in range(1, int(depth.max()) + 1):
            prefix = [p[:level] if len(p) >= level else None for p in paths]
            ids = {pre: n for n, pre in enumerate(sorted({x for x in prefix if x is not None}))}
            pid = np.array([ids[x] if x is not None else -1 for x in prefix])  # (C,)
            common += (pid[:, None] == pid[None, :]) & (pid[:, None] >= 0)
        return depth[:, None] + depth[None, :] - 2 * common  # (C, C)

    def ancestor_at(self, level: int) -> list[str]:
        """Each class's ancestor at `level` (1 = top level), or the class itself if it is shallower."""
        return [self.sep.join(p[:level]) for p in self.paths]


def hierarchical_sets(tree_dist: np.ndarray, k: int) -> np.ndarray:
    """(C, C) bool: row y is the set S_K(y) of hierarchical precision (DeViSE, Frome et al. 2013; paper §4.5).

    S_K(y) holds the classes within radius r of y in the tree, for the smallest r = 0, 1, 2, ...
    that gives at least K classes (all classes if there are fewer than K).
    """
    tree_dist = np.asarray(tree_dist)
    sorted_dist = np.sort(tree_dist, axis=1)  # (C, C), row y ascending
    kth = min(k, tree_dist.shape[1]) - 1
    radius = sorted_dist[:, kth]  # (C,) smallest radius that reaches K classes
    return tree_dist <= radius[:, None]
