"""What a broken or hostile input must never do (issue 22). One catalogue holding every kind of bad,
odd and hostile row of the README's reliability table goes through the four commands (stub encoders,
tiny images, 2 epochs) and every row must get its treatment; then one test per item of the issue:
nothing read outside the image root, NUL bytes, very long texts, literal figure texts and thumbnails
that cannot be made, malformed checkpoints and config.json files, full disks, temporary files left by
kill -9, duplicates across splits, and unsafe checkpoints. Every file is built in tmp_path."""
from __future__ import annotations

import csv
import errno
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import cli
from huse_pipeline.data.catalogue import OUTSIDE_ROOT, read_catalogue, resolve_image, stratified_split
from huse_pipeline.data.text import MAX_TEXT_CHARS, word_scores
from huse_pipeline.errors import HuseError
from huse_pipeline.extract.plan import csv_line_numbers
from huse_pipeline.extract.run import ExtractConfig, extract_features
from huse_pipeline.store import features
from huse_pipeline.train import model as model_module
from huse_pipeline.train.model import HuseModel, ModelConfig, load_checkpoint, save_checkpoint
from huse_pipeline.train.run import _Run
from huse_pipeline.utils import atomic_path, remove_stale_temps

REPO = Path(__file__).resolve().parents[1]
TOPS, SHOES, BAGS = "apparel<tops", "footwear<shoes", "bags<totes"
# top-level classes, so that they are drawn in the report's figures (confusion heatmap, map legend)
MATH_CLASS = "a $x$ class<item"  # matplotlib would read $x$ as mathtext
BROKEN_MATH_CLASS = "$^$<item"  # ... and stop drawing at this one (not valid mathtext)
XSS = "<script>alert(1)</script>"
SCRIPT_CLASS = f"odd{XSS}"  # levels "odd", "script>alert(1)", "/script>": a valid class path


def _run_cli(args: list[str]):
    return CliRunner().invoke(cli.main, args, catch_exceptions=False)


# ------------------------------------------------------------------------------- image files


