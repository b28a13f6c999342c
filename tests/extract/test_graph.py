"""The semantic graph A (paper §3.3): class-name texts, cosine distances, storage (rewritten in place,
never growing the file, never left looking valid when interrupted); tree graph."""
import numpy as np
import pytest
from click.testing import CliRunner

import cli
from huse_pipeline.data.hierarchy import Hierarchy
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


def _graph_texts_and_expected(path, method="semantic"):
    """What build-graph must write for the file at `path`: the graph computed here from scratch."""
    fs = features.read_features(path)
    hierarchy = Hierarchy(tuple(fs.class_names), "<")
    if method == "tree":
        return tree_graph(hierarchy.tree_distance()), hierarchy
    texts = [class_text(p) for p in hierarchy.paths]
    return semantic_graph(texts, StubTextEncoder()), hierarchy


def test_build_graph_rewrites_in_place_without_growth(tmp_path):
    """Five `huse build-graph` runs: the file keeps the size it had after the first (HDF5 never
    reclaims space, so each rewrite must reuse the first one's) and holds the right graph each time."""
    names = [f"top{i % 4}<mid{i % 12}<leaf{i}" for i in range(48)]
    out = _feature_file(tmp_path, names)
    items_before = features.read_features(out).image_emb.copy()
    runner = CliRunner()
    sizes = []
    for _ in range(5):
        result = runner.invoke(cli.main, ["build-graph", "--features", str(out), "--device", "cpu"])
        assert result.exit_code == 0, result.output
        sizes.append(out.stat().st_size)
        fs = features.read_features(out)
        expected, hierarchy = _graph_texts_and_expected(out)
        np.testing.assert_array_equal(fs.class_dist, expected)
        np.testing.assert_array_equal(fs.tree_dist, hierarchy.tree_distance())
        assert fs.graph_attrs["method"] == "semantic" and len(fs.graph_attrs["class_texts"]) == 48
        np.testing.assert_array_equal(fs.image_emb, items_before)  # the items are untouched
        assert features.read_attrs(out)["has_graph"]
    assert sizes == [sizes[0]] * 5, sizes
    assert not list(tmp_path.glob(".f.h5*"))  # no temporary copy of the feature file


def test_switching_graph_methods_reuses_the_space(tmp_path):
    """semantic -> tree -> semantic: each rewrite holds the new method's graph and attributes only,
    and the file does not grow past its largest state."""
    out = _feature_file(tmp_path, ["a<b<c", "a<b<d", "e<f<g", "e<h"])
    sizes = []
    for method in ("semantic", "tree", "semantic", "tree", "semantic"):
        build_graph(GraphConfig(features=str(out), method=method, device="cpu"))
        sizes.append(out.stat().st_size)
        fs = features.read_features(out)
        expected, _ = _graph_texts_and_expected(out, method)
        np.testing.assert_allclose(fs.class_dist, expected)
        assert fs.graph_attrs["method"] == method
        assert (fs.graph_attrs["class_texts"] is None) == (method == "tree")
    assert sizes[2:] == sizes[:3], sizes


def test_interrupted_build_graph_leaves_no_graph_that_looks_valid(tmp_path, monkeypatch, caplog):
    out = _feature_file(tmp_path, ["a<b", "a<c", "d"])
    build_graph(GraphConfig(features=str(out), device="cpu"))
    good = features.read_features(out).class_dist

    def killed(group, name, data):  # the process dies after the flag is on disk, before the values
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(features, "_write_in_place", killed)
        with pytest.raises(KeyboardInterrupt):
            build_graph(GraphConfig(features=str(out), method="tree", device="cpu"))
    attrs = features.read_attrs(out)
    assert not attrs["has_graph"] and attrs["graph_incomplete"]
    with caplog.at_level("WARNING", logger="huse_pipeline.store.features"):
        fs = features.read_features(out)
    assert fs.class_dist is None and fs.tree_dist is None and fs.graph_attrs == {}
    assert "huse build-graph" in caplog.text and "incomplete" in caplog.text
    result = CliRunner().invoke(cli.main, ["train", "--features", str(out), "--device", "cpu"])
    assert result.exit_code == 1 and "incomplete" in result.output and "build-graph" in result.output
    build_graph(GraphConfig(features=str(out), device="cpu"))  # running it again repairs the file
    attrs = features.read_attrs(out)
    assert attrs["has_graph"] and not attrs["graph_incomplete"]
    np.testing.assert_array_equal(features.read_features(out).class_dist, good)
