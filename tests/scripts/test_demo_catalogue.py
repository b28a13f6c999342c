"""Tests of the bundled demo catalogue generator (huse_pipeline.demo)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scripts.demo import CLASSES, PALETTE, class_counts, make_demo_catalogue

REPO_ROOT = Path(__file__).resolve().parents[2]
COMMITTED_CSV = REPO_ROOT / "data" / "catalogue.csv"


def _read_rows(csv_path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_catalogue(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_catalogue(tmp_path_factory.mktemp("demo"), seed=0, n_items=40)


def test_generation_is_byte_identical(tmp_path: Path, small_catalogue: Path) -> None:
    again = make_demo_catalogue(tmp_path, seed=0, n_items=40)
    first, second = _tree_bytes(small_catalogue.parents[1]), _tree_bytes(again.parents[1])
    assert len(first) == 41  # 40 images + the CSV
    assert first.keys() == second.keys()
    for name in first:
        assert first[name] == second[name], f"{name} differs between two runs"


def test_other_seed_gives_other_catalogue(tmp_path: Path, small_catalogue: Path) -> None:
    other = make_demo_catalogue(tmp_path, seed=1, n_items=40)
    assert other.read_bytes() != small_catalogue.read_bytes()


def test_csv_structure_and_images(small_catalogue: Path) -> None:
    columns, rows = _read_rows(small_catalogue)
    assert columns == ["image", "text", "label"]
    assert len(rows) == 40
    labels = {r["label"] for r in rows}
    assert len(labels) >= 12
    assert len({r["image"] for r in rows}) == len(rows)
    for r in rows:
        levels = r["label"].split("<")
        assert len(levels) == 3 and all(levels), r["label"]
        assert r["label"] == r["label"].lower()
        assert 3 <= len(r["text"].split()) <= 12, r["text"]
        assert r["image"].startswith("../images/") and r["image"].endswith(".jpg")
        path = small_catalogue.parent / r["image"]  # paths resolve against the CSV's folder
        with Image.open(path) as im:
            assert im.format == "JPEG"
            assert im.mode == "RGB"
            assert 160 <= im.width <= 200 and 160 <= im.height <= 200


def test_class_table() -> None:
    labels = [c.label for c in CLASSES]
    assert len(set(labels)) == len(labels) >= 12
    parents = [label.rsplit("<", 1)[0] for label in labels]
    tops = [label.split("<")[0] for label in labels]
    # the hierarchy matters: some classes are siblings, some only cousins, some unrelated
    assert len(set(parents)) < len(labels)
    assert len(set(tops)) < len(set(parents))
    assert len(set(tops)) >= 3
    for c in CLASSES:
        assert set(c.colours) <= set(PALETTE), c.label


def test_class_counts() -> None:
    assert class_counts(300) == [c.weight for c in CLASSES]
    for n in (16, 40, 123, 301):
        counts = class_counts(n)
        assert sum(counts) == n and min(counts) >= 1
    with pytest.raises(ValueError):
        class_counts(len(CLASSES) - 1)


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def test_committed_catalogue_matches_generator(tmp_path: Path) -> None:
    fresh = make_demo_catalogue(tmp_path)  # default arguments, as the script uses
    assert fresh.read_bytes() == COMMITTED_CSV.read_bytes(), (
        "data/catalogue.csv is stale: rerun scripts/make_demo_catalogue.py")
    _, rows = _read_rows(COMMITTED_CSV)
    for r in rows[:5] + rows[-3:]:
        committed, regenerated = COMMITTED_CSV.parent / r["image"], fresh.parent / r["image"]
        # compare decoded pixels, not JPEG bytes: encoders of other libjpeg versions differ slightly
        a, b = _pixels(committed), _pixels(regenerated)
        assert a.shape == b.shape and np.abs(a - b).mean() < 2.0, (
            f"{r['image']} differs from the generator's output: rerun scripts/make_demo_catalogue.py")


def test_committed_catalogue_content() -> None:
    columns, rows = _read_rows(COMMITTED_CSV)
    assert columns == ["image", "text", "label"]
    assert len(rows) == 300
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["label"]] = counts.get(r["label"], 0) + 1
        assert (COMMITTED_CSV.parent / r["image"]).is_file(), r["image"]
        # the title names a colour of the palette (the colour the picture was drawn in)
        assert any(name.title() in r["text"] for name in PALETTE), r["text"]
    assert len(counts) >= 12
    assert min(counts.values()) >= 6