def _png_header_only(path: Path, w: int, h: int) -> None:
    """A PNG whose header claims w x h pixels (a decompression bomb is refused before decoding)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def _bomb(path: Path) -> None:
    """A real, valid PNG of 20,000 x 20,000 pixels in a few kB (400 M pixels > the 64 M guard)."""
    Image.new("1", (20_000, 20_000)).save(path, format="PNG", optimize=True)


def _solid(path: Path, colour, mode: str = "RGB", size=(24, 20), **save) -> str:
    Image.new(mode, size, colour).save(path, **save)
    return path.name


@dataclass
class Kind:
    """One kind of row: what the catalogue says and what stage one must do with it."""

    kind: str
    image: str
    text: str
    label: str
    expect: str  # "" = kept; else the skip reason's start


def build_corpus(tmp: Path) -> tuple[Path, list[Kind], Path]:
    """The hostile-input corpus: a CSV with a BOM and CRLF line ends in tmp/root, its images, files
    outside the root, and every kind of row of the README's reliability table (plus filler rows so
    that every split has items). Returns (CSV, kinds, outside folder)."""
    root, outside = tmp / "root", tmp / "outside"
    img = root / "img"
    img.mkdir(parents=True)
    outside.mkdir()
    secret = outside / "secret.png"
    Image.new("RGB", (30, 30), (250, 0, 250)).save(secret)
    (outside / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")

    plain = "img/" + _solid(img / "plain.jpg", (200, 30, 30))
    grey = "img/" + _solid(img / "grey.png", 128, "L")
    palette = "img/" + _solid(img / "palette.png", 7, "P")
    alpha = "img/" + _solid(img / "alpha.png", (200, 30, 30, 90), "RGBA")
    cmyk = "img/" + _solid(img / "cmyk.jpg", (0, 200, 200, 0), "CMYK")
    Image.fromarray(np.full((20, 24), 40000, np.uint16)).save(img / "deep.png")  # 16-bit greyscale
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    rotated = "img/" + _solid(img / "rotated.jpg", (30, 30, 200), size=(30, 16), exif=exif)
    strip = "img/" + _solid(img / "strip.png", (30, 160, 30), size=(4000, 3))
    _png_header_only(img / "huge.png", 20_000, 20_000)
    (img / "empty.jpg").write_bytes(b"")
    full = (img / "plain.jpg").read_bytes()
    (img / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (img / "notimage.png").write_text("hello, I am text")
    (img / "folder.jpg").mkdir()
    os.symlink(secret, img / "link_out.png")  # a symlink that leaves the root
    os.symlink(img / "grey.png", img / "link_in.png")  # one that stays inside
    spaced = "img/" + _solid(img / "naïve name ü.png", (10, 90, 200))
    long_ok = " ".join(f"Sentence {i} says the cotton shirt{i} is soft." for i in range(12))  # > 32 stub tokens

    kinds = [
        Kind("plain JPEG", plain, "Plain red shirt", TOPS, ""),
        Kind("greyscale PNG", grey, "Grey shirt", TOPS, ""),
        Kind("palette PNG", palette, "Palette tote", BAGS, ""),
        Kind("alpha PNG (composited on white)", alpha, "Translucent tote", BAGS, ""),
        Kind("CMYK JPEG", cmyk, "Cyan shoe", SHOES, ""),
        Kind("16-bit greyscale PNG", "img/deep.png", "Deep grey shoe", SHOES, ""),
        Kind("EXIF-rotated JPEG", rotated, "Rotated blue shirt", TOPS, ""),
        Kind("very wide image (4000 x 3)", strip, "Green strip tote", BAGS, ""),
        Kind("symlink inside the root", "img/link_in.png", "Linked grey shoe", SHOES, ""),
        Kind("absolute path inside the root", str(img / "palette.png"), "Absolute tote", BAGS, ""),
        Kind("unicode file name with spaces", spaced, "Unicode named shirt", TOPS, ""),
        Kind("image over `--max-image-pixels` (bomb header)", "img/huge.png", "Huge shoe", SHOES, "image too large"),
        Kind("missing file", "img/nowhere.jpg", "Missing shoe", SHOES, "missing file"),
        Kind("empty file", "img/empty.jpg", "Empty file tote", BAGS, "empty file"),
        Kind("truncated JPEG", "img/truncated.jpg", "Truncated shirt", TOPS, "truncated image"),
        Kind("not an image", "img/notimage.png", "Text file shoe", SHOES, "not an image"),
        Kind("a folder, not a file", "img/folder.jpg", "Folder tote", BAGS, "not a file"),
        Kind("absolute path outside the root", str(secret), "Secret shirt", TOPS, "image outside --image-root"),
        Kind("system file outside the root", str(outside / "passwd"), "Password shirt", TOPS, "image outside --image-root"),
        Kind("`..` path leaving the root", "../outside/secret.png", "Dotdot tote", BAGS, "image outside --image-root"),
        Kind("symlink leaving the root", "img/link_out.png", "Symlinked secret", SHOES, "image outside --image-root"),
        Kind("NUL byte in the text", plain, "Red\x00shirt", TOPS, "NUL byte in text"),
        Kind("NUL byte in the label", plain, "Red shirt nul label", "apparel\x00<tops", "NUL byte in label"),
        Kind("NUL byte in the image path", "img/plain\x00.jpg", "Red shirt nul path", TOPS, "NUL byte in image path"),
        Kind("150,000-character text", plain, "a" * 150_000, TOPS, "text too long"),
        Kind("text over the encoder's budget (TF-IDF reduced)", plain, long_ok, TOPS, ""),
        Kind("99,995 characters of `<!-- `", grey, "<!-- " * 19_999, SHOES, ""),
        Kind("HTML with `<script>` and `onerror`", alpha, f'Tote {XSS}<img src=x onerror="alert(2)"> bag', BAGS, ""),
        Kind("empty text", plain, "", TOPS, "empty text"),
        Kind("whitespace and markup only", plain, " \t <br> &nbsp; ", TOPS, "empty text"),
        Kind("control characters in the text", cmyk, "Shoe\x07 with\x1b bell\u200b", SHOES, ""),
        Kind("quoted newline in the text", palette, "Two line\r\ntote", BAGS, ""),
        Kind("emoji and right-to-left text", strip, "Tote 👜 حقيبة", BAGS, ""),
        Kind("empty label", plain, "No label shirt", "", "malformed label"),
        Kind("empty label level (`a<<b`)", plain, "Empty level shirt", "apparel<<tops", "malformed label"),
        Kind("separators only (`<<`)", plain, "Separator shirt", "<<", "malformed label"),
        Kind("label of 2,000 characters", plain, "Long label shirt", "x" * 2000, "label too long"),
        Kind("class name with `$x$` (mathtext)", rotated, "Math class item one", MATH_CLASS, ""),
        Kind("class name with `$^$` (broken mathtext)", rotated, "Math class item two", BROKEN_MATH_CLASS, ""),
        Kind("class name with `<script>`", alpha, "Script class item", SCRIPT_CLASS, ""),
        Kind("duplicate row (same file and text), first", grey, "Duplicated grey shoe", SHOES, ""),
        Kind("duplicate row (same file and text), second", "img/./grey.png", " Duplicated  grey shoe ", SHOES, ""),
    ]
    filler = [Kind("filler", (plain, grey, palette)[i % 3], f"Filler item {i} {('shirt', 'shoe', 'tote')[i % 3]}",
                   (TOPS, SHOES, BAGS)[i % 3], "") for i in range(24)]
    # two more items of each odd class, so that they reach the test split and the report shows them
    filler += [Kind("filler", plain, f"Odd item {i} of {name}", name, "") for name in (MATH_CLASS, BROKEN_MATH_CLASS,
                                                                                          SCRIPT_CLASS) for i in range(2)]
    rows = kinds + filler
    path = root / "catalogue.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        fh.write("\ufeff")  # a byte-order mark
        writer = csv.writer(fh, lineterminator="\r\n")
        writer.writerow(["image", "text", "label", "price"])  # an extra column is ignored
        writer.writerows([[k.image, k.text, k.label, "9.99"] for k in rows])
    return path, kinds, outside


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The corpus through extract-features, build-graph, train (2 epochs) and eval --report; then a
    second report after every kept image was swapped for a decompression bomb or a symlink out of
    the root."""
    tmp = tmp_path_factory.mktemp("corpus")
    csv_path, kinds, outside = build_corpus(tmp)
    out, run = tmp / "feats.h5", tmp / "run"
    steps = {
        "extract": ["extract-features", "--catalogue", str(csv_path), "--out", str(out), "--image-encoder", "stub",
                    "--text-encoder", "stub", "--num-workers", "0", "--batch-size", "8", "--part-rows", "16",
                    "--device", "cpu"],
        "graph": ["build-graph", "--features", str(out), "--device", "cpu"],
        "train": ["train", "--features", str(out), "--out", str(run), "--epochs", "2", "--batch-size", "16",
                  "--embed-dim", "8", "--hidden-dim", "16", "--image-layers", "1", "--text-layers", "1", "--device", "cpu"],
        "eval": ["eval", "--run", str(run), "--report", str(tmp / "report"), "--report-map", "pca", "--device", "cpu"],
    }
    results = {}
    for name, args in steps.items():
        t0 = time.perf_counter()
        result = _run_cli(args)
        assert result.exit_code == 0, f"huse {name} failed:\n{result.output}"
        results[name] = result.output
        results[f"{name}_s"] = time.perf_counter() - t0
    page = (tmp / "report" / "index.html").read_text(encoding="utf-8")
    fs = features.read_features(out)
    files = sorted({os.path.normpath(Path(fs.attrs["image_root"]) / image) for image in fs.image_path})
    for i, path in enumerate(files):  # after extraction: every kept image becomes hostile
        os.unlink(path)
        if i % 2:
            os.symlink(outside / "secret.png", path)
        else:
            _bomb(Path(path))
    swapped = _run_cli(steps["eval"][:4] + [str(tmp / "report2")] + steps["eval"][5:])
    assert swapped.exit_code == 0, swapped.output
    page2 = (tmp / "report2" / "index.html").read_text(encoding="utf-8")
    return {"tmp": tmp, "csv": csv_path, "kinds": kinds, "features": out, "run": run, "outputs": results,
            "page": page, "page2": page2, "outside": outside}


