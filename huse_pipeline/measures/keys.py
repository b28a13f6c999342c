"""The metric keys of `huse eval` and the one place that lays them out as tables: `metric_tables`
describes every table (rows, columns, keys, digits); `format_table` (plain text, what `huse eval`
prints) and the report's `metrics_section` (HTML) only render that description.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from huse_pipeline.measures import metrics

TASKS = ("img2img", "img2txt", "txt2img", "txt2txt")
IN_MODAL_TASKS = ("img2img", "txt2txt")
RETRIEVAL_METRICS = tuple(f"R@{k}" for k in metrics.RECALL_KS) + ("MAP@R",) + tuple(
    f"HP@{k}" for k in metrics.HP_KS) + ("severity",)
INSTANCE_METRICS = tuple(f"inst_R@{k}" for k in metrics.RECALL_KS) + ("medr",)
CLASSIFICATION_KEYS = ("acc/image", "acc/text", "acc/fused", "acc/fused@0.5", "acc5/image", "acc5/text",
                       "macro_acc/image", "macro_acc/text", "fusion_weight")
# Every key of the JSON (the README's evaluation table). Values are floats, or null where a metric is undefined
# (severity when no top-1 is wrong; fidelity when a side is constant or the graph is missing).
METRIC_KEYS = (
    CLASSIFICATION_KEYS
    + tuple(f"{t}/{m}" for t in TASKS for m in RETRIEVAL_METRICS)
    + tuple(f"{t}/{m}" for t in ("img2txt", "txt2img") for m in INSTANCE_METRICS)
    + ("graph_fidelity", "tree_fidelity", "modality_gap")
)
# With --baselines. baseline/fusion_weight is the separate models' tuned weight (not in the paper).
BASELINE_KEYS = ("baseline/acc/image", "baseline/acc/text", "baseline/acc/fused", "baseline/fusion_weight") + tuple(
    f"baseline/{t}/{m}" for t in IN_MODAL_TASKS for m in RETRIEVAL_METRICS)
# With --attributes (a catalogue with a colour attribute): "<colour> <class>" text queries against the images.
ATTRIBUTE_KEYS = ("attr/colour_class@10", "attr/class@10", "attr/colour@10", "attr/n_queries")
# Provenance, so the JSON says what it measured.
META_KEYS = ("meta/split", "meta/n_items", "meta/checkpoint", "meta/features", "meta/features_match_training",
             "meta/fusion_weight_source", "meta/eval_time_s")



# ------------------------------------------------------------------------------- the tables


@dataclass(frozen=True)
class MetricRow:
    """One row of a metric table: a label and, per column, the metric key shown there (None: empty)."""

    label: str
    keys: tuple[str | None, ...]
    report_label: str = ""  # the report's fuller wording of the label; `label` when empty
    baseline: bool = False  # a row of the §4.4 baselines (set apart in the report)
    meaning: str = ""  # what the metric means, for tables of single metrics


@dataclass(frozen=True)
class MetricTable:
    """One table of metrics. Renderers take everything from here and only decide the markup."""

    name: str  # plain text: the table's corner cell ("classification")
    title: str  # the report's heading ("Classification")
    columns: tuple[str, ...]  # the headers of the value columns
    digits: tuple[int, ...]  # decimals per value column
    rows: tuple[MetricRow, ...]
    label_header: str = ""  # the report's header over the labels ("task")
    note: str = ""  # plain text under the table in the report: what the numbers are
    one_line: bool = False  # plain text: one line "name: label value  label value ..."


def _weight(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}"


def metric_tables(m: dict[str, Any]) -> list[MetricTable]:
    """The metric tables of an evaluation whose metrics are `m` (baseline rows when `m` has them)."""
    base = "baseline/acc/image" in m
    retrieval_digits = tuple(2 if k == "severity" else 3 for k in RETRIEVAL_METRICS)
    rows = [MetricRow("accuracy", ("acc/image", "acc/text", "acc/fused", "acc/fused@0.5")),
            MetricRow("top-5 accuracy", ("acc5/image", "acc5/text", None, None)),
            MetricRow("macro accuracy", ("macro_acc/image", "macro_acc/text", None, None),
                      "macro accuracy (mean per-class recall)")]
    if base:
        rows.append(MetricRow("separate models", ("baseline/acc/image", "baseline/acc/text", "baseline/acc/fused", None),
                              "separate models (baseline)", baseline=True))
    fusion = (f"fused = w·softmax(image) + (1−w)·softmax(text) with w = {_weight(m['fusion_weight'])} "
              f"({m.get('meta/fusion_weight_source', '')})"
              + (f"; separate models: w = {_weight(m.get('baseline/fusion_weight'))}" if base else "") + ".")
    tables = [MetricTable("classification", "Classification", ("image", "text", "fused", "fused@0.5"), (3, 3, 3, 3),
                          tuple(rows), note=fusion)]
    rows = []
    for task in TASKS:
        rows.append(MetricRow(task, tuple(f"{task}/{k}" for k in RETRIEVAL_METRICS)))
        if base and task in IN_MODAL_TASKS:
            rows.append(MetricRow("  raw features", tuple(f"baseline/{task}/{k}" for k in RETRIEVAL_METRICS),
                                  f"{task}, raw features (baseline)", baseline=True))
    tables.append(MetricTable(
        "retrieval (class)", "Class-level retrieval", RETRIEVAL_METRICS, retrieval_digits, tuple(rows), "task",
        "Every item of the split is a query. R@K: an item of the query's class among the top K (the query itself "
        "excluded in img2img / txt2txt; the cross-modal gallery includes its own paired item). MAP@R: Musgrave et al. "
        "2020. HP@K: hierarchical precision (classes near the query's class in the tree count). severity: mean tree "
        "distance of a wrong top-1 (lower is better)."))
    tables.append(MetricTable(
        "retrieval (instance)", "Instance-level retrieval", INSTANCE_METRICS,
        tuple(1 if k == "medr" else 3 for k in INSTANCE_METRICS),
        tuple(MetricRow(t, tuple(f"{t}/{k}" for k in INSTANCE_METRICS)) for t in ("img2txt", "txt2img")), "task",
        "The only hit is the query's own paired item; medr is its median rank (1 = best)."))
    if "attr/n_queries" in m:
        tables.append(MetricTable(
            "attribute search (top 10)", "Colour-and-class text queries", ("value",), (3,),
            (MetricRow("colour and class", ("attr/colour_class@10",), meaning="share of the top 10 images of the "
                       "query's colour and class"),
             MetricRow("class", ("attr/class@10",), meaning="share of the query's class"),
             MetricRow("colour", ("attr/colour@10",), meaning="share of the query's colour"),
             MetricRow("queries", ("attr/n_queries",), meaning="(colour, class) pairs with at least 3 items")),
            "metric", "One text query \"<colour> <class>\" per (colour, class) pair with at least 3 items in the "
            "split, through the text tower, against the split's images (--attributes).", one_line=True))
    tables.append(MetricTable(
        "universal space", "The universal space", ("value",), (3,),
        (MetricRow("graph_fidelity", ("graph_fidelity",), meaning="Spearman correlation of class-centroid distances "
                   "with the semantic graph A (higher is better)"),
         MetricRow("tree_fidelity", ("tree_fidelity",), meaning="Spearman correlation of class-centroid distances "
                   "with the tree distances (higher is better)"),
         MetricRow("modality_gap", ("modality_gap",), meaning="mean cosine distance between an item's image and its text")),
        "metric",
        "A centroid is the renormalised mean of the L2-normalised image and text embeddings of a class's items in "
        "the split; pairs of classes present in the split; – = undefined (e.g. no graph in the feature file, or "
        "constant tree distances for flat labels).", one_line=True))
    return tables


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return [line(header), "-" * len(line(header)), *map(line, rows)]


def _cells(m: dict[str, Any], table: MetricTable, row: MetricRow) -> list[str]:
    return ["" if key is None else _fmt(m[key], d) for key, d in zip(row.keys, table.digits)]


def format_table(m: dict[str, Any]) -> str:
    """The metrics as readable plain-text tables (what `huse eval` prints), laid out by `metric_tables`."""
    lines = [f"split {m.get('meta/split', '?')}: {m.get('meta/n_items', '?')} items; "
             f"fusion weight (image) {_fmt(m['fusion_weight'], 2)}, {m.get('meta/fusion_weight_source', '')}", ""]
    if m.get("meta/features_match_training") is False:
        lines[1:1] = ["WARNING: not the feature file the model was trained on (--other-features)"]
    for table in metric_tables(m):
        if table.one_line:
            lines.append(f"{table.name}: " + "  ".join(f"{row.label} {' '.join(_cells(m, table, row))}"
                                                        for row in table.rows))
        else:
            rows = [[row.label, *_cells(m, table, row)] for row in table.rows]
            lines += _table([table.name, *table.columns], rows) + [""]
    return "\n".join(lines)
