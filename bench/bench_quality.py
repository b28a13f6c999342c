"""Quality on a real catalogue: the whole pipeline with the project's defaults, the ablations and
the baselines, over several seeds, into a table in BENCHMARKS.md.

Runs the `huse` commands exactly as a user would (this checkout's cli.py, the current Python):

    extract-features (defaults) -> build-graph (defaults)
    for each seed: train + eval (test split) for
        huse        the defaults
        delta=0     no instance-level term: the paper's loss (today's default)
        delta=0.3   the instance-level term at the weight round 8 chose on val (not the default)
        beta=0      no semantic-graph loss
        gamma=0     no cross-modal gap loss
        class-only  beta = gamma = 0
        or-beta=0.3 the graph loss's OR rule at beta 0.3 (the space follows the class graph)
      and `eval --baselines` on the huse run: the paper's separate models (one tower + classifier
      per modality, same settings) and in-modal retrieval with the raw frozen features.

Every `huse eval` metric is reported as mean ± sample standard deviation over the seeds, with the
wall-clock time of each stage and the machine. Finished steps are reused when the command is run
again (the feature file is up to date; a run whose eval JSON exists and whose settings are today's
defaults is not retrained, and reports the stage times saved when it ran; `--re-eval` evaluates
such runs again, after a change to `huse eval`; an unfinished run, or one
made with other settings, is moved aside to `<run>.old-<time>` and trained again; a run whose
training finished but whose eval did not is only evaluated), so an interrupted benchmark continues
where it stopped. A catalogue with an `attributes.csv` beside it (the real one) is also scored with
`huse eval --attributes` (attr/*: colour-and-class text queries). `--variants` runs some columns
only; `--features FILE` uses an existing feature file of the catalogue instead of extracting one.

    python bench/bench_quality.py --catalogue ../shared/datasets/myntra_fashion_small/catalogue.csv
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/machine.py
from machine import cpu_model  # noqa: E402

from huse_pipeline.train.config import TrainConfig  # noqa: E402

# Each variant: the TrainConfig fields it changes from the defaults (passed as `huse train` options).
# `or-beta=0.3` is not an ablation but the setting of the graph loss that shapes the space most towards
# the class graph at the least accuracy cost on val (BENCHMARKS.md, round 5); reported, not chosen here.
VARIANTS: dict[str, dict[str, float | str]] = {"huse": {}, "delta=0": {"delta": 0.0}, "delta=0.3": {"delta": 0.3},
                                               "beta=0": {"beta": 0.0}, "gamma=0": {"gamma": 0.0},
                                               "class-only": {"beta": 0.0, "gamma": 0.0},
                                               "or-beta=0.3": {"margin_rule": "or", "beta": 0.3}}
COLUMN_NOTES = {"huse": "the full model with the defaults (`huse`)",
                "delta=0": "`delta=0`: without the instance-level term (the paper's loss)",
                "delta=0.3": "`delta=0.3`: the instance-level term at the weight chosen on val (round 8)",
                "beta=0": "`beta=0`: no graph loss", "gamma=0": "`gamma=0`: no gap loss",
                "class-only": "`class-only`: classification loss only",
                "or-beta=0.3": "the OR rule at beta 0.3 (an option, not the default)"}
BEGIN, END = "<!-- bench_quality:begin -->", "<!-- bench_quality:end -->"
# Rows of the table, in order; baseline columns read the baseline/ keys of the huse run's eval.
TASKS = ("img2img", "img2txt", "txt2img", "txt2txt")
ROWS = (["acc/image", "acc/text", "acc/fused", "acc/fused@0.5", "fusion_weight", "acc5/image", "acc5/text",
         "macro_acc/image", "macro_acc/text"]
        + [f"{t}/{m}" for t in TASKS for m in ("R@1", "R@5", "R@10", "MAP@R")]
        + [f"{t}/{m}" for t in TASKS for m in ("HP@2", "HP@5", "HP@10")]
        + [f"{t}/severity" for t in TASKS]
        + [f"{t}/{m}" for t in ("img2txt", "txt2img") for m in ("inst_R@1", "inst_R@5", "inst_R@10", "medr")]
        + ["attr/colour_class@10", "attr/class@10", "attr/colour@10", "attr/n_queries"]
        + ["graph_fidelity", "tree_fidelity", "modality_gap"])


def run(cmd: list[str], log: Path, hint: str = "") -> float:
    """Run one `huse` command (output appended to `log`); return its wall-clock seconds. On failure exit
    with a message naming the log, plus `hint`."""
    start = time.perf_counter()
    with open(log, "a") as fh:
        fh.write(f"\n$ huse {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.run([sys.executable, str(REPO / "cli.py"), *cmd], stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"`huse {' '.join(cmd)}` failed (exit {proc.returncode}); see {log}{hint}")
    return time.perf_counter() - start


def options(fields: dict[str, float | str]) -> list[str]:
    """{"beta": 0.0} -> ["--beta", "0.0"]."""
    return [item for name, value in fields.items() for item in (f"--{name.replace('_', '-')}", str(value))]


def is_current(run_dir: Path, fields: dict[str, float | str], seed: int) -> bool:
    """Whether a finished run was trained with today's defaults plus `fields` (so its eval may be reused)."""
    try:
        saved = asdict(TrainConfig.from_saved(json.loads((run_dir / "config.json").read_text())["train"]))
    except (OSError, ValueError, KeyError, TypeError):  # unreadable, or made by another version's TrainConfig
        return False
    expected = asdict(TrainConfig(**fields, seed=seed))
    return all(saved[k] == v for k, v in expected.items() if k not in ("device", "amp"))


