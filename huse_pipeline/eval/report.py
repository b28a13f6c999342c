"""The evaluation report (`huse eval --report DIR`): ONE self-contained HTML page, figures and
thumbnails embedded as base64, so the folder can be mailed. It shows the metrics of paper §4.3-4.5
(with the §4.4 baselines when computed), per-class accuracy, a confusion heatmap of the top-level
classes, a 2-D map of the universal space, example retrievals and the training curves.
"""
from __future__ import annotations

import base64
import datetime
import html
import io
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from huse_pipeline import __version__
from huse_pipeline.data.catalogue import resolve_image
from huse_pipeline.data.hierarchy import Hierarchy
from huse_pipeline.data.images import BadImage, load_rgb
from huse_pipeline.eval.outputs import EvalConfig, EvalResult
from huse_pipeline.measures import keys, metrics
from huse_pipeline.measures.retrieval import topk
from huse_pipeline.settings import DEFAULT_MAX_PIXELS
from huse_pipeline.store.features import FeatureSet
from huse_pipeline.train.curves import literal, training_curves
from huse_pipeline.utils import atomic_path, remove_stale_temps

log = logging.getLogger(__name__)

MAX_TOP_LEVEL = 20  # more top-level classes than this are folded into "(other)" in the heatmap
N_EXAMPLES = 3  # example queries per kind (hits and misses each)
THUMB_PX = 120

CSS = """
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#222;background:#f4f5f7;margin:0}
main{max-width:1180px;margin:0 auto;padding:20px 24px 60px}
h1{font-size:24px;margin:8px 0 4px}h2{font-size:19px;margin:0 0 10px}h3{font-size:15px;margin:14px 0 6px}
section{background:#fff;border:1px solid #e1e4e8;border-radius:8px;padding:16px 18px;margin:16px 0}
.meta{color:#555;font-size:13px}.meta code{background:#eef0f3;padding:1px 4px;border-radius:3px;overflow-wrap:normal;word-break:normal}
.nw{white-space:nowrap}
.note{color:#666;font-size:12.5px;margin:6px 0 0}
.scroll{overflow-x:auto;max-width:100%}
.scroll.tall{max-height:520px;overflow-y:auto}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}
th,td{padding:4px 9px;border-bottom:1px solid #eceef1;text-align:right;white-space:nowrap}
th{background:#f6f8fa;position:sticky;top:0;font-weight:600}
td:first-child,th:first-child,td.l,th.l{text-align:left}
tr.base td{color:#666;font-style:italic}
table.sortable th{cursor:pointer}table.sortable th:hover{background:#e8ecf0}
.fig{max-width:100%;height:auto;display:block;margin:6px auto}
.grid2{display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:14px}
.examples{display:grid;grid-template-columns:repeat(auto-fit,minmax(500px,1fr));gap:10px}
.examples.wide{grid-template-columns:1fr}
.example{border:1px solid #e6e8eb;border-radius:6px;padding:10px;display:flex;gap:14px;align-items:flex-start;min-width:0}
.example .query{flex:0 0 132px;font-size:12.5px;overflow-wrap:anywhere}
.example .results{flex:1;min-width:0}
.example ol{margin:0;padding-left:22px}.example li{margin:2px 0;overflow-wrap:anywhere}
.thumbs{display:flex;gap:6px;flex-wrap:wrap}
.thumb{width:128px;font-size:11.5px;text-align:center;overflow-wrap:anywhere}
.results .thumb{width:112px}.results .thumb img,.results .ph{width:108px;height:108px}
.thumb img,.ph{width:124px;height:124px;object-fit:contain;background:#fafafa;border:2px solid #ddd;border-radius:4px}
.ph{display:flex;align-items:center;justify-content:center;color:#999;font-size:11px;margin:0 auto}
.hit img,.hit .ph{border-color:#2e9d4b}.miss img,.miss .ph{border-color:#d2453b}
.ok{color:#2e9d4b;font-weight:600}.bad{color:#d2453b;font-weight:600}
.tag{display:inline-block;background:#eef0f3;border-radius:3px;padding:0 4px;font-size:11.5px;color:#444}
nav a{margin-right:12px;font-size:13px}
"""

