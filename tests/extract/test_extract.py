"""Stage one end to end (huse_pipeline.extract, `huse extract-features`): bad rows, resumption after an
exception or a SIGKILL, up-to-date and mismatch handling, augmented views; stub encoders and tiny
images built in tmp_path, plus one run of the real default encoders on a few rows."""
from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace
from importlib.metadata import version
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import cli
from huse_pipeline.data.images import ImageTransform
from huse_pipeline.data.text import normalise_text
from huse_pipeline.encoders import featurizer as featurizer_module
from huse_pipeline.encoders.image import StubImageEncoder
from huse_pipeline.encoders.text import StubTextEncoder
from huse_pipeline.errors import HuseError
from huse_pipeline.extract import run as extract
from huse_pipeline.extract.plan import csv_line_numbers, parts_folder, plan_batches, plan_parts
from huse_pipeline.extract.run import ExtractConfig, extract_features
from huse_pipeline.store import features

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["apparel<topwear<shirts", "apparel<bottomwear<jeans", "footwear<shoes<sneakers"]
COLOURS = [(200, 30, 30), (30, 30, 200), (30, 160, 30)]
LONG_TEXT = " ".join(f"this shirt is soft and the fabric is cotton{i}." for i in range(8))  # 64 stub tokens > 32
EXPECTED_SKIPS = {
    "missing file": 1,
    "empty file": 1,
    "truncated image": 1,
    "not an image": 1,
    "image too large": 1,
    "empty text": 1,
    "malformed label": 2,
}