def machine() -> str:
    cpu = cpu_model()
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"{cpu}, {os.cpu_count()} cores, GPU: {gpu}; Python {platform.python_version()}, torch {torch.__version__}; "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")


def fmt(values: list[float | None]) -> str:
    vals = np.array([np.nan if v is None else v for v in values], dtype=float)
    if not np.isfinite(vals).any():
        return "–"
    mean = np.nanmean(vals)
    std = np.nanstd(vals, ddof=1) if np.isfinite(vals).sum() > 1 else 0.0
    digits = 1 if abs(mean) >= 10 else 3
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def table(results: dict[str, list[dict]], seeds: list[int]) -> list[str]:
    variants = list(results)
    baselines = any("baseline/acc/image" in r for r in results["huse"])
    cols = variants + (["separate models", "raw features"] if baselines else [])
    lines = ["| metric | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for key in ROWS:
        if not any(r.get(key) is not None for v in variants for r in results[v]):
            continue  # e.g. attr/* without attributes
        cells = [fmt([r.get(key) for r in results[v]]) for v in variants]
        sep = f"baseline/{key}" if key in ("acc/image", "acc/text", "acc/fused", "fusion_weight") else None
        raw = f"baseline/{key}" if key.split("/")[0] in ("img2img", "txt2txt") else None
        if baselines:
            cells.append(fmt([r.get(sep) for r in results["huse"]]) if sep else "")
            cells.append(fmt([r.get(raw) for r in results["huse"]]) if raw else "")
        lines.append(f"| `{key}` | " + " | ".join(cells) + " |")
    return lines


def write_section(markdown: Path, body: list[str]) -> None:
    text = markdown.read_text() if markdown.exists() else "# Benchmarks\n"
    block = "\n".join([BEGIN, *body, END])
    if BEGIN in text and END in text:
        text = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: block, text, flags=re.DOTALL)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    markdown.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalogue", required=True, help="catalogue CSV (the real one: "
                        "../shared/datasets/myntra_fashion_small/catalogue.csv)")
    parser.add_argument("--work", default="cache/bench_quality", help="folder for the feature file, runs and log")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--markdown", default=str(REPO / "BENCHMARKS.md"), help="file to write the table into")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--re-eval", action="store_true",
                        help="evaluate reused runs again (after a change to `huse eval`); their training is kept")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="the columns to run (default: all; huse is always run, for the baselines)")
    parser.add_argument("--no-baselines", action="store_true",
                        help="evaluate the huse runs without --baselines (no separate-model and raw-feature columns)")
    parser.add_argument("--features", default=None,
                        help="use this feature file of the catalogue (copied into the work folder, unless it is "
                             "there already) instead of running extract-features")
    args = parser.parse_args()
    variants = {v: VARIANTS[v] for v in VARIANTS if v in args.variants or v == "huse"}
    if len(args.seeds) < 3:
        print("note: fewer than 3 seeds; the spread will say little", file=sys.stderr)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    feats = str(work / "feats.h5")
    device = ["--device", args.device]
    attributes = Path(args.catalogue).parent / "attributes.csv"  # the real catalogue's colours: attr/* metrics
    scoring = ["--attributes", str(attributes)] if attributes.is_file() else []
    times: dict[str, list[float]] = {}
    print(f"log: {log}", flush=True)

    if args.features:
        if Path(args.features).resolve() != Path(feats).resolve():
            shutil.copyfile(args.features, feats + ".tmp")
            os.replace(feats + ".tmp", feats)
        times[f"extract-features (not run: {args.features} given)"] = [0.0]
    else:
        stage = "extract-features" + (" (file already up to date: not a timing)" if Path(feats).exists() else "")
        hint = (f". If {feats} was made with other settings (another catalogue, or before a default changed), "
                "move the work folder aside or pass another --work") if Path(feats).exists() else ""
        times[stage] = [run(["extract-features", "--catalogue", args.catalogue, "--out", feats, *device], log, hint)]
    times["build-graph"] = [run(["build-graph", "--features", feats, *device], log)]
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for seed in args.seeds:
        for variant, fields in variants.items():
            run_dir = work / "runs" / f"{variant}-seed{seed}"
            out = run_dir / "eval_test.json"
            timing = run_dir / "bench_seconds.json"  # this run's stage times, kept for later invocations
            trained = timing.exists() and (run_dir / "best.pt").exists()  # written once training finished
            if run_dir.exists() and not ((out.exists() or trained) and is_current(run_dir, fields, seed)):
                kept = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
                print(f"{run_dir}: unfinished or trained with other settings than today's defaults; "
                      f"moved to {kept.name} and trained again", flush=True)
                run_dir.rename(kept)
            extra = ["--baselines"] if variant == "huse" and not args.no_baselines else []
            eval_stage = "eval --baselines (huse)" if extra else "eval"
            evaluate = ["eval", "--run", str(run_dir), "--features", feats, "--out", str(out), *extra, *scoring, *device]
            if not out.exists() or args.re_eval:
                seconds = json.loads(timing.read_text()) if timing.exists() and run_dir.exists() else {}
                if f"train ({variant})" not in seconds or not (run_dir / "best.pt").exists():
                    seconds = {f"train ({variant})": run(
                        ["train", "--features", feats, "--out", str(run_dir), "--seed", str(seed), *options(fields),
                         *device], log)}
                    timing.write_text(json.dumps(seconds))
                seconds[eval_stage] = run(evaluate, log)
                timing.write_text(json.dumps(seconds))
            if timing.exists():
                for stage, value in json.loads(timing.read_text()).items():
                    times.setdefault(stage, []).append(value)
            results[variant].append(json.loads(out.read_text()))
            print(f"seed {seed} {variant}: acc/image {results[variant][-1]['acc/image']:.3f} "
                  f"img2txt/R@1 {results[variant][-1]['img2txt/R@1']:.3f}", flush=True)

    config = json.loads((work / "runs" / f"huse-seed{args.seeds[0]}" / "config.json").read_text())
    attrs_cmd = [sys.executable, "-c", "import json,sys; from huse_pipeline.store.features import read_attrs; "
                 "a = {'image_pool': 'avg', **read_attrs(sys.argv[1])}; print(json.dumps({k: a.get(k) for k in "
                 "('image_encoder', 'image_pool', 'image_dim', 'text_encoder', 'augment_views', 'n_items', 'split_counts')}))",
                 feats]  # a file without image_pool was made before the option, with the plain global average
    feature_info = subprocess.run(attrs_cmd, capture_output=True, text=True, cwd=REPO).stdout.strip()
    body = [
        "### Results (test split, mean ± standard deviation over seeds " + ", ".join(map(str, args.seeds)) + ")",
        "",
        f"Command: `python bench/bench_quality.py --catalogue {args.catalogue}"
        + (f" --seeds {' '.join(map(str, args.seeds))}" if args.seeds != [0, 1, 2] else "")
        + (f" --variants {' '.join(args.variants)}" if set(args.variants) != set(VARIANTS) else "")
        + (f" --features {args.features}" if args.features else "")
        + (" --no-baselines" if args.no_baselines else "") + "`",
        "",
        f"Machine: {machine()}.",
        "",
        f"Features: {feature_info}. Training defaults (`huse train`): "
        + ", ".join(f"{k} {config['train'][k]}" for k in ("preset", "optimizer", "lr", "batch_size", "epochs",
                                                        "alpha", "beta", "gamma", "zeta", "margin_rule",
                                                        "graph_pairs", "delta", "instance_loss", "temperature",
                                                        "input_norm", "image_input_dropout")) + ".",
        "",
        "Columns: " + ", ".join(COLUMN_NOTES[v] for v in variants)
        + ("" if args.no_baselines else ", the paper's separate models (`eval --baselines`: one tower and classifier "
           "per modality, classification loss only) and in-modal retrieval with the raw frozen features")
        + ". Severity and medr: lower is better.",
        "",
        *table(results, args.seeds),
        "",
        "Wall-clock time per stage (seconds; mean over the runs, count in brackets; a run reused from an "
        "earlier invocation reports the times measured when it ran, from its `bench_seconds.json`):",
        "",
        "| stage | seconds |",
        "|---|---|",
        *[f"| {stage} | {np.mean(ts):.0f} ({len(ts)}) |" for stage, ts in times.items()],
    ]
    write_section(Path(args.markdown), body)
    print("\n".join(body))


if __name__ == "__main__":
    main()
