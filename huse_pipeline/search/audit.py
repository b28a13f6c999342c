"""`huse audit`: catalogue clean-up with a trained run.

1. **Suspect labels**: items whose given label disagrees with a confident fused prediction
   (argmax of w·p_image + (1−w)·p_text ≠ label and its probability ≥ `min_confidence`), ranked by
   p_fused(predicted) − p_fused(given label), highest first. The predictions are out of sample: a
   model trained on an item has fitted its label, wrong or not, so train items are predicted by
   `folds` models trained like the run without them (cross-fitting, as confident learning does),
   val and test items by the run's model. Each model's image and text probabilities are
   temperature-scaled on the val split (Guo et al. 2017) so that "confident" means what it says
   (the fusion weight stays the run's, tuned on val for the raw softmaxes).
2. **Near-duplicates under different labels**: items whose frozen image features or frozen text
   features (centred on the catalogue mean, L2-normalised) have cosine ≥ `duplicate_threshold`
   while their labels differ, joined into groups (connected components of those links). The raw
   features are used, not the universal space, because training pulls items of different labels
   apart and so hides exactly the pairs looked for here.

Both go to CSV files and to one self-contained HTML page with thumbnails (`audit_section` is the
page's body, for inclusion in the evaluation report).
"""
from __future__ import annotations

import html
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from huse_pipeline.errors import HuseError
from huse_pipeline.search import vectors
from huse_pipeline.search.space import Space
from huse_pipeline.settings import DEFAULT_RUNS_DIR
from huse_pipeline.store import features
from huse_pipeline.utils import atomic_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AuditConfig:
    run: str | None = None
    features: str | None = None
    index: str | None = None  # index folder; default <run>/index (`huse index` builds it)
    out: str | None = None  # suspect-label CSV; default <run>/audit/audit.csv (duplicates: <stem>_duplicates.csv)
    html: str | None = None  # default: audit.html beside the CSV
    min_confidence: float = 0.5  # calibrated fused probability of the predicted class
    folds: int = 5  # train items are predicted by models trained without them (0: the run's model)
    seed: int = 0
    top: int = 0  # suspect rows written (0: all)
    duplicate_threshold: float = 0.95  # cosine of centred frozen features
    duplicate_neighbours: int = 10  # neighbours examined per item and modality
    html_rows: int = 60  # suspects and groups shown with thumbnails
    fusion_weight: float | None = None
    device: str = "auto"
    runs_dir: str = DEFAULT_RUNS_DIR
    block_rows: int = 16384


# ---------------------------------------------------------------------------- suspects


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T minimising the mean negative log-likelihood of softmax(logits / T) (Guo et
    al. 2017, temperature scaling), on a log grid from 0.05 to 20 refined once; 1.0 without items."""
    if len(labels) == 0:
        return 1.0
    z = torch.from_numpy(np.asarray(logits, dtype=np.float64))
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))

    def nll(t: float) -> float:
        return float(torch.nn.functional.cross_entropy(z / t, y))

    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 61))
    best = grid[int(np.argmin([nll(t) for t in grid]))]
    fine = best * np.exp(np.linspace(-0.06, 0.06, 13))
    return float(fine[int(np.argmin([nll(t) for t in fine]))])


@torch.inference_mode()
def _logits(model: Any, fs: features.FeatureSet, items: np.ndarray, device: torch.device) -> dict[str, np.ndarray]:
    """Class logits (n, C) of the image and the text of `items` under `model`."""
    out = {}
    for m in ("image", "text"):
        feats = fs.image_emb if m == "image" else fs.text_emb
        embed = model.embed_image if m == "image" else model.embed_text
        parts = [model.classify(embed(torch.from_numpy(feats[items[b:b + 4096]]).to(device))).float().cpu().numpy()
                 for b in range(0, len(items), 4096)]
        out[m] = np.concatenate(parts) if parts else np.zeros((0, fs.num_classes), np.float32)
    return out


def _calibrated(model: Any, fs: features.FeatureSet, items: np.ndarray, device: torch.device
                ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Temperature-scaled class probabilities of `items` per modality, T fitted on the val split."""
    val = fs.indices("val")
    z_items, z_val = _logits(model, fs, items, device), _logits(model, fs, val, device)
    temps = {m: fit_temperature(z_val[m], fs.labels[val]) for m in ("image", "text")}
    probs = {m: torch.from_numpy(z_items[m] / temps[m]).softmax(1).numpy() for m in ("image", "text")}
    return probs, temps


