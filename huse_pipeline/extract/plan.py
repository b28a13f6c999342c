"""Stage one's plan: the fixed row ranges (parts) a catalogue is cut into, their batches, and where
their files live. Part boundaries depend only on the row count and `--part-rows`, never on who runs them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from huse_pipeline.data.catalogue import csv_records
from huse_pipeline.errors import HuseError


def plan_parts(n_rows: int, part_rows: int) -> list[tuple[int, int]]:
    """Fixed row ranges [start, end) covering 0..n_rows: the shards, unit of resumption and of the
    work shared by many processes (`distributed.claim_order`); they never depend on who runs them."""
    if part_rows < 1:
        raise HuseError("--part-rows must be at least 1")
    return [(start, min(start + part_rows, n_rows)) for start in range(0, n_rows, part_rows)]


def plan_batches(parts: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Fixed batch boundaries: each part is cut into batches from its own start, so a part's
    batches (and hence its numbers) are the same whichever parts run before it."""
    return [list(range(b, min(b + batch_size, end))) for start, end in parts for b in range(start, end, batch_size)]


def parts_folder(out: str | Path) -> Path:
    """Where the part files of `out` live while a run is unfinished: `<out>.parts/`."""
    out = Path(out)
    return out.with_name(out.name + ".parts")


def part_path(folder: Path, start: int, end: int) -> Path:
    return folder / f"part-{start:09d}-{end:09d}.h5"


def claim_path(folder: Path, start: int, end: int) -> Path:
    """The lock file a process holds while it computes the shard [start, end)."""
    return folder / f".claim-{start:09d}-{end:09d}"


def csv_line_numbers(path: Path, n_rows: int) -> list[int]:
    """1-based line of the CSV on which each data row starts (quoted newlines taken into account).

    Falls back to row + 2 when the csv module and pandas disagree on the number of rows.
    """
    lines = [line for line, record in csv_records(path)
             if len(record) > 1 or (record and record[0].strip())]  # pandas skips blank lines only, not ",,"
    lines = lines[1:]  # the header
    return lines if len(lines) == n_rows else [r + 2 for r in range(n_rows)]


