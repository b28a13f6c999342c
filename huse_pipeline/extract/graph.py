"""The semantic graph over classes (paper §3.3, §4.1.2) and the class hierarchy, into the feature file.

A_ij = 1 - cos(psi(v_i), psi(v_j)): cosine distance between sentence embeddings of the class names
(the paper used the Universal Sentence Encoder; here the feature file's own text encoder). A is
symmetric with a zero diagonal; similar classes get small distances. `method="tree"` instead uses
the hierarchy alone: A_ij = tree hops(i, j) / max hops.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from huse_pipeline.data.hierarchy import Hierarchy
from huse_pipeline.encoders.text import TextEncoder, load_text_encoder
from huse_pipeline.errors import HuseError
from huse_pipeline.settings import DEFAULT_FEATURES
from huse_pipeline.store import features
from huse_pipeline.utils import resolve_device

log = logging.getLogger(__name__)

CLASS_TEXT_STYLES = ("leaf", "path", "leaf-path")
GRAPH_METHODS = ("semantic", "tree")


@dataclass(frozen=True)
class GraphConfig:
    features: str = DEFAULT_FEATURES
    method: str = "semantic"  # semantic | tree
    class_text: str = "leaf-path"  # leaf | path | leaf-path: how a class path becomes text
    text_encoder: str | None = None  # default: the text encoder that made the feature file
    device: str = "auto"


def class_text(path: tuple[str, ...], style: str = "leaf-path") -> str:
    """The text the encoder embeds for a class path.

    `leaf`:      "tshirts"
    `path`:      "apparel > topwear > tshirts"
    `leaf-path`: "tshirts (topwear, apparel)": the leaf first, because a sentence embedding is
                 dominated by its head noun, then its ancestors nearest first as context, which
                 separates equal leaf names under different parents and pulls siblings together.
                 An ancestor equal to its child (`watches<watches`) is not repeated.
    """
    if style == "leaf":
        return path[-1]
    if style == "path":
        return " > ".join(path)
    if style == "leaf-path":
        context: list[str] = []
        for name in reversed(path[:-1]):
            if name != (context[-1] if context else path[-1]):
                context.append(name)
        return f"{path[-1]} ({', '.join(context)})" if context else path[-1]
    raise HuseError(f"unknown class-text style {style!r}; choose one of {', '.join(CLASS_TEXT_STYLES)}")


def semantic_graph(texts: list[str], encoder: TextEncoder) -> np.ndarray:
    """(C, C) cosine distances between the embeddings of `texts`; symmetric, zero diagonal."""
    emb = encoder.encode(texts).astype(np.float64)  # (C, Dt)
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise HuseError("a class name embeds to the zero vector; use another --class-text or --method tree")
    emb /= norms
    dist = np.clip(1.0 - emb @ emb.T, 0.0, 2.0)  # (C, C)
    dist = (dist + dist.T) / 2
    np.fill_diagonal(dist, 0.0)
    return dist.astype(np.float32)


def tree_graph(tree_dist: np.ndarray) -> np.ndarray:
    """(C, C) tree hops scaled to [0, 1] by the largest distance (all zeros for a single class)."""
    top = tree_dist.max()
    return (tree_dist / top if top > 0 else np.zeros_like(tree_dist)).astype(np.float32)


def build_graph(cfg: GraphConfig) -> dict[str, Any]:
    """Compute the class graph and hierarchy of a feature file and store them in it."""
    if cfg.method not in GRAPH_METHODS:
        raise HuseError(f"unknown graph method {cfg.method!r}; choose one of {', '.join(GRAPH_METHODS)}")
    attrs = features.read_attrs(cfg.features)
    names = features.read_class_names(cfg.features)
    hierarchy = Hierarchy(tuple(names), attrs.get("label_sep", "<"))
    tree_dist = hierarchy.tree_distance()
    texts = [class_text(p, cfg.class_text) for p in hierarchy.paths]
    encoder_name = cfg.text_encoder or attrs["text_encoder"]
    if cfg.method == "semantic":
        log.info("embedding %d class names with %s", len(names), encoder_name)
        encoder = load_text_encoder(encoder_name, resolve_device(cfg.device))
        class_dist = semantic_graph(texts, encoder)
    else:
        class_dist = tree_graph(tree_dist)
    graph_attrs = {
        **asdict(cfg),
        "text_encoder": encoder_name if cfg.method == "semantic" else None,
        "class_texts": texts if cfg.method == "semantic" else None,
    }
    features.write_graph(cfg.features, class_dist, tree_dist, hierarchy.nodes, graph_attrs)
    off = class_dist[~np.eye(len(names), dtype=bool)]
    return {
        "features": cfg.features,
        "method": cfg.method,
        "n_classes": len(names),
        "depth": int(max(len(p) for p in hierarchy.paths)),
        "class_dist_min": float(off.min()) if off.size else 0.0,
        "class_dist_mean": float(off.mean()) if off.size else 0.0,
        "class_dist_max": float(off.max()) if off.size else 0.0,
    }