def _png_header_only(path: Path, w: int, h: int) -> None:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def _write_csv(path: Path, rows: list[dict], columns=("image", "text", "label", "split")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def build_catalogue(root: Path, n_good: int = 18, odd: bool = True, bad: bool = True) -> tuple[Path, dict[int, str]]:
    """A catalogue under `root`: plain rows, usable odd images, and one row per unusable kind.

    Returns the CSV path and {row: reason kind} of the rows that must be skipped.
    """
    img = root / "images"
    img.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for i in range(n_good):
        c = i % 3
        arr = np.full((24, 32, 3), COLOURS[c], np.uint8)
        arr[i % 24] = 255  # every image differs
        name = f"images/g{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(arr).save(root / name)
        split = {0: "val", 1: "test"}.get((i // 3) % 6, "train")
        text = LONG_TEXT if i == 4 else f"{CLASSES[c].split('<')[-1]} number {i} &amp; <b>more</b>"
        rows.append({"image": name, "text": text, "label": CLASSES[c], "split": split})
    if odd:
        def add(name: str, im: Image.Image, **save) -> None:
            im.save(img / name, **save)
            rows.append({"image": f"images/{name}", "text": f"odd {name}", "label": CLASSES[0], "split": "train"})

        add("cmyk.jpg", Image.new("CMYK", (20, 30), (0, 255, 255, 0)))
        add("grey.png", Image.new("L", (20, 30), 90))
        add("bilevel.png", Image.new("1", (20, 30), 1))
        pal = Image.new("P", (20, 30), 1)
        pal.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
        add("palette.png", pal)
        add("palette_t.png", pal, transparency=1)
        add("grey16.png", Image.fromarray(np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (24, 1))))
        add("rgba.png", Image.new("RGBA", (20, 30), (200, 30, 30, 100)))
        add("la.png", Image.new("LA", (20, 30), (40, 128)))
        exif = Image.Exif()
        exif[0x0112] = 6
        add("rotated.jpg", Image.new("RGB", (40, 20), (30, 30, 200)), exif=exif.tobytes())
        add("large.jpg", Image.new("RGB", (1600, 1200), (30, 160, 30)), quality=80)
        Image.new("RGB", (20, 20), (5, 6, 7)).save(img / "absolute.png")
        rows.append({"image": str((img / "absolute.png").resolve()), "text": "absolute path", "label": CLASSES[1], "split": "train"})
    skips: dict[int, str] = {}
    if bad:
        def add_bad(kind: str, image: str, text: str = "a product", label: str = CLASSES[2]) -> None:
            skips[len(rows)] = kind
            rows.append({"image": image, "text": text, "label": label, "split": "train"})

        (img / "empty.png").write_bytes(b"")
        good = (root / "images/g0.jpg").read_bytes()
        (img / "truncated.jpg").write_bytes(good[: len(good) // 2])
        (img / "notimage.png").write_text("hello")
        _png_header_only(img / "huge.png", 30000, 30000)
        add_bad("missing file", "images/missing.png")
        add_bad("empty file", "images/empty.png")
        add_bad("truncated image", "images/truncated.jpg")
        add_bad("not an image", "images/notimage.png")
        add_bad("image too large", "images/huge.png")
        add_bad("empty text", "images/g0.jpg", text="  <br> &nbsp; ")
        add_bad("malformed label", "images/g0.jpg", label="apparel<<shirts")
        add_bad("malformed label", "images/g0.jpg", label="")
    return _write_csv(root / "catalogue.csv", rows), skips


def stub_config(csv_path: Path, out: Path, **kw) -> ExtractConfig:
    base = dict(catalogue=str(csv_path), out=str(out), image_encoder="stub", text_encoder="stub",
                part_rows=8, batch_size=4, num_workers=0, device="cpu")
    return ExtractConfig(**{**base, **kw})


def assert_same_file(a: Path, b: Path) -> None:
    """Every group, dataset (values) and attribute of two HDF5 files are equal."""
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        names_a: list[str] = []
        names_b: list[str] = []
        fa.visit(names_a.append)
        fb.visit(names_b.append)
        assert names_a == names_b
        for name in ["/"] + names_a:
            assert dict(fa[name].attrs) == dict(fb[name].attrs), name
            if isinstance(fa[name], h5py.Dataset):
                assert fa[name].dtype == fb[name].dtype, name
                np.testing.assert_array_equal(fa[name][()], fb[name][()], err_msg=name)


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    root = tmp_path_factory.mktemp("cat")
    return build_catalogue(root)


@pytest.fixture(scope="module")
def reference(catalogue, tmp_path_factory):
    """One uninterrupted run on the full catalogue: (config, summary, out path)."""
    csv_path, _ = catalogue
    out = tmp_path_factory.mktemp("ref") / "feats.h5"
    cfg = stub_config(csv_path, out)
    summary = extract_features(cfg)
    return cfg, summary, out


# ---------------------------------------------------------------------------------- planning


def test_plan_parts_and_batches():
    assert plan_parts(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert plan_parts(4, 4) == [(0, 4)]
    assert plan_parts(0, 4) == []
    # batches never cross a part and restart at each part's start
    assert plan_batches([(0, 5), (5, 9)], 2) == [[0, 1], [2, 3], [4], [5, 6], [7, 8]]
    assert plan_batches([(5, 9)], 2) == [[5, 6], [7, 8]]


def test_csv_line_numbers_follow_quoted_newlines(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text('image,text,label\na.jpg,"two\nlines",x\n\nb.jpg,one,y\n')
    assert csv_line_numbers(path, 2) == [2, 5]
    # a row of empty fields is a row to pandas (only blank lines are skipped): counting it keeps the lines true
    path.write_text('image,text,label\na.jpg,"two\nlines",x\n,,\n\n   \nb.jpg,one,y\n')
    assert csv_line_numbers(path, 3) == [2, 4, 7]


# ------------------------------------------------------------------------------- end to end


def test_every_row_is_encoded_or_skipped_with_its_reason(catalogue, reference):
    csv_path, skips = catalogue
    cfg, summary, out = reference
    fs = features.read_features(out)
    n_rows = sum(1 for _ in open(csv_path)) - 1
    assert summary["up_to_date"] is False
    assert summary["skipped_by_reason"] == dict(sorted(EXPECTED_SKIPS.items()))
    assert summary["skipped"] == len(skips) == len(fs.skipped)
    assert summary["items"] == len(fs.row) == n_rows - len(skips)
    assert sorted(fs.skipped["row"].tolist()) == sorted(skips)
    for row, reason in zip(fs.skipped["row"], fs.skipped["reason"]):
        assert reason.split(" (")[0] == skips[row]
    first = min(skips)
    assert summary["skipped_examples"][0].startswith(f"CSV line {first + 2} (row {first}, image 'images/missing.png')")
    assert fs.class_names == sorted(CLASSES)
    assert set(fs.row.tolist()).isdisjoint(skips)
    assert summary["splits"] == {s: int((fs.split == s).sum()) for s in ("train", "val", "test")}
    assert summary["texts_reduced"] == 1 and summary["classes"] == 3
    assert summary["images_per_s"] > 0 and summary["texts_per_s"] > 0
    assert not parts_folder(out).exists()


def test_embeddings_match_encoding_each_row_alone(catalogue, reference):
    """Batching, skipping and part boundaries must not move any row's numbers (brute-force reference)."""
    csv_path, _ = catalogue
    cfg, _, out = reference
    fs = features.read_features(out)
    image_encoder, text_encoder = StubImageEncoder(torch.device("cpu"), pool=cfg.image_pool), StubTextEncoder()
    transform = ImageTransform(size=image_encoder.input_size, fit=cfg.image_fit)
    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for i, row in enumerate(fs.row):
        src = rows[row]
        path = Path(src["image"]) if Path(src["image"]).is_absolute() else csv_path.parent / src["image"]
        expected = image_encoder.encode(transform(path)[None]).numpy()[0]
        np.testing.assert_allclose(fs.image_emb[i], expected, rtol=1e-5, atol=1e-6)
        assert fs.text[i] == src["text"] and fs.image_path[i] == src["image"]
        assert fs.class_names[fs.labels[i]] == src["label"] and fs.split[i] == src["split"]
    with h5py.File(out) as f:
        text_used = f["items/text_used"].asstr()[()].tolist()
    for i, used in enumerate(text_used):
        clean = normalise_text(fs.text[i])
        assert used == clean if len(clean.split()) <= 32 else len(used.split()) <= 32
        np.testing.assert_allclose(fs.text_emb[i], text_encoder.encode([used])[0], rtol=1e-6, atol=1e-7)
    assert "&amp;" not in text_used[0] and "<b>" not in text_used[0]


def test_attributes_say_how_the_file_was_made(catalogue, reference):
    csv_path, _ = catalogue
    cfg, _, out = reference
    attrs = features.read_attrs(out)
    assert attrs["extract_config"] == asdict(cfg)
    assert attrs["image_encoder"] == "stub" and attrs["text_encoder"] == "stub"
    assert attrs["image_dim"] == 16 + 4 * 3 and attrs["image_pool"] == "avg+mid"  # stub: 16 + its 2x2-pooled RGB input
    assert attrs["text_dim"] == 16 and attrs["augment_views"] == 0
    assert attrs["image_root"] == str(csv_path.parent.resolve()) and Path(attrs["image_root"]).is_absolute()
    assert attrs["catalogue"] == str(csv_path.resolve())
    assert attrs["catalogue_sha256"] == __import__("hashlib").sha256(csv_path.read_bytes()).hexdigest()
    assert attrs["split_source"] == "catalogue" and attrs["label_sep"] == "<"
    assert attrs["schema_version"] == features.SCHEMA_VERSION and attrs["package_version"]
    image_pre, text_pre = attrs["preprocessing"]["image"], attrs["preprocessing"]["text"]
    assert image_pre["fit"] == "pad" and image_pre["size"] == 32 and "augmentation" in image_pre
    assert text_pre["texts_reduced"] == 1 and text_pre["max_tokens"] == 32 and "tfidf" in text_pre
    assert "image_weights" in attrs and "image_normalisation" in attrs
    assert not any("time" in k or "second" in k for k in attrs)  # nothing that changes between runs


def test_strict_fails_on_the_first_unusable_row(catalogue, tmp_path):
    csv_path, skips = catalogue
    first = min(skips)
    with pytest.raises(HuseError, match=rf"row {first} \(CSV line {first + 2}, image 'images/missing.png'\) is unusable: missing file"):
        extract_features(stub_config(csv_path, tmp_path / "f.h5", strict=True))
    assert not (tmp_path / "f.h5").exists()


def test_strict_passes_a_clean_catalogue(tmp_path):
    csv_path, _ = build_catalogue(tmp_path, n_good=6, odd=True, bad=False)
    summary = extract_features(stub_config(csv_path, tmp_path / "f.h5", strict=True))
    assert summary["skipped"] == 0 and summary["items"] == 6 + 11


def test_stratified_split_without_split_column(tmp_path):
    rows = [{"image": f"i{i}.png", "text": f"item {i}", "label": CLASSES[i % 2]} for i in range(20)]
    for i in range(20):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / f"i{i}.png")
    csv_path = _write_csv(tmp_path / "c.csv", rows, columns=("image", "text", "label"))
    summary = extract_features(stub_config(csv_path, tmp_path / "f.h5", split_seed=3))
    attrs = features.read_attrs(tmp_path / "f.h5")
    assert attrs["split_source"].startswith("stratified(seed=3")
    assert summary["splits"]["val"] >= 2 and summary["splits"]["test"] >= 2


def test_cli_reports_missing_columns_without_traceback(tmp_path):
    csv_path = tmp_path / "c.csv"
    csv_path.write_text("image,caption\na.jpg,hello\n")
    result = CliRunner().invoke(cli.main, ["extract-features", "--catalogue", str(csv_path), "--out", str(tmp_path / "f.h5")])
    assert result.exit_code in (1, 2)
    assert "lacks the required column(s) text, label" in result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)


def test_cli_rejects_unknown_image_encoder_without_traceback(tmp_path):
    csv_path = tmp_path / "c.csv"
    csv_path.write_text("image,text,label\na.jpg,hello,a<b\n")
    result = CliRunner().invoke(cli.main, ["extract-features", "--catalogue", str(csv_path), "--out", str(tmp_path / "f.h5"),
                                           "--image-encoder", "efficientnet-lite0+resnet9"])
    assert result.exit_code == 2
    assert "unknown image encoder 'resnet9'" in result.output and "joined by '+'" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "f.h5").exists()


def test_cli_image_encoder_spelling_is_normalised(catalogue, tmp_path):
    """' stub' passed the option check but failed when loading ("unknown image encoder ' stub'")."""
    csv_path, _ = catalogue
    result = CliRunner().invoke(cli.main, ["extract-features", "--catalogue", str(csv_path), "--out", str(tmp_path / "f.h5"),
                                           "--image-encoder", " stub ", "--text-encoder", "stub", "--device", "cpu",
                                           "--num-workers", "0"])
    assert result.exit_code == 0, result.output
    assert features.read_attrs(tmp_path / "f.h5")["image_encoder"] == "stub"


def test_image_root_option(tmp_path):
    images = tmp_path / "elsewhere"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), COLOURS[i]).save(images / f"{i}.png")
    rows = [{"image": f"{i}.png", "text": f"item {i}", "label": CLASSES[i], "split": "train"} for i in range(3)]
    csv_path = _write_csv(tmp_path / "c.csv", rows)
    with pytest.raises(HuseError, match=r"no usable rows .*missing file: 3.*--image-root"):
        extract_features(stub_config(csv_path, tmp_path / "a.h5"))
    assert not (tmp_path / "a.h5").exists() and not parts_folder(tmp_path / "a.h5").exists()
    summary = extract_features(stub_config(csv_path, tmp_path / "b.h5", image_root=str(images)))
    assert summary["skipped"] == 0
    assert features.read_attrs(tmp_path / "b.h5")["image_root"] == str(images.resolve())


# --------------------------------------------------------------------------- up to date, resume


def test_second_run_is_up_to_date_and_other_settings_are_refused(catalogue, tmp_path):
    csv_path, _ = catalogue
    out = tmp_path / "f.h5"
    cfg = stub_config(csv_path, out)
    extract_features(cfg)
    before = out.stat().st_mtime_ns
    again = extract_features(replace(cfg, num_workers=1))  # how the work runs does not matter
    assert again["up_to_date"] is True and again["items"] > 0
    assert out.stat().st_mtime_ns == before
    with pytest.raises(HuseError, match=r"different settings \(config.image_fit differ\).*--overwrite"):
        extract_features(replace(cfg, image_fit="crop"))
    redone = extract_features(replace(cfg, image_fit="crop"), overwrite=True)
    assert redone["up_to_date"] is False
    assert features.read_attrs(out)["extract_config"]["image_fit"] == "crop"

    result = CliRunner().invoke(cli.main, ["extract-features", "--catalogue", str(csv_path), "--out", str(out),
                                           "--image-encoder", "stub", "--text-encoder", "stub", "--part-rows", "8",
                                           "--batch-size", "4", "--num-workers", "0", "--device", "cpu"])
    assert result.exit_code == 1 and "--overwrite" in result.output and "Traceback" not in result.output


def test_an_unwritable_out_is_a_one_line_error(catalogue, tmp_path):
    csv_path, _ = catalogue
    (tmp_path / "a_file").write_text("x")
    result = CliRunner().invoke(cli.main, ["extract-features", "--catalogue", str(csv_path), "--out",
                                           str(tmp_path / "a_file" / "f.h5"), "--image-encoder", "stub",
                                           "--text-encoder", "stub", "--device", "cpu"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "Error: Not a directory" in result.output and "a_file" in result.output  # click's message, not an exception


def test_foreign_file_at_out_is_refused(catalogue, tmp_path):
    csv_path, _ = catalogue
    out = tmp_path / "f.h5"
    out.write_text("not a feature file")
    with pytest.raises(HuseError, match="--overwrite"):
        extract_features(stub_config(csv_path, out))
    assert out.read_text() == "not a feature file"


# ------------------------------------------------------------------------------ staleness


def _cli_args(cfg: ExtractConfig) -> list[str]:
    return ["extract-features", "--catalogue", cfg.catalogue, "--out", cfg.out, "--image-encoder", cfg.image_encoder,
            "--text-encoder", cfg.text_encoder, "--part-rows", str(cfg.part_rows), "--batch-size", str(cfg.batch_size),
            "--num-workers", str(cfg.num_workers), "--device", cfg.device]


def _edit_recorded_settings(path: Path, edit) -> None:
    """Rewrite a file's settings as another installation would have written them (fingerprint included)."""
    with h5py.File(path, "r+") as f:
        settings = json.loads(f.attrs["settings"])
        edit(settings)
        f.attrs["settings"] = json.dumps(settings, sort_keys=True)
        f.attrs["settings_fingerprint"] = json.dumps(extract._fingerprint(settings))


def test_a_file_from_another_efficientnet_lite_pytorch_is_stale_with_the_reason(catalogue, tmp_path, caplog):
    """The issue's check: a recorded efficientnet-lite-pytorch version other than the installed one is
    reported stale, naming the package and both versions; an unchanged file is up to date."""
    csv_path, _ = catalogue
    cfg = stub_config(csv_path, tmp_path / "f.h5")
    extract_features(cfg)
    assert featurizer_module.staleness(features.read_attrs(cfg.out)) == []
    result = CliRunner().invoke(cli.main, _cli_args(cfg))
    assert result.exit_code == 0 and "is up to date" in result.output, result.output

    installed = version("efficientnet-lite-pytorch")
    _edit_recorded_settings(Path(cfg.out), lambda s: s["versions"].update({"efficientnet-lite-pytorch": "0.0.1"}))
    reason = f"was made with efficientnet-lite-pytorch 0.0.1, this installation has {installed}"
    assert featurizer_module.staleness(features.read_attrs(cfg.out)) == [reason]
    before = Path(cfg.out).read_bytes()
    result = CliRunner().invoke(cli.main, _cli_args(cfg))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{cfg.out} {reason}: its features are stale; rerun with --overwrite" in result.output
    assert "other settings differ" not in result.output
    assert Path(cfg.out).read_bytes() == before  # refused, not silently reused or replaced

    # the other commands' way in says so too (a warning), and the file stays readable
    logger = logging.getLogger("huse_pipeline.encoders.featurizer")
    logger.addHandler(caplog.handler)  # the CLI above stopped huse_pipeline's records from reaching the root logger
    try:
        featurizer_module.Featurizer.from_feature_file(cfg.out, device="cpu")
    finally:
        logger.removeHandler(caplog.handler)
    assert reason in caplog.text and "stale" in caplog.text
    assert len(features.read_features(cfg.out).row) > 0

    # with another setting changed as well, both are said
    with pytest.raises(HuseError, match=r"stale \(and other settings differ: config.image_fit\); rerun with --overwrite"):
        extract_features(replace(cfg, image_fit="crop"))
    result = CliRunner().invoke(cli.main, _cli_args(cfg) + ["--overwrite"])
    assert result.exit_code == 0, result.output
    assert features.read_attrs(cfg.out)["settings"]["versions"]["efficientnet-lite-pytorch"] == installed
    assert extract_features(cfg)["up_to_date"] is True


def test_a_file_made_before_versions_and_weights_were_recorded_is_stale_with_the_reason(catalogue, tmp_path):
    """A file written before this check existed (settings without these entries) stays readable and is
    reported as not recording them, not as up to date and not as a bare "settings differ"."""
    csv_path, _ = catalogue
    cfg = stub_config(csv_path, tmp_path / "f.h5")
    extract_features(cfg)

    def as_before(settings):  # what extract-features recorded until now
        settings.pop("weights_sha256")
        settings["versions"] = {k: settings["versions"][k] for k in ("huse_pipeline", "torch", "torchvision",
                                                                     "sentence-transformers")}

    _edit_recorded_settings(Path(cfg.out), as_before)
    with pytest.raises(HuseError) as info:
        extract_features(cfg)
    message = str(info.value)
    assert message.startswith(f"{cfg.out} does not record the versions of efficientnet-lite-pytorch, transformers, "
                              "tokenizers, Pillow or the sha256 of its weight files (it was made before huse-pipeline "
                              "recorded them): its features may be stale; rerun with --overwrite")
    assert "differ" not in message
    fs = features.read_features(cfg.out)  # still readable
    assert fs.image_emb.shape[0] == len(fs.row) > 0


def test_changed_weights_make_a_file_stale_naming_both_sha256(tmp_path):
    """The checkpoint a file was made with is replaced by another one under the same path."""
    import torchvision

    weights = tmp_path / "r18.pt"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    old_sha = featurizer_module.cached_sha256(weights)
    for i, colour in enumerate(COLOURS):
        Image.new("RGB", (8, 8), colour).save(tmp_path / f"{i}.png")
    rows = [{"image": f"{i}.png", "text": f"item {i}", "label": CLASSES[i], "split": "train"} for i in range(3)]
    cfg = stub_config(_write_csv(tmp_path / "c.csv", rows), tmp_path / "f.h5", image_encoder="resnet18",
                      image_weights=str(weights), image_pool="avg")
    extract_features(cfg)
    recorded = features.read_attrs(cfg.out)["settings"]["weights_sha256"]
    assert recorded == {"image": {"resnet18": old_sha}, "text": {"stub": None}}

    torch.manual_seed(1)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    new_sha = featurizer_module.cached_sha256(weights)
    assert new_sha != old_sha
    reason = (f"was made with image weights resnet18 of sha256 {old_sha[:12]}…, the weight file here ({weights}) "
              f"has sha256 {new_sha[:12]}…")
    assert featurizer_module.staleness(features.read_attrs(cfg.out)) == [reason]
    with pytest.raises(HuseError, match="its features are stale; rerun with --overwrite") as info:
        extract_features(cfg)
    assert reason in str(info.value) and "other settings" not in str(info.value)


def test_the_settings_name_every_package_and_weight_file_behind_a_feature(reference):
    _, _, out = reference
    settings = features.read_attrs(out)["settings"]
    for package in ("torch", "torchvision", "efficientnet-lite-pytorch", "transformers", "sentence-transformers",
                    "Pillow"):
        assert settings["versions"][package] == version(package)
    assert settings["weights_sha256"] == {"image": {"stub": None}, "text": {"stub": None}}
    files = featurizer_module.resolve_weight_files(ExtractConfig(catalogue="c.csv"))  # the defaults, not loaded
    lite0 = files["image"]["efficientnet-lite0"]
    assert lite0.endswith(".pth") and set(files["image"]) == {"efficientnet-lite0", "efficientnet-lite2"}
    assert featurizer_module.weight_digests(files)["image"]["efficientnet-lite0"] == \
        __import__("hashlib").sha256(Path(lite0).read_bytes()).hexdigest()
    assert Path(files["text"]["all-MiniLM-L6-v2"]).is_dir()


def _fail_after_parts(monkeypatch, n_ok: int, out: Path) -> list[Path]:
    """Make the n_ok+1-th part write raise; record that --out never exists during the run."""
    written: list[Path] = []
    real = features.write_part

    def write_part(path, part):
        assert not out.exists(), "a final file appeared before the run was complete"
        if len(written) == n_ok:
            raise RuntimeError("injected failure")
        real(path, part)
        written.append(Path(path))

    monkeypatch.setattr(features, "write_part", write_part)
    return written


def test_resume_after_an_exception_gives_the_same_file(catalogue, reference, tmp_path, monkeypatch):
    csv_path, _ = catalogue
    ref_cfg, _, ref_out = reference
    out = Path(ref_cfg.out)
    shutil.copyfile(ref_out, tmp_path / "ref.h5")
    out.unlink()  # the same --out as the reference, so even extract_config.out is equal

    written = _fail_after_parts(monkeypatch, 1, out)
    with pytest.raises(RuntimeError, match="injected failure"):
        extract_features(ref_cfg)
    assert not out.exists() and len(written) == 1 and written[0].exists()
    monkeypatch.undo()

    summary = extract_features(ref_cfg)
    assert summary["parts_reused"] == 1 and summary["rows_this_run"] < summary["items"] + summary["skipped"]
    assert_same_file(out, tmp_path / "ref.h5")
    assert not parts_folder(out).exists()


def test_unfinished_parts_with_other_settings_are_refused(catalogue, tmp_path, monkeypatch):
    csv_path, _ = catalogue
    out = tmp_path / "f.h5"
    cfg = stub_config(csv_path, out)
    _fail_after_parts(monkeypatch, 1, out)
    with pytest.raises(RuntimeError):
        extract_features(cfg)
    monkeypatch.undo()
    other = replace(cfg, seed=5)
    with pytest.raises(HuseError, match=r"unfinished extraction made with different settings \(config.seed differ\).*--overwrite"):
        extract_features(other)
    assert parts_folder(out).exists()
    summary = extract_features(other, overwrite=True)  # discards the other run's parts
    assert summary["parts_reused"] == 0 and out.exists() and not parts_folder(out).exists()


def test_unfinished_parts_of_an_edited_catalogue_say_so(catalogue, tmp_path, monkeypatch):
    """After `--strict` stops a run and the CSV is fixed, "run that command again" cannot be followed."""
    csv_path, _ = catalogue
    edited = tmp_path / "edited.csv"
    shutil.copyfile(csv_path, edited)
    out = tmp_path / "f.h5"
    cfg = stub_config(edited, out, image_root=str(Path(csv_path).parent))
    _fail_after_parts(monkeypatch, 1, out)
    with pytest.raises(RuntimeError):
        extract_features(cfg)
    monkeypatch.undo()
    edited.write_text(edited.read_text() + "\n")  # one more blank line: same rows, new bytes
    with pytest.raises(HuseError, match=r"as it was before its CSV changed; use --overwrite"):
        extract_features(cfg)


def test_a_run_that_failed_before_its_first_part_does_not_block_other_settings(catalogue, tmp_path, monkeypatch):
    csv_path, _ = catalogue
    out = tmp_path / "f.h5"
    cfg = stub_config(csv_path, out)

    def missing_weights(*args, **kwargs):
        raise HuseError("the ImageNet weights are not installed")

    monkeypatch.setattr(featurizer_module, "load_image_encoder", missing_weights)  # what extraction loads through
    with pytest.raises(HuseError, match="not installed"):
        extract_features(cfg)
    assert not out.exists() and not parts_folder(out).exists()  # no manifest-only folder left behind
    monkeypatch.undo()
    summary = extract_features(replace(cfg, seed=5))  # another choice, same --out, no --overwrite needed
    assert summary["parts_reused"] == 0 and out.exists() and not parts_folder(out).exists()


def test_interrupted_overwrite_keeps_the_old_file_and_resumes(catalogue, tmp_path, monkeypatch):
    csv_path, _ = catalogue
    out = tmp_path / "f.h5"
    cfg = stub_config(csv_path, out)
    extract_features(cfg)
    old = out.read_bytes()
    written = []
    real = features.write_part

    def write_part(path, part):  # the new run dies after its first part
        if written:
            raise RuntimeError("injected failure")
        real(path, part)
        written.append(path)

    monkeypatch.setattr(features, "write_part", write_part)
    with pytest.raises(RuntimeError):
        extract_features(replace(cfg, image_fit="crop"), overwrite=True)
    monkeypatch.undo()
    assert out.read_bytes() == old  # nothing replaced until the new file is complete
    # the old command again: up to date, and the new run's finished part is not its to delete (it was)
    assert extract_features(cfg)["up_to_date"] is True
    assert any(parts_folder(out).glob("part-*"))
    summary = extract_features(replace(cfg, image_fit="crop"), overwrite=True)
    assert summary["parts_reused"] == 1
    assert features.read_attrs(out)["extract_config"]["image_fit"] == "crop"


def test_a_temporary_file_left_by_a_killed_merge_is_removed(catalogue, tmp_path):
    csv_path, _ = catalogue
    out = tmp_path / "f.h5"
    stale = tmp_path / ".f.h5.k1ll3d.tmp"  # what atomic_path leaves when the process is killed mid-write
    stale.write_bytes(b"x" * 1000)
    keep = tmp_path / ".g.h5.abc.tmp"  # another output's: not ours
    keep.write_bytes(b"y")
    extract_features(stub_config(csv_path, out))
    assert not stale.exists() and keep.exists() and out.exists()


def test_resume_after_sigkill_gives_the_same_file(tmp_path):
    """Really kill `python cli.py extract-features` once a part file exists, then run it again."""
    augment = 2
    img = tmp_path / "images"
    img.mkdir()
    noise = np.random.default_rng(0).integers(0, 255, (1600, 1600, 3), dtype=np.uint8)
    Image.fromarray(noise).save(img / "big.png", compress_level=1)  # ~30 ms to decode: slow enough to kill
    for c in range(3):
        Image.new("RGB", (10, 10), COLOURS[c]).save(img / f"c{c}.png")
    rows = [{"image": "images/big.png" if i % 4 else f"images/c{i % 3}.png", "text": f"item {i}",
             "label": CLASSES[i % 3], "split": ("train", "train", "val", "test")[i % 4]} for i in range(48)]
    csv_path = _write_csv(tmp_path / "c.csv", rows)
    out = tmp_path / "out" / "f.h5"
    args = ["extract-features", "--catalogue", str(csv_path), "--out", str(out), "--image-encoder", "stub",
            "--text-encoder", "stub", "--part-rows", "4", "--batch-size", "2", "--num-workers", "1", "--device", "cpu",
            "--augment-views", str(augment)]
    cfg = ExtractConfig(catalogue=str(csv_path), out=str(out), image_encoder="stub", text_encoder="stub", part_rows=4,
                        batch_size=2, num_workers=1, device="cpu", augment_views=augment)
    extract_features(cfg)
    shutil.move(out, tmp_path / "ref.h5")

    proc = subprocess.Popen([sys.executable, "cli.py", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    folder = parts_folder(out)
    deadline = time.monotonic() + 120
    try:
        while not (folder.exists() and any(folder.glob("part-*.h5"))):
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no part file appeared"
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the run and its DataLoader worker
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    n_parts = len(list(folder.glob("part-*.h5")))
    assert 1 <= n_parts < 12 and not out.exists()

    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 0, result.output
    assert '"parts_reused": ' in result.output and '"parts_reused": 0' not in result.output
    assert_same_file(out, tmp_path / "ref.h5")
    assert not folder.exists()


# ------------------------------------------------------------------------------------- views


def test_views_only_for_train_items_and_deterministic(catalogue, tmp_path):
    csv_path, _ = catalogue
    a = tmp_path / "a.h5"
    b = tmp_path / "b.h5"
    extract_features(stub_config(csv_path, a, augment_views=3))
    extract_features(stub_config(csv_path, b, augment_views=3, part_rows=5, batch_size=3, num_workers=2))
    fa, fb = features.read_features(a, views=True), features.read_features(b, views=True)
    train = fa.indices("train")
    np.testing.assert_array_equal(fa.view_item, train)
    assert fa.view_emb.shape == (len(train), 3, fa.image_emb.shape[1])
    # the same (seed, row, view) gives the same view whatever the workers, batches or parts
    np.testing.assert_allclose(fa.view_emb, fb.view_emb, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fa.image_emb, fb.image_emb, rtol=1e-5, atol=1e-6)
    # views are augmented: they differ from each other and from the deterministic view
    assert not np.allclose(fa.view_emb[:, 0], fa.view_emb[:, 1])
    assert not np.allclose(fa.view_emb[:, 0], fa.image_emb[train])
    # another seed gives other views
    c = tmp_path / "c.h5"
    extract_features(stub_config(csv_path, c, augment_views=3, seed=1))
    assert not np.allclose(features.read_features(c, views=True).view_emb, fa.view_emb)


# ------------------------------------------------------------------------------- real encoders


def test_real_default_encoders_on_a_few_rows(tmp_path):
    from huse_pipeline.encoders.text import load_text_encoder

    csv_path, _ = build_catalogue(tmp_path, n_good=8, odd=False, bad=False)
    cfg = ExtractConfig(catalogue=str(csv_path), out=str(tmp_path / "f.h5"), num_workers=0, device="cpu", batch_size=4)
    summary = extract_features(cfg)
    fs = features.read_features(tmp_path / "f.h5")
    assert summary["items"] == 8 and fs.image_emb.shape == (8, 4160) and fs.text_emb.shape == (8, 384)
    assert fs.attrs["image_encoder"] == "efficientnet-lite0+efficientnet-lite2" and fs.attrs["image_pool"] == "avg+mid"
    assert fs.attrs["text_encoder"] == "all-MiniLM-L6-v2"
    assert np.isfinite(fs.image_emb).all() and (np.linalg.norm(fs.image_emb, axis=1) > 1).all()
    # images of the same colour (class) are closer than images of different colours
    emb = fs.image_emb / np.linalg.norm(fs.image_emb, axis=1, keepdims=True)
    sim = emb @ emb.T
    same = fs.labels[:, None] == fs.labels[None, :]
    off = ~np.eye(8, dtype=bool)
    assert sim[same & off].mean() > sim[~same].mean()
    text = load_text_encoder("all-MiniLM-L6-v2")
    with h5py.File(tmp_path / "f.h5") as f:
        used = f["items/text_used"].asstr()[()].tolist()
    np.testing.assert_allclose(fs.text_emb, text.encode(used), atol=1e-5)


@pytest.mark.slow
def test_real_catalogue_sample(tmp_path):
    """The first 64 rows of the real catalogue with the default encoders: nothing skipped, sane features."""
    real = os.environ.get("HUSE_REAL_CATALOGUE")
    if not real:
        pytest.skip("set HUSE_REAL_CATALOGUE to the real catalogue CSV (or its folder) to run this test")
    real_csv = Path(real) / "catalogue.csv" if Path(real).is_dir() else Path(real)
    with open(real_csv, newline="") as fh:
        rows = [r for _, r in zip(range(64), csv.DictReader(fh))]
    csv_path = _write_csv(tmp_path / "sample.csv", rows)
    cfg = ExtractConfig(catalogue=str(csv_path), image_root=str(real_csv.parent), out=str(tmp_path / "f.h5"),
                        device="cpu", num_workers=1)
    summary = extract_features(cfg)
    assert summary["skipped"] == 0 and summary["items"] == 64
    fs = features.read_features(tmp_path / "f.h5")
    assert fs.image_emb.shape == (64, 4160) and fs.text_emb.shape == (64, 384)
    assert np.isfinite(fs.image_emb).all() and np.isfinite(fs.text_emb).all()
    assert fs.attrs["image_root"] == str(real_csv.parent.resolve())


def test_image_pool_through_the_cli(catalogue, reference):
    """The default --image-pool avg+mid writes the plain global average followed by the grid-pooled
    mid map and says so in the file; --image-pool avg writes the plain features only and leaves the
    settings as they were before the option existed, so feature files made then stay up to date."""
    csv_path, _ = catalogue
    cfg, _, ref_path = reference
    assert cfg.image_pool == "avg+mid"
    out = ref_path.parent / "avg.h5"
    args = ["extract-features", "--catalogue", str(csv_path), "--out", str(out), "--image-encoder", "stub",
            "--text-encoder", "stub", "--device", "cpu", "--num-workers", "0", "--image-pool", "avg"]
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 0, result.output
    plain, both = features.read_features(out), features.read_features(ref_path)
    assert plain.image_emb.shape == (len(both.row), 16) and both.image_emb.shape == (len(both.row), 16 + 4 * 3)
    assert both.attrs["image_pool"] == "avg+mid" and "image_pool" not in plain.attrs
    np.testing.assert_array_equal(plain.row, both.row)
    np.testing.assert_allclose(both.image_emb[:, :16], plain.image_emb, rtol=1e-5, atol=1e-6)
    assert both.attrs["settings"]["config"]["image_pool"] == "avg+mid"
    assert "image_pool" not in plain.attrs["settings"]["config"]
    bad = CliRunner().invoke(cli.main, args[:-1] + ["max"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output
