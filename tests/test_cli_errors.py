"""What a new user meets first: a wrong path or value is reported as one `Error: ...` line, before
torch (or anything that imports it) is loaded. Each case runs `huse` in a fresh Python process,
which then says whether torch was imported."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cli
from huse_pipeline.store import features

REPO = Path(cli.__file__).resolve().parent
PROBE = """
import sys
import cli
try:
    cli.main(sys.argv[1:], prog_name="huse")
    code = 0
except SystemExit as exc:
    code = exc.code
print(f"exit={code} torch={'torch' in sys.modules}")
"""


def huse(cwd: Path, *args: str) -> tuple[int, str, bool]:
    """(exit code, the Error line, whether torch was imported) of `huse ARGS` run in `cwd`."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, proc.stderr  # one line says what is wrong
    exit_line = proc.stdout.strip().splitlines()[-1]
    code, torch = exit_line.split()
    return int(code.removeprefix("exit=")), errors[0], torch == "torch=True"


def _feature_file(path: Path, graph: bool) -> Path:
    rng = np.random.default_rng(0)
    names = ["a<b", "a<c", "d"] * 2
    features.write_synthetic(path, rng.normal(size=(6, 3)).astype("f4"), rng.normal(size=(6, 2)).astype("f4"),
                             names, ["train", "train", "train", "val", "val", "test"], attrs={"text_encoder": "stub"})
    if graph:
        features.write_graph(path, np.zeros((3, 3), np.float32), np.zeros((3, 3), np.int64), ["a", "a<b", "a<c", "d"],
                             {"method": "tree"})
    return path


@pytest.fixture()
def workdir(tmp_path):
    """An empty folder (no cache/, no data/) with a few prepared mistakes in it."""
    (tmp_path / "nolabel.csv").write_text("image,text\nimages/1.jpg,a shirt\n")
    (tmp_path / "ok.csv").write_text("image,text,label\nimages/1.jpg,a shirt,apparel<shirts\n")
    (tmp_path / "junk.h5").write_bytes(b"not an HDF5 file")
    (tmp_path / "not-a-run").mkdir()
    _feature_file(tmp_path / "nograph.h5", graph=False)
    _feature_file(tmp_path / "graph.h5", graph=True)
    run = tmp_path / "old-run"  # a finished run whose config names a feature file that is gone
    run.mkdir()
    for name in ("best.pt", "last.pt"):
        (run / name).write_bytes(b"")
    (run / "config.json").write_text('{"features": "gone.h5", "train": {}}')
    return tmp_path


CASES = [
    # (arguments, exit code, what the Error line must contain)
    (["extract-features", "--catalogue", "missing.csv"], 1, "catalogue missing.csv does not exist"),
    (["extract-features", "--catalogue", "nolabel.csv"], 1, "lacks the required column(s) label"),
    (["extract-features", "--catalogue", "ok.csv", "--image-root", "no-such-folder"], 1,
     "--image-root no-such-folder is not a folder"),
    (["extract-features", "--catalogue", "ok.csv", "--image-encoder", "resnet50", "--image-weights", "missing.pth"], 1,
     "--image-weights missing.pth is not a file"),
    (["extract-features", "--catalogue", "ok.csv", "--image-encoder", "resnet51"], 2, "unknown image encoder 'resnet51'"),
    (["build-graph"], 1, "feature file cache/feats.h5 does not exist: run `huse extract-features"),
    (["build-graph", "--features", "missing.h5"], 1, "feature file missing.h5 does not exist"),
    (["build-graph", "--features", "junk.h5"], 1, "junk.h5 is not a readable HDF5 feature file"),
    (["train"], 1, "feature file cache/feats.h5 does not exist"),
    (["train", "--features", "missing.h5"], 1, "feature file missing.h5 does not exist"),
    (["train", "--features", "nograph.h5"], 1, "nograph.h5 has no semantic graph: run `huse build-graph"),
    (["train", "--features", "graph.h5", "--out", "old-run"], 1, "old-run already holds a run: add --resume"),
    (["train", "--resume"], 2, "--resume needs --out"),
    (["train", "--resume", "--out", "not-a-run"], 1, "not-a-run holds no run to resume"),
    (["train", "--resume", "--out", "old-run"], 1, "feature file gone.h5 does not exist"),
    (["eval"], 1, "no run with a best.pt under cache/runs/: train one with `huse train`"),
    (["eval", "--run", "not-a-run"], 1, "not-a-run has no best.pt"),
    (["eval", "--checkpoint", "missing.pt"], 1, "checkpoint missing.pt does not exist"),
    (["eval", "--run", "old-run", "--checkpoint", "old-run/best.pt"], 1, "either --run or --checkpoint"),
    (["eval", "--run", "old-run"], 1, "feature file cache/feats.h5 does not exist"),  # the run's own file is gone
    (["eval", "--run", "old-run", "--features", "junk.h5"], 1, "junk.h5 is not a readable HDF5 feature file"),
]


@pytest.mark.parametrize("args, exit_code, message", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_mistakes_are_reported_before_torch_is_imported(workdir, args, exit_code, message):
    code, error, torch_imported = huse(workdir, *args)
    assert message in error
    assert code == exit_code
    assert not torch_imported, f"`huse {' '.join(args)}` imported torch before reporting: {error}"


def test_valid_input_goes_past_the_checks(workdir):
    """The probe can see torch being imported: a command that passes its checks loads it (here build-graph
    on a good file stops at the unknown text encoder, which only the encoder loader can tell)."""
    code, error, torch_imported = huse(workdir, "build-graph", "--features", "graph.h5", "--text-encoder",
                                       str(workdir / "no-such-model"), "--device", "cpu")
    assert code == 1 and torch_imported, error
