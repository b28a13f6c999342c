"""Read a product catalogue: a CSV with columns `image,text,label` and an optional `split`.

Labels are class paths (`apparel<topwear<tshirts`, `kitchen<mugs` or a flat `mugs`). Without a
`split` column a deterministic split, stratified by class, is made here and recorded by stage one.
A catalogue is data from elsewhere: rows that must not be used (an image outside the image root,
a NUL byte, a malformed label) are refused here with a reason, before any file is opened, and
duplicate rows (same image file, same text) are kept in one split and reported.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import logging
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from huse_pipeline.data.text import MAX_TEXT_CHARS, normalise_text
from huse_pipeline.errors import HuseError

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("image", "text", "label")
SPLITS = ("train", "val", "test")
DEFAULT_LABEL_SEP = "<"
_SPACES = re.compile(r"\s+")
MAX_LABEL_CHARS = 1_000  # a class path longer than this is refused (it would be a class name everywhere)
MAX_IMAGE_PATH_CHARS = 4_096  # PATH_MAX on Linux
OUTSIDE_ROOT = "image outside --image-root (pass --allow-outside-root to read it)"


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
    `text`, `label` (raw strings; a NUL byte is shown as U+FFFD), `class_name` (the normalised
    path, or None if the row is refused), `split` and `reason` ("" or why the row is refused
    before any file is read: see `ROW_CHECKS`). `duplicates` summarises rows that share an image
    file and a text (`find_duplicates`).
    """

    path: Path
    image_root: Path
    frame: pd.DataFrame
    label_sep: str
    split_source: str  # "catalogue" or "stratified(seed=..., val=..., test=...)"
    sha256: str
    allow_outside_root: bool = False
    duplicates: dict = field(default_factory=dict)

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
    with open(path, newline="", encoding="utf-8", errors="replace") as fh, _no_csv_field_limit():
        reader = csv.reader(line.replace("\0", "\ufffd") for line in fh)  # Python 3.10's csv refuses a NUL
        end = 0
        for record in reader:
            start, end = end + 1, reader.line_num
            yield start, record


@contextlib.contextmanager
def _no_csv_field_limit() -> Iterator[None]:
    """The csv module refuses fields over 131,072 characters (`_csv.Error`); pandas reads any. A
    long field is a row-level matter (a text too long is skipped with its reason), so lift it."""
    saved = csv.field_size_limit()
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    try:
        yield
    finally:
        csv.field_size_limit(saved)


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


def resolve_image(root: str | Path, image: str, allow_outside_root: bool = False) -> tuple[str | None, str]:
    """(the path to open, "") for a catalogue's image field, or (None, why it must not be opened).

    `image` is relative to `root` (or absolute). Its real path, with every symlink and `..`
    followed (`os.path.realpath`), must lie inside the real `root` unless `allow_outside_root`:
    a catalogue comes from elsewhere, and `/etc/passwd`, `../../secret.jpg` or a symlink out of
    the root must not be read because a row names them.
    """
    if "\0" in image:
        return None, "NUL byte in image path"
    if len(image) > MAX_IMAGE_PATH_CHARS:
        return None, f"image path too long ({len(image):,} characters > {MAX_IMAGE_PATH_CHARS:,})"
    path = str(Path(root) / image)
    if allow_outside_root:
        return path, ""
    try:
        real_root, real = os.path.realpath(root), os.path.realpath(path)
        inside = os.path.commonpath([real_root, real]) == real_root
    except (OSError, ValueError) as exc:  # a symlink loop, a name the OS refuses
        return None, f"unusable image path ({getattr(exc, 'strerror', None) or exc})"
    return (path, "") if inside else (None, OUTSIDE_ROOT)


def _row_reason(image: str, text: str, label: str, class_name: str | None, root: Path,
                allow_outside_root: bool) -> str:
    """Why a row is refused before any of its files is read, or "" (see `ROW_CHECKS`)."""
    for name, value in (("image path", image), ("text", text), ("label", label)):
        if "\0" in value:  # HDF5 cannot store it, and no real text, label or file name holds one
            return f"NUL byte in {name}"
    if len(label) > MAX_LABEL_CHARS:
        return f"label too long ({len(label):,} characters > {MAX_LABEL_CHARS:,})"
    if class_name is None:
        return "malformed label"
    return resolve_image(root, image, allow_outside_root)[1]


