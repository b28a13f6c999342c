"""bench/sweep_val.py --summarise: runs of one configuration from several logs join into one row."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "sweep_val.py"


@pytest.fixture(scope="module")
def sweep_val():
    spec = importlib.util.spec_from_file_location("sweep_val", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(sweep_val, seed: int, options: dict, value: float, features: str = "f.h5", seconds=None) -> dict:
    run = {"features": features, "options": options, "seed": seed, **{k: value for k in sweep_val.COLUMNS}}
    return run if seconds is None else {**run, "seconds": seconds}


def test_table_row_gives_mean_and_half_range(sweep_val):
    runs = [{k: v for k in sweep_val.COLUMNS} for v in (0.8, 0.9, 1.0)]
    runs[1]["txt2img/severity"] = None  # no wrong query: left out of that column's mean
    cells = [c.strip() for c in sweep_val.table_row("x", runs, 12.4).split("|")[1:-1]]
    assert cells[0] == "x" and cells[-1] == "12"
    assert cells[1] == "0.900 ±0.100"
    assert cells[1 + sweep_val.COLUMNS.index("txt2img/severity")] == "0.900 ±0.100"
    single = [c.strip() for c in sweep_val.table_row("y", runs[:1], None).split("|")[1:-1]]
    assert single[1] == "0.800" and single[-1] == ""


def test_summarise_joins_seeds_across_logs_and_keeps_configs_apart(sweep_val, tmp_path, capsys):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("\n".join(json.dumps(r) for r in [
        _run(sweep_val, 0, {"beta": 0.1, "margin_rule": "or"}, 0.5, seconds=10.0),
        _run(sweep_val, 1, {"beta": 0.1, "margin_rule": "or"}, 0.7, seconds=99.0),
        _run(sweep_val, 0, {}, 0.2)]) + "\n")
    # same options written in another key order, a third seed, and a repeated seed 1 that replaces the first
    b.write_text("\n".join(json.dumps(r) for r in [
        _run(sweep_val, 2, {"margin_rule": "or", "beta": 0.1}, 0.9),  # an untimed (older) run
        _run(sweep_val, 1, {"margin_rule": "or", "beta": 0.1}, 0.6, seconds=20.0),
        _run(sweep_val, 0, {}, 0.4, features="g.h5")]) + "\n")
    sweep_val.summarise([str(a), str(b)])
    rows = [line for line in capsys.readouterr().out.splitlines()[2:]]
    assert len(rows) == 3
    cells = [[c.strip() for c in row.split("|")[1:-1]] for row in rows]
    or_row = next(c for c in cells if "margin_rule" in c[1])
    assert or_row[2] == "0 1 2"
    assert or_row[3] == "0.667 ±0.200"  # mean of 0.5, 0.6, 0.9
    assert or_row[-1] == "15"  # mean of the timed runs kept (10 and 20; the replaced 99 is gone)
    assert all(c[-1] == "" for c in cells if c[1] == "`{}`")  # no run timed: left empty
    assert {(c[0], c[3]) for c in cells if c[1] == "`{}`"} == {("`f.h5`", "0.200"), ("`g.h5`", "0.400")}