def fold_assignment(labels: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """A fold 0..folds-1 per item, stratified by class (each class's items shuffled, dealt in turn)."""
    rng = np.random.default_rng(seed)
    out = np.empty(len(labels), np.int64)
    offset = 0
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        out[idx[rng.permutation(len(idx))]] = (np.arange(len(idx)) + offset) % folds
        offset += len(idx)  # the next class starts where this one stopped: folds stay balanced
    return out


def out_of_sample_probabilities(space: Space, folds: int = 5, seed: int = 0, progress: bool = False
                                ) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, Any]]:
    """Calibrated class probabilities per modality, (N, C) in feature-file order, that no model saw the
    label of: val and test items from the run's model; train items (with `folds` >= 2) from K models
    trained like the run (its TrainConfig) without the fold holding them. With `folds` 0 every item
    comes from the run's model, whose train items it has fitted (biased towards their given labels).
    Also returns the source per item ("run" or "fold j") and what was done."""
    from dataclasses import replace

    from tqdm.auto import tqdm

    from huse_pipeline.train.config import TrainConfig
    from huse_pipeline.train.loop import fit

    fs = features.read_features(space.features_path, views=True)
    n = len(fs.labels)
    all_items = np.arange(n)
    probs, temps = _calibrated(space.model, fs, all_items, space.device)
    source = np.full(n, "run", dtype=object)
    info: dict[str, Any] = {"folds": folds, "temperature": {"run": temps}}
    train = fs.indices("train")
    if folds >= 2 and len(train) >= folds:
        saved = space.train_config
        if saved is None:
            raise HuseError("the checkpoint has no train_config, so fold models cannot be trained like the run; "
                            "use --folds 0")
        cfg = replace(TrainConfig.from_saved(saved), device=str(space.device))
        fold = fold_assignment(fs.labels[train], folds, seed)
        loop_log = logging.getLogger("huse_pipeline.train.loop")
        level = loop_log.level
        loop_log.setLevel(logging.WARNING)  # one line per epoch per fold would drown the audit's output
        try:
            for j in tqdm(range(folds), desc="audit: fold models", unit="fold", disable=not progress):
                held = train[fold == j]
                split = fs.split.copy()
                split[held] = "held-out"
                model, _ = fit(replace(fs, split=split), cfg)
                p, t = _calibrated(model, replace(fs, split=split), held, space.device)
                for m in ("image", "text"):
                    probs[m][held] = p[m]
                source[held] = f"fold {j + 1}"
                info["temperature"][f"fold {j + 1}"] = t
        finally:
            loop_log.setLevel(level)
    elif folds >= 2:
        log.warning("fewer train items than folds: every prediction comes from the run's model")
    return probs, source, info


