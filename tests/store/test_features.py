"""The HDF5 feature file: part files, merging, round trips, graph writes, clear errors."""
import numpy as np
import pandas as pd
import pytest

from huse_pipeline.errors import HuseError
from huse_pipeline.store import features


def _catalogue(n):
    return pd.DataFrame(
        {
            "image": [f"img/{i}.jpg" for i in range(n)],
            "text": [f"title {i}" for i in range(n)],
            "label": ["b<x" if i % 2 else "a<y" for i in range(n)],
            "class_name": ["b<x" if i % 2 else "a<y" for i in range(n)],
            "split": ["train", "train", "val", "test", "train", "train"][:n],
        }
    )


def _part(rows, reasons, di=3, dt=2, views=None):
    rows = np.asarray(rows)
    return features.Part(
        rows=rows,
        reason=reasons,
        image_emb=np.stack([np.full(di, r, np.float32) for r in rows]),
        text_emb=np.stack([np.full(dt, -r, np.float32) for r in rows]),
        text_used=[f"used {r}" for r in rows],
        image_views=None if views is None else np.stack([np.full((views, di), 100 + r, np.float32) for r in rows]),
    )


def test_parts_merge_keeps_usable_rows_and_records_skips(tmp_path):
    cat = _catalogue(6)
    p1, p2 = tmp_path / "p1.h5", tmp_path / "p2.h5"
    features.write_part(p1, _part([0, 1, 2], ["", "missing file", ""], views=2))
    features.write_part(p2, _part([3, 4, 5], ["", "", "empty text"], views=2))
    out = tmp_path / "feats.h5"
    summary = features.merge_parts(out, [p1, p2], cat, {"image_encoder": "x", "image_root": str(tmp_path)})
    assert summary == {"n_items": 4, "n_classes": 2, "n_skipped": 2,
                       "skipped_by_reason": {"empty text": 1, "missing file": 1}}
    fs = features.read_features(out, views=True)
    np.testing.assert_array_equal(fs.row, [0, 2, 3, 4])
    np.testing.assert_array_equal(fs.image_emb[:, 0], [0, 2, 3, 4])
    np.testing.assert_array_equal(fs.text_emb[:, 0], [0, -2, -3, -4])
    assert fs.class_names == ["a<y", "b<x"]
    np.testing.assert_array_equal(fs.labels, [0, 0, 1, 0])
    assert fs.split.tolist() == ["train", "val", "test", "train"]
    assert fs.text == ["title 0", "title 2", "title 3", "title 4"]
    # views only for train items (items 0 and 3 of the file), in item order
    np.testing.assert_array_equal(fs.view_item, [0, 3])
    np.testing.assert_array_equal(fs.view_emb[:, 0, 0], [100, 104])
    assert fs.skipped["reason"].tolist() == ["missing file", "empty text"]
    assert fs.skipped["row"].tolist() == [1, 5]
    assert fs.attrs["image_encoder"] == "x" and fs.attrs["schema_version"] == features.SCHEMA_VERSION
    assert features.read_attrs(out)["has_views"] and not features.read_attrs(out)["has_graph"]


def test_overlapping_parts_and_all_skipped_are_errors(tmp_path):
    cat = _catalogue(6)
    features.write_part(tmp_path / "a.h5", _part([0, 1], ["", ""]))
    features.write_part(tmp_path / "b.h5", _part([1, 2], ["", ""]))
    with pytest.raises(HuseError, match="overlap"):
        features.merge_parts(tmp_path / "f.h5", [tmp_path / "a.h5", tmp_path / "b.h5"], cat, {})
    features.write_part(tmp_path / "c.h5", _part([0, 1], ["bad", "bad"]))
    with pytest.raises(HuseError, match="no usable rows"):
        features.merge_parts(tmp_path / "f.h5", [tmp_path / "c.h5"], cat, {})
    assert not (tmp_path / "f.h5").exists()  # a failed merge leaves nothing behind
    assert not list(tmp_path.glob(".f.h5*"))


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    out = tmp_path / "f.h5"
    rng = np.random.default_rng(0)
    features.write_synthetic(out, rng.normal(size=(4, 3)).astype("f4"), rng.normal(size=(4, 2)).astype("f4"),
                             ["a", "b", "a", "b"], ["train", "train", "val", "test"])
    before = out.read_bytes()

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(features.h5py.Group, "create_dataset", boom)
    with pytest.raises(RuntimeError):
        features.write_graph(out, np.zeros((2, 2)), np.zeros((2, 2), int), ["a", "b"], {})
    assert out.read_bytes() == before
    assert not list(tmp_path.glob(".f.h5*"))


