"""The run folder of `huse train`: config.json, metrics.jsonl, best.pt, last.pt and curves.png.
A folder to resume is checked first (its config.json field by field, its last.pt), and temporary
files a killed run left in it are removed.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from huse_pipeline import __version__
from huse_pipeline.errors import HuseError
from huse_pipeline.store.features import FeatureSet
from huse_pipeline.runs import read_run_config
from huse_pipeline.train.config import RUNS_ROOT, TrainConfig
from huse_pipeline.train.curves import training_curves
from huse_pipeline.train.model import (
    ModelConfig,
    feature_meta,
    load_checkpoint,
)
from huse_pipeline.utils import atomic_path, remove_stale_temps

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------ run folder


class _Run:
    """The run folder: config.json, metrics.jsonl, best.pt, last.pt, curves.png (the README's stage-two section)."""

    def __init__(self, path: Path) -> None:
        self.dir = path
        self.best, self.last = path / "best.pt", path / "last.pt"
        self.metrics, self.config, self.curves = path / "metrics.jsonl", path / "config.json", path / "curves.png"
        self._written = 0
        self._plotted = -math.inf
        remove_stale_temps(path)  # .last.pt.<host>-<pid>.*.tmp of an earlier run of this folder that was killed

    def start(self, cfg: TrainConfig, mcfg: ModelConfig, fs: FeatureSet, device: torch.device, key: str) -> None:
        if self.last.is_file():
            raise HuseError(f"{self.dir} already holds a run: add --resume to continue it, or choose another --out")
        self.dir.mkdir(parents=True, exist_ok=True)
        log.info("training into %s", self.dir)
        config = {"train": asdict(cfg), "model": asdict(mcfg), "features": str(Path(fs.path).resolve()),
                  "feature_meta": feature_meta(fs.attrs), "select": key, "device": str(device),
                  "items": {s: int((fs.split == s).sum()) for s in ("train", "val", "test")},
                  "views": None if fs.view_emb is None or not cfg.use_views else list(fs.view_emb.shape),
                  "package_version": __version__, "torch_version": torch.__version__,
                  "created": datetime.now().isoformat(timespec="seconds")}
        with atomic_path(self.config) as tmp:
            tmp.write_text(json.dumps(config, indent=2) + "\n")
        self.rewrite_metrics([])

    def record_resume(self, cfg: TrainConfig) -> None:
        """Keep config.json's "train" section equal to the configuration that is running now."""
        config = json.loads(self.config.read_text())
        config["train"] = asdict(cfg)
        config.setdefault("resumed", []).append(datetime.now().isoformat(timespec="seconds"))
        with atomic_path(self.config) as tmp:
            tmp.write_text(json.dumps(config, indent=2) + "\n")

    def rewrite_metrics(self, history: list[dict[str, Any]]) -> None:
        with atomic_path(self.metrics) as tmp:
            tmp.write_text("".join(json.dumps(row) + "\n" for row in history))
        self._written = len(history)

    def append_metrics(self, history: list[dict[str, Any]]) -> None:
        with open(self.metrics, "a") as fh:
            fh.write("".join(json.dumps(row) + "\n" for row in history[self._written:]))
        self._written = len(history)

    def maybe_plot(self, history: list[dict[str, Any]], key: str, best_epoch: int, force: bool = False) -> None:
        """Redraw curves.png, at most every 10 seconds unless forced."""
        if force or time.perf_counter() - self._plotted > 10:
            plot_curves(history, self.curves, key, best_epoch)
            self._plotted = time.perf_counter()


def plot_curves(history: list[dict[str, Any]], path: str | Path, key: str = "val/acc/mean", best_epoch: int = 0) -> None:
    """curves.png: each loss part and the total, train and val, and validation accuracy per epoch."""
    fig = training_curves(history, best_epoch or None, f"best by {key}")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


# ------------------------------------------------------------------------------ entry points


def new_run_dir(root: str | Path = RUNS_ROOT) -> Path:
    """A fresh folder name root/<YYYYmmdd-HHMMSS>, with -2, -3 ... if it exists (not created)."""
    base = Path(root) / datetime.now().strftime("%Y%m%d-%H%M%S")
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


_JSON_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "int | None": (int, type(None))}


def check_saved_train_config(saved: dict[str, Any], where: str) -> None:
    """Refuse a saved "train" section with unknown keys or values of the wrong type, naming `where`
    (an absent field takes its default, as `TrainConfig.from_saved` gives it; --resume then compares
    the result with the checkpoint's own train_config)."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(saved) - set(fields))
    if unknown:
        raise HuseError(f"{where}: unknown training setting(s) {', '.join(map(repr, unknown[:5]))}; it cannot be resumed")
    for name, value in saved.items():
        types = _JSON_TYPES.get(str(fields[name].type))
        if types is not None and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
            raise HuseError(f"{where}: training setting {name} is {value!r} ({type(value).__name__}), expected "
                            f"{fields[name].type}; it cannot be resumed")


def resume_config(run_dir: str | Path, overrides: dict[str, Any] | None = None) -> tuple[str, TrainConfig]:
    """The feature path and TrainConfig of an existing run, with `overrides` applied. Refuses, with
    one line naming the file, a config.json that is not a run's (`runs.read_run_config`, then
    every field checked against TrainConfig) and a last.pt that cannot be resumed from."""
    run_dir = Path(run_dir)
    saved = read_run_config(run_dir)
    where = str(run_dir / "config.json")
    check_saved_train_config(saved["train"], where)
    try:
        cfg = dataclasses.replace(TrainConfig.from_saved(saved["train"]), **(overrides or {}))
    except HuseError as exc:
        raise HuseError(f"{where}: {exc}; it cannot be resumed") from None
    load_checkpoint(run_dir / "last.pt", resumable=True)  # malformed or unsafe: refused before any work
    return saved["features"], cfg
