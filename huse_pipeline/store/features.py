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
from typing import Any, Sequence

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


# ---------------------------------------------------------------------------------- reading


@dataclass
class FeatureSet:
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

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def indices(self, split: str) -> np.ndarray:
        """Item indices of one split, in file order."""
        return np.flatnonzero(self.split == split)

    @property
    def image_root(self) -> Path:
        return Path(self.attrs.get("image_root", "."))


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
            image_emb=items["image_emb"][()],
            text_emb=items["text_emb"][()],
            labels=items["label"][()],
            split=np.asarray(_strings(items["split"]), dtype=object),
            class_names=_strings(f["classes/name"]),
            image_path=_strings(items["image_path"]),
            text=_strings(items["text"]),
            row=items["row"][()],
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


def features_digest(fs: FeatureSet) -> str:
    """A content hash of the items (features, labels, splits): a run records it, so that --resume
    and `huse eval` can tell the feature file it was trained on from another."""
    h = hashlib.blake2b(digest_size=16)
    for arr in (fs.image_emb, fs.text_emb, fs.labels):
        h.update(np.ascontiguousarray(arr).tobytes())
    h.update("\n".join(map(str, fs.split)).encode())
    return h.hexdigest()


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


def file_features_digest(path: str | Path, block_rows: int = 16384) -> str:
    """`features_digest` of the feature file at `path` (the same value), read in blocks of rows."""
    h = hashlib.blake2b(digest_size=16)
    with _open(path) as f:
        items = f["items"]
        n = len(items["label"])
        for name in ("image_emb", "text_emb", "label"):
            for start in range(0, n, block_rows):
                h.update(np.ascontiguousarray(items[name][start:start + block_rows]).tobytes())
        h.update("\n".join(items["split"].asstr()[()].tolist()).encode())
    return h.hexdigest()
