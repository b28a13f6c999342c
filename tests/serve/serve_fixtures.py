"""Fixtures and constants of the `huse serve` tests (conftest.py registers the fixtures), built once
per session: the bundled demo catalogue with hostile and overlong titles (markup, an unbroken
70-letter word, very long descriptions), extracted with the stub encoders, trained briefly and
indexed through the CLI; its Space; a TestClient over the app."""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "search"))  # the search tests' helpers

from search_fixtures import copy_demo, stub_pipeline

HOSTILE = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2"> Tom & "Jerry" <b>Mug</b>'
LONG_WORD = "Super" + "califragilistic" * 4 + "Mug"
LONG_TEXT = (" with an extraordinarily long description that goes on and on about the fabric, the fit, the "
             "colour, the washing instructions and the country of origin")
UPLOAD_CAP = 200_000  # bytes: the TestClient's app refuses larger uploads
PIXEL_CAP = 1_000_000


def hostile_titles(frame: pd.DataFrame) -> dict[str, list[int]]:
    """Rewrite some titles in place; returns the catalogue rows of each kind."""
    rows = {"hostile": list(range(0, len(frame), 25)), "long_word": list(range(7, len(frame), 20)),
            "long_text": list(range(3, len(frame), 3))}
    for i in rows["long_text"]:
        frame.loc[i, "text"] = frame.loc[i, "text"] + LONG_TEXT
    for i in rows["long_word"]:
        frame.loc[i, "text"] = f"{LONG_WORD} {frame.loc[i, 'text']}"
    for i in rows["hostile"]:
        frame.loc[i, "text"] = f"{HOSTILE} {frame.loc[i, 'text']}"
    return rows


@pytest.fixture(scope="session")
def serve_demo(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("serve_demo")
    catalogue = copy_demo(root / "demo")
    frame = pd.read_csv(catalogue, dtype=str, keep_default_na=False)
    rows = hostile_titles(frame)
    frame.to_csv(catalogue, index=False)
    feats, run = stub_pipeline(root, catalogue)
    return {"root": root, "catalogue": catalogue, "frame": frame, "rows": rows, "features": feats, "run": run}


@pytest.fixture(scope="session")
def space(serve_demo):
    from huse_pipeline.search.space import Space

    return Space.load(serve_demo["run"], serve_demo["features"], device="cpu")


@pytest.fixture(scope="session")
def client(space):
    from fastapi.testclient import TestClient

    from huse_pipeline.serve.app import create_app

    with TestClient(create_app(space, max_upload_bytes=UPLOAD_CAP, max_pixels=PIXEL_CAP)) as c:
        yield c
