"""The HDF5 feature cache: the only module that imports h5py and knows the file layout.

Schema version 1 (`N` usable items, `C` classes, `K` augmented views, `S` skipped rows)::

    /                attrs: JSON-encoded values (format, schema_version, package_version, encoder
                     names, weights, dimensions, preprocessing, the extraction config, ...)
    /items/image_emb (N, Di) float32   frozen image features, deterministic view
    /items/text_emb  (N, Dt) float32   frozen text features
    /items/label     (N,)    int64     class index into /classes/name
    /items/split     (N,)    str       train | val | test
    /items/row       (N,)    int64     0-based row of the catalogue CSV
    /items/image_path, /items/text, /items/text_used (N,) str   (text_used: what the encoder saw)
    /views/image_emb (M, K, Di) float32, /views/item (M,) int64   augmented views of train items
    /classes/name    (C,)    str       full class paths, sorted
    /skipped/{row,image_path,text,label,reason} (S,)              unusable rows and why
    /graph/class_dist (C, C) float32   semantic graph A (written by `huse build-graph`)
    /hierarchy/tree_dist (C, C) int64, /hierarchy/nodes (str)      class tree from the label paths

Stage one writes row ranges as *part files* (each complete or absent) and merges them; each of
those writes goes to a temporary file that replaces the target atomically, so an interrupted run
never leaves a file that looks complete. `huse build-graph` instead rewrites /graph and /hierarchy
in place (their sizes are fixed by C, so the file never grows and is never copied); /graph carries
`write_complete` false while it writes, and readers treat such a graph as absent.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import h5py
import numpy as np
import pandas as pd

from huse_pipeline import __version__
from huse_pipeline.errors import HuseError
from huse_pipeline.utils import atomic_path

log = logging.getLogger(__name__)

FORMAT = "huse-features"
SCHEMA_VERSION = 1
_STR = h5py.string_dtype(encoding="utf-8")
# attribute of /graph: false from the start of a `huse build-graph` write until its end (absent in
# files written before it existed, whose graphs were written atomically and are complete)
GRAPH_COMPLETE = "write_complete"
_ATTR_IN_HEADER = 32 * 1024  # bytes; an HDF5 object header message holds at most 64 KiB


# ----------------------------------------------------------------------------------------- attrs


def _write_attrs(obj: h5py.HLObject, attrs: dict[str, Any]) -> None:
    for key, value in attrs.items():
        obj.attrs[key] = json.dumps(value, sort_keys=True)


def _rewrite_attrs(obj: h5py.HLObject, attrs: dict[str, Any], keep: Sequence[str] = ()) -> None:
    """Make `attrs` (JSON-encoded) the attributes of `obj` (besides those in `keep`), reusing the file's
    space: an unchanged value is not rewritten, and a value up to _ATTR_IN_HEADER bytes is a fixed-length
    string kept in the object header, whose space a rewrite reuses. (A variable-length string lives in
    the global heap, which HDF5 never reclaims; only a larger value is stored so.)"""
    for key in [k for k in obj.attrs if k not in attrs and k not in keep]:
        del obj.attrs[key]
    for key, value in attrs.items():
        text = json.dumps(value, sort_keys=True)
        old = obj.attrs.get(key)
        if (old.decode() if isinstance(old, bytes) else old) == text:
            continue
        raw = text.encode()
        obj.attrs[key] = np.bytes_(raw) if len(raw) <= _ATTR_IN_HEADER else text


def _read_attrs(obj: h5py.HLObject) -> dict[str, Any]:
    out = {}
    for key, value in obj.attrs.items():
        try:
            out[key] = json.loads(value)
        except (TypeError, ValueError):
            out[key] = value.tolist() if isinstance(value, np.ndarray) else value
    return out


def _strings(ds: h5py.Dataset) -> list[str]:
    return ds.asstr()[()].tolist()


def _open(path: str | Path, mode: str = "r") -> h5py.File:
    """Open a feature file (`r`, or `r+` to modify it in place), checking that it is one."""
    path = Path(path)
    if not path.is_file():
        raise HuseError(f"feature file {path} does not exist: run `huse extract-features --out {path}` first")
    if mode != "r" and not h5py.is_hdf5(path):
        raise HuseError(f"{path} is not a readable HDF5 feature file; re-run `huse extract-features`")
    try:
        f = h5py.File(path, mode)
    except OSError as exc:
        if mode != "r":  # a valid file that cannot be written: read-only, or open in another process
            raise HuseError(f"cannot open {path} for writing ({exc})") from exc
        raise HuseError(f"{path} is not a readable HDF5 feature file ({exc}); re-run `huse extract-features`") from exc
    attrs = _read_attrs(f)
    if attrs.get("format") != FORMAT:
        f.close()
        raise HuseError(f"{path} is an HDF5 file but not a huse feature file; re-run `huse extract-features`")
    if attrs.get("schema_version") != SCHEMA_VERSION:
        f.close()
        raise HuseError(
            f"{path} has feature schema version {attrs.get('schema_version')}, this huse-pipeline reads "
            f"version {SCHEMA_VERSION}: re-run `huse extract-features`"
        )
    return f


# ------------------------------------------------------------------------------------ part files


@dataclass
class Part:
    """Stage one's output for one row range of the catalogue (usable and unusable rows alike)."""

    rows: np.ndarray  # (n,) int64 catalogue rows
    reason: list[str]  # (n,) "" if the row is usable, else why it was skipped
    image_emb: np.ndarray  # (n, Di) float32, zeros where unusable
    text_emb: np.ndarray  # (n, Dt) float32, zeros where unusable
    text_used: list[str]  # (n,) the text fed to the text encoder
    image_views: np.ndarray | None = None  # (n, K, Di) float32, zeros where not computed
    attrs: dict[str, Any] = field(default_factory=dict)


