"""`huse index`: embed every catalogue item's image and text through a trained run's towers into the
universal space and build one FAISS index per modality (the kind by the rule in `search.vectors`),
in an index folder written atomically (default `<run>/index/`)::

    meta.json            kind, parameters and measured recall@10 of each index, N, D, the class names,
                         the fingerprints of the run and the feature file, the fusion weight, versions
    image.faiss, text.faiss
    image_emb.npy, text_emb.npy   (N, D) float32, unit norm (cosine = inner product)
    labels.npy, ids.npy  (N,) int64: class index and item id (the catalogue row, /items/row)
    items.csv            id, class_path, split, title, image_path: one line per stored row

Items are stored sorted by class (then in feature-file order), so the items of a class-path prefix
form contiguous ranges and a category filter is exact. Embeddings are computed from the feature
file one block of rows at a time, straight into memory-mapped .npy files.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from huse_pipeline import __version__
from huse_pipeline.data.catalogue import file_sha256, parse_label
from huse_pipeline.errors import HuseError
from huse_pipeline.measures import metrics
from huse_pipeline.runs import resolve_checkpoint, resolve_features
from huse_pipeline.search import vectors
from huse_pipeline.settings import DEFAULT_RUNS_DIR
from huse_pipeline.store import features
from huse_pipeline.train.model import HuseModel, check_compatible, load_checkpoint, model_from_checkpoint
from huse_pipeline.utils import resolve_device

log = logging.getLogger(__name__)

INDEX_FORMAT = "huse-index"
INDEX_VERSION = 1
MODALITIES = ("image", "text")
META = "meta.json"
ITEM_COLUMNS = ("id", "class_path", "split", "title", "image_path")


@dataclass(frozen=True)
class IndexConfig:
    """What `huse index` is given."""

    run: str | None = None  # run folder; default: the latest under runs_dir
    features: str | None = None  # default: the run's own feature file (its config.json), else cache/feats.h5
    out: str | None = None  # index folder; default <run>/index
    index_kind: str = "auto"  # auto | exact | hnsw | compressed
    max_memory: str | None = "auto"  # budget for both indexes (8G, 512M, auto = half the RAM, none)
    exact_max_items: int = vectors.EXACT_MAX_ITEMS
    recall_target: float = vectors.RECALL_TARGET
    recall_queries: int = 1000  # per modality: half tune the search parameter, half measure recall@10
    block_rows: int = 16384  # items embedded at a time
    device: str = "auto"
    runs_dir: str = DEFAULT_RUNS_DIR
    seed: int = 0


# ----------------------------------------------------------------------------- fingerprints


def resolve_run(run: str | None, runs_dir: str = DEFAULT_RUNS_DIR, features_path: str | None = None
                ) -> tuple[Path, Path | None, str]:
    """(checkpoint best.pt, run folder, feature file) as `huse eval` resolves them."""
    ckpt_path, run_dir = resolve_checkpoint(run, None, runs_dir)
    return ckpt_path, run_dir, resolve_features(features_path, run_dir)


def run_fingerprint(checkpoint: Path) -> dict[str, Any]:
    return {"checkpoint": str(Path(checkpoint).resolve()), "checkpoint_sha256": file_sha256(Path(checkpoint))}


def content_digest(path: str | Path) -> str:
    """`features_digest` of a feature file, from one streaming pass (one block of rows in memory)."""
    with features.open_features(path) as ff:
        return ff.summary().digest


def features_fingerprint(path: str | Path, digest: str | None = None) -> dict[str, Any]:
    """The feature file's content digest (`features_digest`: items, labels, splits) and a cheap stamp
    (size, modification time) that lets a later check skip re-reading an unchanged file."""
    path = Path(path)
    st = path.stat()
    attrs = features.read_attrs(path)
    return {"path": str(path.resolve()), "digest": digest or content_digest(path),
            "size": st.st_size, "mtime_ns": st.st_mtime_ns, "settings_fingerprint": attrs.get("settings_fingerprint")}


def check_fresh(meta: dict[str, Any], folder: Path, checkpoint: Path, features_path: str | Path) -> None:
    """Refuse an index built from another run or another feature file, saying what to rerun."""
    rerun = f"rerun `huse index --run {checkpoint.parent} --features {features_path} --out {folder}`"
    if meta.get("run", {}).get("checkpoint_sha256") != file_sha256(checkpoint):
        raise HuseError(f"the index {folder} was built from another model than {checkpoint} "
                        f"(its checkpoint sha256 differs): {rerun}")
    rec = meta.get("features", {})
    path = Path(features_path)
    if not path.is_file():
        raise HuseError(f"feature file {path} does not exist; the index {folder} was built from {rec.get('path')}")
    st = path.stat()
    if rec.get("size") == st.st_size and rec.get("mtime_ns") == st.st_mtime_ns and \
            Path(rec.get("path", "")) == path.resolve():
        return  # the very file the index was built from, unchanged since
    log.info("checking that %s holds the items the index was built from (it moved or was rewritten)", path)
    if content_digest(path) != rec.get("digest"):
        raise HuseError(f"the index {folder} was built from other features than {path} (its items, features or "
                        f"splits differ): {rerun}")


# ------------------------------------------------------------------------------ embedding


@torch.inference_mode()
def embed_features(model: HuseModel, feats: np.ndarray, modality: str, device: torch.device,
                   batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Frozen features (B, Df) -> universal embeddings (B, D) float32 and class probabilities (B, C)."""
    embed = model.embed_image if modality == "image" else model.embed_text
    emb, prob = [], []
    for b0 in range(0, len(feats), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(feats[b0:b0 + batch_size], dtype=np.float32)).to(device)
        e = embed(x).float()  # (B, D)
        emb.append(e.cpu().numpy())
        prob.append(model.classify(e).float().softmax(dim=1).cpu().numpy())  # (B, C)
    d, c = model.cfg.embed_dim, model.cfg.num_classes
    return (np.concatenate(emb) if emb else np.zeros((0, d), np.float32),
            np.concatenate(prob) if prob else np.zeros((0, c), np.float32))


