"""The query side on the demo catalogue (stub encoders): a text or an image searched is encoded exactly
as stage one encoded it, then the tower; `huse predict` reproduces `huse eval`'s accuracies; bad rows
get a reason, never a traceback."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from search_fixtures import one_thread

import cli
from huse_pipeline.store import features
from huse_pipeline.train.model import load_checkpoint, model_from_checkpoint


@pytest.fixture(scope="module")
def space(stub_demo):
    from huse_pipeline.search.space import Space

    return Space.load(stub_demo["run"], stub_demo["features"], device="cpu")


def test_text_query_gets_the_vector_of_extraction_and_tower(stub_demo, space):
    fs = features.read_features(stub_demo["features"])
    model = model_from_checkpoint(load_checkpoint(stub_demo["run"] / "best.pt"))
    items = [0, 7, 123, len(fs.labels) - 1]
    emb, reasons = space.encode_texts([fs.text[i] for i in items])  # the raw catalogue texts
    assert reasons == [""] * len(items)
    with torch.no_grad():
        expected = model.embed_text(torch.from_numpy(fs.text_emb[items])).numpy()
    np.testing.assert_allclose(emb, expected, atol=1e-6)
    # ... which is the vector the index stores for those items
    index = space.index
    stored = np.asarray(index.vectors("text"))[[index.position(int(fs.row[i])) for i in items]]
    np.testing.assert_allclose(emb, stored, atol=1e-6)


def test_cli_text_search_finds_the_item_itself(stub_demo):
    fs = features.read_features(stub_demo["features"])
    i = 42
    result = CliRunner().invoke(cli.main, ["search", fs.text[i], "--target", "text", "-k", "3", "--json",
                                           "--run", str(stub_demo["run"]), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    top = json.loads(result.output)["results"][0]
    same_text = [int(fs.row[j]) for j in range(len(fs.text)) if fs.text[j] == fs.text[i]]
    assert top["id"] in same_text and top["score"] == pytest.approx(1.0, abs=1e-5)
    assert top["class_path"] == fs.class_names[fs.labels[i]] and top["title"] == fs.text[i]


def test_image_query_gets_the_vector_of_extraction_and_tower(stub_demo, space):
    fs = features.read_features(stub_demo["features"])
    items = [3, 200]
    paths = [str(fs.image_root / fs.image_path[i]) for i in items]
    emb, reasons = space.encode_images(paths)
    assert reasons == ["", ""]
    index = space.index
    stored = np.asarray(index.vectors("image"))[[index.position(int(fs.row[i])) for i in items]]
    np.testing.assert_allclose(emb, stored, atol=1e-5)
    hits = space.search_image(paths[0], k=1)
    assert hits[0].id == int(fs.row[items[0]]) and hits[0].score == pytest.approx(1.0, abs=1e-5)


def test_predict_reproduces_eval_accuracies(stub_demo, tmp_path):
    out = tmp_path / "pred.csv"
    with one_thread():
        result = CliRunner().invoke(cli.main, ["predict", "--catalogue", str(stub_demo["catalogue"]), "--out", str(out),
                                               "--run", str(stub_demo["run"]), "-k", "3", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    pred = pd.read_csv(out, keep_default_na=False)
    fs = features.read_features(stub_demo["features"])
    test_rows = set(fs.row[fs.indices("test")].tolist())
    test = pred[pred["row"].isin(test_rows)]
    assert len(test) == len(test_rows) and (test["reason"] == "").all()
    assert set(pred.loc[pred["row"].isin(test_rows), "split"]) == {"test"}  # the same split as stage one
    evaluated = json.loads((stub_demo["run"] / "eval_test.json").read_text())
    for source in ("image", "text", "fused"):
        acc = float((test[f"{source}_class_1"] == test["label"]).mean())
        assert acc == pytest.approx(evaluated[f"acc/{source}"], abs=1e-9), source
    probs = test[[f"fused_prob_{j}" for j in (1, 2, 3)]].to_numpy(dtype=float)
    assert (np.diff(probs, axis=1) <= 0).all() and (probs.sum(1) <= 1 + 1e-6).all()
    assert "fusion_weight" in result.output


def test_predict_bad_rows_get_a_reason(stub_demo, tmp_path):
    demo = stub_demo["catalogue"].parent
    (demo / "notes.txt").write_text("not an image")
    frame = pd.DataFrame({"image": ["images/" + next((demo / "images").iterdir()).name, "images/missing.jpg",
                                    "notes.txt", "", "../outside.png"],
                          "text": ["Blue denim jeans", "Red cotton t-shirt", "", "White sneakers", "Mug"]})
    from PIL import Image

    Image.new("RGB", (8, 8)).save(demo.parent / "outside.png")  # exists, but out of the image root
    csv = demo / "new.csv"  # no label column: new products
    frame.to_csv(csv, index=False)
    out = tmp_path / "new_pred.csv"
    result = CliRunner().invoke(cli.main, ["predict", "--catalogue", str(csv), "--out", str(out), "--run",
                                           str(stub_demo["run"]), "--device", "cpu"])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    pred = pd.read_csv(out, keep_default_na=False)
    assert pred["reason"].tolist() == ["", "image: missing file", "image: not an image; text: empty text",
                                       "image: empty image path",
                                       "image: image outside --image-root (pass --allow-outside-root to read it)"]
    assert (pred["fused_class_1"] != "").tolist() == [True, False, False, False, False]
    assert (pred["text_class_1"] != "").tolist() == [True, True, False, True, True]  # the usable modality predicts
    assert (pred["image_class_1"] != "").tolist() == [True, False, False, False, False]
    missing = CliRunner().invoke(cli.main, ["predict", "--catalogue", str(demo / "nope.csv"), "--run", str(stub_demo["run"])])
    assert missing.exit_code != 0 and "does not exist" in missing.output and "Traceback" not in missing.output


def test_python_api_predict(space):
    preds = space.predict(texts=["Blue denim jeans", ""], k=2)
    assert preds[0].text is not None and len(preds[0].text) == 2 and preds[0].image is None
    assert preds[1].text is None and preds[1].reason == "text: empty text"
    assert preds[0].fused is None  # fused needs both modalities