SORT_JS = """
document.querySelectorAll('table.sortable').forEach(function(t){
  t.querySelectorAll('th').forEach(function(th,i){
    th.addEventListener('click',function(){
      var body=t.tBodies[0],rows=Array.from(body.rows),asc=th.dataset.asc!=='1';
      rows.sort(function(a,b){
        var x=a.cells[i].dataset.v,y=b.cells[i].dataset.v;
        if(x!==undefined&&y!==undefined){x=parseFloat(x);y=parseFloat(y);
          x=isNaN(x)?-1:x;y=isNaN(y)?-1:y;return asc?x-y:y-x;}
        x=a.cells[i].textContent;y=b.cells[i].textContent;return asc?x.localeCompare(y):y.localeCompare(x);});
      t.querySelectorAll('th').forEach(function(h){h.dataset.asc='';});th.dataset.asc=asc?'1':'0';
      rows.forEach(function(r){body.appendChild(r);});});});});
"""


# ----------------------------------------------------------------------------------- helpers


def _esc(x: Any) -> str:
    return html.escape(str(x))


def _path(p: Any) -> str:
    """A file path, escaped, that wraps only after a "/" (<wbr>), never inside a folder or file name."""
    return _esc(p).replace("/", "/<wbr>")


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return _esc(v)


