"""The metric tables are described once (`keys.metric_tables`) and rendered twice: plain text
(`format_table`, what `huse eval` prints) and HTML (the report's `metrics_section`)."""
from __future__ import annotations

import html
import re
from dataclasses import replace

import pytest

from huse_pipeline.eval.report import metrics_section
from huse_pipeline.measures import keys
from huse_pipeline.measures.keys import BASELINE_KEYS, METRIC_KEYS, MetricRow, MetricTable, format_table, metric_tables


def _metrics(baselines: bool) -> dict:
    """Every key with a distinct value (distinct at 3 decimals), medr above 1."""
    names = list(METRIC_KEYS) + (list(BASELINE_KEYS) if baselines else [])
    m = {k: (11.0 + 0.7 * i if k.endswith("medr") else 0.1 + 0.007 * i) for i, k in enumerate(names)}
    m.update({"meta/split": "test", "meta/n_items": 30, "meta/fusion_weight_source": "tuned on val"})
    return m


def _keys_in(tables: list[MetricTable]) -> set[str]:
    return {k for t in tables for row in t.rows for k in row.keys if k is not None}


@pytest.mark.parametrize("baselines", [False, True])
def test_the_description_covers_every_metric_key(baselines):
    m = _metrics(baselines)
    want = set(METRIC_KEYS) | (set(BASELINE_KEYS) if baselines else set())
    # the fusion weights are told in the header line / the classification note, not in a cell
    assert _keys_in(metric_tables(m)) == want - {"fusion_weight", "baseline/fusion_weight"}
    for table in metric_tables(m):
        assert len(table.digits) == len(table.columns)
        assert all(len(row.keys) == len(table.columns) for row in table.rows), table.name


def _text_rows(text: str, table: MetricTable) -> list[list[str]]:
    """The value cells of each row of `table` in the plain-text output."""
    if table.one_line:
        line = next(ln for ln in text.splitlines() if ln.startswith(f"{table.name}: "))
        return [[re.search(rf"\b{re.escape(row.label)} (\S+)", line).group(1)] for row in table.rows]
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.split("  ")[0] == table.name)
    assert set(lines[start + 1]) == {"-"}
    body = lines[start + 2:start + 2 + len(table.rows)]
    out = []
    for row, line in zip(table.rows, body):
        assert line.startswith(row.label), (row.label, line)
        out.append(line[len(row.label):].split())
    return out


def _html_rows(page: str, table: MetricTable) -> list[list[str]]:
    """The value cells of each row of `table` in the HTML, "–" read as "-"."""
    part = page.split(f"<h3>{html.escape(table.title)}</h3>")[1].split("<h3>")[0]
    rows = re.findall(r"<tr class=\"(base)?\">(.*?)</tr>", part)
    assert len(rows) == len(table.rows), table.title
    out = []
    for (base, cells), row in zip(rows, table.rows):
        tds = [html.unescape(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", cells)]
        assert tds[0] == (row.report_label or row.label) and bool(base) == row.baseline
        out.append([c.replace("–", "-") for c in tds[1:1 + len(table.columns)] if c])
    return out


@pytest.mark.parametrize("baselines", [False, True])
def test_text_and_html_show_the_same_cells_in_the_same_places(baselines):
    m = _metrics(baselines)
    m["img2img/severity"] = None  # undefined: a dash in both
    text, page = format_table(m), metrics_section(m)
    for table in metric_tables(m):
        want = [[keys._fmt(m[k], d) for k, d in zip(row.keys, table.digits) if k is not None] for row in table.rows]
        assert _text_rows(text, table) == want, table.name
        assert _html_rows(page, table) == want, table.title
        if not table.one_line:
            header = next(ln for ln in text.splitlines() if ln.split("  ")[0] == table.name)
            assert header.split()[-len(table.columns):] == list(table.columns)
        for column in table.columns:
            assert f">{html.escape(column)}</th>" in page
    assert "-" in _text_rows(text, metric_tables(m)[1])[0]


def test_a_row_or_table_added_to_the_description_appears_in_both(monkeypatch):
    original = keys.metric_tables

    def changed(m):
        tables = original(m)
        classification = replace(tables[0], rows=tuple(r for r in tables[0].rows if r.label != "top-5 accuracy")
                                 + (MetricRow("made-up row", ("made/up", None, None, None), "made-up row (report)"),))
        extra = MetricTable("extra things", "Extra things", ("x", "y"), (4, 1), (MetricRow("one", ("extra/x", "extra/y")),),
                            note="What the extra things are.")
        return [classification, *tables[1:], extra]

    m = {**_metrics(False), "made/up": 0.98765, "extra/x": 0.123456, "extra/y": 7.25}
    assert "top-5 accuracy" in format_table(m) and "top-5 accuracy" in metrics_section(m)
    monkeypatch.setattr(keys, "metric_tables", changed)
    text, page = format_table(m), metrics_section(m)
    assert "top-5 accuracy" not in text and "top-5 accuracy" not in page  # a row left out of both
    assert re.search(r"^made-up row +0\.988 *$", text, re.M)
    assert re.search(r"<td[^>]*>made-up row \(report\)</td><td[^>]*>0\.988</td>", page)
    assert re.search(r"^extra things +x +y$", text, re.M) and re.search(r"^one +0\.1235 +7\.2$", text, re.M)
    assert "<h3>Extra things</h3>" in page and '<p class="note">What the extra things are.</p>' in page
    assert re.search(r"<td[^>]*>one</td><td[^>]*>0\.1235</td><td[^>]*>7\.2</td>", page)


def test_the_fusion_weights_are_told_in_both():
    m = {**_metrics(True), "fusion_weight": 0.25, "baseline/fusion_weight": 0.75}
    assert "fusion weight (image) 0.25, tuned on val" in format_table(m)
    assert "with w = 0.25 (tuned on val); separate models: w = 0.75." in html.unescape(metrics_section(m))
