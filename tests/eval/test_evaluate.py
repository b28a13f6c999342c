"""`huse eval` end to end on a synthetic feature file and a checkpoint made here."""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from huse_pipeline.data.hierarchy import Hierarchy
from huse_pipeline.errors import HuseError
from huse_pipeline.eval import evaluate as evaluate_module
from huse_pipeline.eval.evaluate import EvalConfig, evaluate, latest_run, run_evaluation
from huse_pipeline.extract.graph import tree_graph
from huse_pipeline.measures.keys import format_table
from huse_pipeline.store import features
from huse_pipeline.train.model import HuseModel, ModelConfig, feature_meta, save_checkpoint

NAMES = ["apparel<bottomwear<jeans", "apparel<topwear<shirts", "apparel<topwear<tshirts",
         "footwear<sandal<sandals", "footwear<shoes<boots", "footwear<shoes<sneakers"]
PER_SPLIT = {"train": 10, "val": 4, "test": 5}

# the README's table of metric keys, written out independently of evaluate.py's constants
TASKS = ["img2img", "img2txt", "txt2img", "txt2txt"]
CONTRACT_KEYS = (
    ["acc/image", "acc/text", "acc/fused", "acc/fused@0.5", "acc5/image", "acc5/text", "macro_acc/image",
     "macro_acc/text", "fusion_weight"]
    + [f"{t}/{m}" for t in TASKS for m in ["R@1", "R@5", "R@10", "MAP@R", "HP@2", "HP@5", "HP@10", "severity"]]
    + [f"{t}/{m}" for t in ["img2txt", "txt2img"] for m in ["inst_R@1", "inst_R@5", "inst_R@10", "medr"]]
    + ["graph_fidelity", "tree_fidelity", "modality_gap"]
)
CONTRACT_BASELINE_KEYS = ["baseline/acc/image", "baseline/acc/text", "baseline/acc/fused", "baseline/fusion_weight"] + [
    f"baseline/{t}/{m}" for t in ["img2img", "txt2txt"]
    for m in ["R@1", "R@5", "R@10", "MAP@R", "HP@2", "HP@5", "HP@10", "severity"]]
META_KEYS = ["meta/split", "meta/n_items", "meta/checkpoint", "meta/features", "meta/features_match_training",
             "meta/fusion_weight_source", "meta/eval_time_s",
             # issue 18: how it was computed at scale
             "meta/data", "meta/max_queries", "meta/query_seed", "meta/n_queries", "meta/similarity", "meta/map_r_cap"]
MAY_BE_NULL = {f"{t}/severity" for t in TASKS} | {f"baseline/{t}/severity" for t in ("img2img", "txt2txt")}