def _png(fig: Figure) -> str:
    """A matplotlib figure as a data URI (PNG)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(uri: str, alt: str, width: int | None = None) -> str:
    style = f' style="width:{width}px"' if width else ""
    return f'<img class="fig" src="{uri}" alt="{_esc(alt)}"{style}>'


def thumbnail_uri(path: Path | None, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[str | None, str]:
    """(a JPEG data URI of the image at `path`, at most THUMB_PX square, "") or (None, why not).

    Decoded by stage one's `load_rgb`, so the report shows what the encoder saw: EXIF rotation
    applied, CMYK / 16-bit / palette converted, alpha on white, images over `max_pixels` refused.
    Whatever the file has become since extraction (a decompression bomb, garbage), a thumbnail
    that cannot be made is a placeholder with the reason, never an error.
    """
    try:
        im = load_rgb(path, max_pixels=max_pixels, min_side=THUMB_PX)
    except BadImage as exc:
        return None, exc.reason
    except (Exception, MemoryError) as exc:  # PIL's DecompressionBombError, a decoder's own failure
        log.debug("no thumbnail of %s", path, exc_info=True)
        return None, f"cannot make a thumbnail ({type(exc).__name__})"
    try:
        im.thumbnail((THUMB_PX, THUMB_PX))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=82)
    except (Exception, MemoryError) as exc:  # e.g. a disk error while re-encoding: a placeholder, not a crash
        return None, f"cannot make a thumbnail ({exc})"
    finally:
        im.close()
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), ""


def thumb_html(thumb: tuple[str | None, str], caption: str, cls: str = "") -> str:
    """A thumbnail with its caption, or a placeholder saying why there is no picture."""
    uri, reason = thumb
    if uri:
        pic = f'<img src="{uri}" alt="">'
    else:
        short = "image not found" if reason == "missing file" else reason.split(" (")[0]
        pic = f'<div class="ph" title="{_esc(reason)}">{_esc(short)}</div>'
    return f'<div class="thumb {cls}">{pic}<div>{caption}</div></div>'


def _table(header: Sequence[str], rows: Sequence[tuple[str, Sequence[str]]], cls: str = "", left_last: bool = False) -> str:
    """rows: (tr class, cells already escaped). `left_last`: the last column is text, left-aligned."""
    last = len(header) - 1 if left_last else -1
    head = "".join(f'<th class="{"l" if i == last else ""}">{_esc(h)}</th>' for i, h in enumerate(header))
    body = "".join(f'<tr class="{c}">' + "".join(f'<td class="{"l" if i == last else ""}">{x}</td>'
                                                   for i, x in enumerate(cells)) + "</tr>" for c, cells in rows)
    return f'<div class="scroll"><table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


# ----------------------------------------------------------------------------------- sections


def metrics_section(m: dict[str, Any]) -> str:
    """The metric tables of `keys.metric_tables` as HTML: a heading, the table and its note each."""
    out = []
    for table in keys.metric_tables(m):
        meaning = any(row.meaning for row in table.rows)
        rows = []
        for row in table.rows:
            cells = ["" if key is None else _fmt(m[key], d) for key, d in zip(row.keys, table.digits)]
            rows.append(("base" if row.baseline else "", [_esc(row.report_label or row.label), *cells]
                         + ([_esc(row.meaning)] if meaning else [])))
        header = [table.label_header, *table.columns] + (["meaning"] if meaning else [])
        out += [f"<h3>{_esc(table.title)}</h3>", _table(header, rows, left_last=meaning)]
        if table.note:
            out.append(f'<p class="note">{_esc(table.note)}</p>')
    return "\n".join(out)


def per_class_section(result: EvalResult, class_names: list[str]) -> str:
    out = result.outputs
    fused = metrics.fuse(out.image_prob, out.text_prob, result.fusion_weight)
    count, acc_img = metrics.per_class_accuracy(out.image_prob, out.labels, len(class_names))
    _, acc_txt = metrics.per_class_accuracy(out.text_prob, out.labels, len(class_names))
    _, acc_fus = metrics.per_class_accuracy(fused, out.labels, len(class_names))
    present = np.flatnonzero(count > 0)
    order = present[np.lexsort((-count[present], acc_fus[present]))]  # worst fused accuracy first

    def cell(a: float) -> str:
        hue = int(round(120 * a))
        return f'<td data-v="{a:.6f}" style="background:hsl({hue},65%,88%)">{100 * a:.1f}</td>'

    body = "".join(
        f'<tr><td>{_esc(class_names[c])}</td><td data-v="{count[c]}">{count[c]}</td>'
        f"{cell(acc_img[c])}{cell(acc_txt[c])}{cell(acc_fus[c])}</tr>" for c in order)
    head = "".join(f"<th>{h}</th>" for h in ("class", "items", "image %", "text %", "fused %"))
    return (f'<p class="note">{len(present)} classes present in the split, worst fused accuracy first; '
            "click a column header to sort.</p>"
            f'<div class="scroll tall"><table class="sortable"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>')


def confusion_figure(true_top: np.ndarray, pred_top: np.ndarray, names: list[str]) -> Figure:
    """Row-normalised confusion heatmap of top-level classes, with counts."""
    t = len(names)
    conf = np.zeros((t, t), dtype=np.int64)
    np.add.at(conf, (true_top, pred_top), 1)
    rate = conf / np.maximum(conf.sum(1, keepdims=True), 1)
    size = 1.6 + 0.55 * t
    fig = Figure(figsize=(size + 1.5, size))
    ax = fig.subplots()
    im = ax.imshow(rate, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(t), [literal(n) for n in names], rotation=40, ha="right", fontsize=9)
    ax.set_yticks(range(t), [literal(n) for n in names], fontsize=9)
    ax.set_xlabel("predicted top-level class (fused)")
    ax.set_ylabel("true top-level class")
    if t <= 12:
        for i in range(t):
            for j in range(t):
                ax.text(j, i, f"{conf[i, j]}", ha="center", va="center", fontsize=8,
                        color="white" if rate[i, j] > 0.55 else "#222")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the row")
    return fig


def map_figure(xy: np.ndarray, top: np.ndarray, names: list[str], n: int, method: str) -> Figure:
    """2-D map: first n rows are image points, next n text points; colour = top-level class."""
    fig = Figure(figsize=(9.5, 7.2))
    ax = fig.subplots()
    cmap = colormaps["tab20" if len(names) > 10 else "tab10"]
    colours = cmap(np.arange(len(names)) % cmap.N)
    for modality, sl, marker in (("image", slice(0, n), "o"), ("text", slice(n, 2 * n), "^")):
        ax.scatter(xy[sl, 0], xy[sl, 1], c=colours[top[sl]], marker=marker, s=14, alpha=0.75,
                   linewidths=0.3, edgecolors="white" if marker == "o" else "none")
    handles = [Line2D([], [], ls="", marker="s", color=colours[i], label=literal(name)) for i, name in enumerate(names)]
    handles += [Line2D([], [], ls="", marker="o", color="#555", label="image"),
                Line2D([], [], ls="", marker="^", color="#555", label="text")]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8.5, frameon=False)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{method} of the universal space ({n} items, {2 * n} points)", fontsize=11)
    return fig


def _read_history(run_dir: Path | None) -> list[dict[str, Any]]:
    if run_dir is None or not (run_dir / "metrics.jsonl").is_file():
        return []
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a half-written last line of a run still in progress
    return rows


def curves_section(run_dir: Path | None, mark_epoch: int | None = None) -> str:
    history = _read_history(run_dir)
    fig = training_curves(history, mark_epoch, "evaluated checkpoint") if history else None
    if fig is not None:
        return _img(_png(fig), "training curves") + f'<p class="note">{len(history)} epochs from {_path(run_dir / "metrics.jsonl")}.</p>'
    if run_dir is not None and (run_dir / "curves.png").is_file():
        uri = "data:image/png;base64," + base64.b64encode((run_dir / "curves.png").read_bytes()).decode("ascii")
        return _img(uri, "training curves") + f'<p class="note">{_path(run_dir / "curves.png")}</p>'
    return '<p class="note">No training curves: the checkpoint is not inside a run folder with metrics.jsonl or curves.png.</p>'


def _pick(hit: np.ndarray, rng: np.random.Generator, n: int) -> list[int]:
    """Up to n queries whose top-1 is a hit and up to n whose top-1 is a miss, in index order."""
    chosen = []
    for want in (True, False):
        pool = np.flatnonzero(hit == want)
        chosen += sorted(rng.choice(pool, size=min(n, len(pool)), replace=False).tolist())
    return chosen


def examples_section(result: EvalResult, fs: FeatureSet, seed: int) -> str:
    out = result.outputs
    items = out.items
    labels = out.labels.cpu().numpy()
    leaf = [c.split(fs.attrs.get("label_sep", "<"))[-1].strip() for c in fs.class_names]
    root = fs.image_root
    extract_config = fs.attrs.get("extract_config") or {}
    max_pixels = extract_config.get("max_image_pixels", DEFAULT_MAX_PIXELS)
    # the rule stage one applied: nothing outside the image root unless the file was made with --allow-outside-root
    allow_outside_root = extract_config.get("allow_outside_root", False) is True
    cache: dict[int, tuple[str | None, str]] = {}

    def thumb(item: int) -> tuple[str | None, str]:
        if item not in cache:
            path, refused = resolve_image(root, fs.image_path[item], allow_outside_root)
            cache[item] = (None, refused) if path is None else thumbnail_uri(Path(path), max_pixels)
        return cache[item]

    rng = np.random.default_rng(seed)
    parts = []
    _, i2t = topk(out.image_emb, out.text_emb, 5)  # (N, 5) positions within the split
    _, t2i = topk(out.text_emb, out.image_emb, 5)
    i2t, t2i = i2t.cpu().numpy(), t2i.cpu().numpy()

    def top1_tag(hit: bool) -> str:
        return '<div class="ok">top-1 right</div>' if hit else '<div class="bad">top-1 wrong</div>'

    blocks = []
    for q in _pick(labels[i2t[:, 0]] == labels, rng, N_EXAMPLES):
        li = []
        for j in i2t[q]:
            ok = labels[j] == labels[q]
            mark = '<span class="ok">✓</span>' if ok else '<span class="bad">✗</span>'
            own = ' <span class="tag">its own text</span>' if j == q else ""
            li.append(f"<li>{mark} {_esc(fs.text[items[j]])} <span class=\"tag\">{_esc(leaf[labels[j]])}</span>{own}</li>")
        query = thumb_html(thumb(items[q]), _esc(leaf[labels[q]])) + top1_tag(labels[i2t[q, 0]] == labels[q])
        blocks.append(f'<div class="example"><div class="query">{query}</div>'
                      f'<div class="results"><ol>{"".join(li)}</ol></div></div>')
    parts.append('<h3>Image query → top-5 texts</h3><div class="examples">' + "".join(blocks) + "</div>")

    blocks = []
    for q in _pick(labels[t2i[:, 0]] == labels, rng, N_EXAMPLES):
        thumbs = []
        for j in t2i[q]:
            ok = labels[j] == labels[q]
            cap = ("✓ " if ok else "✗ ") + _esc(leaf[labels[j]]) + (" · its own image" if j == q else "")
            thumbs.append(thumb_html(thumb(items[j]), cap, "hit" if ok else "miss"))
        blocks.append(f'<div class="example"><div class="query"><b>{_esc(fs.text[items[q]])}</b><br>'
                      f'<span class="tag">{_esc(leaf[labels[q]])}</span>{top1_tag(labels[t2i[q, 0]] == labels[q])}</div>'
                      f'<div class="results"><div class="thumbs">{"".join(thumbs)}</div></div></div>')
    parts.append('<h3>Text query → top-5 images</h3><div class="examples wide">' + "".join(blocks) + "</div>")
    missing = sum(uri is None for uri, _ in cache.values())
    note = (f'<p class="note">Queries drawn at random (seed {seed}): up to {N_EXAMPLES} whose top-1 has the query\'s class '
            f"and up to {N_EXAMPLES} whose top-1 does not. ✓ = same class as the query. Images from {_path(root)}"
            + (f"; {missing} of {len(cache)} could not be read (placeholder shown)." if missing else ".") + "</p>")
    return note + "\n".join(parts)


def space_map(result: EvalResult, method: str, max_items: int, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """2-D coordinates of [image points; text points] of a sample of items, and the sample."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    out = result.outputs
    n_all = len(out.items)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n_all, size=min(max_items, n_all), replace=False))
    x = torch.cat([out.image_emb[sample], out.text_emb[sample]]).cpu().double().numpy()  # (2n, D)
    if method == "tsne" and len(x) >= 8:
        perplexity = float(min(30.0, (len(x) - 1) / 3))
        xy = TSNE(n_components=2, init="pca", learning_rate="auto", perplexity=perplexity, random_state=seed).fit_transform(x)
        return xy, sample, "t-SNE"
    return PCA(n_components=2, random_state=seed).fit_transform(x), sample, "PCA"


