"""How far the semantic graph A (class-name text embeddings) agrees with the class tree.

Prints the Spearman correlation between A and the tree distances over all class pairs, and A's
mean / min / max for each tree distance (2 = siblings, 4 = cousins, ...). Then, for margins ζ, how
many class pairs of each tree distance have A < ζ: the pairs that the graph loss's OR rule pulls
towards their A whatever their current distance.

    python bench/graph_vs_tree.py cache/feats.h5
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from huse_pipeline.store import features  # noqa: E402


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    fs = features.read_features(sys.argv[1])
    if fs.class_dist is None or fs.tree_dist is None:
        sys.exit(f"{sys.argv[1]} has no graph; run `huse build-graph --features {sys.argv[1]}` first")
    upper = np.triu_indices(fs.num_classes, 1)
    graph, tree = fs.class_dist[upper], fs.tree_dist[upper]
    print(f"{fs.num_classes} classes, {len(graph)} pairs; Spearman(A, tree) = {spearmanr(graph, tree).statistic:.3f}")
    for hops in np.unique(tree):
        sel = graph[tree == hops]
        print(f"tree distance {hops}: {len(sel)} pairs, A mean {sel.mean():.3f} min {sel.min():.3f} max {sel.max():.3f}")
    for zeta in (0.3, 0.4, 0.5):
        counts = ", ".join(f"{int(((graph < zeta) & (tree == hops)).sum())} at distance {hops}" for hops in np.unique(tree))
        print(f"pairs with A < {zeta}: {counts}")


if __name__ == "__main__":
    main()
