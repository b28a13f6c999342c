"""The one featurizer (huse_pipeline.encoders.featurizer): rebuilt from a feature file's recorded config,
it gives the file's stored features again for the same images (paths or PIL images) and texts (long ones
TF-IDF-reduced alike); unusable inputs get a reason, not an exception. Stub encoders over rows of the
bundled demo catalogue, plus MiniLM for texts."""
from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from huse_pipeline.data.text import normalise_text, tfidf_select
from huse_pipeline.encoders.featurizer import Featurizer, recorded_config, staleness
from huse_pipeline.encoders.text import StubTextEncoder
from huse_pipeline.extract.run import ExtractConfig, extract_features
from huse_pipeline.store import features

REPO = Path(__file__).resolve().parents[2]
LONG_TEXT = " ".join(f"this shirt is soft and the fabric is cotton{i}." for i in range(8))  # 64 stub tokens > 32
# about 60 sentences, over 254 MiniLM word pieces: reduced for the real encoder too
VERY_LONG_TEXT = " ".join(f"Sentence {i} says the blue cotton shirt{i} has {i} buttons and a collar." for i in range(60))


def _demo_catalogue(root: Path, n_demo: int = 20) -> Path:
    """The first demo rows (200x200 JPEGs, absolute paths) plus odd and unusable rows, in `root`."""
    with open(REPO / "data" / "catalogue.csv", newline="") as fh:
        rows = [r for _, r in zip(range(n_demo), csv.DictReader(fh))]
    for r in rows:
        r["image"] = str((REPO / "data" / r["image"]).resolve())
    rows[3]["text"] = LONG_TEXT
    rows[5]["text"] = VERY_LONG_TEXT
    rows[7]["text"] = "Blue&amp;White <b>Mug</b>\u00a0 set"
    Image.new("RGBA", (30, 20), (200, 30, 30, 90)).save(root / "alpha.png")
    (root / "notimage.png").write_text("hello")
    rows += [{"image": "alpha.png", "text": "a translucent red square", "label": rows[0]["label"]},
             {"image": "notimage.png", "text": "not an image", "label": rows[0]["label"]},
             {"image": "missing.jpg", "text": "no file", "label": rows[0]["label"]},
             {"image": rows[1]["image"], "text": " <br> ", "label": rows[1]["label"]}]
    path = root / "catalogue.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image", "text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def _image_paths(fs: features.FeatureSet) -> list[Path]:
    root = Path(fs.attrs["image_root"])
    return [Path(p) if Path(p).is_absolute() else root / p for p in fs.image_path]


@pytest.fixture(scope="module")
def stub_file(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    out = root / "feats.h5"
    extract_features(ExtractConfig(allow_outside_root=True, catalogue=str(_demo_catalogue(root)), out=str(out), image_encoder="stub",
                                   text_encoder="stub", batch_size=4, part_rows=8, num_workers=0, device="cpu"))
    return out


def test_rebuilt_featurizer_gives_the_stored_features_again(stub_file):
    fs = features.read_features(stub_file)
    assert len(fs.row) == 20 + 1 and len(fs.skipped) == 3  # the alpha PNG is usable; three rows are not
    featurizer = Featurizer.from_feature_file(stub_file, device="cpu")
    assert featurizer.image_dim == fs.image_emb.shape[1] == 16 + 4 * 3 and featurizer.text_dim == fs.text_emb.shape[1] == 16
    assert featurizer.image_encoder.pool == "avg+mid" and featurizer.transform.size == 32

    text_emb, reasons = featurizer.encode_texts(fs.text)  # the raw catalogue texts
    assert reasons == [""] * len(fs.row) and text_emb.dtype == np.float32
    np.testing.assert_array_equal(text_emb, fs.text_emb)

    paths = _image_paths(fs)
    image_emb, reasons = featurizer.encode_images(paths)
    assert reasons == [""] * len(fs.row) and image_emb.dtype == np.float32
    np.testing.assert_allclose(image_emb, fs.image_emb, rtol=0, atol=1e-6)
    # the same files opened with PIL (not loaded yet: the JPEGs are decoded at the same reduced scale)
    opened = [Image.open(p) for p in paths]
    np.testing.assert_allclose(featurizer.encode_images(opened)[0], fs.image_emb, rtol=0, atol=1e-6)
    assert opened[0].size[0] < 200  # decoded by DCT scaling, as extraction decodes the file
    # decoded in memory, a PNG's pixels are its file's pixels
    png = [i for i, p in enumerate(paths) if p.suffix == ".png"]
    assert len(png) == 1
    np.testing.assert_allclose(featurizer.encode_images([Image.open(paths[png[0]]).copy()])[0][0], fs.image_emb[png[0]],
                               rtol=0, atol=1e-6)


def test_long_texts_are_reduced_as_in_extraction(stub_file):
    fs = features.read_features(stub_file)
    featurizer = Featurizer.from_feature_file(stub_file, device="cpu")
    stub = StubTextEncoder()
    for long in (LONG_TEXT, VERY_LONG_TEXT):
        i = fs.text.index(long)
        prepared = featurizer.prepare_texts([long])
        used = tfidf_select(normalise_text(long), stub.max_tokens, stub.count_tokens)  # paper §4.1.1, by hand
        assert prepared.reduced.tolist() == [True] and prepared.text_used == [used]
        assert 0 < len(used.split()) <= stub.max_tokens < len(long.split())
        emb, reasons = featurizer.encode_texts([long])
        assert reasons == [""]
        np.testing.assert_array_equal(emb[0], stub.encode([used])[0])
        np.testing.assert_array_equal(emb[0], fs.text_emb[i])
    emb, reasons = featurizer.encode_texts(["Blue&amp;White <b>Mug</b>\u00a0 set"])
    np.testing.assert_array_equal(emb[0], stub.encode(["Blue&White Mug set"])[0])  # cleaned first


def test_unusable_inputs_get_a_reason_and_zeros(stub_file, tmp_path):
    featurizer = Featurizer.from_feature_file(stub_file, device="cpu")
    good = _image_paths(features.read_features(stub_file))[0]
    (tmp_path / "notimage.png").write_text("hello")
    (tmp_path / "empty.jpg").write_bytes(b"")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:300])
    items = [tmp_path / "missing.png", str(tmp_path / "notimage.png"), good, tmp_path / "empty.jpg", truncated, 42, None]
    emb, reasons = featurizer.encode_images(items)
    assert reasons == ["missing file", "not an image", "", "empty file", "truncated image",
                       "not an image path or PIL image (int)", "no image"]
    assert emb.shape == (7, featurizer.image_dim)
    assert not emb[[0, 1, 3, 4, 5, 6]].any() and emb[2].any()
    np.testing.assert_allclose(emb[2], featurizer.encode_images([good])[0][0], rtol=0, atol=1e-6)  # neighbours don't matter
    assert featurizer.encode_images([])[0].shape == (0, featurizer.image_dim)

    emb, reasons = featurizer.encode_texts(["", "  <br> &nbsp; ", "a red mug", None])
    assert reasons == ["empty text", "empty text", "", "empty text"]
    assert not emb[[0, 1, 3]].any() and emb[2].any()