def tiny_model(fs: features.FeatureSet, steps: int = 60, seed: int = 0) -> HuseModel:
    """A small HUSE model trained briefly (classification + gap) so predictions are not random."""
    torch.manual_seed(seed)
    cfg = ModelConfig(image_dim=fs.image_emb.shape[1], text_dim=fs.text_emb.shape[1], num_classes=fs.num_classes,
                      embed_dim=8, hidden_dim=16, image_layers=1, text_layers=1, dropout=0.0)
    model = HuseModel(cfg)
    train = fs.indices("train")
    x_img, x_txt = torch.from_numpy(fs.image_emb[train]), torch.from_numpy(fs.text_emb[train])
    y = torch.from_numpy(fs.labels[train])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        out = model(x_img, x_txt)
        loss = (torch.nn.functional.cross_entropy(out["image_logits"], y)
                + torch.nn.functional.cross_entropy(out["text_logits"], y)
                + (1 - (out["image_emb"] * out["text_emb"]).sum(1)).mean())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def build_eval_fixture(root: Path, names: list[str] = NAMES, graph: bool = True, splits=PER_SPLIT,
                       image_encoder: str = "synthetic", train_steps: int = 60) -> dict[str, Path]:
    """Feature file (clustered features, every other image file missing), graph, and a run folder."""
    rng = np.random.default_rng(0)
    c = len(names)
    img_centre, txt_centre = rng.normal(size=(c, 12)), rng.normal(size=(c, 10))
    rows = [(k, s) for s, n in splits.items() for k in range(c) for _ in range(n)]
    cls = np.array([k for k, _ in rows])
    image = (img_centre[cls] + 0.9 * rng.normal(size=(len(rows), 12))).astype(np.float32)
    text = (txt_centre[cls] + 0.9 * rng.normal(size=(len(rows), 10))).astype(np.float32)
    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    for i in range(0, len(rows), 2):
        colour = tuple(int(v) for v in (40 * cls[i] % 255, 90 + 25 * cls[i] % 160, 200 - 30 * cls[i] % 200))
        Image.new("RGB", (48, 64), colour).save(image_dir / f"{i}.png")
    feats = root / "feats.h5"
    features.write_synthetic(
        feats, image, text, [names[k] for k in cls], [s for _, s in rows],
        attrs={"image_root": str(root), "image_encoder": image_encoder},
        image_path=[f"images/{i}.png" for i in range(len(rows))],
        text=[f"{names[k].split('<')[-1]} number {i}" for i, k in enumerate(cls)],
    )
    if graph:
        hierarchy = Hierarchy(tuple(features.read_class_names(feats)))
        tree = hierarchy.tree_distance()
        features.write_graph(feats, tree_graph(tree), tree, hierarchy.nodes, {"method": "tree"})
    fs = features.read_features(feats)
    model = tiny_model(fs, steps=train_steps)
    run = root / "runs" / "20240101-000000"
    save_checkpoint(run / "best.pt", model, fs.class_names, feature_meta(fs.attrs),
                    train_config={"epochs": 2, "lr": 0.01}, epoch=2, step=20, metrics={},
                    features_digest=features.features_digest(fs))
    history = [{"epoch": e, "step": 10 * e, "time_s": 1.0 * e, "train/loss": 3.0 / e, "train/class": 2.0 / e,
                "train/graph": 0.5 / e, "train/gap": 0.5 / e, "val/acc/image": 0.3 * e, "val/acc/text": 0.35 * e,
                "val/acc/fused": 0.4 * e} for e in (1, 2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    (run / "config.json").write_text(json.dumps({"train": {}, "model": {}, "features": str(feats)}))
    return {"features": feats, "run": run, "checkpoint": run / "best.pt", "root": root}


@pytest.fixture(scope="module")
def fixture_paths(tmp_path_factory) -> dict[str, Path]:
    return build_eval_fixture(tmp_path_factory.mktemp("eval"))


def _cfg(paths: dict[str, Path], **kw) -> EvalConfig:
    return EvalConfig(run=str(paths["run"]), features=str(paths["features"]), device="cpu", **kw)


def test_evaluate_returns_exactly_the_contract_keys(fixture_paths):
    m = evaluate(_cfg(fixture_paths, out=str(fixture_paths["root"] / "m.json")))
    assert set(m) == set(CONTRACT_KEYS) | set(META_KEYS)
    for key in CONTRACT_KEYS:
        if key in MAY_BE_NULL and m[key] is None:
            continue
        assert isinstance(m[key], float) and math.isfinite(m[key]), key
    assert json.loads((fixture_paths["root"] / "m.json").read_text()) == m
    assert m["meta/n_items"] == 30 and m["meta/split"] == "test"
    assert m["meta/fusion_weight_source"] == "tuned on val"
    for key in ("acc/image", "img2img/R@1", "img2txt/inst_R@10", "txt2txt/HP@10"):
        assert 0.0 <= m[key] <= 1.0
    assert m["img2txt/medr"] >= 1.0
    # the clusters are easy: a briefly trained model beats chance (1/6) by far
    assert m["acc/fused"] > 0.5 and m["txt2txt/R@1"] > 0.5
    assert m["tree_fidelity"] is not None and m["graph_fidelity"] is not None


def test_evaluate_is_deterministic_and_chunk_independent(fixture_paths):
    a = evaluate(_cfg(fixture_paths, out=str(fixture_paths["root"] / "a.json")))
    b = evaluate(_cfg(fixture_paths, out=str(fixture_paths["root"] / "b.json"), query_chunk=3, gallery_chunk=7))
    drop = lambda d: {k: v for k, v in d.items() if k != "meta/eval_time_s"}  # noqa: E731
    assert drop(a) == drop(b)


def test_default_run_and_output_path(fixture_paths, tmp_path):
    runs = fixture_paths["run"].parent
    assert latest_run(runs) == fixture_paths["run"]
    result = run_evaluation(EvalConfig(runs_dir=str(runs), features=str(fixture_paths["features"]), device="cpu",
                                       split="val"))
    assert result.out == fixture_paths["run"] / "eval_val.json" and result.out.is_file()
    with pytest.raises(HuseError, match="no run with a best.pt"):
        latest_run(tmp_path)
    with pytest.raises(HuseError, match="not both"):
        evaluate(EvalConfig(run="x", checkpoint="y"))


def test_latest_run_is_the_last_trained_not_the_last_evaluated(tmp_path):
    import os

    old, new = tmp_path / "20240101-000000", tmp_path / "20240102-000000"
    for run, t in ((old, 1_000_000), (new, 2_000_000)):
        run.mkdir()
        for name in ("best.pt", "last.pt", "metrics.jsonl"):
            (run / name).write_text("x")
            os.utime(run / name, (t, t))
        os.utime(run, (t, t))
    (old / "eval_test.json").write_text("{}")  # evaluating the older run moves its folder's time to now
    assert old.stat().st_mtime > new.stat().st_mtime
    assert latest_run(tmp_path) == new


def test_missing_split_and_missing_val_and_graph(tmp_path):
    paths = build_eval_fixture(tmp_path, graph=False, splits={"train": 6, "test": 3}, train_steps=5)
    m = evaluate(_cfg(paths))
    assert m["fusion_weight"] == 0.5 and m["meta/fusion_weight_source"] == "default 0.5 (no val split)"
    assert m["graph_fidelity"] is None and m["tree_fidelity"] is not None  # tree from the class paths
    with pytest.raises(HuseError, match="no items in split 'val'"):
        evaluate(_cfg(paths, split="val"))


def test_flat_labels(tmp_path):
    paths = build_eval_fixture(tmp_path, names=["bags", "mugs", "shoes", "watches"], train_steps=5)
    m = evaluate(_cfg(paths))
    assert m["tree_fidelity"] is None  # every pair of flat classes is 2 hops apart: undefined
    assert m["img2img/HP@2"] == 1.0  # S_2 of a flat class is every class
    assert m["img2img/severity"] in (None, 2.0)


def test_mismatched_checkpoint_is_refused_naming_the_difference(fixture_paths, tmp_path):
    other = build_eval_fixture(tmp_path / "classes", names=[n.replace("boots", "wellies") for n in NAMES],
                               train_steps=1)
    with pytest.raises(HuseError, match=r"classes differ.*boots.*wellies"):
        evaluate(EvalConfig(checkpoint=str(fixture_paths["checkpoint"]), features=str(other["features"]), device="cpu"))
    enc = build_eval_fixture(tmp_path / "enc", image_encoder="resnet18", train_steps=1)
    with pytest.raises(HuseError, match="image_encoder"):
        evaluate(EvalConfig(checkpoint=str(fixture_paths["checkpoint"]), features=str(enc["features"]), device="cpu"))


def test_eval_defaults_to_the_runs_own_feature_file(fixture_paths, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no cache/feats.h5 here: the run's config.json must be followed
    result = run_evaluation(EvalConfig(run=str(fixture_paths["run"]), device="cpu", out=str(tmp_path / "m.json")))
    assert result.metrics["meta/features"] == str(fixture_paths["features"].resolve())
    assert result.metrics["meta/features_match_training"] is True


def test_a_feature_file_with_other_splits_is_refused_unless_asked(fixture_paths, tmp_path):
    """Same encoders and classes, but items moved between splits: the model's training items could be
    scored as test items. It used to be evaluated silently."""
    fs = features.read_features(fixture_paths["features"])
    split = np.array(fs.split, dtype=object)
    train, test = np.flatnonzero(split == "train"), np.flatnonzero(split == "test")
    split[train[:3]], split[test[:3]] = "test", "train"
    moved = tmp_path / "moved.h5"
    features.write_synthetic(moved, fs.image_emb, fs.text_emb, [fs.class_names[k] for k in fs.labels], list(split),
                             attrs={"image_encoder": "synthetic"})
    cfg = EvalConfig(checkpoint=str(fixture_paths["checkpoint"]), features=str(moved), device="cpu",
                     out=str(tmp_path / "m.json"))
    with pytest.raises(HuseError, match="not the feature file this model was trained on.*--other-features"):
        evaluate(cfg)
    m = evaluate(replace(cfg, other_features=True))
    assert m["meta/features_match_training"] is False and m["meta/n_items"] == len(test)
    assert "not the feature file the model was trained on" in format_table(m)


def test_a_single_modality_checkpoint_is_flagged(fixture_paths, tmp_path, caplog):
    ckpt = torch.load(fixture_paths["checkpoint"], weights_only=False)
    ckpt["train_config"] = {**ckpt["train_config"], "modality": "image"}
    path = tmp_path / "image_only.pt"
    torch.save(ckpt, path)
    with caplog.at_level("WARNING"):
        evaluate(EvalConfig(checkpoint=str(path), features=str(fixture_paths["features"]), device="cpu",
                            out=str(tmp_path / "m.json")))
    assert "trained with --modality image" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        evaluate(_cfg(fixture_paths, out=str(tmp_path / "n.json")))
    assert "--modality" not in caplog.text


def test_cli_eval_prints_the_table_and_writes_json(fixture_paths, tmp_path):
    from cli import main

    out = tmp_path / "cli.json"
    res = CliRunner().invoke(main, ["eval", "--checkpoint", str(fixture_paths["checkpoint"]), "--features",
                                    str(fixture_paths["features"]), "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    for word in ("classification", "img2img", "txt2txt", "MAP@R", "HP@10", "inst_R@1", "medr", "modality_gap"):
        assert word in res.output
    m = json.loads(out.read_text())
    assert set(CONTRACT_KEYS) <= set(m)
    bad = CliRunner().invoke(main, ["eval", "--checkpoint", str(tmp_path / "nope.pt"), "--features",
                                    str(fixture_paths["features"])])
    assert bad.exit_code != 0 and "does not exist" in bad.output and "Traceback" not in bad.output


def test_format_table_shows_nulls_as_dashes(fixture_paths):
    m = evaluate(_cfg(fixture_paths, out=str(fixture_paths["root"] / "t.json")))
    m = {**m, "img2img/severity": None, "graph_fidelity": None}
    text = format_table(m)
    assert "graph_fidelity -" in text and "img2img" in text


# ----------------------------------------------------------------------------------- baselines


def fake_fit(calls: list):
    """Stands in for `huse_pipeline.train.loop.fit`: records the config, returns a quickly trained model."""

    def fit(fs, cfg, run_dir=None):
        calls.append(cfg)
        return tiny_model(fs, steps=40, seed=1 if cfg.modality == "image" else 2), [{"epoch": 1}]

    return fit


def test_baselines_use_fit_with_the_runs_config_and_add_their_keys(fixture_paths, monkeypatch):
    calls: list = []
    monkeypatch.setattr(evaluate_module, "fit", fake_fit(calls))
    m = evaluate(_cfg(fixture_paths, baselines=True, out=str(fixture_paths["root"] / "base.json")))
    assert set(m) == set(CONTRACT_KEYS) | set(CONTRACT_BASELINE_KEYS) | set(META_KEYS)
    assert [c.modality for c in calls] == ["image", "text"]
    assert calls[0] == replace(calls[0], epochs=2, lr=0.01)  # the run's train_config
    for key in CONTRACT_BASELINE_KEYS:
        assert key in MAY_BE_NULL and m[key] is None or math.isfinite(m[key]), key
    assert "separate models" in format_table(m) and "raw features" in format_table(m)


def test_raw_feature_baseline_equals_retrieval_on_normalised_features(fixture_paths, monkeypatch):
    from huse_pipeline.eval.evaluate import retrieval_metrics
    from huse_pipeline.measures.retrieval import l2_normalize

    monkeypatch.setattr(evaluate_module, "fit", fake_fit([]))
    m = evaluate(_cfg(fixture_paths, baselines=True, out=str(fixture_paths["root"] / "base2.json")))
    fs = features.read_features(fixture_paths["features"])
    test = fs.indices("test")
    emb = l2_normalize(torch.from_numpy(fs.text_emb[test]))
    want = retrieval_metrics(emb, emb, torch.from_numpy(fs.labels[test]), True, torch.as_tensor(fs.tree_dist), 6)
    assert {k: m[f"baseline/txt2txt/{k}"] for k in want} == want


# ----------------------------------------------------------------------------- at scale (issue 18)


def _drop_how(m: dict) -> dict:
    return {k: v for k, v in m.items() if k not in ("meta/eval_time_s", "meta/data")}


@pytest.mark.parametrize("kw", [{}, {"max_queries": 11}, {"similarity": "float32"},
                                {"max_queries": 13, "similarity": "float32", "query_chunk": 3, "gallery_chunk": 4,
                                 "batch_size": 4, "block_rows": 9}, {"split": "val", "max_queries": 7}])
def test_streamed_and_resident_evaluation_give_identical_metrics(fixture_paths, kw):
    root = fixture_paths["root"]
    resident = evaluate(_cfg(fixture_paths, out=str(root / "res.json"), data="resident", **kw))
    streamed = evaluate(_cfg(fixture_paths, out=str(root / "str.json"), data="stream", **kw))
    assert resident["meta/data"] == "resident" and streamed["meta/data"] == "stream"
    assert _drop_how(resident) == _drop_how(streamed)


def test_the_default_evaluation_records_how_it_was_computed(fixture_paths):
    m = evaluate(_cfg(fixture_paths, out=str(fixture_paths["root"] / "d.json")))
    assert m["meta/data"] == "resident" and m["meta/similarity"] == "float64"  # a small split: as before
    assert m["meta/max_queries"] is None and m["meta/n_queries"] == 30 and m["meta/map_r_cap"] == 1000
    big = evaluate(_cfg(fixture_paths, out=str(fixture_paths["root"] / "e.json"), data="stream"))
    assert big["meta/data"] == "stream"


def test_max_queries_samples_by_class_and_records_the_sample(fixture_paths, monkeypatch):
    root = fixture_paths["root"]
    drawn = []
    real = evaluate_module.stratified_sample
    monkeypatch.setattr(evaluate_module, "stratified_sample", lambda *a: drawn.append(real(*a)) or drawn[-1])
    m = evaluate(_cfg(fixture_paths, out=str(root / "q.json"), max_queries=12, query_seed=4))
    assert m["meta/max_queries"] == 12 and m["meta/query_seed"] == 4 and m["meta/n_queries"] == 12
    assert json.loads((root / "q.json").read_text())["meta/query_seed"] == 4
    assert len(drawn) == 1 and np.array_equal(drawn[0], real(np.repeat(np.arange(6), 5), 12, 4))
    assert np.bincount(np.repeat(np.arange(6), 5)[drawn[0]], minlength=6).tolist() == [2] * 6  # 2 per class
    again = evaluate(_cfg(fixture_paths, out=str(root / "q2.json"), max_queries=12, query_seed=4))
    assert _drop_how(again) == _drop_how(m)  # seeded
    full = evaluate(_cfg(fixture_paths, out=str(root / "q3.json"), max_queries=30))
    assert full["meta/n_queries"] == 30 and full["meta/max_queries"] == 30
    # classification uses every item of the split, sampled or not
    assert all(m[k] == full[k] for k in ("acc/image", "acc/text", "acc/fused", "macro_acc/text", "modality_gap"))
    # the report then draws from the queries, whichever the mode
    res = run_evaluation(_cfg(fixture_paths, out=str(root / "q4.json"), max_queries=12, data="resident"))
    test_items = features.read_features(fixture_paths["features"]).indices("test")
    assert len(res.outputs.items) == 12 and set(res.outputs.items.tolist()) <= set(test_items.tolist())


def test_map_at_r_is_bounded_by_the_cap(fixture_paths):
    """MAP@min(R, cap): with cap 1 it is the precision of the first item, R@1 of every defined query."""
    root = fixture_paths["root"]
    m = evaluate(_cfg(fixture_paths, out=str(root / "cap.json"), map_cap=1))
    full = evaluate(_cfg(fixture_paths, out=str(root / "nocap.json")))
    for task in TASKS:
        assert m[f"{task}/MAP@R"] == pytest.approx(m[f"{task}/R@1"], abs=1e-12)
        assert m[f"{task}/R@5"] == full[f"{task}/R@5"]
    assert any(full[f"{t}/MAP@R"] != m[f"{t}/MAP@R"] for t in TASKS)  # the cap really acts
    assert m["meta/map_r_cap"] == 1
    streamed = evaluate(_cfg(fixture_paths, out=str(root / "cap2.json"), map_cap=1, data="stream"))
    assert _drop_how(streamed) == _drop_how(m)


def test_several_query_groups_give_the_same_metrics(fixture_paths, monkeypatch):
    root = fixture_paths["root"]
    one = evaluate(_cfg(fixture_paths, out=str(root / "g1.json"), data="stream", query_chunk=4, batch_size=4))
    monkeypatch.setattr(evaluate_module, "QUERY_STATE_BYTES", 1)  # one query chunk per gallery pass
    many = evaluate(_cfg(fixture_paths, out=str(root / "g2.json"), data="stream", query_chunk=4, batch_size=4))
    assert _drop_how(one) == _drop_how(many)


def test_streamed_baselines_and_report(fixture_paths, monkeypatch, tmp_path):
    monkeypatch.setattr(evaluate_module, "fit", fake_fit([]))
    root = fixture_paths["root"]
    resident = evaluate(_cfg(fixture_paths, baselines=True, out=str(root / "b1.json"), data="resident"))
    streamed = run_evaluation(_cfg(fixture_paths, baselines=True, out=str(root / "b2.json"), data="stream",
                                   max_queries=20, report=str(tmp_path / "report")))
    sampled = evaluate(_cfg(fixture_paths, baselines=True, out=str(root / "b3.json"), data="resident", max_queries=20))
    assert _drop_how(streamed.metrics) == _drop_how(sampled)
    assert set(streamed.metrics) == set(resident)
    assert {k: v for k, v in streamed.metrics.items() if k.startswith("baseline/acc")} == \
        {k: v for k, v in resident.items() if k.startswith("baseline/acc")}  # classification: every item
    assert len(streamed.outputs.items) == 20  # the report draws from the queries
    assert (tmp_path / "report" / "index.html").is_file()


def test_eval_config_refuses_unknown_choices():
    with pytest.raises(HuseError, match="data"):
        EvalConfig(data="disk")
    with pytest.raises(HuseError, match="similarity"):
        EvalConfig(similarity="float16")
    with pytest.raises(HuseError, match="max_queries"):
        EvalConfig(max_queries=-1)


# ------------------------------------------------------------------- attribute-aware search (issue 21)

from huse_pipeline.train.model import load_checkpoint, model_from_checkpoint  # noqa: E402


class _FakeTextEncoder:
    """Deterministic 10-d features per query string (the fixture's text dimension)."""

    max_tokens, dim = 32, 10

    def count_tokens(self, texts):
        return [len(t.split()) for t in texts]

    def encode(self, texts, batch_size=256):
        return np.stack([np.random.default_rng(sum(map(ord, t))).normal(size=self.dim) for t in texts]).astype(np.float32)


COLOURS = ["Red", "Navy Blue", "Red", ""]  # by item position; "" = no colour


def _write_attributes(paths: dict[str, Path]) -> tuple[Path, features.FeatureSet]:
    """An attributes CSV for the fixture: colours by position, items without one, a row of no item."""
    fs = features.read_features(paths["features"])
    rows = [f"{p},{i},{COLOURS[i % 4]}" for i, p in enumerate(fs.image_path)] + ["images/absent.png,999,Green"]
    csv = paths["root"] / "attributes.csv"
    csv.write_text("image,id,baseColour\n" + "\n".join(rows) + "\n")
    return csv, fs


def test_attribute_queries_and_measure_match_a_plain_loop(fixture_paths):
    csv, fs = _write_attributes(fixture_paths)
    items = fs.indices("test")
    queries = evaluate_module.attribute_queries(fs, items, csv, encoder=_FakeTextEncoder(), min_items=2)
    # the queries are exactly the (colour, class) pairs with >= 2 test items, named "<colour> <leaf>"
    colour_of = {p: COLOURS[i % 4] or None for i, p in enumerate(fs.image_path)}
    counts: dict[tuple[str, int], int] = {}
    for i in items:
        if colour_of[fs.image_path[i]]:
            key = (colour_of[fs.image_path[i]], int(fs.labels[i]))
            counts[key] = counts.get(key, 0) + 1
    expected = sorted(f"{c} {fs.class_names[y].split('<')[-1]}" for (c, y), n in counts.items() if n >= 2)
    assert sorted(queries.text) == expected and len(expected) > 0
    assert (queries.item_colour == -1).sum() == sum(1 for i in items if colour_of[fs.image_path[i]] is None)
    # the same queries from the file read in blocks
    with features.open_features(fixture_paths["features"]) as ff:
        again = evaluate_module.attribute_queries(ff, items, csv, encoder=_FakeTextEncoder(), min_items=2)
    assert again.text == queries.text and np.array_equal(again.item_colour, queries.item_colour)

    model = model_from_checkpoint(load_checkpoint(fixture_paths["checkpoint"]), torch.device("cpu"))
    out = evaluate_module.split_outputs(model, model, fs, items, torch.device("cpu"), 64)
    cfg = _cfg(fixture_paths, gallery_chunk=4)  # several gallery blocks
    got = evaluate_module.attribute_metrics(model, queries, out, cfg, k=3)
    both = cls_only = colour_only = 0.0
    with torch.no_grad():
        q = model.embed_text(torch.from_numpy(queries.features))
    for row in range(len(queries.text)):
        scores = [float(q[row].double() @ out.image_emb[j].double()) for j in range(len(items))]
        top = sorted(range(len(items)), key=lambda j: (-scores[j], j))[:3]
        want_colour, want_label = queries.colours[queries.colour[row]], queries.label[row]
        colour = [colour_of[fs.image_path[items[j]]] == want_colour for j in top]
        label = [fs.labels[items[j]] == want_label for j in top]
        both += sum(c and y for c, y in zip(colour, label)) / 3
        cls_only += sum(label) / 3
        colour_only += sum(colour) / 3
    n = len(queries.text)
    assert got["attr/colour_class@3"] == pytest.approx(both / n)
    assert got["attr/class@3"] == pytest.approx(cls_only / n)
    assert got["attr/colour@3"] == pytest.approx(colour_only / n)
    assert got["attr/n_queries"] == n


@pytest.mark.parametrize("kw", [{}, {"max_queries": 11, "gallery_chunk": 4, "batch_size": 4, "block_rows": 9}])
def test_eval_with_attributes_resident_and_streamed_alike(fixture_paths, monkeypatch, tmp_path, kw):
    csv, _ = _write_attributes(fixture_paths)
    monkeypatch.setattr(evaluate_module, "load_text_encoder", lambda name, device="cpu": _FakeTextEncoder())
    resident = evaluate(_cfg(fixture_paths, attributes=str(csv), out=str(tmp_path / "r.json"), data="resident", **kw))
    streamed = evaluate(_cfg(fixture_paths, attributes=str(csv), out=str(tmp_path / "s.json"), data="stream", **kw))
    keys = {"attr/colour_class@10", "attr/class@10", "attr/colour@10", "attr/n_queries"}
    assert keys <= set(resident) and set(resident) == set(CONTRACT_KEYS) | set(META_KEYS) | keys
    assert _drop_how(resident) == _drop_how(streamed)
    assert 0 <= resident["attr/colour_class@10"] <= resident["attr/class@10"] <= 1
    assert resident["attr/n_queries"] > 0
    assert "attribute search" in format_table(resident)


def test_eval_attributes_refuses_a_csv_without_the_columns_or_the_items(fixture_paths, monkeypatch, tmp_path):
    monkeypatch.setattr(evaluate_module, "load_text_encoder", lambda name, device="cpu": _FakeTextEncoder())
    bad = tmp_path / "bad.csv"
    bad.write_text("image,colour\nx.png,Red\n")
    with pytest.raises(HuseError, match="baseColour"):
        evaluate(_cfg(fixture_paths, attributes=str(bad), out=str(tmp_path / "e.json")))
    other = tmp_path / "other.csv"
    other.write_text("image,baseColour\nnot/an/item.png,Red\n")
    with pytest.raises(HuseError, match="image paths"):
        evaluate(_cfg(fixture_paths, attributes=str(other), out=str(tmp_path / "e.json")))


def test_cli_eval_attributes(fixture_paths, monkeypatch, tmp_path):
    import cli

    csv, _ = _write_attributes(fixture_paths)
    monkeypatch.setattr(evaluate_module, "load_text_encoder", lambda name, device="cpu": _FakeTextEncoder())
    result = CliRunner().invoke(cli.main, ["eval", "--run", str(fixture_paths["run"]), "--features",
                                           str(fixture_paths["features"]), "--attributes", str(csv),
                                           "--out", str(tmp_path / "c.json"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "attribute search" in result.output
    assert "attr/colour_class@10" in json.loads((tmp_path / "c.json").read_text())