ROW_CHECKS = (
    "NUL byte in image path / text / label",
    f"label too long (over {MAX_LABEL_CHARS:,} characters)",
    "malformed label (empty, or an empty level such as a<<b)",
    "image outside --image-root (absolute, `..` or symlinked out of it; --allow-outside-root reads it)",
    f"image path too long (over {MAX_IMAGE_PATH_CHARS:,} characters), unusable image path",
)


def read_catalogue(
    path: str | Path,
    image_root: str | Path | None = None,
    label_sep: str = DEFAULT_LABEL_SEP,
    split_seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    allow_outside_root: bool = False,
    report_duplicates: bool = True,
) -> Catalogue:
    """Read and validate a catalogue CSV; fail before any work if its structure is wrong.

    Row-level problems are not errors: rows that must not be used at all (`ROW_CHECKS`: a NUL
    byte, a malformed label, an image outside `image_root` unless `allow_outside_root`) get a
    `reason` here, before any image is opened; the rest (bad images, empty or too long texts) are
    found by stage one. Every such row is skipped with its reason. Structural problems (missing
    file or columns, unknown split values) raise `HuseError`. Duplicate rows (`find_duplicates`)
    are kept in one split when the split is made here, and logged as a warning when
    `report_duplicates`.
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
    root = Path(image_root) if image_root is not None else path.parent
    class_name = [None if (segs := parse_label(lab, label_sep)) is None else label_sep.join(segs) for lab in frame["label"]]
    reason = [_row_reason(*row, root, allow_outside_root)
              for row in zip(frame["image"], frame["text"], frame["label"], class_name)]
    class_name = [None if r else c for c, r in zip(class_name, reason)]  # a refused row has no class
    # object dtype keeps None for refused rows (pandas >= 3 would infer str and turn None into NaN)
    frame["class_name"] = pd.Series(class_name, index=frame.index, dtype=object)
    frame["reason"] = pd.Series(reason, index=frame.index, dtype=object)
    for col in ("image", "text", "label"):  # stored with the skipped rows: HDF5 cannot hold a NUL
        frame[col] = frame[col].str.replace("\0", "\ufffd", regex=False)
    groups = duplicate_groups(frame, root)

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
        frame["split"] = stratified_split(frame["class_name"].tolist(), split_seed, val_fraction, test_fraction,
                                          groups=groups)
        split_source = f"stratified(seed={split_seed}, val={val_fraction}, test={test_fraction})"

    duplicates = find_duplicates(frame, groups)
    if report_duplicates and duplicates["groups"]:
        _log_duplicates(path, duplicates, split_source)
    return Catalogue(
        path=path,
        image_root=root,
        frame=frame[["image", "text", "label", "class_name", "split", "reason"]],
        label_sep=label_sep,
        split_source=split_source,
        sha256=file_sha256(path),
        allow_outside_root=allow_outside_root,
        duplicates=duplicates,
    )


# ------------------------------------------------------------------------------- duplicates


def duplicate_groups(frame: pd.DataFrame, root: Path) -> list[int]:
    """Per row, the first row with the same image FILE (its real path: `a.jpg`, `./a.jpg` and a
    symlink to it are one file) and the same normalised text (`normalise_text`); the row itself
    if there is none. Rows that will be skipped anyway (a `reason`, an empty or too long text)
    are their own group."""
    first: dict[tuple[str, str], int] = {}
    out = []
    for i, (image, text, reason) in enumerate(zip(frame["image"], frame["text"], frame["reason"])):
        clean = "" if reason or len(text) > MAX_TEXT_CHARS else normalise_text(text)
        if not clean:
            out.append(i)
            continue
        try:
            real = os.path.realpath(root / image)
        except (OSError, ValueError):
            real = str(root / image)
        out.append(first.setdefault((real, clean), i))
    return out


def find_duplicates(frame: pd.DataFrame, groups: list[int], n_examples: int = 5) -> dict:
    """Summary of the duplicate groups: how many, their rows, how many span several splits (the
    same product in train and test) or several labels, and a few examples."""
    members: dict[int, list[int]] = {}
    for row, g in enumerate(groups):
        members.setdefault(g, []).append(row)
    dups = [rows for rows in members.values() if len(rows) > 1]
    split, label = frame["split"].tolist(), frame["class_name"].tolist()
    across = [rows for rows in dups if len({split[r] for r in rows}) > 1]
    conflicting = [rows for rows in dups if len({label[r] for r in rows}) > 1]
    shown = (across + [r for r in dups if r not in across])[:n_examples]
    examples = [f"rows {', '.join(map(str, rows[:6]))}{' ...' if len(rows) > 6 else ''} (image {frame['image'].iat[rows[0]]!r}): "
                f"splits {', '.join(split[r] for r in rows[:6])}" for rows in shown]
    return {"groups": len(dups), "rows": sum(map(len, dups)), "across_splits": len(across),
            "conflicting_labels": len(conflicting), "examples": examples}


def _log_duplicates(path: Path, d: dict, split_source: str) -> None:
    where = ("kept in one split each" if split_source != "catalogue" else
             f"{d['across_splits']} of them in more than one split of the CSV's split column "
             "(the same product in training and evaluation)" if d["across_splits"] else "each within one split")
    log.warning("catalogue %s: %d row(s) are duplicates (same image file and text) in %d group(s), %s%s; they are "
                "all used", path, d["rows"], d["groups"], where,
                f"; {d['conflicting_labels']} group(s) have different labels" if d["conflicting_labels"] else "")
    for example in d["examples"]:
        log.warning("  e.g. %s", example)


def stratified_split(
    class_names: list[str | None], seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.1,
    groups: list[int] | None = None,
) -> list[str]:
    """Assign train/val/test per row, stratified by class, deterministically for a given seed.

    Each class is shuffled with its own generator (seeded by `seed` and the class name, so adding
    a class does not reshuffle the others); round(fraction * n) items go to val and to test, at
    least one each when the class has 3 or more items, and the rest to train (never empty). Rows
    whose label is malformed (None) get "train"; stage one skips them anyway.

    `groups` (a group id per row, e.g. `duplicate_groups`): rows of one group always get the same
    split. The class's groups are shuffled instead of its rows and go to test, then val, while
    those are short of their counts (so a group may overshoot by its size); a group whose rows
    have several classes follows its first row. Without duplicates this is the row-wise split.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise HuseError("split fractions must be in [0, 1) and sum to less than 1")
    groups = list(range(len(class_names))) if groups is None else list(groups)
    out = np.full(len(class_names), "train", dtype=object)
    by_class: dict[str, dict[int, list[int]]] = {}  # class -> group -> rows, in row order
    for i, name in enumerate(class_names):
        if name is not None:
            by_class.setdefault(name, {}).setdefault(groups[i], []).append(i)
    for name in sorted(by_class):
        units = list(by_class[name].values())
        class_seed = int.from_bytes(hashlib.sha256(f"{seed}\0{name}".encode()).digest()[:8], "little")
        units = [units[k] for k in np.random.default_rng(class_seed).permutation(len(units))]
        n = sum(map(len, units))
        n_val, n_test = round(val_fraction * n), round(test_fraction * n)
        if n >= 3:
            n_val, n_test = max(n_val, 1 if val_fraction > 0 else 0), max(n_test, 1 if test_fraction > 0 else 0)
        n_val = min(n_val, max(n - 1, 0))
        n_test = min(n_test, max(n - 1 - n_val, 0))
        k = 0
        for split, target in (("test", n_test), ("val", n_val)):
            taken = 0
            while taken < target and len(units) - k > 1:  # the last group stays in train
                out[units[k]] = split
                taken += len(units[k])
                k += 1
    first_split: dict[int, str] = {}
    for i, g in enumerate(groups):  # a group spread over several classes: its first row's split
        if class_names[i] is not None:
            out[i] = first_split.setdefault(g, out[i])
    return out.tolist()