def write_part(path: str | Path, part: Part) -> None:
    """Write one part file atomically: it is either complete or absent."""
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("rows", data=np.asarray(part.rows, dtype=np.int64))
            f.create_dataset("reason", data=np.asarray(part.reason, dtype=object), dtype=_STR)
            f.create_dataset("image_emb", data=np.asarray(part.image_emb, dtype=np.float32))
            f.create_dataset("text_emb", data=np.asarray(part.text_emb, dtype=np.float32))
            f.create_dataset("text_used", data=np.asarray(part.text_used, dtype=object), dtype=_STR)
            if part.image_views is not None:
                f.create_dataset("image_views", data=np.asarray(part.image_views, dtype=np.float32))
            _write_attrs(f, part.attrs)


def read_part(path: str | Path) -> Part:
    with h5py.File(path, "r") as f:
        return Part(
            rows=f["rows"][()],
            reason=_strings(f["reason"]),
            image_emb=f["image_emb"][()],
            text_emb=f["text_emb"][()],
            text_used=_strings(f["text_used"]),
            image_views=f["image_views"][()] if "image_views" in f else None,
            attrs=_read_attrs(f),
        )


def merge_parts(
    out: str | Path,
    part_paths: Sequence[str | Path],
    catalogue: pd.DataFrame,
    attrs: dict[str, Any],
) -> dict[str, Any]:
    """Merge part files (in row order) into the final feature file, atomically.

    `catalogue` is the catalogue frame (index = row) with columns image, text, label, class_name,
    split. Returns a summary: item and class counts and the skip reasons with their counts.
    """
    return write_merged(out, [read_part(p) for p in part_paths], catalogue, attrs)


def write_merged(out: str | Path, parts: Sequence[Part], catalogue: pd.DataFrame, attrs: dict[str, Any]) -> dict[str, Any]:
    """Write the final feature file from in-memory parts; see `merge_parts`."""
    rows = np.concatenate([p.rows for p in parts])
    if len(rows) and np.any(np.diff(rows) <= 0):
        raise HuseError("internal error: part files overlap or are out of order")
    reason = np.asarray([r for p in parts for r in p.reason], dtype=object)
    ok = reason == ""
    if not ok.any():
        raise HuseError("no usable rows: every row was skipped (see the reasons above)")
    frame = catalogue.loc[rows]
    class_names = sorted(set(frame["class_name"][ok]))
    class_index = {c: i for i, c in enumerate(class_names)}
    image_emb = np.concatenate([p.image_emb for p in parts])[ok]
    text_emb = np.concatenate([p.text_emb for p in parts])[ok]
    text_used = np.asarray([t for p in parts for t in p.text_used], dtype=object)[ok]
    split = frame["split"].to_numpy()[ok]
    has_views = parts[0].image_views is not None

    with atomic_path(out) as tmp:
        with h5py.File(tmp, "w") as f:
            _write_attrs(
                f,
                {
                    **attrs,
                    "format": FORMAT,
                    "schema_version": SCHEMA_VERSION,
                    "package_version": __version__,
                    "n_items": int(ok.sum()),
                    "n_classes": len(class_names),
                    "n_skipped": int((~ok).sum()),
                },
            )
            items = f.create_group("items")
            items.create_dataset("image_emb", data=image_emb)
            items.create_dataset("text_emb", data=text_emb)
            items.create_dataset("label", data=np.array([class_index[c] for c in frame["class_name"][ok]], np.int64))
            items.create_dataset("split", data=split.astype(object), dtype=_STR)
            items.create_dataset("row", data=rows[ok])
            items.create_dataset("image_path", data=frame["image"].to_numpy()[ok].astype(object), dtype=_STR)
            items.create_dataset("text", data=frame["text"].to_numpy()[ok].astype(object), dtype=_STR)
            items.create_dataset("text_used", data=text_used, dtype=_STR)
            if has_views:
                views = np.concatenate([p.image_views for p in parts])[ok]  # (N, K, Di)
                train = np.flatnonzero(split == "train")
                g = f.create_group("views")
                g.create_dataset("image_emb", data=views[train])
                g.create_dataset("item", data=train.astype(np.int64))
            f.create_group("classes").create_dataset("name", data=np.asarray(class_names, dtype=object), dtype=_STR)
            skipped = f.create_group("skipped")
            bad = ~ok
            skipped.create_dataset("row", data=rows[bad])
            for col in ("image", "text", "label"):
                name = "image_path" if col == "image" else col
                skipped.create_dataset(name, data=frame[col].to_numpy()[bad].astype(object), dtype=_STR)
            skipped.create_dataset("reason", data=reason[bad], dtype=_STR)
    reasons, counts = np.unique(reason[bad], return_counts=True) if bad.any() else ([], [])
    return {
        "n_items": int(ok.sum()),
        "n_classes": len(class_names),
        "n_skipped": int(bad.sum()),
        "skipped_by_reason": {str(r): int(c) for r, c in zip(reasons, counts)},
    }