def test_corpus_is_large_enough_and_in_the_readme(corpus):
    kinds = {k.kind for k in corpus["kinds"]}
    assert len(kinds) >= 30
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Reliability"):]
    for kind in kinds:
        assert f"| {kind} |" in section, f"README's reliability table lacks {kind!r}"


def test_every_corpus_row_gets_its_treatment(corpus):
    fs = features.read_features(corpus["features"])
    kept = set(fs.row.tolist())
    skipped = dict(zip(fs.skipped["row"].tolist(), fs.skipped["reason"]))
    for row, k in enumerate(corpus["kinds"]):
        if k.expect:
            assert row in skipped and skipped[row].startswith(k.expect), (k.kind, skipped.get(row))
        else:
            assert row in kept, (k.kind, skipped.get(row))
    assert len(fs.row) + len(fs.skipped) == len(corpus["kinds"]) + 24 + 6  # every row accounted for, fillers kept
    # nothing outside the root was stored, and the refusal says what to do
    assert not any("secret" in p or "passwd" in p for p in fs.image_path)
    assert "image outside --image-root (pass --allow-outside-root to read it)" in fs.skipped["reason"].tolist()
    assert all("\x00" not in s for col in ("image_path", "text", "label") for s in fs.skipped[col])
    summary = corpus["outputs"]["extract"]
    assert '"image outside --image-root": 4' in summary and '"NUL byte in text": 1' in summary


def test_corpus_texts_are_cleaned_and_classes_kept(corpus):
    fs = features.read_features(corpus["features"])
    by_kind = {k.kind: row for row, k in enumerate(corpus["kinds"])}
    used = dict(zip(fs.row.tolist(), fs.text))
    text_used = dict(zip(fs.row.tolist(), _text_used(corpus["features"])))
    html_used = text_used[by_kind["HTML with `<script>` and `onerror`"]]
    assert "alert(1)" not in html_used and "<img" not in html_used and html_used == "Tote bag"
    assert text_used[by_kind["control characters in the text"]] == "Shoe with bell"
    assert len(text_used[by_kind["text over the encoder's budget (TF-IDF reduced)"]].split()) <= 32
    assert used[by_kind["quoted newline in the text"]] == "Two line\r\ntote"  # the raw text is kept as it was
    assert {MATH_CLASS, BROKEN_MATH_CLASS, SCRIPT_CLASS} <= set(fs.class_names)
    assert fs.attrs["duplicates"]["groups"] == 1 and fs.attrs["duplicates"]["rows"] == 2
    first, second = by_kind["duplicate row (same file and text), first"], by_kind["duplicate row (same file and text), second"]
    split = dict(zip(fs.row.tolist(), fs.split))
    assert split[first] == split[second]  # one product, one split


def _text_used(path: Path) -> list[str]:
    import h5py

    with h5py.File(path, "r") as f:
        return f["items/text_used"].asstr()[()].tolist()


def test_corpus_report_escapes_and_draws_names_literally(corpus):
    page = corpus["page"]
    assert XSS not in page and "<img src=x" not in page
    assert page.count("<script>") == 1  # only the page's own sorting script
    assert "odd&lt;script&gt;alert(1)&lt;/script&gt;" in page  # the class name, shown as text
    assert "a $x$ class&lt;item" in page  # the per-class table shows the name as it is
    # the figures were drawn (the top-level names "a $x$ class" and "$^$" are in the heatmap and the map)
    assert len(re.findall(r'<img class="fig" src="data:image/png;base64,', page)) == 3


