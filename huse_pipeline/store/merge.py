"""Stage one's merge of shard (part) files into the feature file, streamed and validated first.

Pass 1 reads only each shard's small arrays (rows, reasons) and attributes and checks them: every
shard present and readable, its rows the expected range, the run's settings fingerprint, its
arrays the expected shapes. Pass 2 creates the output's datasets at their final sizes and copies
the shards into them block by block, checking that every value is finite (also after a cast to
float16), into a temporary file that replaces `out` only when all is done. Memory is one block of
rows (plus the caller's catalogue frame), whatever the number of rows or shards. The file layout
is `features`' (schema 1): every reader works unchanged; the arrays are copied, not mapped, so the
file never depends on its shards.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np
import pandas as pd

from huse_pipeline import __version__
from huse_pipeline.errors import HuseError
from huse_pipeline.settings import FEATURE_DTYPES
from huse_pipeline.store import features
from huse_pipeline.store.features import _STR, _read_attrs, _write_attrs
from huse_pipeline.utils import atomic_path

log = logging.getLogger(__name__)

STORAGE_DTYPES = FEATURE_DTYPES  # of /items/image_emb, /items/text_emb and /views/image_emb
_SHARD_ARRAYS = ("rows", "reason", "image_emb", "text_emb", "text_used")
_FLOAT16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class Shard:
    """One fixed row range [start, end) of the catalogue and the file that holds its features."""

    start: int
    end: int
    path: Path

    def describe(self) -> str:
        return f"shard {self.path} (rows {self.start}-{self.end - 1})"


class ShardError(HuseError):
    """A shard that cannot be merged; the message names it and says how to redo it."""

    def __init__(self, shard: Shard, problem: str, redo: str) -> None:
        first = "delete it, then " if shard.path.exists() else ""
        super().__init__(f"{shard.describe()} {problem}; {first}{redo}")
        self.shard, self.problem = shard, problem


def shard_fingerprint(shard: Shard, redo: str) -> str | None:
    """The settings fingerprint recorded in a finished shard (its attributes only: cheap).

    ShardError if the file is unreadable (an atomic write never leaves one: it was truncated or
    damaged afterwards)."""
    try:
        with h5py.File(shard.path, "r") as f:
            return _read_attrs(f).get("fingerprint")
    except OSError as exc:
        raise ShardError(shard, f"is unreadable (truncated or damaged: {exc})", redo) from exc


def shard_skipped(shard: Shard) -> int:
    """Unusable rows in a finished shard (its reasons only; for progress, not validated)."""
    try:
        with h5py.File(shard.path, "r") as f:
            return int(sum(r != "" for r in f["reason"].asstr()[()]))
    except (OSError, KeyError):
        return 0


@dataclass
class Survey:
    """What pass 1 found: per-shard counts, the class names, the skip reasons, the shapes."""

    shards: list[Shard]
    usable: list[int]  # per shard: usable rows
    skipped: list[int]  # per shard: unusable rows
    usable_train: list[int]  # per shard: usable train rows (they carry augmented views)
    class_names: list[str]
    split_counts: dict[str, int]
    reasons: dict[str, int]  # every distinct skip reason and its count
    skip_examples: list[tuple[int, str]]  # (row, reason) of the first unusable rows
    texts_reduced: int
    image_dim: int
    text_dim: int
    n_views: int | None  # augmented views per item; None: the shards hold none

    @property
    def n_items(self) -> int:
        return sum(self.usable)

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped)

    def reasons_by_kind(self) -> dict[str, int]:
        """Counts per reason kind ("image too large (...)" counts as "image too large")."""
        kinds: dict[str, int] = {}
        for reason, n in self.reasons.items():
            kind = reason.split(" (")[0]
            kinds[kind] = kinds.get(kind, 0) + n
        return dict(sorted(kinds.items()))


def _rows(catalogue: pd.DataFrame, column: str, start: int, end: int) -> np.ndarray:
    """catalogue[column] of rows start..end-1 as an object array. Only these rows: a string column
    (pandas' str dtype) makes a Python object per value when converted, so a whole column would
    cost memory in proportion to the catalogue."""
    return catalogue[column].iloc[start:end].to_numpy(dtype=object)


def survey_shards(shards: Sequence[Shard], fingerprint: str, catalogue: pd.DataFrame, redo: str,
                  n_examples: int = 5) -> Survey:
    """Pass 1: validate every shard from its small arrays and attributes; ShardError names the
    first bad one. `catalogue`: the frame (index = row) with columns class_name (None: unusable) and
    split."""
    shards = list(shards)
    if not shards:
        raise HuseError("internal error: no shards to merge")
    survey = Survey(shards, [], [], [], [], {}, {}, [], 0, 0, 0, None)
    classes: set[str] = set()
    dims: tuple[int, int, int | None] | None = None
    end_before = 0
    for shard in shards:
        if shard.start != end_before:
            raise HuseError(f"internal error: shards do not tile the catalogue at row {end_before}")
        end_before = shard.end
        if not shard.path.exists():
            raise ShardError(shard, "is missing", redo)
        n = shard.end - shard.start
        try:
            with h5py.File(shard.path, "r") as f:
                absent = [name for name in _SHARD_ARRAYS if name not in f]
                if absent:
                    raise ShardError(shard, f"is incomplete (it has no {', '.join(absent)})", redo)
                attrs = _read_attrs(f)
                if attrs.get("fingerprint") != fingerprint:
                    theirs = str(attrs.get("fingerprint"))[:12]
                    raise ShardError(shard, f"was made with other settings (settings fingerprint {theirs}…, this "
                                            f"run's is {fingerprint[:12]}…) and is never mixed in", redo)
                rows = f["rows"][()]
                if (attrs.get("start"), attrs.get("end")) != (shard.start, shard.end) or not np.array_equal(
                        rows, np.arange(shard.start, shard.end)):
                    got = f"{rows[0]}-{rows[-1]}" if len(rows) else "none"
                    raise ShardError(shard, f"holds rows {got}, not the expected {shard.start}-{shard.end - 1}", redo)
                shape = (f["image_emb"].shape, f["text_emb"].shape,
                         f["image_views"].shape if "image_views" in f else None)
                mine = (shape[0][1] if len(shape[0]) == 2 else -1, shape[1][1] if len(shape[1]) == 2 else -1,
                        shape[2][1] if shape[2] is not None and len(shape[2]) == 3 else None)
                dims = dims or mine
                expected = ((n, dims[0]), (n, dims[1]), None if dims[2] is None else (n, dims[2], dims[0]))
                if shape != expected or len(f["reason"]) != n or len(f["text_used"]) != n:
                    raise ShardError(shard, f"has arrays of the wrong shape ({shape}, expected {expected})", redo)
                reason = np.asarray(f["reason"].asstr()[()], dtype=object)
        except OSError as exc:
            raise ShardError(shard, f"is unreadable (truncated or damaged: {exc})", redo) from exc
        ok = reason == ""
        rows_split = _rows(catalogue, "split", shard.start, shard.end)[ok]
        survey.usable.append(int(ok.sum()))
        survey.skipped.append(int((~ok).sum()))
        survey.usable_train.append(int((rows_split == "train").sum()))
        classes.update(_rows(catalogue, "class_name", shard.start, shard.end)[ok])
        for s in rows_split:
            survey.split_counts[s] = survey.split_counts.get(s, 0) + 1
        for i in np.flatnonzero(~ok):
            survey.reasons[reason[i]] = survey.reasons.get(reason[i], 0) + 1
            if len(survey.skip_examples) < n_examples:
                survey.skip_examples.append((shard.start + int(i), reason[i]))
        survey.texts_reduced += int(attrs.get("texts_reduced", 0))
    survey.class_names = sorted(classes)
    survey.split_counts = {s: survey.split_counts.get(s, 0) for s in ("train", "val", "test")}
    survey.image_dim, survey.text_dim, survey.n_views = dims
    return survey


def write_from_shards(out: str | Path, survey: Survey, catalogue: pd.DataFrame, attrs: dict[str, Any],
                      dtype: str = "float32", redo: str = "run the extraction again",
                      block_rows: int = 2048) -> dict[str, Any]:
    """Pass 2: copy the surveyed shards into the feature file `out` (atomically), block by block.

    `catalogue`: the frame (index = row) with columns image, text, class_name, split. `dtype`: the
    storage of the features (float16 halves the file; readers upcast to float32). Returns the same
    summary as `features.write_merged`. The values are those `features.write_merged` writes from
    the same shards read into memory.
    """
    if dtype not in STORAGE_DTYPES:
        raise HuseError(f"unknown feature dtype {dtype!r}; choose one of {', '.join(STORAGE_DTYPES)}")
    store = np.dtype(dtype)
    n_items, n_skipped = survey.n_items, survey.n_skipped
    if n_items == 0:
        raise HuseError("no usable rows: every row was skipped (see the reasons above)")
    class_index = {c: i for i, c in enumerate(survey.class_names)}
    n_train = sum(survey.usable_train)
    k, di, dt = survey.n_views, survey.image_dim, survey.text_dim

    with atomic_path(out) as tmp:
        with h5py.File(tmp, "w") as f:
            _write_attrs(f, {**attrs, "format": features.FORMAT, "schema_version": features.SCHEMA_VERSION,
                             "package_version": __version__, "n_items": n_items,
                             "n_classes": len(survey.class_names), "n_skipped": n_skipped})
            items = f.create_group("items")
            out_image = items.create_dataset("image_emb", shape=(n_items, di), dtype=store)
            out_text = items.create_dataset("text_emb", shape=(n_items, dt), dtype=store)
            out_label = items.create_dataset("label", shape=(n_items,), dtype=np.int64)
            out_split = items.create_dataset("split", shape=(n_items,), dtype=_STR)
            out_row = items.create_dataset("row", shape=(n_items,), dtype=np.int64)
            out_strings = {name: items.create_dataset(name, shape=(n_items,), dtype=_STR)
                           for name in ("image_path", "text", "text_used")}
            if k is not None:
                views = f.create_group("views")
                out_views = views.create_dataset("image_emb", shape=(n_train, k, di), dtype=store)
                out_view_item = views.create_dataset("item", shape=(n_train,), dtype=np.int64)
            f.create_group("classes").create_dataset("name", data=np.asarray(survey.class_names, dtype=object),
                                                     dtype=_STR)
            skipped = f.create_group("skipped")
            out_skipped = {"row": skipped.create_dataset("row", shape=(n_skipped,), dtype=np.int64)}
            for name in ("image_path", "text", "label", "reason"):
                out_skipped[name] = skipped.create_dataset(name, shape=(n_skipped,), dtype=_STR)

            at_item = at_view = at_skip = 0
            for shard in survey.shards:
                try:
                    with h5py.File(shard.path, "r") as src:
                        reason = np.asarray(src["reason"].asstr()[()], dtype=object)
                        text_used = np.asarray(src["text_used"].asstr()[()], dtype=object)
                        for a in range(0, shard.end - shard.start, block_rows):
                            b = min(a + block_rows, shard.end - shard.start)
                            ok = reason[a:b] == ""
                            col = {name: _rows(catalogue, name, shard.start + a, shard.start + b)
                                   for name in ("image", "text", "label", "class_name", "split")}
                            rows = np.arange(shard.start + a, shard.start + b)[ok]
                            m = len(rows)
                            if m:
                                sl = slice(at_item, at_item + m)
                                out_image[sl] = _checked(src["image_emb"][a:b][ok], store, shard, "image", redo)
                                out_text[sl] = _checked(src["text_emb"][a:b][ok], store, shard, "text", redo)
                                out_label[sl] = np.fromiter((class_index[c] for c in col["class_name"][ok]), np.int64,
                                                            m)
                                out_split[sl] = col["split"][ok]
                                out_row[sl] = rows
                                out_strings["image_path"][sl] = col["image"][ok]
                                out_strings["text"][sl] = col["text"][ok]
                                out_strings["text_used"][sl] = text_used[a:b][ok]
                                if k is not None:
                                    train = col["split"][ok] == "train"
                                    t = int(train.sum())
                                    if t:
                                        v = src["image_views"][a:b][ok][train]  # (t, K, Di)
                                        out_views[at_view:at_view + t] = _checked(v, store, shard, "view", redo)
                                        out_view_item[at_view:at_view + t] = at_item + np.flatnonzero(train)
                                        at_view += t
                                at_item += m
                            bad = np.arange(shard.start + a, shard.start + b)[~ok]
                            s = len(bad)
                            if s:
                                sl = slice(at_skip, at_skip + s)
                                out_skipped["row"][sl] = bad
                                out_skipped["image_path"][sl] = col["image"][~ok]
                                out_skipped["text"][sl] = col["text"][~ok]
                                out_skipped["label"][sl] = col["label"][~ok]
                                out_skipped["reason"][sl] = reason[a:b][~ok]
                                at_skip += s
                except OSError as exc:
                    raise ShardError(shard, f"is unreadable (truncated or damaged: {exc})", redo) from exc
            assert (at_item, at_view, at_skip) == (n_items, n_train if k is not None else 0, n_skipped)
    return {
        "n_items": n_items,
        "n_classes": len(survey.class_names),
        "n_skipped": n_skipped,
        "skipped_by_reason": dict(sorted(survey.reasons.items())),
    }


def _checked(block: np.ndarray, store: np.dtype, shard: Shard, what: str, redo: str) -> np.ndarray:
    """`block` cast to the storage dtype; ShardError if a value is not finite, before or after."""
    bad = ~np.isfinite(block)
    if bad.any():
        raise ShardError(shard, f"holds {int(bad.sum())} non-finite {what} feature values", redo)
    out = block.astype(store, copy=False)
    if store != block.dtype and not np.isfinite(out).all():
        big = float(np.abs(block).max())
        raise HuseError(f"{shard.describe()} holds {what} feature values up to {big:g}, beyond float16's range "
                        f"(±{_FLOAT16_MAX:g}): use --dtype float32")
    return out


def merge_shards(out: str | Path, shards: Sequence[Shard], catalogue: pd.DataFrame, attrs: dict[str, Any],
                 fingerprint: str, dtype: str = "float32", redo: str = "run the extraction again") -> dict[str, Any]:
    """Both passes: validate the shards, then write `out`; see `survey_shards` and `write_from_shards`."""
    survey = survey_shards(shards, fingerprint, catalogue, redo)
    return write_from_shards(out, survey, catalogue, attrs, dtype, redo)