def suspect_labels(space: Space, probs: dict[str, np.ndarray], source: np.ndarray,
                   min_confidence: float = 0.5) -> pd.DataFrame:
    """The items whose fused prediction (from `probs`, feature-file order) is confident and disagrees with
    the given label, ranked by p_fused(predicted) - p_fused(given), highest first (ties by lower id)."""
    index = space._index()
    rows = np.concatenate([b["row"] for _, b in features.iter_item_blocks(space.features_path, ("row",))])
    pos = np.asarray([index.position(r) for r in rows])  # stored row of each item
    given = index.labels[pos]
    w = space.fusion_weight
    fused = w * probs["image"] + (1 - w) * probs["text"]  # (N, C)
    pred = fused.argmax(1)
    at = np.arange(len(pred))
    p_pred, p_given = fused[at, pred], fused[at, given]
    bad = np.flatnonzero((pred != given) & (p_pred >= min_confidence))
    names = np.asarray(space.class_names, dtype=object)
    items = index.items
    out = pd.DataFrame({
        "id": rows[bad],
        "given_label": names[given[bad]],
        "predicted_label": names[pred[bad]],
        "score": np.round(p_pred[bad] - p_given[bad], 6),
        "fused_prob": np.round(p_pred[bad], 6),
        "fused_prob_given": np.round(p_given[bad], 6),
        "image_predicted": names[probs["image"][bad].argmax(1)] if len(bad) else [],
        "image_prob": np.round(probs["image"][bad].max(1), 6) if len(bad) else [],
        "text_predicted": names[probs["text"][bad].argmax(1)] if len(bad) else [],
        "text_prob": np.round(probs["text"][bad].max(1), 6) if len(bad) else [],
        "predicted_by": source[bad],
        "split": items["split"].to_numpy()[pos[bad]],
        "title": items["title"].to_numpy()[pos[bad]],
        "image_path": items["image_path"].to_numpy()[pos[bad]],
    })
    out = out.sort_values(["score", "id"], ascending=[False, True], kind="stable").reset_index(drop=True)
    out.insert(0, "rank", np.arange(1, len(out) + 1))
    return out


# -------------------------------------------------------------------------- duplicates


def _normalised_features(path: Path, field: str, folder: Path, block_rows: int) -> np.ndarray:
    """The frozen features `field` of every item, centred on their mean and L2-normalised, in a
    memory-mapped file under `folder` (two passes over the feature file, one block in memory)."""
    total, n = None, 0
    for _, block in features.iter_item_blocks(path, (field,), block_rows):
        x = block[field].astype(np.float64)
        total = x.sum(0) if total is None else total + x.sum(0)
        n += len(x)
    mean = (total / max(n, 1)).astype(np.float32)
    out = np.lib.format.open_memmap(folder / f"{field}.npy", mode="w+", dtype=np.float32, shape=(n, len(mean)))
    for start, block in features.iter_item_blocks(path, (field,), block_rows):
        x = block[field] - mean
        out[start:start + len(x)] = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    out.flush()
    return np.load(folder / f"{field}.npy", mmap_mode="r")


def duplicate_pairs(x: np.ndarray, labels: np.ndarray, threshold: float, k: int = 10, block_rows: int = 4096
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i, j), i < j, of rows of `x` (N, D) unit norm whose cosine is ≥ `threshold` among each
    other's k nearest neighbours and whose `labels` differ: (i, j, cosine) arrays."""
    ii, jj, ss = [], [], []
    k = min(k + 1, len(x))  # + the item itself
    for start in range(0, len(x), block_rows):
        q = np.ascontiguousarray(x[start:start + block_rows])
        scores, nbrs = vectors.exact_topk(q, x, k)
        rows = np.arange(start, start + len(q))[:, None].repeat(k, 1)
        keep = (nbrs >= 0) & (nbrs != rows) & (scores >= threshold)
        keep &= labels[np.clip(nbrs, 0, None)] != labels[rows]
        ii.append(rows[keep]), jj.append(nbrs[keep]), ss.append(scores[keep])
    i, j, s = (np.concatenate(a) if a else np.zeros(0) for a in (ii, jj, ss))
    lo, hi = np.minimum(i, j).astype(np.int64), np.maximum(i, j).astype(np.int64)
    if len(lo) == 0:
        return lo, hi, s.astype(np.float32)
    order = np.lexsort((-s, hi, lo))
    lo, hi, s = lo[order], hi[order], s[order]
    first = np.ones(len(lo), bool)
    first[1:] = (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])
    return lo[first], hi[first], s[first].astype(np.float32)