def _recall_queries(emb: dict[str, np.ndarray], n_queries: int, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per target modality: (tuning, held-out) queries, each half text and half image embeddings of
    randomly drawn items (cross-modal "images for this text" and in-modal "more like this")."""
    n = len(emb["image"])
    rng = np.random.default_rng(seed)
    out = {}
    for target in MODALITIES:
        m = min(n, n_queries)
        items = rng.choice(n, size=m, replace=False)
        half = m // 2
        q = np.concatenate([emb["text"][np.sort(items[:half])], emb["image"][np.sort(items[half:])]])
        q = q[rng.permutation(len(q))]
        out[target] = (np.ascontiguousarray(q[: m // 2]), np.ascontiguousarray(q[m // 2:]))
    return out


def _versions() -> dict[str, str]:
    out = {"huse_pipeline": __version__}
    for package in ("faiss-cpu", "numpy", "torch"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:  # an unusual install (faiss built from source): not worth failing for
            out[package] = "unknown"
    return out


def _replace_folder(tmp: Path, out: Path) -> None:
    """Put the finished folder `tmp` at `out`: the old one (if any) is moved aside first, so a reader sees
    the old index, then briefly none, then the new one, never a mixture."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_index(cfg: IndexConfig, progress: bool = False) -> dict[str, Any]:
    """Build the index folder for a run and its feature file; returns a summary (meta.json's content)."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    ckpt_path, run_dir, features_path = resolve_run(cfg.run, cfg.runs_dir, cfg.features)
    ckpt = load_checkpoint(ckpt_path)
    attrs = features.read_attrs(features_path)
    class_names = features.read_class_names(features_path)
    check_compatible(ckpt, attrs, class_names, features_path)
    out = Path(cfg.out) if cfg.out else (run_dir or ckpt_path.parent) / "index"
    if cfg.block_rows < 1 or cfg.recall_queries < 0:
        raise HuseError("--block-rows must be at least 1 and --recall-queries not negative")
    max_memory = vectors.parse_memory(cfg.max_memory)
    device = resolve_device(cfg.device)
    model = model_from_checkpoint(ckpt, device)
    digest = content_digest(features_path)

    meta_fields = ("label", "row", "split", "image_path", "text")
    info = {name: [] for name in meta_fields}
    for _, block in features.iter_item_blocks(features_path, meta_fields, cfg.block_rows):
        for name in meta_fields:
            info[name].append(block[name])
    labels = np.concatenate(info["label"]).astype(np.int64)
    rows = np.concatenate(info["row"]).astype(np.int64)
    split = np.asarray([s for b in info["split"] for s in b], dtype=object)
    n, dim = len(labels), model.cfg.embed_dim
    order = np.argsort(labels, kind="stable")  # stored row p holds item order[p]
    position = np.empty(n, np.int64)
    position[order] = np.arange(n)
    kind, why = vectors.choose_kind(n, dim, cfg.index_kind, max_memory, cfg.exact_max_items)
    log.info("index kind %s: %s", kind, why)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        emb = {m: np.lib.format.open_memmap(tmp / f"{m}_emb.npy", mode="w+", dtype=np.float32, shape=(n, dim))
               for m in MODALITIES}
        val_prob: dict[str, list[np.ndarray]] = {m: [] for m in MODALITIES}
        val_labels = []
        bar = tqdm(total=2 * n, unit="item", desc="index: embed", disable=not progress, dynamic_ncols=True)
        for start, block in features.iter_item_blocks(features_path, ("image_emb", "text_emb"), cfg.block_rows):
            stop = start + len(block["image_emb"])
            is_val = split[start:stop] == "val"
            for m in MODALITIES:
                e, p = embed_features(model, block[f"{m}_emb"], m, device)
                emb[m][position[start:stop]] = e
                val_prob[m].append(p[is_val])
                bar.update(len(e))
            val_labels.append(labels[start:stop][is_val])
        bar.close()
        for m in MODALITIES:
            emb[m].flush()
        emb = {m: np.load(tmp / f"{m}_emb.npy", mmap_mode="r") for m in MODALITIES}

        y_val = np.concatenate(val_labels)
        if len(y_val):
            weight = metrics.tune_fusion_weight(torch.from_numpy(np.concatenate(val_prob["image"])),
                                                torch.from_numpy(np.concatenate(val_prob["text"])),
                                                torch.from_numpy(y_val))
            weight_source = f"tuned on the val split ({len(y_val)} items), as huse eval does"
        else:
            weight, weight_source = 0.5, "default 0.5 (no val split)"

        queries = _recall_queries(emb, cfg.recall_queries, cfg.seed)
        modality_info = {}
        for m in MODALITIES:
            t_build = time.perf_counter()
            log.info("building the %s index (%s, %d items)", m, kind, n)
            vi, mi = vectors.build_vector_index(emb[m], kind, *queries[m], target=cfg.recall_target, seed=cfg.seed,
                                                exact_max=cfg.exact_max_items,
                                                progress=f"index: {m} {kind}" if progress else None)
            vectors.write_faiss(vi.index, tmp / f"{m}.faiss")
            modality_info[m] = {**mi, "file": f"{m}.faiss", "vectors": f"{m}_emb.npy",
                                "build_s": round(time.perf_counter() - t_build, 2)}
            log.info("%s index: %s, recall@10 %s on %d held-out queries", m, kind, mi["recall@10"], mi["recall_queries"])
            del vi

        np.save(tmp / "labels.npy", labels[order])
        np.save(tmp / "ids.npy", rows[order])
        texts = [t for b in info["text"] for t in b]
        paths = [p for b in info["image_path"] for p in b]
        pd.DataFrame({"id": rows[order], "class_path": [class_names[c] for c in labels[order]],
                      "split": split[order], "title": [texts[i] for i in order],
                      "image_path": [paths[i] for i in order]}).to_csv(tmp / "items.csv", index=False)
        meta = {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "created": datetime.now().isoformat(timespec="seconds"),
            "versions": _versions(),
            "n": int(n),
            "dim": int(dim),
            "order": "sorted by class index, then feature-file order",
            "kind": kind,
            "rule": {"requested": cfg.index_kind, "why": why, "exact_max_items": cfg.exact_max_items,
                     "max_memory_bytes": max_memory, "recall_target": cfg.recall_target},
            "modalities": modality_info,
            "class_names": list(class_names),
            "label_sep": attrs.get("label_sep", "<"),
            "image_root": attrs.get("image_root", "."),
            "run": {"dir": str(run_dir.resolve()) if run_dir else None, **run_fingerprint(ckpt_path)},
            "features": features_fingerprint(features_path, digest),
            "features_match_training": ckpt.get("features_digest") in (None, digest),
            "fusion_weight": weight,
            "fusion_weight_source": weight_source,
            "config": asdict(cfg),
            "build_s": round(time.perf_counter() - t0, 2),
        }
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
        del emb
        for f in tmp.iterdir():  # on disk before the rename makes the folder visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; give the usual permissions of a new folder
        _replace_folder(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return {"out": str(out), **meta}


# ------------------------------------------------------------------------------- loading


@dataclass
class CatalogueIndex:
    """A loaded index folder: one `VectorIndex` per modality over the stored rows, their class
    labels and item ids, the item metadata (read on first use) and meta.json."""

    folder: Path
    meta: dict[str, Any]
    indexes: dict[str, vectors.VectorIndex]
    labels: np.ndarray  # (N,) int64, sorted
    ids: np.ndarray  # (N,) int64 catalogue rows
    _items: pd.DataFrame | None = field(default=None, repr=False)
    _columns: dict[str, np.ndarray] | None = field(default=None, repr=False)
    _position: dict[int, int] | None = field(default=None, repr=False)

    @property
    def n(self) -> int:
        return len(self.ids)

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def items(self) -> pd.DataFrame:
        """id, class_path, split, title, image_path per stored row (items.csv, read once)."""
        if self._items is None:
            self._items = pd.read_csv(self.folder / "items.csv", dtype={"class_path": str, "split": str, "title": str,
                                                                         "image_path": str}, keep_default_na=False)
        return self._items

    def column(self, name: str) -> np.ndarray:
        """One column of `items` as an array (cached: a result row is then a few array lookups)."""
        if self._columns is None:
            self._columns = {}
        if name not in self._columns:
            self._columns[name] = self.items[name].to_numpy()
        return self._columns[name]

    def vectors(self, modality: str) -> np.ndarray:
        """(N, D) stored universal embeddings of one modality (memory-mapped)."""
        return self.indexes[modality].vectors

    def position(self, item_id: int) -> int:
        """The stored row of the item with catalogue row `item_id`."""
        if self._position is None:
            self._position = {int(i): p for p, i in enumerate(self.ids)}
        try:
            return self._position[int(item_id)]
        except KeyError:
            raise HuseError(f"no item with id {item_id} in the index (ids are the catalogue's 0-based rows; "
                            f"{self.n} items, ids {int(self.ids.min())}..{int(self.ids.max())})") from None

    def class_ranges(self, prefix: str | None) -> list[tuple[int, int]]:
        """Stored-row ranges [lo, hi) of the items whose class path starts with `prefix` (whole levels,
        case-insensitive: `apparel<topwear` matches `apparel<topwear<tshirts`, not `apparel<top`)."""
        if prefix is None:
            return [(0, self.n)]
        sep = self.meta.get("label_sep", "<")
        want = parse_label(prefix, sep)
        if want is None:
            raise HuseError(f"--category {prefix!r} is not a class path (levels separated by {sep!r})")
        want_l = tuple(s.lower() for s in want)
        match = [c for c, name in enumerate(self.class_names)
                 if tuple(s.lower() for s in name.split(sep))[: len(want_l)] == want_l]
        if not match:
            tops = sorted({name.split(sep)[0] for name in self.class_names})
            raise HuseError(f"no class path starts with {prefix!r}; the top levels are: {', '.join(tops[:20])}")
        lo = np.searchsorted(self.labels, match, side="left")
        hi = np.searchsorted(self.labels, match, side="right")
        ranges: list[tuple[int, int]] = []
        for a, b in zip(lo.tolist(), hi.tolist()):
            if b <= a:
                continue
            if ranges and ranges[-1][1] == a:
                ranges[-1] = (ranges[-1][0], b)
            else:
                ranges.append((a, b))
        return ranges

    def search(self, queries: np.ndarray, k: int, target: str = "image", category: str | None = None,
               exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """queries (Q, D) unit norm -> (Q, k) cosine scores and stored rows, best first (ties by lower
        row; -1 where fewer match). `exclude` (Q,) stored rows to leave out (the query item itself)."""
        if target not in self.indexes:
            raise HuseError(f"unknown --target {target!r}; choose image or text")
        index = self.indexes[target]
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        kk = k + (1 if exclude is not None else 0)
        ranges = self.class_ranges(category)
        parts = [index.search(queries, kk, None if (lo, hi) == (0, self.n) else (lo, hi)) for lo, hi in ranges]
        scores = np.concatenate([p[0] for p in parts], 1)
        rows = np.concatenate([p[1] for p in parts], 1)
        if exclude is not None:
            drop = rows == np.asarray(exclude).reshape(-1, 1)
            scores, rows = np.where(drop, -np.inf, scores), np.where(drop, -1, rows)
        scores, rows = vectors.sort_hits(scores, rows)
        return scores[:, :k], rows[:, :k]


def read_meta(folder: Path) -> dict[str, Any]:
    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, ValueError) as exc:
        raise HuseError(f"{folder} is not an index folder ({exc}); build one with `huse index`") from exc
    if meta.get("format") != INDEX_FORMAT:
        raise HuseError(f"{folder}/{META} is not a huse index; build one with `huse index`")
    if meta.get("version") != INDEX_VERSION:
        raise HuseError(f"the index {folder} has version {meta.get('version')}, this huse-pipeline reads "
                        f"{INDEX_VERSION}: rebuild it with `huse index`")
    return meta


def load_index(folder: str | Path, checkpoint: Path | None = None, features_path: str | Path | None = None
               ) -> CatalogueIndex:
    """Load an index folder; with `checkpoint` and `features_path`, refuse it unless it was built from them."""
    folder = Path(folder)
    if not folder.is_dir():
        raise HuseError(f"no index at {folder}: build it with `huse index`" +
                        (f" --run {checkpoint.parent}" if checkpoint else ""))
    meta = read_meta(folder)
    if checkpoint is not None and features_path is not None:
        check_fresh(meta, folder, checkpoint, features_path)
    indexes = {}
    exact_max = int(meta.get("rule", {}).get("exact_max_items", vectors.EXACT_MAX_ITEMS))
    for m in MODALITIES:
        mi = meta["modalities"][m]
        indexes[m] = vectors.VectorIndex(mi["kind"], vectors.read_faiss(folder / mi["file"]),
                                         np.load(folder / mi["vectors"], mmap_mode="r"), dict(mi["params"]), exact_max)
    return CatalogueIndex(folder, meta, indexes, np.load(folder / "labels.npy"), np.load(folder / "ids.npy"))


# -------------------------------------------------------------------------------- export


def export_embeddings(folder: str | Path, out: str | Path, fmt: str = "npy", block_rows: int = 65536) -> list[Path]:
    """Write the universal embeddings and ids of an index folder for other serving stacks.

    npy: OUT/ids.npy (N,) int64, OUT/image_emb.npy and OUT/text_emb.npy (N, D) float32 unit norm,
    OUT/items.csv (id, class_path, split, title, image_path), row i of each the same item.
    parquet: OUT/embeddings.parquet with those columns and image_emb, text_emb as lists of float32
    (needs pyarrow: `pip install "huse-pipeline[parquet]"`), written in row groups of `block_rows`.
    """
    folder, out = Path(folder), Path(out)
    meta = read_meta(folder)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "npy":
        written = []
        for name in ("ids.npy", "image_emb.npy", "text_emb.npy", "items.csv"):
            target = out / name
            with tempfile.NamedTemporaryFile(dir=out, prefix=f".{name}.", suffix=".tmp", delete=False) as fh:
                tmp = Path(fh.name)
            try:
                shutil.copyfile(folder / name, tmp)
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
            written.append(target)
        return written
    if fmt != "parquet":
        raise HuseError(f"unknown export format {fmt!r}; choose npy or parquet")
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise HuseError('Parquet export needs pyarrow: pip install "huse-pipeline[parquet]" (or pyarrow), '
                        "or use --format npy") from None
    from huse_pipeline.utils import atomic_path

    items = pd.read_csv(folder / "items.csv", keep_default_na=False, dtype={"title": str, "image_path": str})
    emb = {m: np.load(folder / f"{m}_emb.npy", mmap_mode="r") for m in MODALITIES}
    dim = int(meta["dim"])
    target = out / "embeddings.parquet"
    schema = pa.schema([("id", pa.int64()), ("class_path", pa.string()), ("split", pa.string()),
                        ("title", pa.string()), ("image_path", pa.string()),
                        ("image_emb", pa.list_(pa.float32(), dim)), ("text_emb", pa.list_(pa.float32(), dim))])
    with atomic_path(target) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for start in range(0, len(items), block_rows):
            part = items.iloc[start:start + block_rows]
            cols = {c: pa.array(part[c].tolist(), type=schema.field(c).type) for c in ITEM_COLUMNS}
            for m in MODALITIES:
                flat = pa.array(np.ascontiguousarray(emb[m][start:start + block_rows]).reshape(-1), pa.float32())
                cols[f"{m}_emb"] = pa.FixedSizeListArray.from_arrays(flat, dim)
            writer.write_table(pa.table(cols, schema=schema))
    return [target]


def export_run(out: str | Path, fmt: str = "npy", run: str | None = None, features_path: str | None = None,
               index_folder: str | None = None, runs_dir: str = DEFAULT_RUNS_DIR) -> list[Path]:
    """`huse export`: the embeddings of a run's index folder (refused if stale), see `export_embeddings`."""
    ckpt_path, run_dir, feats = resolve_run(run, runs_dir, features_path)
    folder = Path(index_folder) if index_folder else (run_dir or ckpt_path.parent) / "index"
    if not folder.is_dir():
        raise HuseError(f"no index at {folder}: build it with `huse index --run {run_dir or ckpt_path.parent}`")
    check_fresh(read_meta(folder), folder, ckpt_path, feats)
    return export_embeddings(folder, out, fmt)
