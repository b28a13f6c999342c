"""`huse predict`: the class paths of new products. Each row of a catalogue CSV (image, text; label
and split optional) goes through the run's feature-file featurizer and towers; the output CSV has,
per row, the top-k class paths with probabilities from the image, from the text and fused
(w·p_image + (1−w)·p_text, w as `Space.fusion_weight` says). Unusable inputs are handled as in
stage one: the row keeps a reason ("image: missing file") and the other modality's prediction.
"""
from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from huse_pipeline.data.catalogue import read_catalogue, resolve_image
from huse_pipeline.errors import HuseError
from huse_pipeline.search.space import Space
from huse_pipeline.settings import DEFAULT_RUNS_DIR
from huse_pipeline.utils import atomic_path

log = logging.getLogger(__name__)

SOURCES = ("image", "text", "fused")


@dataclass(frozen=True)
class PredictConfig:
    catalogue: str
    out: str = "predictions.csv"
    run: str | None = None
    features: str | None = None  # whose featurizer (preprocessing, encoders) to use; default: the run's
    image_root: str | None = None  # default: the catalogue's folder
    allow_outside_root: bool = False  # as stage one: an image path leading out of image_root is not read
    label_sep: str = "<"
    k: int = 3
    fusion_weight: float | None = None  # default: huse eval's (tuned on val), see Space
    batch_size: int = 64
    device: str = "auto"
    runs_dir: str = DEFAULT_RUNS_DIR


def read_rows(path: str | Path, image_root: str | None, label_sep: str) -> tuple[pd.DataFrame, Path]:
    """The CSV's rows (image, text, label, class_name, split) and the image root. With a label column it
    is read exactly as stage one reads it (the same split when there is no split column); without
    one, only image and text are required."""
    path = Path(path)
    if not path.is_file():
        raise HuseError(f"catalogue {path} does not exist (expected a CSV with columns image,text[,label,split])")
    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        header = [c.strip() for c in next(csv.reader(fh), [])]
    if "label" in header:
        cat = read_catalogue(path, image_root, label_sep)
        return cat.frame, cat.image_root
    missing = [c for c in ("image", "text") if c not in header]
    if missing:
        raise HuseError(f"catalogue {path} lacks the column(s) {', '.join(missing)}; it has {', '.join(header) or 'none'}")
    frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False, index_col=False)
    frame.columns = [str(c).strip() for c in frame.columns]
    frame = frame.reset_index(drop=True)
    frame["label"] = ""
    frame["class_name"] = None
    frame["split"] = frame["split"] if "split" in frame.columns else ""
    return frame[["image", "text", "label", "class_name", "split"]], Path(image_root) if image_root else path.parent


def predict_catalogue(cfg: PredictConfig, progress: bool = False, space: Space | None = None) -> dict[str, Any]:
    """Predict every row of `cfg.catalogue` into `cfg.out` (atomically); returns a summary with the
    top-1 accuracy of each source over the rows whose given label is one of the run's classes."""
    from tqdm.auto import tqdm

    if cfg.k < 1:
        raise HuseError("-k must be at least 1")
    frame, root = read_rows(cfg.catalogue, cfg.image_root, cfg.label_sep)  # a bad CSV fails before any model loads
    space = space or Space.load(cfg.run, cfg.features, index=False, device=cfg.device, runs_dir=cfg.runs_dir,
                                fusion_weight=cfg.fusion_weight)
    k = min(cfg.k, len(space.class_names))
    n = len(frame)
    prob = {s: np.full((n, len(space.class_names)), np.nan, np.float32) for s in SOURCES}
    reasons: list[list[str]] = [[] for _ in range(n)]
    texts = frame["text"].tolist()
    resolved = [resolve_image(root, p, cfg.allow_outside_root) if p.strip() else (None, "empty image path")
                for p in frame["image"]]  # (path or None, why not), exactly as stage one decides
    images = [path for path, _ in resolved]
    featurizer = space.featurizer
    with tqdm(total=n, unit="row", desc="predict", disable=not progress, dynamic_ncols=True) as bar:
        for b0 in range(0, n, cfg.batch_size):
            sl = slice(b0, min(n, b0 + cfg.batch_size))
            text_feats, text_why = featurizer.encode_texts(texts[sl])
            image_feats, image_why = featurizer.encode_images(images[sl])  # None -> a reason, replaced below
            image_why = [r if path is None else why for (path, r), why in zip(resolved[sl], image_why)]
            out = space.predict_features(image_feats, text_feats, [not r for r in image_why], [not r for r in text_why])
            for s in SOURCES:
                prob[s][sl] = out[s]
            for i, (ri, rt) in enumerate(zip(image_why, text_why)):
                reasons[b0 + i] += ([f"image: {ri}"] if ri else []) + ([f"text: {rt}"] if rt else [])
            bar.update(sl.stop - sl.start)

    columns: dict[str, Any] = {
        "row": np.arange(n), "image": frame["image"].tolist(), "text": texts, "label": frame["label"].tolist(),
        "split": frame["split"].tolist(), "reason": ["; ".join(r) for r in reasons]}
    top1: dict[str, list[str]] = {}
    for s in SOURCES:
        usable = ~np.isnan(prob[s]).any(axis=1)
        tops = space.top_classes(np.nan_to_num(prob[s], nan=0.0), k)
        for j in range(k):
            columns[f"{s}_class_{j + 1}"] = [t[j][0] if ok else "" for t, ok in zip(tops, usable)]
            columns[f"{s}_prob_{j + 1}"] = [round(t[j][1], 6) if ok else np.nan for t, ok in zip(tops, usable)]
        top1[s] = columns[f"{s}_class_1"]
    table = pd.DataFrame(columns)
    with atomic_path(cfg.out) as tmp:
        table.to_csv(tmp, index=False)

    known = set(space.class_names)
    given = [None if c is None else c for c in frame["class_name"]]
    summary: dict[str, Any] = {
        "out": str(cfg.out), "rows": n,
        "usable": {s: int((~np.isnan(prob[s]).any(axis=1)).sum()) for s in SOURCES},
        "unusable_rows": int(sum(1 for r in reasons if len(r) == 2)),
        "fusion_weight": space.fusion_weight, "fusion_weight_source": space.fusion_weight_source,
    }
    labelled = [i for i, c in enumerate(given) if c in known]
    if labelled:
        summary["accuracy"] = {s: _accuracy(top1[s], given, labelled) for s in SOURCES}
        summary["labelled_rows"] = len(labelled)
    unknown = sorted({c for c in given if c is not None and c not in known})
    if unknown:
        summary["labels_not_in_the_run"] = len([c for c in given if c in unknown])
    by_reason: dict[str, int] = {}
    for r in reasons:
        for part in r:
            kind = part.split(" (")[0]
            by_reason[kind] = by_reason.get(kind, 0) + 1
    summary["reasons"] = dict(sorted(by_reason.items()))
    return summary


def _accuracy(pred: list[str], given: list[str | None], rows: list[int]) -> float | None:
    usable = [i for i in rows if pred[i]]
    return round(sum(pred[i] == given[i] for i in usable) / len(usable), 6) if usable else None

