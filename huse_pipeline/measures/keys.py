"""The metric keys of `huse eval` and the one place that lays them out as tables.
"""
from __future__ import annotations

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
# Provenance, so the JSON says what it measured.
META_KEYS = ("meta/split", "meta/n_items", "meta/checkpoint", "meta/features", "meta/features_match_training",
             "meta/fusion_weight_source", "meta/eval_time_s")



# ------------------------------------------------------------------------------- the table


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


def format_table(m: dict[str, Any]) -> str:
    """The metrics as readable plain-text tables (what `huse eval` prints)."""
    has_base = "baseline/acc/image" in m
    lines = [f"split {m.get('meta/split', '?')}: {m.get('meta/n_items', '?')} items; "
             f"fusion weight (image) {_fmt(m['fusion_weight'], 2)}, {m.get('meta/fusion_weight_source', '')}", ""]
    if m.get("meta/features_match_training") is False:
        lines[1:1] = ["WARNING: not the feature file the model was trained on (--other-features)"]
    rows = [["accuracy", _fmt(m["acc/image"]), _fmt(m["acc/text"]), _fmt(m["acc/fused"]), _fmt(m["acc/fused@0.5"])],
            ["top-5 accuracy", _fmt(m["acc5/image"]), _fmt(m["acc5/text"]), "", ""],
            ["macro accuracy", _fmt(m["macro_acc/image"]), _fmt(m["macro_acc/text"]), "", ""]]
    if has_base:
        rows.append(["separate models", _fmt(m["baseline/acc/image"]), _fmt(m["baseline/acc/text"]),
                     _fmt(m["baseline/acc/fused"]), ""])
    lines += _table(["classification", "image", "text", "fused", "fused@0.5"], rows) + [""]
    rows = []
    for task in TASKS:
        rows.append([task] + [_fmt(m[f"{task}/{k}"], 2 if k == "severity" else 3) for k in RETRIEVAL_METRICS])
        if has_base and task in IN_MODAL_TASKS:
            rows.append(["  raw features"] + [_fmt(m[f"baseline/{task}/{k}"], 2 if k == "severity" else 3)
                                               for k in RETRIEVAL_METRICS])
    lines += _table(["retrieval (class)", *RETRIEVAL_METRICS], rows) + [""]
    rows = [[t] + [_fmt(m[f"{t}/{k}"], 1 if k == "medr" else 3) for k in INSTANCE_METRICS] for t in ("img2txt", "txt2img")]
    lines += _table(["retrieval (instance)", *INSTANCE_METRICS], rows) + [""]
    lines.append(f"universal space: graph_fidelity {_fmt(m['graph_fidelity'])}  tree_fidelity "
                 f"{_fmt(m['tree_fidelity'])}  modality_gap {_fmt(m['modality_gap'])}")
    return "\n".join(lines)
