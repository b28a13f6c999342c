"""bench/swap_image_features.py: the copy holds the requested image features, row for row, and
everything else of the source; bad input is one line, not a traceback."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from huse_pipeline.store import features

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "swap_image_features.py"


def _swap(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


def test_swapped_copy_has_new_columns_then_old_ones(tmp_path):
    rng = np.random.default_rng(0)
    n = 12
    image, text = rng.normal(size=(n, 5)).astype(np.float32), rng.normal(size=(n, 3)).astype(np.float32)
    labels = [f"a<{'xy'[i % 2]}" for i in range(n)]
    splits = ["train"] * 8 + ["val"] * 2 + ["test"] * 2
    src, dst = tmp_path / "src.h5", tmp_path / "dst.h5"
    features.write_synthetic(src, image, text, labels, splits)
    new = rng.normal(size=(n, 2)).astype(np.float32)
    np.save(tmp_path / "new.npy", new)

    done = _swap(str(src), str(dst), str(tmp_path / "new.npy"), "old:1:4")
    assert done.returncode == 0, done.stderr
    before, after = features.read_features(src), features.read_features(dst)
    expected = np.concatenate([new[before.row], before.image_emb[:, 1:4]], axis=1)
    np.testing.assert_array_equal(after.image_emb, expected)
    np.testing.assert_array_equal(after.text_emb, before.text_emb)
    np.testing.assert_array_equal(after.labels, before.labels)
    attrs = features.read_attrs(dst)
    assert attrs["image_dim"] == 5 and attrs["settings_fingerprint"].startswith("swapped:")
    assert attrs["image_features_swapped"]["parts"] == [str(tmp_path / "new.npy"), "old:1:4"]

    again = _swap(str(src), str(dst), "old:0:5")  # never overwrites
    assert again.returncode != 0 and "exists" in again.stderr and "Traceback" not in again.stderr
    bad = _swap(str(src), str(tmp_path / "d2.h5"), "old:0:6")
    assert bad.returncode != 0 and "5 image feature columns" in bad.stderr and not (tmp_path / "d2.h5").exists()
    short = rng.normal(size=(n - 1, 2))
    np.save(tmp_path / "short.npy", short)
    bad = _swap(str(src), str(tmp_path / "d3.h5"), str(tmp_path / "short.npy"))
    assert bad.returncode != 0 and "one row per catalogue row" in bad.stderr
