"""Choose training defaults on evidence: train configurations on a feature file and score them on
the VALIDATION split only (never test), with the same metrics as `huse eval`.

Each configuration is a JSON object of `huse train` options (TrainConfig field names) applied on
top of the project's defaults; every one is trained once per seed, in memory, and scored on val
(the fusion weight is tuned on val too, so `acc/fused` is slightly optimistic for every row alike).
Prints one markdown row per configuration (mean over seeds, and the spread (max-min)/2 when several)
and appends every run's full metrics to a JSON-lines log.

    python bench/sweep_val.py --features cache/myntra.h5 --seeds 0 1 \
        --grid '[{}, {"beta": 0, "gamma": 0}, {"margin_rule": "and"}]' --log cache/sweep.jsonl

The feature file needs a graph (`huse build-graph`). Runs of one configuration made by separate
invocations (say seeds 0 1 in one, seed 2 in another) are joined into one row, without training
(s/run is then the mean of the logged run times; logs written before runs were timed leave it empty),
by `python bench/sweep_val.py --summarise cache/sweep.jsonl cache/sweep_seed2.jsonl`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from huse_pipeline.eval.outputs import EvalConfig  # noqa: E402
from huse_pipeline.eval.evaluate import (  # noqa: E402
    attribute_metrics,
    attribute_queries,
    all_retrieval_metrics,
    classification_metrics,
    split_outputs,
    universal_space_metrics,
)
from huse_pipeline.measures import metrics  # noqa: E402
from huse_pipeline.store import features  # noqa: E402
from huse_pipeline.train.config import make_config  # noqa: E402
from huse_pipeline.train.loop import fit  # noqa: E402

COLUMNS = ["acc/image", "acc/text", "acc/fused", "img2img/R@1", "img2txt/R@1", "txt2img/R@1", "txt2txt/R@1",
           "img2txt/HP@10", "txt2img/HP@10", "img2img/severity", "img2txt/severity", "txt2img/severity",
           "graph_fidelity", "tree_fidelity", "modality_gap",
           "img2txt/inst_R@1", "img2txt/inst_R@10", "img2txt/medr", "txt2img/inst_R@1", "txt2img/inst_R@10",
           "txt2img/medr", "attr/colour_class@10", "attr/class@10"]


def score_on_val(model, fs: features.FeatureSet, device: torch.device, queries=None) -> dict[str, float | None]:
    """`huse eval`'s metrics of `model` on the val split (fusion weight tuned on val); with
    `queries` (evaluate.attribute_queries of the val items) also the attr/* search measure."""
    val = fs.indices("val")
    out = split_outputs(model, model, fs, val, device, 4096)
    weight = metrics.tune_fusion_weight(out.image_prob, out.text_prob, out.labels, 0.05)
    result = {**classification_metrics(out, weight), "fusion_weight": weight}
    tree = torch.as_tensor(fs.tree_dist, device=device)
    result.update(all_retrieval_metrics(out, tree, fs.num_classes, 1024, 16384))
    result.update(universal_space_metrics(out, fs.num_classes, fs.class_dist, fs.tree_dist))
    if queries is not None:
        result.update(attribute_metrics(model, queries, out, EvalConfig()))
    return result


def table_row(label: str, runs: list[dict], seconds: float | None) -> str:
    """One markdown row: per column the mean over `runs` and, with several runs, half their range."""
    cells = []
    for key in COLUMNS:
        values = np.array([np.nan if r.get(key) is None else r[key] for r in runs], dtype=float)
        mean = np.nanmean(values) if np.isfinite(values).any() else np.nan
        spread = f" ±{(np.nanmax(values) - np.nanmin(values)) / 2:.3f}" if len(runs) > 1 else ""
        cells.append(f"{mean:.3f}{spread}")
    return f"| {label} | " + " | ".join(cells) + f" | {'' if seconds is None else f'{seconds:.0f}'} |"


def summarise(logs: list[str]) -> None:
    """Print one row per (feature file, options) found in the JSON-lines logs, over all its seeds."""
    groups: dict[tuple[str, str], dict[int, dict]] = {}
    for log in logs:
        try:
            lines = Path(log).read_text().splitlines()
        except OSError as exc:
            sys.exit(f"cannot read sweep log {log}: {exc.strerror}")
        for number, line in enumerate(lines, 1):
            if line.strip():
                try:
                    run = json.loads(line)
                    key = (run["features"], json.dumps(run["options"], sort_keys=True))
                    seed = run["seed"]
                except (ValueError, KeyError, TypeError):
                    sys.exit(f"{log}:{number} is not a run written by `sweep_val.py --log`")
                groups.setdefault(key, {})[seed] = run  # a seed run twice counts once (the last)
    print("| features | options | seeds | " + " | ".join(COLUMNS) + " | s/run |")
    print("|---" * (len(COLUMNS) + 4) + "|")
    for (feats, options), runs in groups.items():
        seeds = sorted(runs)
        timed = [runs[s]["seconds"] for s in seeds if runs[s].get("seconds") is not None]  # older logs hold none
        seconds = sum(timed) / len(timed) if timed else None
        print(table_row(f"`{feats}` | `{options}` | {' '.join(map(str, seeds))}", [runs[s] for s in seeds], seconds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", help="feature file with a graph")
    parser.add_argument("--grid", help="JSON list of option dicts, or @file.json")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--log", default=None, help="append every run's metrics here (JSON lines)")
    parser.add_argument("--attributes", default=None,
                        help="attributes CSV (image, baseColour): also score the colour + class text queries on val")
    parser.add_argument("--runs", default=None,
                        help="also write each run's folder (as `huse train --out`) under this folder, named by "
                             "configuration and seed, so a chosen run can later be evaluated with `huse eval`")
    parser.add_argument("--summarise", nargs="+", metavar="LOG",
                        help="only join the runs in these --log files into rows (no training)")
    args = parser.parse_args()
    if args.summarise:
        summarise(args.summarise)
        return
    if not (args.features and args.grid):
        parser.error("--features and --grid are required (unless --summarise)")
    if args.threads:
        torch.set_num_threads(args.threads)
    grid = json.loads(Path(args.grid[1:]).read_text() if args.grid.startswith("@") else args.grid)
    fs = features.read_features(args.features, views=True)
    if fs.class_dist is None:
        sys.exit(f"{args.features} has no graph: run `huse build-graph --features {args.features}`")
    device = torch.device(args.device)
    queries = attribute_queries(fs, fs.indices("val"), args.attributes, device=device) if args.attributes else None
    print(f"features {args.features}: {fs.attrs.get('image_encoder')} + {fs.attrs.get('text_encoder')}, "
          f"views {fs.attrs.get('augment_views', 0)}, val items {len(fs.indices('val'))}; seeds {args.seeds}")
    print("| options | " + " | ".join(COLUMNS) + " | s/run |")
    print("|---" * (len(COLUMNS) + 2) + "|", flush=True)
    for options in grid:
        runs = []
        start = time.perf_counter()
        for seed in args.seeds:
            run_start = time.perf_counter()
            cfg = make_config(**{**options, "seed": seed, "device": args.device})
            run_dir = None
            if args.runs:
                name = "-".join(f"{k}{v}" for k, v in sorted(options.items())) or "defaults"
                run_dir = Path(args.runs) / f"{name}-seed{seed}"
            model, history = fit(fs, cfg, run_dir)
            scores = score_on_val(model, fs, device, queries)
            runs.append(scores)
            if args.log:
                with open(args.log, "a") as fh:
                    fh.write(json.dumps({"features": args.features, "options": options, "seed": seed,
                                         "best_epoch": max(history, key=lambda h: h.get(cfg.select_key, 0))["epoch"],
                                         "seconds": time.perf_counter() - run_start, **scores}) + "\n")
        seconds = (time.perf_counter() - start) / len(args.seeds)
        print(table_row(f"`{json.dumps(options)}`", runs, seconds), flush=True)


if __name__ == "__main__":
    main()