def _components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Union-find: a component id per node 0..n-1 over the edges (i, j)."""
    parent = np.arange(n)

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in zip(i.tolist(), j.tolist()):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([find(a) for a in range(n)])


def duplicate_groups(space: Space, threshold: float = 0.95, k: int = 10, block_rows: int = 16384) -> pd.DataFrame:
    """Groups of near-duplicate items (frozen image or text features, see module) with different labels:
    one row per member, groups ordered by their highest cosine."""
    index = space._index()
    rows = np.concatenate([b["row"] for _, b in features.iter_item_blocks(space.features_path, ("row",), block_rows)])
    labels = index.labels[[index.position(r) for r in rows]]  # feature-file order
    edges = []
    with tempfile.TemporaryDirectory(prefix="huse-audit-") as tmp:
        for modality in ("image", "text"):
            x = _normalised_features(space.features_path, f"{modality}_emb", Path(tmp), block_rows)
            i, j, s = duplicate_pairs(x, labels, threshold, k)
            edges.append((i, j, s, modality))
            del x
    i = np.concatenate([e[0] for e in edges])
    j = np.concatenate([e[1] for e in edges])
    s = np.concatenate([e[2] for e in edges])
    link = np.concatenate([[e[3]] * len(e[0]) for e in edges]) if len(i) else np.zeros(0, object)
    columns = ["group", "id", "label", "max_cosine", "linked_by", "title", "image_path", "split"]
    if len(i) == 0:
        return pd.DataFrame(columns=columns)
    comp = _components(len(rows), i, j)
    members = np.unique(np.concatenate([i, j]))
    best: dict[int, float] = {}
    how: dict[int, set[str]] = {}
    for a, b, score, m in zip(i.tolist(), j.tolist(), s.tolist(), link.tolist()):
        for node in (a, b):
            best[node] = max(best.get(node, -1.0), score)
            how.setdefault(node, set()).add(m)
    group_best: dict[int, float] = {}
    for node in members.tolist():
        group_best[comp[node]] = max(group_best.get(comp[node], -1.0), best[node])
    ranked = sorted(group_best, key=lambda g: (-group_best[g], g))
    group_no = {g: n + 1 for n, g in enumerate(ranked)}
    items = index.items
    out = []
    for node in sorted(members.tolist(), key=lambda a: (group_no[comp[a]], -best[a], rows[a])):
        item = items.iloc[index.position(rows[node])]
        out.append({"group": group_no[comp[node]], "id": int(rows[node]), "label": item["class_path"],
                    "max_cosine": round(best[node], 6), "linked_by": "+".join(sorted(how[node])),
                    "title": item["title"], "image_path": item["image_path"], "split": item["split"]})
    return pd.DataFrame(out, columns=columns)


# ---------------------------------------------------------------------------------- page


def _thumb(space: Space, image_path: str) -> str:
    from huse_pipeline.eval.report import thumb_html, thumbnail_uri

    root = Path(space._index().meta.get("image_root", "."))
    return thumb_html(thumbnail_uri(root / image_path), "")


def audit_section(space: Space, suspects: pd.DataFrame, groups: pd.DataFrame, n_rows: int = 60) -> str:
    """The audit as an HTML fragment (two tables with thumbnails), for a page or the evaluation report."""
    esc = html.escape
    n_groups = groups["group"].nunique() if len(groups) else 0
    parts = [(f"<h2>Catalogue audit</h2><p class=\"note\">{len(suspects)} items whose given label disagrees with a "
              f"confident fused prediction (w = {space.fusion_weight:.2f}); {n_groups} groups of near-duplicates filed "
              "under different labels. Full lists in the CSV files.</p>")]
    head = "".join(f"<th>{h}</th>" for h in ("rank", "image", "id", "title", "given label", "predicted", "p(pred)",
                                               "p(given)", "image says", "text says"))
    body = []
    for r in suspects.head(n_rows).itertuples():
        body.append(f"<tr><td>{r.rank}</td><td>{_thumb(space, r.image_path)}</td><td>{r.id}</td><td class=\"l\">"
                    f"{esc(str(r.title))}</td><td class=\"l bad\">{esc(r.given_label)}</td><td class=\"l ok\">"
                    f"{esc(r.predicted_label)}</td><td>{r.fused_prob:.3f}</td><td>{r.fused_prob_given:.3f}</td>"
                    f"<td class=\"l\">{esc(r.image_predicted)}</td><td class=\"l\">{esc(r.text_predicted)}</td></tr>")
    parts.append(f"<h3>Suspect labels</h3><div class=\"scroll tall\"><table><thead><tr>{head}</tr></thead>"
                 f"<tbody>{''.join(body)}</tbody></table></div>")
    cards = []
    if len(groups):
        for g, members in list(groups.groupby("group", sort=True))[:n_rows]:
            thumbs = "".join(
                f'<div class="thumb">{_thumb(space, m.image_path)}<div>{m.id}: {esc(m.label)}<br>'
                f'<span class="tag">{esc(m.linked_by)} {m.max_cosine:.3f}</span><br>{esc(str(m.title)[:80])}</div></div>'
                for m in members.itertuples())
            cards.append(f'<div class="example"><div class="query">group {g}</div><div class="results">'
                         f'<div class="thumbs">{thumbs}</div></div></div>')
    parts.append("<h3>Near-duplicates under different labels</h3>" +
                 (f'<div class="examples wide">{"".join(cards)}</div>' if cards else "<p>None found.</p>"))
    return "\n".join(parts)


def write_page(path: Path, section: str, title: str) -> None:
    from huse_pipeline.eval.report import CSS

    page = (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body><main><h1>{html.escape(title)}</h1><section>{section}</section>"
            "</main></body></html>\n")
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")


def run_audit(cfg: AuditConfig, space: Space | None = None, progress: bool = False) -> dict[str, Any]:
    """Write the suspect-label CSV, the duplicates CSV and the HTML page; returns a summary."""
    if not 0 <= cfg.min_confidence <= 1:
        raise HuseError("--min-confidence must be in [0, 1]")
    if cfg.folds == 1 or cfg.folds < 0:
        raise HuseError("--folds must be 0 (the run's model for every item) or at least 2")
    space = space or Space.load(cfg.run, cfg.features, index=cfg.index or True, device=cfg.device,
                                runs_dir=cfg.runs_dir, fusion_weight=cfg.fusion_weight)
    run = space.run_dir or space.checkpoint.parent
    out = Path(cfg.out) if cfg.out else run / "audit" / "audit.csv"
    dup_out = out.with_name(f"{out.stem}_duplicates{out.suffix or '.csv'}")
    page = Path(cfg.html) if cfg.html else out.with_name("audit.html")
    probs, source, info = out_of_sample_probabilities(space, cfg.folds, cfg.seed, progress)
    suspects = suspect_labels(space, probs, source, cfg.min_confidence)
    groups = duplicate_groups(space, cfg.duplicate_threshold, cfg.duplicate_neighbours, cfg.block_rows)
    written = suspects.head(cfg.top) if cfg.top else suspects
    for table, path in ((written, out), (groups, dup_out)):
        with atomic_path(path) as tmp:
            table.to_csv(tmp, index=False)
    write_page(page, audit_section(space, suspects, groups, cfg.html_rows), f"Catalogue audit — {run.name}")
    return {"suspects": len(suspects), "duplicate_groups": int(groups["group"].nunique()) if len(groups) else 0,
            "duplicate_items": len(groups), "csv": str(out), "duplicates_csv": str(dup_out), "html": str(page),
            "fusion_weight": space.fusion_weight, "min_confidence": cfg.min_confidence, **info,
            "top": suspects.head(5)[["rank", "id", "given_label", "predicted_label", "score"]].to_dict("records")}