def test_graph_round_trip_and_shape_check(tmp_path):
    out = tmp_path / "f.h5"
    rng = np.random.default_rng(0)
    features.write_synthetic(out, rng.normal(size=(3, 3)).astype("f4"), rng.normal(size=(3, 2)).astype("f4"),
                             ["a<b", "a<c", "d"], ["train"] * 3)
    a = np.array([[0, 0.2, 0.9], [0.2, 0, 0.8], [0.9, 0.8, 0]], np.float32)
    t = np.array([[0, 2, 3], [2, 0, 3], [3, 3, 0]])
    features.write_graph(out, a, t, ["a", "a<b", "a<c", "d"], {"method": "semantic"})
    features.write_graph(out, a, t, ["a", "a<b", "a<c", "d"], {"method": "semantic"})  # rewriting replaces
    fs = features.read_features(out)
    np.testing.assert_array_equal(fs.class_dist, a)
    np.testing.assert_array_equal(fs.tree_dist, t)
    assert fs.graph_attrs == {"method": "semantic"}
    with pytest.raises(HuseError, match="does not match"):
        features.write_graph(out, np.zeros((2, 2)), np.zeros((2, 2)), [], {})


def test_clear_errors_for_missing_or_foreign_files(tmp_path):
    with pytest.raises(HuseError, match="huse extract-features"):
        features.read_features(tmp_path / "missing.h5")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5")
    with pytest.raises(HuseError, match="not a readable HDF5"):
        features.read_features(junk)
    import h5py

    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = 1
    with pytest.raises(HuseError, match="not a huse feature file"):
        features.read_attrs(tmp_path / "other.h5")


def test_atomic_files_get_the_usual_permissions(tmp_path):
    import os

    from huse_pipeline.utils import atomic_path

    umask = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "x.txt") as tmp:
            tmp.write_text("hello")
    finally:
        os.umask(umask)
    assert (tmp_path / "x.txt").read_text() == "hello"
    assert (tmp_path / "x.txt").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600


def test_graph_written_before_the_flag_existed_reads_and_rewrites(tmp_path):
    """Files whose graph was written by the old copy-and-replace `write_graph` have no
    `write_complete` flag and variable-length attributes: their graph counts as complete, and a
    rewrite replaces it in place, its old attributes included."""
    import h5py

    out = tmp_path / "f.h5"
    rng = np.random.default_rng(0)
    features.write_synthetic(out, rng.normal(size=(3, 3)).astype("f4"), rng.normal(size=(3, 2)).astype("f4"),
                             ["a<b", "a<c", "d"], ["train"] * 3)
    old = np.full((3, 3), 0.5, np.float32)
    with h5py.File(out, "r+") as f:
        g = f.create_group("graph")
        g.create_dataset("class_dist", data=old)
        g.attrs["method"] = '"semantic"'
        g.attrs["class_text"] = '"leaf"'
        f.create_group("hierarchy").create_dataset("tree_dist", data=np.ones((3, 3), np.int64))
    assert features.read_attrs(out)["has_graph"] and not features.read_attrs(out)["graph_incomplete"]
    fs = features.read_features(out)
    np.testing.assert_array_equal(fs.class_dist, old)
    assert fs.graph_attrs == {"method": "semantic", "class_text": "leaf"}
    a = np.array([[0, 0.2, 0.9], [0.2, 0, 0.8], [0.9, 0.8, 0]], np.float32)
    t = np.array([[0, 2, 3], [2, 0, 3], [3, 3, 0]])
    features.write_graph(out, a, t, ["a", "a<b", "a<c", "d"], {"method": "tree"})
    fs = features.read_features(out)
    np.testing.assert_array_equal(fs.class_dist, a)
    np.testing.assert_array_equal(fs.tree_dist, t)
    assert fs.graph_attrs == {"method": "tree"}  # the previous build's other settings are gone
    with h5py.File(out, "r") as f:
        assert f["hierarchy/nodes"].asstr()[()].tolist() == ["a", "a<b", "a<c", "d"]


def test_graph_flag_is_reserved(tmp_path):
    out = tmp_path / "f.h5"
    rng = np.random.default_rng(0)
    features.write_synthetic(out, rng.normal(size=(2, 3)).astype("f4"), rng.normal(size=(2, 2)).astype("f4"),
                             ["a", "b"], ["train"] * 2)
    with pytest.raises(HuseError, match="reserved"):
        features.write_graph(out, np.zeros((2, 2)), np.zeros((2, 2), int), ["a", "b"], {features.GRAPH_COMPLETE: 1})
    assert not features.read_attrs(out)["has_graph"]