def _top_level(class_names: list[str], sep: str, labels: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Top-level class index per item and the names; rare top levels beyond MAX_TOP_LEVEL -> (other)."""
    top_name = Hierarchy(tuple(class_names), sep).ancestor_at(1)
    item_top = np.asarray([top_name[c] for c in labels], dtype=object)
    names, counts = np.unique(item_top, return_counts=True)
    keep = list(names[np.argsort(-counts, kind="stable")][:MAX_TOP_LEVEL])
    keep.sort()
    if len(names) > MAX_TOP_LEVEL:
        keep.append("(other)")
    index = {n: i for i, n in enumerate(keep)}
    return np.asarray([index.get(n, len(keep) - 1) for n in item_top]), keep


def _top_level_of_predictions(class_top: list[str], names: list[str], pred: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Column index per prediction for the heatmap whose rows are `names` (from `_top_level`): a
    predicted class whose top level is not a row goes to "(other)", added if there is none yet."""
    names = list(names)
    if "(other)" not in names and any(class_top[c] not in names for c in pred):
        names.append("(other)")
    index = {n: i for i, n in enumerate(names)}
    return np.asarray([index.get(class_top[c], len(names) - 1) for c in pred], dtype=np.int64), names


# ------------------------------------------------------------------------------------ the page


def write_report(result: EvalResult, fs: FeatureSet, cfg: EvalConfig) -> Path:
    """Write <cfg.report>/index.html (self-contained) and return its path."""
    out_dir = Path(cfg.report)
    m = result.metrics
    sep = fs.attrs.get("label_sep", "<")
    o = result.outputs
    labels = o.labels.cpu().numpy()
    fused = metrics.fuse(o.image_prob, o.text_prob, result.fusion_weight)
    pred = fused.argmax(dim=1).cpu().numpy()  # first maximum: the same tie rule as the accuracy

    # top-level heatmap over every class (both true and predicted map through the same table)
    all_top = Hierarchy(tuple(fs.class_names), sep).ancestor_at(1)
    top_true, top_names = _top_level(fs.class_names, sep, labels)
    top_pred, heat_names = _top_level_of_predictions(all_top, top_names, pred)

    log.info("report: 2-D map (%s)", cfg.report_map)
    xy, sample, method = space_map(result, cfg.report_map, cfg.report_max_items, cfg.seed)
    map_top = np.concatenate([top_true[sample], top_true[sample]])

    sections = [
        ("metrics", "Metrics", metrics_section(m)),
        ("per-class", "Per-class accuracy", per_class_section(result, fs.class_names)),
        ("confusion", "Confusion between top-level classes",
         _img(_png(confusion_figure(top_true, top_pred, heat_names)), "top-level confusion heatmap")
         + '<p class="note">Rows: true top-level class; columns: the top-level class of the fused prediction; '
         "colour = fraction of the row, numbers = items.</p>"),
        ("map", "The universal space",
         _img(_png(map_figure(xy, map_top, top_names, len(sample), method)), "2-D map of the universal space")
         + f'<p class="note">{method} of the L2-normalised image (●) and text (▲) embeddings of {len(sample)} items of '
         f"the split, coloured by top-level class. Matching colours should cluster whatever the marker.</p>"),
        ("examples", "Example retrievals", examples_section(result, fs, cfg.seed)),
        ("curves", "Training curves", curves_section(result.run_dir, result.extra.get("checkpoint_epoch"))),
    ]
    nav = "".join(f'<a href="#{sid}">{_esc(title)}</a>' for sid, title, _ in sections)
    body = "".join(f'<section id="{sid}"><h2>{_esc(title)}</h2>{content}</section>' for sid, title, content in sections)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    other = " (<strong>not the training file</strong>)" if m.get("meta/features_match_training") is False else ""
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>HUSE evaluation: {_esc(m.get("meta/split", ""))}</title><style>{CSS}</style></head>
<body><main>
<h1>HUSE evaluation — {_esc(m.get("meta/split", ""))} split, {m.get("meta/n_items", "?")} items</h1>
<p class="meta">checkpoint <code>{_path(result.checkpoint)}</code> · features <code>{_path(m.get("meta/features", ""))}</code>{other}
 · {len(fs.class_names)} classes · metrics JSON <code>{_path(result.out)}</code> · <span class="nw">huse-pipeline {__version__} · {stamp}</span></p>
<nav>{nav}</nav>
{body}
</main><script>{SORT_JS}</script></body></html>
"""
    path = out_dir / "index.html"
    remove_stale_temps(out_dir)  # an earlier report killed while it wrote
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    log.info("wrote %s (%.1f KiB)", path, path.stat().st_size / 1024)
    return path
