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


# ------------------------------------------------------------------ reading lazily, in blocks (issue 18)


def _blocky_file(tmp_path, n=53, views=2, seed=0):
    """A feature file whose row count is no multiple of the small block sizes the tests use."""
    rng = np.random.default_rng(seed)
    names = ["a<x", "a<y", "b<z"]
    labels = rng.integers(0, 3, n)
    split = rng.choice(["train", "val", "test"], n, p=[0.6, 0.2, 0.2])
    image = (3 * rng.normal(size=(n, 5)) + 7).astype(np.float32)  # a mean far from 0: cancellation shows
    text = rng.normal(size=(n, 4)).astype(np.float32)
    image_views = (image[:, None, :] + rng.normal(size=(n, views, 5))).astype(np.float32) if views else None
    out = tmp_path / f"blocky{seed}.h5"
    features.write_synthetic(out, image, text, [names[k] for k in labels], list(split), image_views=image_views)
    return out


def _old_digest(fs) -> str:
    """features_digest as it was written before it hashed in blocks (runs recorded these values)."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for arr in (fs.image_emb, fs.text_emb, fs.labels):
        h.update(np.ascontiguousarray(arr).tobytes())
    h.update("\n".join(map(str, fs.split)).encode())
    return h.hexdigest()


def test_streaming_digest_is_the_old_digest(tmp_path, monkeypatch):
    path = _blocky_file(tmp_path)
    fs = features.read_features(path)
    want = _old_digest(fs)
    for rows in (7, 2048):  # blocks smaller than the file, and one block
        monkeypatch.setattr(features, "SCAN_ROWS", rows)
        assert features.features_digest(fs) == want
        with features.open_features(path) as ff:
            assert features.features_digest(ff) == want
    other = features.read_features(_blocky_file(tmp_path, seed=1))
    assert features.features_digest(other) != want  # the comparison can fail


def test_streaming_statistics_and_counts_equal_the_in_memory_ones(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(features, "SCAN_ROWS", 6)
    path = _blocky_file(tmp_path)
    fs = features.read_features(path)
    with features.open_features(path) as ff:
        summary = ff.summary()
        assert ff.summary() is summary  # one pass, cached
    train = fs.indices("train")
    for name, arr in (("image", fs.image_emb), ("text", fs.text_emb)):
        x = torch.as_tensor(arr[train]).double()
        mean, std = summary.stats[name]
        np.testing.assert_allclose(mean, x.mean(0).numpy(), rtol=1e-12)
        np.testing.assert_allclose(std, x.std(0).numpy(), rtol=1e-12)  # unbiased, as torch.std
        assert torch.equal(torch.as_tensor(std).float(), x.std(0).float())  # what the towers get
    for s in ("train", "val", "test"):
        np.testing.assert_array_equal(summary.class_counts[s], np.bincount(fs.labels[fs.split == s], minlength=3))
    assert summary.non_finite == {"image": 0, "text": 0}
    image = fs.image_emb.copy()
    image[4, 1], image[40, 0] = np.nan, np.inf
    bad = tmp_path / "bad.h5"
    features.write_synthetic(bad, image, fs.text_emb, [fs.class_names[k] for k in fs.labels], list(fs.split))
    with features.open_features(bad) as ff:
        assert ff.summary().non_finite == {"image": 2, "text": 0}


def test_running_moments_are_the_two_pass_values_whatever_the_blocks():
    rng = np.random.default_rng(3)
    x = 1e4 + rng.normal(size=(101, 3))  # large mean, small spread
    for cuts in ([101], [1, 100], [50, 1, 1, 49], [10] * 10 + [1]):
        m, start = features.RunningMoments(3), 0
        for c in cuts:
            m.add(x[start:start + c])
            start += c
        np.testing.assert_allclose(m.mean, x.mean(0), rtol=1e-14)
        np.testing.assert_allclose(m.std(), x.std(0, ddof=1), rtol=1e-9)
    one = features.RunningMoments(3)
    one.add(x[:1])
    assert np.isnan(one.std()).all()  # as torch.std of one row


def test_feature_file_reads_rows_and_items_as_the_feature_set_holds_them(tmp_path):
    path = _blocky_file(tmp_path)
    fs = features.read_features(path, views=True)
    with features.open_features(path) as ff:
        assert ff.n_items == 53 and ff.num_classes == 3 and ff.class_names == fs.class_names
        np.testing.assert_array_equal(ff.labels, fs.labels)
        assert ff.split.tolist() == fs.split.tolist() and (ff.split == "train").sum() == len(fs.indices("train"))
        for s in ("train", "val", "test"):
            np.testing.assert_array_equal(ff.indices(s), fs.indices(s))
        assert ff.image_emb.shape == fs.image_emb.shape and ff.view_emb.shape == fs.view_emb.shape
        np.testing.assert_array_equal(ff.view_item, fs.view_item)
        np.testing.assert_array_equal(ff.row, fs.row)
        assert ff.text[7] == fs.text[7] and ff.image_path[52] == fs.image_path[52] and len(ff.text) == 53
        assert ff.nbytes() == fs.image_emb.nbytes + fs.text_emb.nbytes
        assert ff.nbytes(views=True) == ff.nbytes() + fs.view_emb.nbytes
        np.testing.assert_array_equal(ff.read_rows("image_emb", 50, 60), fs.image_emb[50:])  # clipped at the end
        out = np.zeros((10, 4), np.float32)
        got = ff.read_rows("text_emb", 3, 9, out=out)
        np.testing.assert_array_equal(got, fs.text_emb[3:9])
        assert got.base is out or got is out  # read into the given buffer
        np.testing.assert_array_equal(ff.read_rows("view_emb", 1, 4), fs.view_emb[1:4])
        items = np.array([0, 1, 2, 9, 30, 31, 52])
        for gap, rows in ((0, 1), (1, 3), (16, 2048), (100, 4)):
            np.testing.assert_array_equal(ff.read_items("image_emb", items, max_gap=gap, max_rows=rows),
                                          fs.image_emb[items])
        assert ff.read_items("text_emb", np.array([], np.int64)).shape == (0, 4)
        with pytest.raises(ValueError, match="ascending"):
            ff.read_items("image_emb", np.array([3, 1]))
        with pytest.raises(ValueError, match="unknown"):
            ff.read_rows("label", 0, 1)


def test_a_float16_file_digests_and_summarises_as_its_float32_reading(tmp_path):
    """Stage one may store the features in float16; read_features upcasts them, and the streaming pass
    hashes and averages the same float32 values."""
    rng = np.random.default_rng(1)
    image, text = rng.normal(size=(9, 5)).astype(np.float16), rng.normal(size=(9, 3)).astype(np.float16)
    path = tmp_path / "half.h5"
    features.write_synthetic(path, image, text, ["a", "b", "c"] * 3, ["train"] * 6 + ["val"] * 3)
    fs = features.read_features(path)
    with features.open_features(path) as ff:
        assert ff.image_emb.dtype == np.float16
        assert features.features_digest(ff) == features.features_digest(fs) == _old_digest(fs)
        np.testing.assert_allclose(ff.summary().stats["image"][0], image[:6].astype(np.float64).mean(0), rtol=1e-12)


def test_block_writer_makes_the_file_write_synthetic_makes(tmp_path):
    rng = np.random.default_rng(2)
    names = ["a<x", "a<y", "b<z"]
    n = 23
    image, text = rng.normal(size=(n, 5)).astype(np.float32), rng.normal(size=(n, 4)).astype(np.float32)
    labels = rng.integers(0, 3, n)
    split = list(rng.choice(["train", "val", "test"], n))
    features.write_synthetic(tmp_path / "a.h5", image, text, [names[k] for k in labels], split)
    blocks = ((image[a:a + 7], text[a:a + 7], labels[a:a + 7], split[a:a + 7]) for a in range(0, n, 7))
    features.write_synthetic_blocks(tmp_path / "b.h5", n, names, blocks)
    a, b = features.read_features(tmp_path / "a.h5"), features.read_features(tmp_path / "b.h5")
    for name in ("image_emb", "text_emb", "labels", "row"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.split.tolist() == b.split.tolist() and a.text == b.text and a.image_path == b.image_path
    assert a.class_names == b.class_names and len(b.skipped) == 0
    drop = {"package_version"}
    assert {k: v for k, v in a.attrs.items() if k not in drop} == {k: v for k, v in b.attrs.items() if k not in drop}
    assert features.features_digest(a) == features.features_digest(b)
    with pytest.raises(HuseError, match="hold 7 items"):
        features.write_synthetic_blocks(tmp_path / "c.h5", n, names, iter([(image[:7], text[:7], labels[:7], split[:7])]))
    assert not (tmp_path / "c.h5").exists()