def test_corpus_report_after_images_turned_hostile(corpus):
    """Every image was replaced by a decompression bomb or a symlink out of the root after
    extraction: placeholders, and no picture read from outside the root."""
    page = corpus["page2"]
    assert "data:image/jpeg" not in page  # no thumbnail at all: neither the bombs nor the outside file
    assert "image too large" in page and "image outside --image-root" in page


# ------------------------------------------------------------------ item 1: outside the root


def test_item1_outside_the_root_is_refused_unless_asked(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    Image.new("RGB", (8, 8), (9, 9, 9)).save(outside / "o.png")
    Image.new("RGB", (8, 8), (9, 9, 9)).save(root / "i.png")
    os.symlink(outside / "o.png", root / "out.png")
    rows = [("i.png", "inside"), (str(outside / "o.png"), "absolute"), ("../outside/o.png", "dotdot"),
            ("out.png", "symlink"), (str(root / "i.png"), "absolute inside")]
    csv_path = root / "c.csv"
    csv_path.write_text("image,text,label\n" + "".join(f"{p},{t},a<b\n" for p, t in rows))
    cat = read_catalogue(csv_path)
    assert cat.frame["reason"].tolist() == ["", OUTSIDE_ROOT, OUTSIDE_ROOT, OUTSIDE_ROOT, ""]
    assert cat.frame["class_name"].tolist() == ["a<b", None, None, None, "a<b"]
    assert read_catalogue(csv_path, allow_outside_root=True).frame["reason"].tolist() == [""] * 5
    assert resolve_image(root, "../outside/o.png") == (None, OUTSIDE_ROOT)
    assert resolve_image(root, "../outside/o.png", allow_outside_root=True)[0] == str(root / "../outside/o.png")

    opened = []
    from huse_pipeline.data import images

    original = images.load_rgb

    def spy(path, *a, **kw):
        opened.append(os.path.realpath(path))
        return original(path, *a, **kw)

    base = ["extract-features", "--catalogue", str(csv_path), "--image-encoder", "stub", "--text-encoder", "stub",
            "--num-workers", "0", "--device", "cpu"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(images, "load_rgb", spy)
        result = _run_cli(base + ["--out", str(tmp_path / "a.h5")])
    assert result.exit_code == 0, result.output
    assert opened and not any(p.startswith(str(outside.resolve())) for p in opened)  # never even opened
    fs = features.read_features(tmp_path / "a.h5")
    assert sorted(fs.text) == ["absolute inside", "inside"]
    assert set(fs.skipped["reason"]) == {OUTSIDE_ROOT}
    result = _run_cli(base + ["--out", str(tmp_path / "b.h5"), "--allow-outside-root"])
    assert result.exit_code == 0, result.output
    assert len(features.read_features(tmp_path / "b.h5").row) == 5


def test_item1_the_bundled_demo_still_needs_no_option(tmp_path):
    cat = read_catalogue(REPO / "data" / "catalogue.csv")
    assert set(cat.frame["reason"]) == {OUTSIDE_ROOT}  # its images are in ../images: outside data/
    # `huse extract-features` without --catalogue reads the demo as if --allow-outside-root were given
    result = _run_cli(["extract-features", "--out", str(tmp_path / "demo.h5"), "--image-encoder", "stub",
                       "--text-encoder", "stub", "--num-workers", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    attrs = features.read_attrs(tmp_path / "demo.h5")
    assert attrs["n_items"] == 300 and attrs["extract_config"]["allow_outside_root"] is True


def test_item1_a_copy_of_the_demo_in_another_checkout_needs_no_option_either(tmp_path):
    """An installation made from one checkout, run in another: that checkout's data/catalogue.csv is the
    same demo, byte for byte, so it is trusted too; an edited copy is not."""
    other = tmp_path / "checkout"
    (other / "data").mkdir(parents=True)
    shutil.copyfile(REPO / "data" / "catalogue.csv", other / "data" / "catalogue.csv")
    shutil.copytree(REPO / "images", other / "images")
    base = ["extract-features", "--catalogue", str(other / "data" / "catalogue.csv"), "--image-encoder", "stub",
            "--text-encoder", "stub", "--num-workers", "0", "--device", "cpu"]
    result = _run_cli(base + ["--out", str(tmp_path / "copy.h5")])
    assert result.exit_code == 0, result.output
    assert features.read_attrs(tmp_path / "copy.h5")["n_items"] == 300
    with open(other / "data" / "catalogue.csv", "a", encoding="utf-8") as fh:
        fh.write("../images/73566.jpg,one more row,apparel<topwear<tshirts\n")
    result = _run_cli(base + ["--out", str(tmp_path / "edited.h5")])
    assert result.exit_code != 0 and "image outside --image-root" in result.output


# ------------------------------------------------------------------------- item 2: NUL bytes


def test_item2_a_nul_byte_skips_its_row_only_and_the_rerun_is_up_to_date(tmp_path):
    Image.new("RGB", (8, 8), (200, 9, 9)).save(tmp_path / "a.png")
    rows = [["a.png", "good one", "a<b"], ["a.png", "bad\x00text", "a<b"], ["a.\x00png", "bad path", "a<b"],
            ["a.png", "bad label", "a<\x00b"], ["a.png", "good two", "a<c"]]
    csv_path = tmp_path / "c.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([["image", "text", "label"], *rows])
    assert csv_line_numbers(csv_path, 5) == [2, 3, 4, 5, 6]
    cfg = ExtractConfig(catalogue=str(csv_path), out=str(tmp_path / "f.h5"), image_encoder="stub", text_encoder="stub",
                        num_workers=0, device="cpu")
    summary = extract_features(cfg)
    assert summary["items"] == 2 and summary["skipped_by_reason"] == {
        "NUL byte in image path": 1, "NUL byte in label": 1, "NUL byte in text": 1}
    fs = features.read_features(tmp_path / "f.h5")
    assert fs.skipped["text"].tolist()[0] == "bad\ufffdtext"  # shown, not lost
    assert extract_features(cfg)["up_to_date"]


# ---------------------------------------------------------------------- item 3: long texts


def test_item3_a_150000_character_field_is_one_skipped_row(tmp_path):
    Image.new("RGB", (8, 8), (200, 9, 9)).save(tmp_path / "a.png")
    csv_path = tmp_path / "c.csv"
    csv_path.write_text(f'image,text,label\na.png,"{"word " * 30_000}",a<b\na.png,short one,a<b\na.png,two,a<c\n')
    assert len(csv_line_numbers(csv_path, 3)) == 3  # the csv module's 131,072-character limit used to stop here
    summary = extract_features(ExtractConfig(catalogue=str(csv_path), out=str(tmp_path / "f.h5"), image_encoder="stub",
                                             text_encoder="stub", num_workers=0, device="cpu"))
    assert summary["items"] == 2 and summary["skipped_by_reason"] == {"text too long": 1}
    assert f"150,000 characters > {MAX_TEXT_CHARS:,}" in summary["skipped_examples"][0]


def test_item3_tfidf_memory_is_bounded_by_the_words():
    """130,000 characters of short sentences: the scores need memory in proportion to the words, not
    a dense (sentences x vocabulary) matrix (about 2 GB at this size; 1.4 GB measured at 246,000)."""
    text = " ".join(f"w{i} x{i % 300}." for i in range(13_000))[:130_000]
    tracemalloc.start()
    try:
        words, scores = word_scores(text)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(words) == len(scores) > 20_000
    assert peak < 100e6, f"{peak / 1e6:.0f} MB"


# --------------------------------------------------------------- item 4: figures, thumbnails


def test_item4_figure_texts_are_literal():
    from matplotlib.text import Text

    from huse_pipeline.eval.report import _png, confusion_figure, map_figure

    names = [MATH_CLASS, BROKEN_MATH_CLASS, "price $5 - $10"]
    fig = confusion_figure(np.array([0, 1, 2]), np.array([0, 1, 1]), names)
    _png(fig)  # drawing used to fail: "$^$" is not valid mathtext
    shown = [t for t in fig.findobj(Text) if "$" in t.get_text()]
    assert shown and all(not t._preprocess_math(t.get_text())[1] for t in shown)  # not mathtext
    assert {t._preprocess_math(t.get_text())[0] for t in shown} >= set(names)
    fig = map_figure(np.zeros((6, 2)), np.array([0, 1, 2, 0, 1, 2]), names, 3, "PCA")
    _png(fig)
    legend = [t.get_text() for t in fig.legends[0].get_texts()] if fig.legends else \
        [t.get_text() for ax in fig.axes for t in ax.get_legend().get_texts()]
    assert {Text(text=t)._preprocess_math(t)[0] for t in legend} >= set(names)


def test_item4_a_thumbnail_that_cannot_be_made_is_a_placeholder(tmp_path, monkeypatch):
    from huse_pipeline.eval import report

    _bomb(tmp_path / "bomb.png")
    uri, reason = report.thumbnail_uri(tmp_path / "bomb.png")
    assert uri is None and reason.startswith("image too large")

    def bomb_error(*a, **kw):
        raise Image.DecompressionBombError("decompression bomb")

    monkeypatch.setattr(report, "load_rgb", bomb_error)
    assert report.thumbnail_uri(tmp_path / "bomb.png") == (None, "cannot make a thumbnail (DecompressionBombError)")


# ---------------------------------------------------------------- item 6: malformed files


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A real run folder from `huse train` on a tiny synthetic feature file."""
    from huse_pipeline.extract.graph import GraphConfig, build_graph

    tmp = tmp_path_factory.mktemp("run")
    rng = np.random.default_rng(0)
    n = 60
    labels = np.arange(n) % 3
    feats = tmp / "feats.h5"
    features.write_synthetic(feats, rng.normal(size=(n, 6)).astype(np.float32) + labels[:, None],
                             rng.normal(size=(n, 5)).astype(np.float32) + labels[:, None],
                             [f"a<{'xyz'[k]}" for k in labels], ["train", "train", "val", "test"] * (n // 4))
    build_graph(GraphConfig(features=str(feats), method="tree"))
    run = tmp / "run"
    result = _run_cli(["train", "--features", str(feats), "--out", str(run), "--epochs", "2", "--batch-size", "16",
                       "--embed-dim", "8", "--hidden-dim", "8", "--image-layers", "1", "--text-layers", "1",
                       "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return {"features": feats, "run": run}


def _copy_run(small_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(small_run["run"], run)
    return run


def _one_line_error(result, *needles: str) -> None:
    """The command failed with exit 1 and its output ends with ONE line "Error: ..." holding the
    needles (progress lines may come before it), and no traceback."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output, result.output
    message = result.output.strip().splitlines()[-1]
    assert message.startswith("Error: ") and result.output.count("Error: ") == 1, result.output
    for needle in needles:
        assert needle in message, message


def _train_change(**changes):
    return lambda saved: json.dumps({**saved, "train": {**saved["train"], **changes}})


@pytest.mark.parametrize("make, needle", [
    (lambda saved: "{not json", "is not a run's config.json"),
    (lambda saved: b"\xff\xfe{\x00", "is not a run's config.json"),  # not UTF-8
    (_train_change(bogus=1), "unknown training setting(s) 'bogus'"),
    (_train_change(epochs="three"), "training setting epochs is 'three'"),
    (_train_change(epochs=True), "training setting epochs is True"),
    (_train_change(dropout=[0.1]), "train.dropout is not a plain value"),
    (_train_change(beta="high"), "train.beta is 'high', not a number"),
    (_train_change(lr=-1.0), "lr must be positive"),
    (lambda saved: json.dumps({**saved, "train": []}), "no 'train' section"),
    (lambda saved: json.dumps([saved]), "no 'train' section"),
])
def test_item6_a_malformed_config_json_is_one_line_naming_it(small_run, tmp_path, make, needle):
    run = _copy_run(small_run, tmp_path)
    content = make(json.loads((run / "config.json").read_text()))
    (run / "config.json").write_bytes(content if isinstance(content, bytes) else content.encode())
    result = _run_cli(["train", "--resume", "--out", str(run), "--epochs", "3", "--features", str(small_run["features"])])
    _one_line_error(result, str(run / "config.json"), needle)


def _tamper(path: Path, change) -> Path:
    ckpt = torch.load(path, weights_only=True)
    change(ckpt)
    out = path.with_name("tampered.pt")
    torch.save(ckpt, out)
    return out


@pytest.mark.parametrize("change, needle", [
    (lambda c: c.pop("model_state"), "no model_state"),
    (lambda c: c["model_state"].pop("classifier.weight"), "missing tensors classifier.weight"),
    (lambda c: c["model_state"].__setitem__("classifier.weight", torch.zeros(3, 9)), "wrong shapes: classifier.weight (3, 9)"),
    (lambda c: c["model_config"].__setitem__("hidden_dim", 10_000_000), "hidden_dim = 10000000"),
    (lambda c: c["model_config"].__setitem__("image_layers", "5"), "image_layers = '5'"),
    (lambda c: c["model_config"].__setitem__("depth", 3), "unknown keys depth"),
    (lambda c: c["model_config"].pop("num_classes"), "missing num_classes"),
    (lambda c: c["model_state"]["classifier.bias"].fill_(float("nan")), "non-finite weights"),
    (lambda c: c.__setitem__("class_names", ["a<x"]), "1 class names"),
    (lambda c: c.pop("optimizer_state"), "lacks optimizer_state"),
    (lambda c: c.__setitem__("epoch", "2"), "epoch of type str"),
])
def test_item6_a_malformed_checkpoint_is_one_line_before_any_allocation(small_run, tmp_path, monkeypatch, change, needle):
    run = _copy_run(small_run, tmp_path)
    tampered = _tamper(run / "last.pt", change)
    with pytest.raises(HuseError, match=re.escape(needle)) as info:
        load_checkpoint(tampered, resumable=True)
    assert str(tampered) in str(info.value)
    os.replace(tampered, run / "last.pt")
    result = _run_cli(["train", "--resume", "--out", str(run), "--epochs", "3", "--features", str(small_run["features"])])
    _one_line_error(result, str(run / "last.pt"), needle)


def test_item6_model_from_checkpoint_checks_before_building(small_run, monkeypatch):
    """An absurd hidden_dim used to be allocated (160 GB); now nothing is built for it."""
    ckpt = load_checkpoint(small_run["run"] / "best.pt")
    built = []

    def no_build(self, cfg):
        built.append(cfg)
        raise AssertionError("a model was built")

    monkeypatch.setattr(HuseModel, "__init__", no_build)
    for change in ({"hidden_dim": 200_000}, {"hidden_dim": 4096}, {"num_classes": 0}):
        with pytest.raises(HuseError, match="model_config|does not match"):
            model_module.model_from_checkpoint({**ckpt, "model_config": {**ckpt["model_config"], **change}})
    assert not built


def test_item6_eval_refuses_a_malformed_best_pt_with_one_line(small_run, tmp_path):
    run = _copy_run(small_run, tmp_path)
    tampered = _tamper(run / "best.pt", lambda c: c["model_config"].__setitem__("embed_dim", 1 << 40))
    os.replace(tampered, run / "best.pt")
    result = _run_cli(["eval", "--run", str(run), "--features", str(small_run["features"]), "--device", "cpu"])
    _one_line_error(result, str(run / "best.pt"), "embed_dim")


# -------------------------------------------------------------------------- item 7: disk full


def _disk_full_after(n_bytes: int):
    """A torch.save that writes n_bytes into the file and then fails as a full disk does."""
    def save(obj, f, *a, **kw):
        f.write(b"x" * n_bytes)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return save


def test_item7_a_full_disk_while_saving_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    model = HuseModel(ModelConfig(image_dim=4, text_dim=3, num_classes=2, embed_dim=4, hidden_dim=4))
    path = tmp_path / "last.pt"
    save_checkpoint(path, model, ["a", "b"], {})
    before = path.read_bytes()
    monkeypatch.setattr(model_module.torch, "save", _disk_full_after(1000))
    with pytest.raises(HuseError, match=rf"cannot write checkpoint {re.escape(str(path))}: the disk is full; "
                                        r"the previous last.pt is kept as it was"):
        save_checkpoint(path, model, ["a", "b"], {})
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.pt"]

    def torch_writer_fails(obj, f, *a, **kw):  # what torch.save(obj, path) raises on a full disk
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    monkeypatch.setattr(model_module.torch, "save", torch_writer_fails)
    with pytest.raises(HuseError, match=r"cannot write checkpoint .*unexpected pos 704 vs 598"):
        save_checkpoint(path, model, ["a", "b"], {})


def test_item7_train_on_a_full_disk_is_one_line(small_run, tmp_path, monkeypatch):
    run = _copy_run(small_run, tmp_path)
    before = (run / "last.pt").read_bytes()
    monkeypatch.setattr(model_module.torch, "save", _disk_full_after(10))
    result = _run_cli(["train", "--resume", "--out", str(run), "--epochs", "3", "--features", str(small_run["features"])])
    _one_line_error(result, "cannot write checkpoint", str(run), "the disk is full")
    assert (run / "last.pt").read_bytes() == before
    assert not list(run.glob(".*.tmp"))


def test_item7_eval_report_on_a_full_disk_names_the_file(small_run, tmp_path, monkeypatch):
    real_write_text = Path.write_text

    def full(self, *a, **kw):
        if self.name.startswith(".index.html."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write_text(self, *a, **kw)

    monkeypatch.setattr(Path, "write_text", full)
    report = tmp_path / "report"
    result = _run_cli(["eval", "--run", str(small_run["run"]), "--features", str(small_run["features"]),
                       "--out", str(tmp_path / "m.json"), "--report", str(report), "--report-map", "pca", "--device", "cpu"])
    _one_line_error(result, f"No space left on device: {report / 'index.html'}")
    assert (tmp_path / "m.json").is_file() and not list(report.iterdir())


# -------------------------------------------------------------- item 8: temporary files of kill -9


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_item8_temporary_files_of_a_killed_writer_are_removed_by_the_next_run(tmp_path):
    """A real kill -9 in the middle of a write; then a live writer's file, another host's and another
    program's are left alone."""
    script = ("import sys, time; from huse_pipeline.utils import atomic_path\n"
              "with atomic_path(sys.argv[1]) as tmp:\n"
              "    tmp.write_bytes(b'x' * 1000); print('writing', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "last.pt")], stdout=subprocess.PIPE,
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == b"writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = list(tmp_path.glob(".last.pt.*.tmp"))
    assert len(left) == 1 and f"-{proc.pid}." in left[0].name  # what a killed run leaves
    with atomic_path(tmp_path / "best.pt") as live:  # this process is writing it now
        live.write_bytes(b"y")
        other_host = tmp_path / f".last.pt.elsewhere-{_dead_pid()}.abcdefgh.tmp"
        other_host.write_bytes(b"z")
        foreign = tmp_path / ".other-program.tmp"
        foreign.write_bytes(b"z")
        assert remove_stale_temps(tmp_path) == left
        assert live.exists() and other_host.exists() and foreign.exists() and not left[0].exists()
    assert (tmp_path / "best.pt").read_bytes() == b"y"


def test_item8_train_resume_cleans_what_its_killed_run_left(small_run, tmp_path):
    run = _copy_run(small_run, tmp_path)
    from huse_pipeline.utils import _HOST

    dead = run / f".last.pt.{_HOST}-{_dead_pid()}.k2j4h5g6.tmp"
    dead.write_bytes(b"\0" * 4096)
    live = run / f".best.pt.{_HOST}-{os.getpid()}.a1b2c3d4.tmp"  # a live process's (ours): not touched
    live.write_bytes(b"\0")
    result = _run_cli(["train", "--resume", "--out", str(run), "--epochs", "3", "--features", str(small_run["features"])])
    assert result.exit_code == 0, result.output
    assert not dead.exists() and live.exists()
    _Run(run)  # the run folder object cleans on its own as well
    assert live.exists()


# ------------------------------------------------------------------------ item 9: duplicates


def test_item9_duplicates_stay_in_one_split_when_we_make_it(tmp_path):
    names = ["a"] * 40 + ["b"] * 12
    groups = [i // 4 * 4 for i in range(40)] + list(range(40, 52))  # class a: 10 products, 4 rows each
    for seed in range(20):
        split = stratified_split(names, seed, 0.1, 0.1, groups=groups)
        assert all(len({split[j] for j in range(g, g + 4)}) == 1 for g in range(0, 40, 4))
        assert {"train", "val", "test"} <= set(split[:40])
        assert stratified_split(names[40:], seed) == split[40:]  # without duplicates: the row-wise split
    one_group = stratified_split(["c"] * 5, 0, groups=[0] * 5)
    assert one_group == ["train"] * 5  # never a class with an empty train split


def test_item9_duplicates_across_the_csvs_splits_are_reported(tmp_path, caplog):
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "a.png")
    Image.new("RGB", (8, 8), (3, 2, 1)).save(tmp_path / "b.png")
    csv_path = tmp_path / "c.csv"
    csv_path.write_text("image,text,label,split\na.png,Red Shirt,a<b,train\n./a.png,  Red   Shirt ,a<b,test\n"
                        "b.png,Blue shirt,a<b,val\nb.png,Blue shirt,a<c,val\na.png,another text,a<b,train\n")
    with caplog.at_level("WARNING"):
        cat = read_catalogue(csv_path)
    assert cat.duplicates["groups"] == 2 and cat.duplicates["across_splits"] == 1
    assert cat.duplicates["conflicting_labels"] == 1 and cat.duplicates["rows"] == 4
    assert "rows 0, 1 (image 'a.png'): splits train, test" in cat.duplicates["examples"][0]
    assert "1 of them in more than one split" in caplog.text and "different labels" in caplog.text
    summary = extract_features(ExtractConfig(catalogue=str(csv_path), out=str(tmp_path / "f.h5"), image_encoder="stub",
                                             text_encoder="stub", num_workers=0, device="cpu"))
    assert summary["items"] == 5 and summary["duplicates"]["across_splits"] == 1  # kept, not dropped silently
    assert features.read_attrs(tmp_path / "f.h5")["duplicates"]["groups"] == 2


# ----------------------------------------------------------------- item 10: unsafe checkpoints


class _Payload:
    """Unpickling this calls os.system: what a hostile checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_item10_an_unsafe_checkpoint_runs_nothing_and_the_message_keeps_the_protection(small_run, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": "huse-checkpoint", "version": 1, "x": _Payload(marker)}, path)
    with pytest.raises(HuseError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "refused for safety" in message and str(path) in message
    assert "weights_only" not in message and "trust" not in message.lower() and "\n" not in message
    assert not marker.exists()
    result = _run_cli(["eval", "--checkpoint", str(path), "--features", str(small_run["features"]), "--device", "cpu"])
    _one_line_error(result, "refused for safety")
    assert not marker.exists() and "weights_only" not in result.output


# ----------------------------------------------- item 5 and item 6: malformed or non-finite feature files


def _edited_features(small_run, tmp_path, edit) -> Path:
    import h5py

    path = tmp_path / "edited.h5"
    shutil.copy(small_run["features"], path)
    with h5py.File(path, "r+") as f:
        edit(f)
    return path


def _nan_in_a_test_item(f):
    test = np.flatnonzero(f["items/split"].asstr()[()] == "test")[0]
    f["items/image_emb"][test, 0] = np.nan


def test_item5_non_finite_features_are_the_same_clear_refusal_everywhere(small_run, tmp_path):
    path = _edited_features(small_run, tmp_path, _nan_in_a_test_item)
    for extra in ([], ["--other-features"]):
        result = _run_cli(["eval", "--run", str(small_run["run"]), "--features", str(path), "--device", "cpu", *extra])
        _one_line_error(result, f"{path} holds 1 non-finite image feature values; re-run `huse extract-features`")
    result = _run_cli(["train", "--features", str(path), "--out", str(tmp_path / "r"), "--epochs", "1", "--device", "cpu"])
    _one_line_error(result, f"{path} holds 1 non-finite image feature values")


def _replace(f, name, data):
    del f[name]
    f.create_dataset(name, data=data)


@pytest.mark.parametrize("edit, needle", [
    (lambda f: f["items/label"].__setitem__(0, 7), "1 label(s) outside [0, 3) (values 0..7)"),
    (lambda f: f["items/label"].__setitem__(1, -1), "1 label(s) outside [0, 3)"),
    (lambda f: _replace(f, "graph/class_dist", np.zeros((4, 4), np.float32)), "the semantic graph is (4, 4), not (3, 3)"),
    (lambda f: _replace(f, "graph/class_dist", np.full((3, 3), np.nan, np.float32)), "graph holds non-finite values"),
    (lambda f: _replace(f, "items/text", np.asarray(["t"] * 59, dtype=object).astype("S")), "/items/text has 59 rows for 60"),
    (lambda f: _replace(f, "items/text_emb", np.zeros((60, 4), np.float32)), "/items/text_emb has 4 dims, the file's text_dim says 5"),
    (lambda f: _replace(f, "items/label", np.zeros(60, np.float32)), "/items/label is float32"),
])
def test_item6_a_malformed_feature_file_is_one_line_naming_it(small_run, tmp_path, edit, needle):
    path = _edited_features(small_run, tmp_path, edit)
    for args in (["eval", "--run", str(small_run["run"]), "--features", str(path), "--other-features"],
                 ["train", "--features", str(path), "--out", str(tmp_path / "r"), "--epochs", "1"]):
        _one_line_error(_run_cli([*args, "--device", "cpu"]), f"feature file {path} is malformed", needle)
    assert _run_cli(["build-graph", "--features", str(path), "--method", "tree"]).exit_code == (0 if "graph" in needle else 1)
