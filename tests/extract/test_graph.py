"""The semantic graph A (paper §3.3): class-name texts, cosine distances, storage; tree graph."""
import numpy as np
import pytest

from huse_pipeline.encoders.text import StubTextEncoder
from huse_pipeline.errors import HuseError
from huse_pipeline.extract.graph import GraphConfig, build_graph, class_text, semantic_graph, tree_graph
from huse_pipeline.store import features


@pytest.mark.parametrize(
    "path, style, expected",
    [
        (("apparel", "topwear", "tshirts"), "leaf", "tshirts"),
        (("apparel", "topwear", "tshirts"), "path", "apparel > topwear > tshirts"),
        (("apparel", "topwear", "tshirts"), "leaf-path", "tshirts (topwear, apparel)"),
        (("accessories", "watches", "watches"), "leaf-path", "watches (accessories)"),
        (("mugs",), "leaf-path", "mugs"),
    ],
)
def test_class_text(path, style, expected):
    assert class_text(path, style) == expected


def test_semantic_graph_is_cosine_distance():
    class Fixed(StubTextEncoder):
        def encode(self, texts, batch_size=256):
            table = {"x": [1.0, 0.0], "y": [1.0, 1.0], "z": [-2.0, 0.0]}
            return np.array([table[t] for t in texts], np.float32)

    a = semantic_graph(["x", "y", "z"], Fixed())
    expected = np.array([[0, 1 - 1 / np.sqrt(2), 2], [1 - 1 / np.sqrt(2), 0, 1 + 1 / np.sqrt(2)],
                         [2, 1 + 1 / np.sqrt(2), 0]])
    np.testing.assert_allclose(a, expected, atol=1e-6)
    np.testing.assert_array_equal(a, a.T)
    assert np.all(np.diag(a) == 0)


def test_tree_graph_scaled():
    t = np.array([[0, 2, 6], [2, 0, 6], [6, 6, 0]])
    np.testing.assert_allclose(tree_graph(t), t / 6)
    np.testing.assert_array_equal(tree_graph(np.zeros((1, 1), int)), np.zeros((1, 1)))


def _feature_file(tmp_path, names):
    out = tmp_path / "f.h5"
    rng = np.random.default_rng(0)
    n = len(names)
    features.write_synthetic(out, rng.normal(size=(n, 3)).astype("f4"), rng.normal(size=(n, 2)).astype("f4"),
                             names, ["train"] * n, attrs={"text_encoder": "stub"})
    return out


def test_build_graph_writes_graph_and_hierarchy(tmp_path):
    out = _feature_file(tmp_path, ["a<b<c", "a<b<d", "e<f<g"])
    summary = build_graph(GraphConfig(features=str(out), device="cpu"))
    assert summary["n_classes"] == 3 and summary["depth"] == 3
    fs = features.read_features(out)
    assert fs.class_dist.shape == (3, 3) and np.allclose(fs.class_dist, fs.class_dist.T)
    np.testing.assert_array_equal(fs.tree_dist, [[0, 2, 6], [2, 0, 6], [6, 6, 0]])
    assert fs.graph_attrs["class_texts"] == ["c (b, a)", "d (b, a)", "g (f, e)"]
    build_graph(GraphConfig(features=str(out), method="tree"))
    np.testing.assert_allclose(features.read_features(out).class_dist, np.array([[0, 2, 6], [2, 0, 6], [6, 6, 0]]) / 6)


def test_build_graph_errors(tmp_path):
    with pytest.raises(HuseError, match="extract-features"):
        build_graph(GraphConfig(features=str(tmp_path / "missing.h5")))
    out = _feature_file(tmp_path, ["a", "b"])
    with pytest.raises(HuseError, match="unknown graph method"):
        build_graph(GraphConfig(features=str(out), method="wordnet"))
