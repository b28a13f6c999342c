"""`huse eval --report`: one self-contained HTML page with its figures, tables and thumbnails."""
from __future__ import annotations

import re

import numpy as np
import pytest
from click.testing import CliRunner
from test_evaluate import build_eval_fixture, fake_fit

from huse_pipeline.eval.report import _top_level, _top_level_of_predictions


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
