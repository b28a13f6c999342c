"""`huse eval --report`: one self-contained HTML page with its figures, tables and thumbnails."""
from __future__ import annotations

import base64
import html
import io
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from matplotlib.legend import Legend
from PIL import Image
from test_evaluate import build_eval_fixture, fake_fit

from huse_pipeline.eval.report import CSS, THUMB_PX, _path, thumb_html, thumbnail_uri, _top_level, _top_level_of_predictions
from huse_pipeline.train.curves import N_EPOCH_TICKS, training_curves

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def report_html(tmp_path_factory) -> tuple[str, dict]:
    root = tmp_path_factory.mktemp("report")
    paths = build_eval_fixture(root)
    from cli import main
    from huse_pipeline.eval import evaluate

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(evaluate, "fit", fake_fit([]))
        res = CliRunner().invoke(main, ["eval", "--run", str(paths["run"]), "--features", str(paths["features"]),
                                        "--report", str(root / "report"), "--baselines", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "report:" in res.output
    return (root / "report" / "index.html").read_text(encoding="utf-8"), paths


def test_report_is_one_self_contained_page(report_html):
    page, _ = report_html
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    srcs = re.findall(r'src="([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/") for s in srcs)  # nothing fetched from elsewhere
    assert "http://" not in page and "https://" not in page


def test_report_has_every_section_and_figure(report_html):
    page, _ = report_html
    for heading in ("Metrics", "Per-class accuracy", "Confusion between top-level classes", "The universal space",
                    "Example retrievals", "Image query → top-5 texts", "Text query → top-5 images", "Training curves"):
        assert f">{heading}</h" in page, heading
    # confusion heatmap, 2-D map and training curves as PNG; thumbnails as JPEG
    assert len(re.findall(r'<img class="fig" src="data:image/png;base64,[A-Za-z0-9+/=]{200,}"', page)) == 3
    assert len(re.findall(r'src="data:image/jpeg;base64,', page)) >= 3
    assert "image not found" in page  # every other image file is missing: placeholders, no crash
    assert "separate models (baseline)" in page and "raw features (baseline)" in page
    assert "t-SNE" in page


def test_report_per_class_table_lists_every_class_with_sizes(report_html):
    page, paths = report_html
    table = page[page.index('<table class="sortable">'):]
    table = table[:table.index("</table>")]
    rows = re.findall(r"<tr><td>([^<]+)</td><td data-v=\"(\d+)\">", table)
    assert sorted(name for name, _ in rows) == sorted(n.replace("<", "&lt;") for n in _names(paths))
    assert all(int(n) == 5 for _, n in rows)
    fused = [float(v) for v in re.findall(r'data-v="([0-9.]+)" style[^>]*>[^<]*</td></tr>', table)]
    assert fused == sorted(fused)  # worst fused accuracy first


def _names(paths) -> list[str]:
    from huse_pipeline.store import features

    return features.read_class_names(paths["features"])


def test_top_level_folding():
    names = [f"t{i}<leaf" for i in range(25)]
    top, kept = _top_level(names, "<", np.arange(25))
    assert len(kept) == 21 and kept[-1] == "(other)"
    assert (top == 20).sum() == 5
    top, kept = _top_level(["a<x", "a<y", "b<z"], "<", np.array([0, 1, 2, 2]))
    assert kept == ["a", "b"] and top.tolist() == [0, 0, 1, 1]


def test_a_prediction_outside_the_splits_top_levels_goes_to_other():
    """Top level c has no item in the split, so it is no row; a prediction of c<w used to be drawn as
    the last row's class (b)."""
    class_top = ["a", "a", "b", "c"]  # a<x, a<y, b<z, c<w
    cols, names = _top_level_of_predictions(class_top, ["a", "b"], np.array([0, 2, 3]))
    assert names == ["a", "b", "(other)"] and cols.tolist() == [0, 1, 2]
    cols, names = _top_level_of_predictions(class_top, ["a", "b"], np.array([1, 2]))
    assert names == ["a", "b"] and cols.tolist() == [0, 1]  # nothing outside: no empty (other) column
    cols, names = _top_level_of_predictions(class_top, ["a", "(other)"], np.array([2, 3]))
    assert names == ["a", "(other)"] and cols.tolist() == [1, 1]  # folded rare top levels


# ------------------------------------------------------------------------------ thumbnails


def _decode(uri: str) -> Image.Image:
    assert uri.startswith("data:image/jpeg;base64,")
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB")


def _exif_rotated(path: Path, size=(200, 100)) -> None:
    """Stored wide, left half red and right half blue, with EXIF orientation 6 (turn 90° clockwise
    to view): the picture is tall, red on top."""
    im = Image.new("RGB", size, (220, 0, 0))
    im.paste((0, 0, 220), (size[0] // 2, 0, size[0], size[1]))
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(path, format="JPEG", quality=95, exif=exif)


def test_thumbnail_applies_the_exif_rotation(tmp_path):
    _exif_rotated(tmp_path / "rotated.jpg")
    uri, reason = thumbnail_uri(tmp_path / "rotated.jpg")
    assert reason == ""
    thumb = _decode(uri)
    assert thumb.size == (THUMB_PX // 2, THUMB_PX)  # tall, not the stored 2:1 landscape
    top, bottom = thumb.getpixel((thumb.width // 2, 5)), thumb.getpixel((thumb.width // 2, thumb.height - 5))
    assert top[0] > 150 > top[2] and bottom[2] > 150 > bottom[0]  # red on top, blue below


def test_thumbnail_converts_like_stage_one(tmp_path):
    """16-bit greyscale scaled (not clipped to white) and alpha composited on white (not black)."""
    Image.fromarray(np.full((40, 40), 128 * 257, dtype=np.uint16)).save(tmp_path / "grey16.png")
    Image.new("RGBA", (40, 40), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    grey = _decode(thumbnail_uri(tmp_path / "grey16.png")[0]).getpixel((20, 20))
    clear = _decode(thumbnail_uri(tmp_path / "clear.png")[0]).getpixel((20, 20))
    assert all(abs(v - 128) <= 3 for v in grey), grey
    assert all(v >= 250 for v in clear), clear


def test_thumbnail_placeholder_says_why(tmp_path):
    (tmp_path / "garbage.jpg").write_bytes(b"this is not an image at all")
    Image.new("RGB", (200, 100)).save(tmp_path / "big.png")
    assert thumbnail_uri(tmp_path / "nope.jpg") == (None, "missing file")
    assert thumbnail_uri(tmp_path / "garbage.jpg") == (None, "not an image")
    uri, reason = thumbnail_uri(tmp_path / "big.png", max_pixels=10_000)
    assert uri is None and reason.startswith("image too large")
    assert '<div class="ph" title="missing file">image not found</div>' in thumb_html((None, "missing file"), "x")
    assert '>not an image</div>' in thumb_html((None, "not an image"), "x")
    assert re.search(r'<div class="ph" title="image too large \(200 x 100 &gt; 10000 pixels\)">image too large</div>',
                     thumb_html((None, reason), "x"))
    assert '<img src="data:' in thumb_html(thumbnail_uri(tmp_path / "big.png"), "x")


def test_report_thumbnails_go_through_the_image_loader(tmp_path):
    """Every image of the fixture EXIF-rotated (even rows) or garbage (odd rows): every thumbnail in
    the page is upright, every other one a placeholder, and the report does not fail."""
    paths = build_eval_fixture(tmp_path, train_steps=5)
    images = sorted((tmp_path / "images").glob("*.png"))
    for i in range(2 * len(images)):
        if i % 2:
            (tmp_path / "images" / f"{i}.png").write_bytes(b"\x00garbage, not an image")
        else:
            _exif_rotated(tmp_path / "images" / f"{i}.png")  # a JPEG under a .png name: PIL reads the content
    from cli import main

    res = CliRunner().invoke(main, ["eval", "--run", str(paths["run"]), "--features", str(paths["features"]),
                                    "--report", str(tmp_path / "report"), "--report-map", "pca", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    page = (tmp_path / "report" / "index.html").read_text(encoding="utf-8")
    uris = re.findall(r'<img src="(data:image/jpeg;base64,[^"]+)"', page)
    assert len(uris) >= 3
    assert {_decode(u).size for u in uris} == {(THUMB_PX // 2, THUMB_PX)}
    assert '<div class="ph" title="not an image">not an image</div>' in page and "image not found" not in page
    assert "could not be read (placeholder shown)" in page


# ------------------------------------------------------------------------------ page layout


def test_header_paths_wrap_only_after_a_slash(report_html):
    page, paths = report_html
    meta = re.search(r'<p class="meta">(.*?)</p>', page, re.S).group(1)
    codes = re.findall(r"<code>(.*?)</code>", meta)
    assert len(codes) == 3  # checkpoint, features, metrics JSON
    for code in codes:
        assert "/<wbr>" in code and re.search(r"/(?!<wbr>)", code) is None, code
        assert "<wbr>" not in code.replace("/<wbr>", "")
    shown = {html.unescape(c.replace("<wbr>", "")) for c in codes}
    assert str(paths["features"].resolve()) in shown and any(c.endswith("best.pt") for c in shown)
    rule = re.search(r"\.meta code\{([^}]*)\}", CSS).group(1)
    assert "word-break:normal" in rule and "overflow-wrap:normal" in rule
    assert "break-all" not in CSS
    assert _path("/a b/c&d.json") == "/<wbr>a b/<wbr>c&amp;d.json"


def _history(n: int) -> list[dict]:
    return [{"epoch": e, "train/loss": 3.0 / e, "val/loss": 3.2 / e, "train/class": 2.0 / e, "val/class": 2.1 / e,
             "train/graph": 0.01 / e, "train/gap": 0.5 / e, "val/acc/image": 0.5 - 0.2 / e,
             "val/acc/text": 0.6 - 0.2 / e, "val/acc/fused": 0.7 - 0.2 / e, "val/acc/mean": 0.6 - 0.2 / e}
            for e in range(1, n + 1)]


@pytest.mark.parametrize("epochs", [1, 20, 300])
def test_training_curves_are_readable(epochs):
    fig = training_curves(_history(epochs), mark_epoch=max(1, epochs // 2), mark_label="best")
    fig.canvas.draw()
    *panels, key = fig.axes
    assert len(panels) == 6 and not key.axison  # total, L_class, L_graph, L_gap, L_inst, accuracy
    assert fig.get_size_inches()[0] * fig.dpi / 4 >= 400  # four panels a row, each >= 400 px wide
    for ax in panels:
        assert ax.get_legend() is None  # no legend over a curve
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert 1 <= len(ticks) <= N_EPOCH_TICKS + 1 and all(float(t).is_integer() for t in ticks), ticks
    legends = [a for a in key.artists if isinstance(a, Legend)]
    assert [lg.get_title().get_text() for lg in legends] == ["losses", "validation accuracy"]
    assert [t.get_text() for t in legends[1].get_texts()] == ["image", "text", "fused", "mean"]
    assert f"best (epoch {max(1, epochs // 2)})" in [t.get_text() for t in legends[0].get_texts()]
    renderer = fig.canvas.get_renderer()
    boxes = [lg.get_window_extent(renderer) for lg in legends]
    assert not boxes[0].overlaps(boxes[1])
    for ax in panels:
        assert not any(ax.get_window_extent(renderer).overlaps(b) for b in boxes)
        assert all(line.get_visible() for line in ax.lines)
    if epochs == 1:  # a lone point gets a marker, or nothing would show
        assert all(line.get_marker() == "o" for ax in panels for line in ax.lines if len(line.get_xdata()) == 1)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Chromium (apt-get install -y chromium)")
def test_screenshot_script_captures_the_whole_page(tmp_path):
    """A page 5,600 px tall (taller than the old fixed 4,000) with a red block at its very end."""
    (tmp_path / "index.html").write_text(
        '<!DOCTYPE html><html><body style="margin:0"><div style="height:5500px;background:#fff"></div>'
        '<div style="height:100px;background:#f00"></div></body></html>')
    out = tmp_path / "shot.png"
    res = subprocess.run(["bash", str(REPO / "bench" / "screenshot_report.sh"), str(tmp_path), str(out), "900"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    with Image.open(out) as shot:
        assert shot.width == 900 and 5600 <= shot.height <= 5620
        assert shot.convert("RGB").getpixel((450, 5590)) == (255, 0, 0)
    bad = subprocess.run(["bash", str(REPO / "bench" / "screenshot_report.sh"), str(tmp_path), str(out), "wide"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "WIDTH or WIDTHxHEIGHT" in bad.stderr