def write_synthetic(
    out: str | Path,
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    class_name: Sequence[str],
    split: Sequence[str],
    attrs: dict[str, Any] | None = None,
    image_views: np.ndarray | None = None,
    image_path: Sequence[str] | None = None,
    text: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Write a feature file from arrays (one item per row, all usable), for tests and benchmarks."""
    n = len(class_name)
    catalogue = pd.DataFrame(
        {
            "image": list(image_path) if image_path is not None else [f"img{i}.jpg" for i in range(n)],
            "text": list(text) if text is not None else [f"text {i}" for i in range(n)],
            "label": list(class_name),
            "class_name": list(class_name),
            "split": list(split),
        }
    )
    part = Part(
        rows=np.arange(n),
        reason=[""] * n,
        image_emb=image_emb,
        text_emb=text_emb,
        text_used=catalogue["text"].tolist(),
        image_views=image_views,
    )
    base = {
        "image_encoder": "synthetic",
        "image_dim": int(image_emb.shape[1]),
        "text_encoder": "synthetic",
        "text_dim": int(text_emb.shape[1]),
        "augment_views": 0 if image_views is None else int(image_views.shape[1]),
        "label_sep": "<",
        "image_root": ".",
    }
    return write_merged(out, [part], catalogue, {**base, **(attrs or {})})


def write_synthetic_blocks(
    out: str | Path,
    n_items: int,
    class_names: Sequence[str],
    blocks: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray, Sequence[str]]],
    attrs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write a feature file of `n_items` items a block at a time (benchmarks: files larger than memory).

    `blocks` yields (image (b, Di), text (b, Dt), label (b,) indices into the sorted `class_names`,
    split (b,)) in item order, n_items rows in all. The layout is `write_synthetic`'s (every item
    usable, catalogue row = item, synthetic image paths and texts); written atomically. Memory: one block.
    """
    class_names = list(class_names)
    if class_names != sorted(set(class_names)):
        raise HuseError("internal error: class names must be sorted and distinct")
    with atomic_path(out) as tmp:
        with h5py.File(tmp, "w") as f:
            items, start, dims = f.create_group("items"), 0, None
            for image, text, label, split in blocks:
                b = len(label)
                if dims is None:
                    dims = (image.shape[1], text.shape[1])
                    items.create_dataset("image_emb", shape=(n_items, dims[0]), dtype=image.dtype)
                    items.create_dataset("text_emb", shape=(n_items, dims[1]), dtype=text.dtype)
                    items.create_dataset("label", shape=(n_items,), dtype=np.int64)
                    items.create_dataset("row", data=np.arange(n_items, dtype=np.int64))
                    for name in ("split", "image_path", "text", "text_used"):
                        items.create_dataset(name, shape=(n_items,), dtype=_STR)
                if start + b > n_items:
                    raise HuseError(f"internal error: the blocks hold more than {n_items} items")
                sl = slice(start, start + b)
                items["image_emb"][sl] = image
                items["text_emb"][sl] = text
                items["label"][sl] = np.asarray(label, dtype=np.int64)
                items["split"][sl] = np.asarray(split, dtype=object)
                items["image_path"][sl] = np.asarray([f"img{i}.jpg" for i in range(start, start + b)], dtype=object)
                texts = np.asarray([f"text {i}" for i in range(start, start + b)], dtype=object)
                items["text"][sl] = texts
                items["text_used"][sl] = texts
                start += b
            if start != n_items:
                raise HuseError(f"internal error: the blocks hold {start} items, not {n_items}")
            base = {"image_encoder": "synthetic", "image_dim": int(dims[0]), "text_encoder": "synthetic",
                    "text_dim": int(dims[1]), "augment_views": 0, "label_sep": "<", "image_root": "."}
            _write_attrs(f, {**base, **(attrs or {}), "format": FORMAT, "schema_version": SCHEMA_VERSION,
                             "package_version": __version__, "n_items": n_items, "n_classes": len(class_names),
                             "n_skipped": 0})
            f.create_group("classes").create_dataset("name", data=np.asarray(class_names, dtype=object), dtype=_STR)
            skipped = f.create_group("skipped")
            skipped.create_dataset("row", data=np.zeros(0, np.int64))
            for name in ("image_path", "text", "label", "reason"):
                skipped.create_dataset(name, data=np.zeros(0, dtype=object), dtype=_STR)
    return {"n_items": n_items, "n_classes": len(class_names), "n_skipped": 0, "skipped_by_reason": {}}


# ---------------------------------------------------------------------------------- reading


class _ItemsView:
    """What FeatureSet (in memory) and FeatureFile (read in blocks) answer alike, from their
    `class_names`, `split` (N,) and `attrs`."""

    class_names: list[str]
    split: np.ndarray
    attrs: dict[str, Any]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def indices(self, split: str) -> np.ndarray:
        """Item indices of one split, in file order."""
        return np.flatnonzero(self.split == split)

    @property
    def image_root(self) -> Path:
        return Path(self.attrs.get("image_root", "."))


@dataclass
class FeatureSet(_ItemsView):
    """Everything stage two and evaluation need from a feature file, in memory."""

    path: Path
    attrs: dict[str, Any]
    image_emb: np.ndarray  # (N, Di) float32
    text_emb: np.ndarray  # (N, Dt) float32
    labels: np.ndarray  # (N,) int64
    split: np.ndarray  # (N,) str
    class_names: list[str]
    image_path: list[str]
    text: list[str]
    row: np.ndarray  # (N,) int64
    view_emb: np.ndarray | None = None  # (M, K, Di) float32 augmented views
    view_item: np.ndarray | None = None  # (M,) int64 item index of each view row
    class_dist: np.ndarray | None = None  # (C, C) float32 semantic graph A
    graph_attrs: dict[str, Any] = field(default_factory=dict)
    tree_dist: np.ndarray | None = None  # (C, C) int64
    skipped: pd.DataFrame | None = None
    text_used: list[str] | None = None  # (N,) what the text encoder saw (None in a file without the column)



def _graph_state(f: h5py.File) -> str:
    """`absent`, `incomplete` (a `huse build-graph` was interrupted) or `complete`."""
    if "graph" not in f or "class_dist" not in f["graph"]:
        return "absent"
    done = f["graph"].attrs.get(GRAPH_COMPLETE)
    return "complete" if done is None or json.loads(done) is True else "incomplete"


def _graph_present(f: h5py.File, path: Path) -> bool:
    """Whether the file holds a complete graph; an interrupted one is absent, with a warning."""
    state = _graph_state(f)
    if state == "incomplete":
        log.warning("the semantic graph in %s is incomplete (`huse build-graph` was interrupted) and is ignored: "
                    "run `huse build-graph --features %s` again", path, path)
    return state == "complete"


def read_attrs(path: str | Path) -> dict[str, Any]:
    """The root attributes of a feature file, plus `has_graph`, `graph_incomplete` and `has_views`
    flags (cheap). An interrupted `huse build-graph` leaves `has_graph` false, `graph_incomplete` true."""
    with _open(path) as f:
        attrs = _read_attrs(f)
        state = _graph_state(f)
        attrs["has_graph"] = state == "complete"
        attrs["graph_incomplete"] = state == "incomplete"
        attrs["has_views"] = "views" in f
        return attrs


def read_class_names(path: str | Path) -> list[str]:
    with _open(path) as f:
        return _strings(f["classes/name"])


def read_features(path: str | Path, views: bool = False) -> FeatureSet:
    """Read a feature file into memory (augmented views only when `views` is true)."""
    path = Path(path)
    with _open(path) as f:
        items = f["items"]
        fs = FeatureSet(
            path=path,
            attrs=_read_attrs(f),
            image_emb=items["image_emb"][()].astype(np.float32, copy=False),  # --dtype float16 files: upcast
            text_emb=items["text_emb"][()].astype(np.float32, copy=False),
            labels=items["label"][()],
            split=np.asarray(_strings(items["split"]), dtype=object),
            class_names=_strings(f["classes/name"]),
            image_path=_strings(items["image_path"]),
            text=_strings(items["text"]),
            row=items["row"][()],
            text_used=_strings(items["text_used"]) if "text_used" in items else None,
        )
        if views and "views" in f:
            fs.view_emb = f["views/image_emb"][()]
            fs.view_item = f["views/item"][()]
        if _graph_present(f, path):  # the hierarchy is written with the graph, under the same flag
            fs.class_dist = f["graph/class_dist"][()]
            fs.graph_attrs = {k: v for k, v in _read_attrs(f["graph"]).items() if k != GRAPH_COMPLETE}
            if "hierarchy/tree_dist" in f:
                fs.tree_dist = f["hierarchy/tree_dist"][()]
        if "skipped" in f:
            g = f["skipped"]
            fs.skipped = pd.DataFrame(
                {"row": g["row"][()], **{k: _strings(g[k]) for k in ("image_path", "text", "label", "reason")}}
            )
    return fs


# ----------------------------------------------------------------------------------- graph


def _write_in_place(group: h5py.Group, name: str, data: np.ndarray) -> None:
    """group[name] = data, overwriting the existing dataset when its shape and dtype match (no new
    space in the file); otherwise (re)created."""
    if name in group:
        ds = group[name]
        if isinstance(ds, h5py.Dataset) and ds.shape == data.shape and ds.dtype == data.dtype:
            ds[...] = data
            return
        del group[name]
    group.create_dataset(name, data=data)


def write_graph(
    path: str | Path,
    class_dist: np.ndarray,
    tree_dist: np.ndarray,
    nodes: Sequence[str],
    graph_attrs: dict[str, Any],
) -> None:
    """Write (or rewrite) the semantic graph and the class hierarchy into a feature file, in place.

    The datasets' sizes are fixed by the number of classes, so a rewrite overwrites their values and
    the file neither grows nor is copied. /graph is flagged incomplete (`write_complete` false, on
    disk) before any value changes and complete only after the last one, so an interrupted write
    leaves a graph that every reader ignores, saying to run `huse build-graph` again.
    """
    path = Path(path)
    class_dist = np.asarray(class_dist, dtype=np.float32)
    tree_dist = np.asarray(tree_dist, dtype=np.int64)
    nodes = list(nodes)
    if GRAPH_COMPLETE in graph_attrs:
        raise HuseError(f"internal error: {GRAPH_COMPLETE!r} is a reserved graph attribute")
    with _open(path, "r+") as f:
        n_classes = len(f["classes/name"])
        if class_dist.shape != (n_classes, n_classes) or tree_dist.shape != (n_classes, n_classes):
            raise HuseError(f"graph shape {class_dist.shape} does not match the {n_classes} classes of {path}")
        if "graph/class_dist" not in f:
            # first write: make the dataset (and its group) before anything else, so a failure here leaves
            # the file as it was, and flag it before its values exist
            f.create_dataset("graph/class_dist", shape=class_dist.shape, dtype=class_dist.dtype)
        graph = f["graph"]
        _rewrite_attrs(graph, {GRAPH_COMPLETE: False}, keep=list(graph.attrs))
        f.flush()  # the flag reaches the disk before the first value changes
        _write_in_place(graph, "class_dist", class_dist)
        hierarchy = f.require_group("hierarchy")
        _write_in_place(hierarchy, "tree_dist", tree_dist)
        # the nodes follow from the class names, which a feature file never changes: rewritten only if they
        # differ (a variable-length string dataset would take new space at every write)
        if "nodes" not in hierarchy or _strings(hierarchy["nodes"]) != nodes:
            if "nodes" in hierarchy:
                del hierarchy["nodes"]
            hierarchy.create_dataset("nodes", data=np.asarray(nodes, dtype=object), dtype=_STR)
        _rewrite_attrs(graph, graph_attrs, keep=[GRAPH_COMPLETE])  # drops a previous build's other settings
        f.flush()  # every value is on disk before the flag says so
        _rewrite_attrs(graph, {GRAPH_COMPLETE: True}, keep=list(graph.attrs))


def features_digest(fs: "FeatureSet | FeatureFile") -> str:
    """A content hash of the items (features, labels, splits): a run records it, so that --resume
    and `huse eval` can tell the feature file it was trained on from another.

    Hashed a block of rows at a time (no copy of the arrays); a `FeatureFile` gives the same value
    from its one streaming pass (`FeatureFile.summary`)."""
    if isinstance(fs, FeatureFile):
        return fs.summary().digest
    h = hashlib.blake2b(digest_size=16)
    for arr in (fs.image_emb, fs.text_emb, fs.labels):
        for start in range(0, len(arr), SCAN_ROWS):
            h.update(np.ascontiguousarray(arr[start:start + SCAN_ROWS]))  # the same bytes as one tobytes()
    h.update("\n".join(map(str, fs.split)).encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------ item keys
# (stage two's instance term must not treat two items with the same title, or the same image, as
# negatives of each other: `train.batches.item_groups` joins items by these keys)


def row_keys(rows: np.ndarray) -> np.ndarray:
    """(b, D) float32 rows -> (b,) uint64: a 64-bit blake2b hash of each row's bytes, so bit-identical
    rows get one key (different rows the same key with chance 2^-64 a pair)."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    return np.frombuffer(b"".join(hashlib.blake2b(r, digest_size=8).digest() for r in rows), dtype=np.uint64).copy()


def string_keys(texts: Iterable[str]) -> np.ndarray:
    """(n,) uint64 64-bit blake2b hashes of the strings' UTF-8 bytes (equal strings, one key)."""
    digests = b"".join(hashlib.blake2b(t.encode("utf-8", "surrogatepass"), digest_size=8).digest() for t in texts)
    return np.frombuffer(digests, dtype=np.uint64).copy()


def item_keys(fs: "FeatureSet | FeatureFile") -> tuple[np.ndarray, np.ndarray]:
    """(title key, image key), (N,) uint64 each: `string_keys` of each item's title as the text encoder
    saw it (`text_used`; the raw text in a file without it) and `row_keys` of its image features (the
    deterministic view, as float32). A `FeatureFile` takes them from its one streaming pass."""
    if isinstance(fs, FeatureFile):
        summary = fs.summary()
        return summary.title_key, summary.image_key
    image = [row_keys(fs.image_emb[a:a + SCAN_ROWS]) for a in range(0, len(fs.image_emb), SCAN_ROWS)]
    title = string_keys(fs.text_used if fs.text_used is not None else fs.text)
    return title, np.concatenate(image) if image else np.zeros(0, np.uint64)


# ------------------------------------------------------------------------ reading in blocks
# (for `huse index`: memory bounded by one block of rows, whatever the catalogue's size)

ITEM_STRING_FIELDS = ("split", "image_path", "text", "text_used")


def iter_item_blocks(path: str | Path, fields: Sequence[str], block_rows: int = 16384):
    """Yield (first item index, {field: that block's rows}) over /items in file order.

    `fields` are names under /items (image_emb, text_emb, label, split, row, image_path, text,
    text_used); string fields come as lists. Only one block is in memory at a time.
    """
    with _open(path) as f:
        items = f["items"]
        n = len(items["label"])
        for start in range(0, n, block_rows):
            stop = min(n, start + block_rows)
            yield start, {name: (items[name].asstr()[start:stop].tolist() if name in ITEM_STRING_FIELDS
                                 else items[name][start:stop]) for name in fields}


# ---------------------------------------------------------------- a feature file read lazily
# (stage two and `huse eval` on files larger than memory: the per-item columns they need are held,
# a few bytes per item; the feature arrays stay in the file and are read a block of rows at a time)

SCAN_ROWS = 2048  # rows per block of the digest and of the streaming pass: ~37 MB at 4,160 + 384 float32 dims
ITEM_ARRAYS = ("image_emb", "text_emb")


@dataclass(frozen=True)
class ItemSummary:
    """What one streaming pass over a feature file's items gives (`FeatureFile.summary`)."""

    digest: str  # features_digest of the file
    class_counts: dict[str, np.ndarray]  # split name -> (C,) int64 items of each class
    stats: dict[str, tuple[np.ndarray, np.ndarray]]  # image | text -> train-split (mean, std) (D,) float64, std unbiased
    non_finite: dict[str, int]  # image | text -> non-finite feature values over all items
    title_key: np.ndarray  # (N,) uint64 `item_keys`' title keys
    image_key: np.ndarray  # (N,) uint64 `item_keys`' image keys


class RunningMoments:
    """Per-feature mean and unbiased variance of rows added a block at a time, in float64 (the pairwise
    update of Chan, Golub and LeVeque): equal to the two-pass values up to rounding, whatever the blocks."""

    def __init__(self, dim: int) -> None:
        self.n = 0
        self.mean = np.zeros(dim, dtype=np.float64)
        self.m2 = np.zeros(dim, dtype=np.float64)  # sum of squared deviations from the mean

    def add(self, x: np.ndarray) -> None:
        """Add the rows of x (b, D)."""
        if len(x) == 0:
            return
        x = np.asarray(x, dtype=np.float64)
        n_b, mean_b = len(x), x.mean(axis=0)
        m2_b = np.square(x - mean_b).sum(axis=0)
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + np.square(delta) * (self.n * n_b / n)
        self.n = n

    def std(self) -> np.ndarray:
        """(D,) unbiased standard deviation (NaN with fewer than two rows, as torch.std)."""
        if self.n < 2:
            return np.full_like(self.mean, np.nan)
        return np.sqrt(self.m2 / (self.n - 1))


def _read_split(ds: h5py.Dataset, block_rows: int = 1 << 16) -> np.ndarray:
    """(N,) object array of split names in which each distinct name is one shared str (8 bytes an item)."""
    names: dict[str, str] = {}
    out = np.empty(len(ds), dtype=object)
    for start in range(0, len(ds), block_rows):
        block = ds.asstr()[start:start + block_rows]
        out[start:start + len(block)] = [names.setdefault(s, s) for s in block]
    return out


class _StringColumn:
    """A string column of /items read one element at a time (`fs.text[i]`), never whole."""

    def __init__(self, ds: h5py.Dataset) -> None:
        self._ds = ds

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, i: int) -> str:
        return self._ds.asstr()[int(i)]


class FeatureFile(_ItemsView):
    """A feature file held open for reading in blocks: the members of a `FeatureSet`, but only the small
    per-item columns in memory (labels: 8 bytes an item; splits: 8; the graph, classes and attributes).

    `image_emb`, `text_emb` and `view_emb` are the file's h5py datasets (`.shape`, `.dtype`, slices
    `[a:b]`), read with `read_rows` / `read_items`; `image_path`, `text` read one string at a time;
    `summary()` makes the one streaming pass that gives the digest, the train split's input statistics
    and the class counts. Use it as a context manager, or `close()` it.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file = f = _open(self.path)
        try:
            items = f["items"]
            self.attrs = _read_attrs(f)
            self.image_emb: h5py.Dataset = items["image_emb"]  # (N, Di)
            self.text_emb: h5py.Dataset = items["text_emb"]  # (N, Dt)
            self.labels: np.ndarray = items["label"][()]  # (N,) int64
            self.split: np.ndarray = _read_split(items["split"])  # (N,) str objects
            self.class_names: list[str] = _strings(f["classes/name"])
            self.image_path, self.text = _StringColumn(items["image_path"]), _StringColumn(items["text"])
            self.view_emb: h5py.Dataset | None = f["views/image_emb"] if "views" in f else None  # (M, K, Di)
            self.view_item: np.ndarray | None = f["views/item"][()] if "views" in f else None  # (M,) ascending
            self.class_dist: np.ndarray | None = None
            self.graph_attrs: dict[str, Any] = {}
            self.tree_dist: np.ndarray | None = None
            if _graph_present(f, self.path):
                self.class_dist = f["graph/class_dist"][()]
                self.graph_attrs = {k: v for k, v in _read_attrs(f["graph"]).items() if k != GRAPH_COMPLETE}
                if "hierarchy/tree_dist" in f:
                    self.tree_dist = f["hierarchy/tree_dist"][()]
        except BaseException:
            f.close()
            raise
        self._summary: ItemSummary | None = None

    # -- as FeatureSet

    @property
    def row(self) -> np.ndarray:
        return self._file["items/row"][()]

    @property
    def n_items(self) -> int:
        return len(self.labels)

    def nbytes(self, views: bool = False) -> int:
        """Bytes of the feature arrays (with `views`, the augmented views too): what holding them costs."""
        arrays = [self.image_emb, self.text_emb] + ([self.view_emb] if views and self.view_emb is not None else [])
        return int(sum(np.prod(a.shape) * a.dtype.itemsize for a in arrays))

    # -- reading
    def _dataset(self, name: str) -> h5py.Dataset:
        if name not in ITEM_ARRAYS and name != "view_emb":
            raise ValueError(f"unknown item array {name!r}")
        ds = getattr(self, name)
        if ds is None:
            raise HuseError(f"{self.path} has no augmented views")
        return ds

    def read_rows(self, name: str, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [start, stop) of `name` (image_emb, text_emb or view_emb), in their stored dtype; into
        `out` (at least stop - start rows) when given, without another copy."""
        ds = self._dataset(name)
        stop = min(stop, len(ds))
        if out is None:
            return ds[start:stop]
        if stop > start:
            ds.read_direct(out, np.s_[start:stop], np.s_[0:stop - start])
        return out[:stop - start]

    def read_items(self, name: str, items: np.ndarray, max_gap: int = 16, max_rows: int = SCAN_ROWS) -> np.ndarray:
        """Rows `items` (strictly ascending indices) of `name`, (len(items), ...) in the stored dtype.

        Read as contiguous slices: items less than `max_gap` rows apart share one slice (the rows
        between are read and dropped), and no slice is longer than `max_rows` rows (memory).
        """
        ds = self._dataset(name)
        items = np.asarray(items, dtype=np.int64)
        out = np.empty((len(items), *ds.shape[1:]), dtype=ds.dtype)
        if len(items) > 1 and np.any(np.diff(items) <= 0):
            raise ValueError("read_items needs strictly ascending item indices")
        bounds = np.concatenate([[0], np.flatnonzero(np.diff(items) > max_gap) + 1, [len(items)]])
        for s, e in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            while s < e:
                stop = s + int(np.searchsorted(items[s:e], items[s] + max_rows))  # those within max_rows rows
                lo, hi = int(items[s]), int(items[stop - 1]) + 1
                out[s:stop] = ds[lo:hi][items[s:stop] - lo]
                s = stop
        return out

    def summary(self) -> ItemSummary:
        """One streaming pass over the items (cached): the digest (`features_digest`'s value of the
        FeatureSet `read_features` gives: float32 values, whatever the stored dtype), the train split's
        per-feature mean and unbiased std in float64 (those of the whole array to ~1e-12), the class
        counts per split, the non-finite values and the `item_keys` (16 bytes an item). Memory: one
        block of SCAN_ROWS rows, besides the keys."""
        if self._summary is None:
            h = hashlib.blake2b(digest_size=16)
            train = self.split == "train"
            stats, bad, image_key = {}, {}, []
            for name, ds in (("image", self.image_emb), ("text", self.text_emb)):
                moments, bad[name] = RunningMoments(ds.shape[1]), 0
                for start in range(0, len(ds), SCAN_ROWS):
                    x = ds[start:start + SCAN_ROWS].astype(np.float32, copy=False)  # (b, D) as read_features gives it
                    h.update(np.ascontiguousarray(x))
                    finite = np.isfinite(x)
                    if not finite.all():
                        bad[name] += int((~finite).sum())
                    moments.add(x[train[start:start + len(x)]])
                    if name == "image":
                        image_key.append(row_keys(x))
                stats[name] = (moments.mean, moments.std())
            items = self._file["items"]
            titles = items["text_used"] if "text_used" in items else items["text"]
            title_key = np.concatenate([np.zeros(0, np.uint64)] + [
                string_keys(titles.asstr()[a:a + SCAN_ROWS]) for a in range(0, len(titles), SCAN_ROWS)])
            h.update(np.ascontiguousarray(self.labels))
            h.update("\n".join(map(str, self.split)).encode())
            counts = {s: np.bincount(self.labels[self.split == s], minlength=self.num_classes)
                      for s in sorted(set(self.split.tolist()))}
            self._summary = ItemSummary(h.hexdigest(), counts, stats, bad, title_key,
                                        np.concatenate([np.zeros(0, np.uint64), *image_key]))
        return self._summary

    # -- lifetime
    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> FeatureFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_features(path: str | Path) -> FeatureFile:
    """Open a feature file for reading in blocks (see `FeatureFile`); nothing large is read yet."""
    return FeatureFile(path)


# ---------------------------------------------------------------------------- checking a file

SPLIT_NAMES = ("train", "val", "test")


def check_feature_file(path: str | Path, graph: bool = True) -> None:
    """Refuse a malformed feature file with one line naming it, before anything large is read:
    every /items array as long as the labels, 2-d features matching the recorded dimensions, labels
    in [0, C) for the C class names (distinct), splits among train/val/test, views of the image
    width pointing at items, and (with `graph`; `huse build-graph` rewrites them) a complete graph
    and tree of shape (C, C), the graph finite. Reads the labels, the splits and the (C, C) arrays
    only; the features are never loaded."""
    path = Path(path)

    def bad(what: str) -> HuseError:
        return HuseError(f"feature file {path} is malformed: {what}; re-run `huse extract-features`")

    with _open(path) as f:
        attrs = _read_attrs(f)
        for name in ("items", "items/label", "items/image_emb", "items/text_emb", "classes/name"):
            if name not in f:
                raise bad(f"/{name} is missing")
        items, names = f["items"], f["classes/name"]
        if names.ndim != 1 or len(names) == 0:
            raise bad("/classes/name holds no class names")
        n_classes = len(names)
        if len(set(_strings(names))) != n_classes:
            raise bad("/classes/name repeats a class")
        label = items["label"]
        if label.ndim != 1 or label.dtype.kind not in "iu":
            raise bad(f"/items/label is {label.dtype} of shape {label.shape}, not one integer per item")
        n = len(label)
        for name in items:
            ds = items[name]
            if isinstance(ds, h5py.Dataset) and (ds.ndim == 0 or ds.shape[0] != n):
                raise bad(f"/items/{name} has {ds.shape[0] if ds.ndim else 0} rows for {n} items")
        for name, key in (("image_emb", "image_dim"), ("text_emb", "text_dim")):
            ds = items[name]
            if ds.ndim != 2 or ds.dtype.kind != "f":
                raise bad(f"/items/{name} is {ds.dtype} of shape {ds.shape}, not (items, dims) floats")
            if isinstance(attrs.get(key), int) and attrs[key] != ds.shape[1]:
                raise bad(f"/items/{name} has {ds.shape[1]} dims, the file's {key} says {attrs[key]}")
        labels = label[()]
        if n and (labels.min() < 0 or labels.max() >= n_classes):
            out = int(((labels < 0) | (labels >= n_classes)).sum())
            raise bad(f"{out} label(s) outside [0, {n_classes}) (values {int(labels.min())}..{int(labels.max())})")
        if "split" in items:
            unknown = sorted(set(_read_split(items["split"]).tolist()) - set(SPLIT_NAMES))
            if unknown:
                raise bad(f"/items/split holds {', '.join(map(repr, unknown[:3]))}, not train/val/test")
        if "views" in f:
            emb, item = f["views"].get("image_emb"), f["views"].get("item")
            if emb is None or item is None or emb.ndim != 3 or item.ndim != 1 or len(item) != emb.shape[0]:
                raise bad("/views is incomplete (image_emb (M, K, D) and item (M,) expected)")
            if emb.shape[2] != items["image_emb"].shape[1]:
                raise bad(f"/views/image_emb has {emb.shape[2]} dims, the image features {items['image_emb'].shape[1]}")
            view_item = item[()]
            if len(view_item) and (view_item.min() < 0 or view_item.max() >= n or np.any(np.diff(view_item) <= 0)):
                raise bad("/views/item does not point at items in ascending order")
        if graph and _graph_state(f) == "complete":
            graph = f["graph/class_dist"]
            if graph.shape != (n_classes, n_classes):
                raise bad(f"the semantic graph is {graph.shape}, not ({n_classes}, {n_classes}) for its classes; "
                          "run `huse build-graph` again")
            if not np.isfinite(graph[()]).all():
                raise bad("the semantic graph holds non-finite values; run `huse build-graph` again")
            tree = f.get("hierarchy/tree_dist")
            if tree is not None and tree.shape != (n_classes, n_classes):
                raise bad(f"the class tree is {tree.shape}, not ({n_classes}, {n_classes}); run `huse build-graph` again")
