"""Read a product catalogue: a CSV with columns `image,text,label` and an optional `split`.

Labels are class paths (`apparel<topwear<tshirts`, `kitchen<mugs` or a flat `mugs`). Without a
`split` column a deterministic split, stratified by class, is made here and recorded by stage one.
"""
from __future__ import annotations

import csv
import hashlib
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from huse_pipeline.errors import HuseError

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("image", "text", "label")
SPLITS = ("train", "val", "test")
DEFAULT_LABEL_SEP = "<"
_SPACES = re.compile(r"\s+")


def parse_label(raw: str, sep: str = DEFAULT_LABEL_SEP) -> tuple[str, ...] | None:
    """Split a class path into its segments, or return None if it is malformed.

    Whitespace around and inside segments is normalised (`" Apparel < top  wear"` ->
    `("Apparel", "top wear")`); case is kept. Empty labels and empty segments (`a<<b`, `a<`) are
    malformed.
    """
    if not isinstance(raw, str):
        return None
    segments = tuple(_SPACES.sub(" ", s).strip() for s in raw.split(sep))
    if not segments or any(not s for s in segments):
        return None
    return segments


@dataclass
class Catalogue:
    """A catalogue read from disk.

    `frame` has one row per CSV row (index = 0-based CSV row number) and the columns `image`,
    `text`, `label` (raw strings), `class_name` (the normalised path, or None if malformed) and
    `split`.
    """

    path: Path
    image_root: Path
    frame: pd.DataFrame
    label_sep: str
    split_source: str  # "catalogue" or "stratified(seed=..., val=..., test=...)"
    sha256: str

    def __len__(self) -> int:
        return len(self.frame)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def csv_records(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(1-based line on which it starts, fields) of every record of a CSV, header and blank lines
    included; quoted newlines are followed, so the line is the one an editor shows."""
    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        reader = csv.reader(fh)
        end = 0
        for record in reader:
            start, end = end + 1, reader.line_num
            yield start, record


def _refuse_extra_fields(path: Path) -> None:
    """Some rows have more fields than the header. Trailing empty fields (a comma at the end of a
    line) are harmless and dropped; a non-empty one means the row's fields are shifted (a text with
    an unquoted comma, say), which would silently misread its label, so refuse naming the lines."""
    bad: list[int] = []
    n_columns: int | None = None  # the header's width
    for line, record in csv_records(path):
        if n_columns is None:
            n_columns = len(record)
        elif any(field.strip() for field in record[n_columns:]):
            bad.append(line)
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise HuseError(f"catalogue {path}: {len(bad)} row(s) have more fields than the header's {n_columns} "
                        f"(CSV line {shown}); a text containing a comma must be quoted, e.g. \"Shirt, blue\"")


def read_catalogue(
    path: str | Path,
    image_root: str | Path | None = None,
    label_sep: str = DEFAULT_LABEL_SEP,
    split_seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
) -> Catalogue:
    """Read and validate a catalogue CSV; fail before any work if its structure is wrong.

    Row-level problems (malformed labels, empty text, bad images) are not errors here: stage one
    skips such rows with a reason. Structural problems (missing file or columns, unknown split
    values) raise `HuseError`.
    """
    path = Path(path)
    if not path.is_file():
        raise HuseError(f"catalogue {path} does not exist (expected a CSV with columns image,text,label[,split])")
    try:
        with warnings.catch_warnings(record=True) as caught:  # rows longer than the header
            warnings.simplefilter("always", pd.errors.ParserWarning)
            # index_col=False: a trailing comma on every row must not turn the first column into the index
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False, index_col=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        if isinstance(exc, pd.errors.ParserError):
            _refuse_extra_fields(path)  # the likely cause, said plainly
        raise HuseError(f"cannot read catalogue {path} as CSV: {exc}") from exc
    if any(issubclass(w.category, pd.errors.ParserWarning) for w in caught):
        _refuse_extra_fields(path)
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise HuseError(
            f"catalogue {path} lacks the required column(s) {', '.join(missing)}; "
            f"it has {', '.join(frame.columns) or 'none'}. Expected: image,text,label and optionally split."
        )
    if len(frame) == 0:
        raise HuseError(f"catalogue {path} has a header but no rows")
    if not label_sep:
        raise HuseError("the label separator must not be empty")

    frame = frame.reset_index(drop=True)
    # object dtype keeps None for malformed labels (pandas >= 3 would infer str and turn None into NaN)
    frame["class_name"] = pd.Series(
        [None if (segs := parse_label(lab, label_sep)) is None else label_sep.join(segs) for lab in frame["label"]],
        index=frame.index,
        dtype=object,
    )

    if "split" in frame.columns:
        split = frame["split"].str.strip().str.lower()
        bad = ~split.isin(SPLITS)
        if bad.any():
            rows = np.flatnonzero(bad.to_numpy())
            examples = ", ".join(f"row {r + 2}: {frame['split'].iat[r]!r}" for r in rows[:5])
            raise HuseError(
                f"catalogue {path}: {len(rows)} row(s) have a split other than train/val/test ({examples}). "
                "Fix them, or drop the split column to get a stratified split."
            )
        frame["split"] = split
        split_source = "catalogue"
    else:
        frame["split"] = stratified_split(frame["class_name"].tolist(), split_seed, val_fraction, test_fraction)
        split_source = f"stratified(seed={split_seed}, val={val_fraction}, test={test_fraction})"

    root = Path(image_root) if image_root is not None else path.parent
    return Catalogue(
        path=path,
        image_root=root,
        frame=frame[["image", "text", "label", "class_name", "split"]],
        label_sep=label_sep,
        split_source=split_source,
        sha256=file_sha256(path),
    )


def stratified_split(
    class_names: list[str | None], seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.1
) -> list[str]:
    """Assign train/val/test per row, stratified by class, deterministically for a given seed.

    Each class is shuffled with its own generator (seeded by `seed` and the class name, so adding
    a class does not reshuffle the others); round(fraction * n) items go to val and to test, at
    least one each when the class has 3 or more items, and the rest to train. Rows whose label
    is malformed (None) get "train"; stage one skips them anyway.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise HuseError("split fractions must be in [0, 1) and sum to less than 1")
    out = np.full(len(class_names), "train", dtype=object)
    by_class: dict[str, list[int]] = {}
    for i, name in enumerate(class_names):
        if name is not None:
            by_class.setdefault(name, []).append(i)
    for name in sorted(by_class):
        rows = np.asarray(by_class[name])
        class_seed = int.from_bytes(hashlib.sha256(f"{seed}\0{name}".encode()).digest()[:8], "little")
        rows = rows[np.random.default_rng(class_seed).permutation(len(rows))]
        n = len(rows)
        n_val, n_test = round(val_fraction * n), round(test_fraction * n)
        if n >= 3:
            n_val, n_test = max(n_val, 1 if val_fraction > 0 else 0), max(n_test, 1 if test_fraction > 0 else 0)
        n_val = min(n_val, max(n - 1, 0))
        n_test = min(n_test, max(n - 1 - n_val, 0))
        out[rows[:n_test]] = "test"
        out[rows[n_test : n_test + n_val]] = "val"
    return out.tolist()