def test_an_image_over_the_pixel_limit_is_refused_before_decoding():
    cfg = SimpleNamespace(image_encoder="stub", image_weights=None, image_fit="pad", image_pool="avg",
                          text_encoder="stub", max_image_pixels=50, seed=0, batch_size=8)
    featurizer = Featurizer.from_config(cfg, device="cpu")
    emb, reasons = featurizer.encode_images([Image.new("RGB", (10, 10), (1, 2, 3)), Image.new("RGB", (7, 7), (1, 2, 3))])
    assert reasons == ["image too large (10 x 10 > 50 pixels)", ""] and emb.shape == (2, 16)


def test_a_fresh_file_is_not_stale_and_old_files_rebuild_their_pooling(stub_file):
    attrs = features.read_attrs(stub_file)
    assert staleness(attrs) == []
    # a file made before --image-pool existed records neither the field nor the attribute: its features are "avg"
    old = {**attrs, "extract_config": {k: v for k, v in attrs["extract_config"].items() if k != "image_pool"}}
    old.pop("image_pool")
    assert recorded_config(old).image_pool == "avg" and recorded_config(attrs).image_pool == "avg+mid"
    with pytest.raises(Exception, match="does not record its extraction config"):
        recorded_config({"settings": {}}, "x.h5")


def test_minilm_features_are_reproduced(tmp_path):
    """The real text encoder: the rebuilt featurizer's MiniLM features match the file's, the text longer
    than MiniLM reads (254 word pieces) included."""
    csv_path = _demo_catalogue(tmp_path, n_demo=8)
    out = tmp_path / "feats.h5"
    extract_features(ExtractConfig(allow_outside_root=True, catalogue=str(csv_path), out=str(out), image_encoder="stub", batch_size=4,
                                   num_workers=0, device="cpu"))
    fs = features.read_features(out)
    assert fs.attrs["text_encoder"] == "all-MiniLM-L6-v2" and fs.attrs["preprocessing"]["text"]["texts_reduced"] == 1
    featurizer = Featurizer.from_feature_file(out, device="cpu")
    emb, reasons = featurizer.encode_texts(fs.text)
    assert reasons == [""] * len(fs.text) and emb.shape == (len(fs.text), 384)
    # sentence-transformers batches by length, so padding may differ from extraction's batches
    np.testing.assert_allclose(emb, fs.text_emb, rtol=0, atol=1e-6)
    i = fs.text.index(VERY_LONG_TEXT)
    prepared = featurizer.prepare_texts([VERY_LONG_TEXT])
    assert prepared.reduced.tolist() == [True]
    assert featurizer.text_encoder.count_tokens(prepared.text_used)[0] <= featurizer.text_encoder.max_tokens
    np.testing.assert_allclose(featurizer.encode_texts([VERY_LONG_TEXT])[0][0], fs.text_emb[i], rtol=0, atol=1e-6)
