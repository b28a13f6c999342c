"""Run folders written by `huse train`: which run a command means and what it was trained on.
Torch-free, so the CLI can check a user's --run / --checkpoint / --resume before loading torch."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from huse_pipeline.errors import HuseError
from huse_pipeline.settings import DEFAULT_FEATURES, DEFAULT_RUNS_DIR

TRAINING_FILES = ("best.pt", "last.pt", "metrics.jsonl")  # written by `huse train` only


def _trained_at(run: Path) -> float:
    """When `huse train` last wrote to the run (not the folder's time, which an eval JSON moves)."""
    return max((run / name).stat().st_mtime for name in TRAINING_FILES if (run / name).is_file())


def latest_run(runs_dir: str | Path = DEFAULT_RUNS_DIR) -> Path:
    """The run under `runs_dir` (a folder with a best.pt) that was trained most recently."""
    runs_dir = Path(runs_dir)
    runs = [p for p in runs_dir.glob("*") if (p / "best.pt").is_file()] if runs_dir.is_dir() else []
    if not runs:
        raise HuseError(f"no run with a best.pt under {runs_dir}/: train one with `huse train`, "
                        "or pass --run DIR or --checkpoint FILE")
    return max(runs, key=lambda p: (_trained_at(p), p.name))


def resolve_checkpoint(run: str | None, checkpoint: str | None,
                       runs_dir: str | Path = DEFAULT_RUNS_DIR) -> tuple[Path, Path | None]:
    """(checkpoint file, run folder or None) from --run / --checkpoint / the latest run."""
    if run and checkpoint:
        raise HuseError("give either --run or --checkpoint, not both")
    if checkpoint:
        ckpt = Path(checkpoint)
        if not ckpt.is_file():
            raise HuseError(f"checkpoint {ckpt} does not exist")
        parent = ckpt.parent
        is_run = (parent / "metrics.jsonl").is_file() or (parent / "config.json").is_file()
        return ckpt, parent if is_run else None
    run_dir = Path(run) if run else latest_run(runs_dir)
    if not (run_dir / "best.pt").is_file():
        raise HuseError(f"{run_dir} has no best.pt: pass a run folder written by `huse train`, or --checkpoint FILE")
    return run_dir / "best.pt", run_dir


def resolve_features(features: str | None, run_dir: Path | None) -> str:
    """`features` if given; else the feature file the run was trained on, if it is still there;
    else the default feature file."""
    if features:
        return features
    try:
        saved = json.loads((run_dir / "config.json").read_text())["features"] if run_dir else None
    except (OSError, ValueError, KeyError, TypeError):
        saved = None
    if saved and Path(saved).is_file():
        return str(saved)
    return DEFAULT_FEATURES


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """The config.json of a run that can be resumed (it has last.pt); HuseError otherwise.

    Checked here (torch-free, for the CLI's pre-flight): JSON, an object with a "train" object of
    plain values and a "features" path, and the types of the values the pre-flight reads. Every
    field is checked against TrainConfig by `train.run.resume_config`."""
    run_dir = Path(run_dir)
    config = run_dir / "config.json"
    if not (run_dir / "last.pt").is_file() or not config.is_file():
        raise HuseError(f"{run_dir} holds no run to resume (no last.pt / config.json): start it without --resume")
    try:
        saved = json.loads(config.read_bytes())
        if not isinstance(saved, dict) or not isinstance(saved.get("train"), dict) or not isinstance(saved.get("features"), str):
            raise ValueError("no 'train' section or 'features' path")
        nested = [k for k, v in saved["train"].items() if isinstance(v, (dict, list))]
        if nested:
            raise ValueError(f"train.{nested[0]} is not a plain value")
        for key, types, what in (("modality", (str,), "a string"), ("beta", (int, float), "a number")):
            value = saved["train"].get(key)
            if key in saved["train"] and (not isinstance(value, types) or isinstance(value, bool)):
                raise ValueError(f"train.{key} is {value!r}, not {what}")
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: not JSON (UnicodeDecodeError too)
        raise HuseError(f"{config} is not a run's config.json ({str(exc).splitlines()[0][:200]}); it cannot be resumed") from None
    return saved
