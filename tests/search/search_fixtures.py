"""Fixtures of the search tests, built once per session in tmp folders:

* `synthetic_run`: a clustered synthetic feature file (6 classes in 3 levels, with the semantic
  graph), a run trained on it by `huse train`'s library function, and its index;
* `stub_demo`: the bundled demo catalogue copied, extracted with the stub encoders, trained briefly
  and evaluated through the CLI, then indexed (`huse index`).
"""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import cli
from huse_pipeline.data.hierarchy import Hierarchy
from huse_pipeline.extract.graph import tree_graph
from huse_pipeline.store import features

REPO = Path(__file__).resolve().parents[2]
NAMES = ["apparel<bottomwear<jeans", "apparel<topwear<shirts", "apparel<topwear<tshirts",
         "footwear<sandal<sandals", "footwear<shoes<boots", "footwear<shoes<sneakers"]
PER_SPLIT = {"train": 30, "val": 8, "test": 8}
TINY_TRAIN = {"epochs": 12, "batch_size": 64, "embed_dim": 16, "hidden_dim": 32, "image_layers": 1, "text_layers": 1,
              "image_input_dropout": 0.0, "device": "cpu"}


def write_clustered(path: Path, root: Path, swap: list[int] | None = None, seed: int = 0) -> tuple[list[str], list[str]]:
    """A feature file of clustered image (12-d) and text (10-d) features; every other item has an image
    file. `swap`: items whose labels are exchanged in pairs (labelled wrongly on purpose). Returns the
    true and the given class path of every item."""
    rng = np.random.default_rng(seed)
    c = len(NAMES)
    img_centre, txt_centre = rng.normal(size=(c, 12)), rng.normal(size=(c, 10))
    rows = [(k, s) for s, n in PER_SPLIT.items() for k in range(c) for _ in range(n)]
    cls = np.array([k for k, _ in rows])
    image = (img_centre[cls] + 0.6 * rng.normal(size=(len(rows), 12))).astype(np.float32)
    text = (txt_centre[cls] + 0.6 * rng.normal(size=(len(rows), 10))).astype(np.float32)
    true = [NAMES[k] for k in cls]
    given = list(true)
    for a, b in zip((swap or [])[::2], (swap or [])[1::2]):
        given[a], given[b] = true[b], true[a]
    (root / "images").mkdir(parents=True, exist_ok=True)
    from PIL import Image

    for i in range(0, len(rows), 2):
        Image.new("RGB", (40, 40), tuple(int(v) for v in (30 * cls[i] % 255, 100, 200))).save(root / "images" / f"{i}.png")
    features.write_synthetic(path, image, text, given, [s for _, s in rows], attrs={"image_root": str(root)},
                             image_path=[f"images/{i}.png" for i in range(len(rows))],
                             text=[f"{true[i].split('<')[-1]} item {i}" for i in range(len(rows))])
    hierarchy = Hierarchy(tuple(features.read_class_names(path)))
    tree = hierarchy.tree_distance()
    features.write_graph(path, tree_graph(tree), tree, hierarchy.nodes, {"method": "tree"})
    return true, given


@contextlib.contextmanager
def one_thread():
    """Tiny models train faster on one thread (and far faster on a shared machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_run(feats: Path, run: Path, **overrides) -> Path:
    from huse_pipeline.train.config import make_config
    from huse_pipeline.train.loop import train

    with one_thread():
        train(feats, make_config("default", **{**TINY_TRAIN, **overrides}), run, progress=False)
    return run


@pytest.fixture(scope="session")
def synthetic_run(tmp_path_factory) -> dict[str, Path]:
    from huse_pipeline.search.index import IndexConfig, build_index

    root = tmp_path_factory.mktemp("search_synthetic")
    feats = root / "feats.h5"
    write_clustered(feats, root)
    run = train_run(feats, root / "runs" / "r1")
    build_index(IndexConfig(run=str(run), features=str(feats), device="cpu"))
    return {"root": root, "features": feats, "run": run, "index": run / "index"}


def invoke(*args: str) -> str:
    result = CliRunner().invoke(cli.main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, f"huse {' '.join(args)} failed:\n{result.output}"
    return result.output


def copy_demo(dest: Path) -> Path:
    """The bundled demo catalogue and its images under `dest` (paths made relative to the copy)."""
    import pandas as pd

    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / "images", dest / "images")
    frame = pd.read_csv(REPO / "data" / "catalogue.csv", dtype=str, keep_default_na=False)
    frame["image"] = ["images/" + Path(p).name for p in frame["image"]]
    frame.to_csv(dest / "catalogue.csv", index=False)
    return dest / "catalogue.csv"


@pytest.fixture(scope="session")
def stub_demo(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("search_demo")
    catalogue = copy_demo(root / "demo")
    feats, run = stub_pipeline(root, catalogue, evaluate=True)
    return {"root": root, "catalogue": catalogue, "features": feats, "run": run, "index": run / "index"}


def stub_pipeline(root: Path, catalogue: Path, evaluate: bool = False) -> tuple[Path, Path]:
    """Stage one with stub encoders, the graph, 8 epochs of training, (eval,) and the index, in `root`:
    (feature file, run folder)."""
    feats, run = root / "feats.h5", root / "runs" / "demo"
    with one_thread():
        invoke("extract-features", "--catalogue", str(catalogue), "--out", str(feats), "--image-encoder", "stub",
               "--text-encoder", "stub", "--num-workers", "0", "--device", "cpu")
        invoke("build-graph", "--features", str(feats), "--device", "cpu")
        invoke("train", "--features", str(feats), "--out", str(run), "--epochs", "8", "--device", "cpu")
        if evaluate:
            invoke("eval", "--run", str(run), "--device", "cpu")
        invoke("index", "--run", str(run), "--device", "cpu")
    return feats, run
