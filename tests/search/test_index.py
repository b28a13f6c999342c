"""`huse index` and the index folder: stored embeddings are the towers' outputs, the exact index equals
brute-force cosine top-k over them, the category filter, the fingerprints (a stale index is
refused), atomic replacement, the CLI of `huse search` / `huse export`."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from search_fixtures import NAMES, write_clustered

import cli
from huse_pipeline.errors import HuseError
from huse_pipeline.measures import metrics
from huse_pipeline.search.index import IndexConfig, build_index, export_embeddings, load_index
from huse_pipeline.search.space import Space
from huse_pipeline.store import features
from huse_pipeline.train.model import load_checkpoint, model_from_checkpoint


def brute_force(queries: np.ndarray, gallery: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Cosine top-k in float64 by a plain sort: highest first, ties by lower row."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    scores = q.astype(np.float64) @ g.astype(np.float64).T
    rows = np.array([sorted(range(len(g)), key=lambda j: (-s[j], j))[:k] for s in scores])
    return np.take_along_axis(scores, rows, 1), rows


def assert_same_topk(scores, rows, ref_scores, ref_rows, tol=1e-5):
    """Equal rows, except where brute force itself sees a near-tie (|gap| < tol) at that rank."""
    np.testing.assert_allclose(scores, ref_scores, atol=tol)
    for s, r, rs, rr in zip(scores, rows, ref_scores, ref_rows):
        for j in range(len(r)):
            near_tie = (j > 0 and rs[j - 1] - rs[j] < tol) or (j + 1 < len(r) and rs[j] - rs[j + 1] < tol)
            assert r[j] == rr[j] or near_tie


def test_stored_embeddings_are_the_towers_outputs(synthetic_run):
    index = load_index(synthetic_run["index"])
    fs = features.read_features(synthetic_run["features"])
    model = model_from_checkpoint(load_checkpoint(synthetic_run["run"] / "best.pt"))
    item = {int(r): i for i, r in enumerate(fs.row)}
    order = np.array([item[int(r)] for r in index.ids])  # stored row -> feature-file item
    with torch.no_grad():
        image = model.embed_image(torch.from_numpy(fs.image_emb[order])).numpy()
        text = model.embed_text(torch.from_numpy(fs.text_emb[order])).numpy()
    np.testing.assert_allclose(index.vectors("image"), image, atol=1e-6)
    np.testing.assert_allclose(index.vectors("text"), text, atol=1e-6)
    np.testing.assert_array_equal(index.labels, fs.labels[order])
    assert np.all(np.diff(index.labels) >= 0)  # sorted by class
    assert index.items["class_path"].tolist() == [fs.class_names[c] for c in fs.labels[order]]
    assert index.items["title"].tolist() == [fs.text[i] for i in order]


@pytest.mark.parametrize("target", ["image", "text"])
def test_exact_index_equals_brute_force_cosine(synthetic_run, target):
    index = load_index(synthetic_run["index"])
    assert index.meta["modalities"][target]["kind"] == "exact"
    gallery = np.asarray(index.vectors(target))
    rng = np.random.default_rng(1)
    queries = np.concatenate([gallery[[0, 5, 100]], index.vectors("text" if target == "image" else "image")[[3, 50]],
                              rng.normal(size=(10, gallery.shape[1]))]).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    for k in (1, 10, 40):
        scores, rows = index.search(queries, k, target)
        assert_same_topk(scores, rows, *brute_force(queries, gallery, k))


def test_meta_records_kind_recall_fingerprints_and_fusion(synthetic_run):
    meta = json.loads((synthetic_run["index"] / "meta.json").read_text())
    fs = features.read_features(synthetic_run["features"])
    assert meta["n"] == len(fs.labels) and meta["dim"] == 16 and meta["kind"] == "exact"
    assert meta["class_names"] == fs.class_names
    for m in ("image", "text"):
        assert meta["modalities"][m]["recall@10"] == 1.0 and meta["modalities"][m]["recall_queries"] > 0
    assert meta["features"]["digest"] == features.features_digest(fs)
    from huse_pipeline.data.catalogue import file_sha256

    assert meta["run"]["checkpoint_sha256"] == file_sha256(synthetic_run["run"] / "best.pt")
    assert meta["features_match_training"] is True
    assert {"faiss-cpu", "numpy", "torch", "huse_pipeline"} <= set(meta["versions"])
    # the fusion weight is the one huse eval would tune on val
    space = Space.load(synthetic_run["run"], synthetic_run["features"], index=True, device="cpu")
    val = fs.indices("val")
    probs = [space.class_probabilities(space.embed_features(x[val], m)) for x, m in
             ((fs.image_emb, "image"), (fs.text_emb, "text"))]
    w = metrics.tune_fusion_weight(torch.from_numpy(probs[0]), torch.from_numpy(probs[1]), torch.from_numpy(fs.labels[val]))
    assert meta["fusion_weight"] == w


def test_category_ranges_and_filter(synthetic_run):
    space = Space.load(synthetic_run["run"], synthetic_run["features"], device="cpu")
    index = space.index
    topwear = [c for c in NAMES if c.startswith("apparel<topwear<")]
    (lo, hi), = index.class_ranges("apparel<topwear")
    assert sorted(set(index.items["class_path"][lo:hi])) == topwear
    assert hi - lo == int(np.isin(index.items["class_path"], topwear).sum())
    assert index.class_ranges(" Apparel < TOPWEAR ") == [(lo, hi)]  # whole levels, case and spaces ignored
    with pytest.raises(HuseError, match="no class path starts with"):
        index.class_ranges("apparel<top")
    query = index.vectors("image")[index.position(int(index.ids[0]))][None]  # a jeans item
    for prefix in ("apparel<topwear", "footwear", "footwear<shoes<boots"):
        hits = space.search(query, 15, "image", prefix)[0]
        assert len(hits) == 15 and all(h.class_path.startswith(prefix) for h in hits)
        gallery = np.asarray(index.vectors("image"))
        allowed = np.flatnonzero(index.items["class_path"].str.startswith(prefix).to_numpy())
        _, ref = brute_force(query, gallery[allowed], 15)
        assert [h.id for h in hits] == index.ids[allowed[ref[0]]].tolist()


def test_more_like_this_leaves_the_item_out(synthetic_run):
    space = Space.load(synthetic_run["run"], synthetic_run["features"], device="cpu")
    item = int(space.index.ids[40])
    hits = space.search_item(item, k=5)
    assert item not in [h.id for h in hits] and len(hits) == 5
    assert hits == sorted(hits, key=lambda h: -h.score)
    with pytest.raises(HuseError, match="no item with id"):
        space.search_item(10**9)


def test_stale_index_is_refused(synthetic_run, tmp_path):
    run, feats = synthetic_run["run"], synthetic_run["features"]
    # another model in the run folder (same classes and encoders): refused
    other_run = tmp_path / "other_run"
    shutil.copytree(run, other_run)
    ckpt = torch.load(other_run / "best.pt", weights_only=True)
    ckpt["model_state"]["classifier.bias"] += 1.0
    torch.save(ckpt, other_run / "best.pt")
    with pytest.raises(HuseError, match="another model.*huse index"):
        Space.load(other_run, feats, device="cpu")
    # another feature file with the same classes and encoders: refused
    other_feats = tmp_path / "other.h5"
    write_clustered(other_feats, tmp_path, seed=7)
    with pytest.raises(HuseError, match="other features.*huse index"):
        Space.load(run, other_feats, index=synthetic_run["index"], device="cpu")
    # the same file moved elsewhere: its content digest matches, accepted
    moved = tmp_path / "moved.h5"
    shutil.copyfile(feats, moved)
    assert Space.load(run, moved, index=synthetic_run["index"], device="cpu").index is not None
    # no index at all: a clear message
    with pytest.raises(HuseError, match="huse index"):
        Space.load(other_run, feats, index=tmp_path / "nowhere", device="cpu")


def test_rebuild_replaces_the_folder_atomically_and_hnsw_records_recall(synthetic_run, tmp_path):
    out = tmp_path / "idx"
    cfg = IndexConfig(run=str(synthetic_run["run"]), features=str(synthetic_run["features"]), out=str(out), device="cpu")
    build_index(cfg)
    (out / "stray.txt").write_text("from the old index")
    meta = build_index(IndexConfig(**{**cfg.__dict__, "index_kind": "hnsw"}))
    assert not (out / "stray.txt").exists()  # the new folder replaced the old one whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no temporary folder left
    assert meta["kind"] == "hnsw" and meta["rule"]["why"] == "--index-kind hnsw"
    info = meta["modalities"]["image"]
    assert info["params"]["efSearch"] >= 16 and info["recall@10"] >= 0.95
    index = load_index(out)
    q = np.asarray(index.vectors("image")[:20])
    _, rows = index.search(q, 10, "image")
    _, ref = brute_force(q, np.asarray(index.vectors("image")), 10)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, ref)]) >= 0.95


def test_cli_search_json_and_errors(synthetic_run):
    runner = CliRunner()
    base = ["--run", str(synthetic_run["run"]), "--features", str(synthetic_run["features"]), "--device", "cpu"]
    item = int(load_index(synthetic_run["index"]).ids[10])
    result = runner.invoke(cli.main, ["search", "--item", str(item), "-k", "4", "--json", "--category", "footwear", *base])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["query"] == {"item": item, "target": "image", "k": 4, "category": "footwear"}
    assert len(out["results"]) == 4 and all(r["class_path"].startswith("footwear") for r in out["results"])
    assert set(out["results"][0]) == {"rank", "id", "score", "class_path", "title", "image_path", "split"}
    plain = runner.invoke(cli.main, ["search", "--item", str(item), "-k", "3", "--target", "text", *base])
    assert plain.exit_code == 0 and plain.output.count("id ") == 3
    for args, message in ((["search", *base], "exactly one query"),
                          (["search", "--item", "1", "--image", "x.jpg", *base], "exactly one query"),
                          (["search", "--item", str(item), "--category", "kitchen", *base], "no class path starts"),
                          (["search", "--item", "99999", *base], "no item with id")):
        bad = runner.invoke(cli.main, args)
        assert bad.exit_code != 0 and message in bad.output and "Traceback" not in bad.output, bad.output


def test_export_npy_and_parquet(synthetic_run, tmp_path):
    index = load_index(synthetic_run["index"])
    result = CliRunner().invoke(cli.main, ["export", "--out", str(tmp_path / "npy"), "--run", str(synthetic_run["run"]),
                                           "--features", str(synthetic_run["features"])])
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(np.load(tmp_path / "npy" / "ids.npy"), index.ids)
    np.testing.assert_array_equal(np.load(tmp_path / "npy" / "image_emb.npy"), index.vectors("image"))
    pytest.importorskip("pyarrow")
    import pandas as pd

    (path,) = export_embeddings(synthetic_run["index"], tmp_path / "pq", "parquet", block_rows=100)
    table = pd.read_parquet(path)
    assert table["id"].tolist() == index.ids.tolist()
    np.testing.assert_array_equal(np.stack(table["text_emb"].to_numpy()), index.vectors("text"))
    assert table["class_path"].tolist() == index.items["class_path"].tolist()
