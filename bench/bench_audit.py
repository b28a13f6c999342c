"""`huse audit` on labels swapped on purpose in a real catalogue's feature file: how many of them it
ranks first, with cross-fitted fold models (`--folds 5`, the default) and with the run's own model
(`--folds 0`).

A copy of the feature file gets the labels of `--pairs` random pairs of items of different classes
exchanged (stage one's features do not depend on the labels, so this is the feature file of a
catalogue with those labels swapped). A default run is trained on it, `huse index` builds its index,
and `huse audit` runs with each --folds; the script prints where the swapped items rank, by split.

    python bench/bench_audit.py --features cache/myntra.h5 --out cache/audit_bench
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, str(ROOT / "cli.py")]


def swap(path: Path, pairs: int, seed: int) -> dict[int, str]:
    """Swap the labels of `pairs` pairs of items of different classes in place; {row: split}."""
    rng = np.random.default_rng(seed)
    with h5py.File(path, "r+") as f:
        label = f["items/label"][:]
        split = f["items/split"].asstr()[:]
        rows = f["items/row"][:]
        chosen: list[int] = []
        while len(chosen) < 2 * pairs:
            a, b = (int(v) for v in rng.choice(len(label), 2, replace=False))
            if label[a] != label[b] and a not in chosen and b not in chosen:
                label[a], label[b] = label[b], label[a]
                chosen += [a, b]
        f["items/label"][:] = label
    return {int(rows[i]): str(split[i]) for i in chosen}


def run(args: list[str], log: Path) -> None:
    with open(log, "a") as fh:
        subprocess.run(CLI + args, check=True, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", type=Path, default=ROOT / "cache/myntra.h5")
    ap.add_argument("--out", type=Path, default=ROOT / "cache/audit_bench")
    ap.add_argument("--pairs", type=int, default=5, help="Pairs of labels swapped (10 items for 5).")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    feats, run_dir, log = args.out / "swapped.h5", args.out / "run", args.out / "bench_audit.log"
    if not feats.is_file():
        tmp = feats.with_suffix(".tmp")
        shutil.copyfile(args.features, tmp)
        swapped = swap(tmp, args.pairs, args.seed)
        tmp.rename(feats)
        pd.Series(swapped, name="split").rename_axis("id").to_csv(args.out / "swapped.csv")
    swapped = pd.read_csv(args.out / "swapped.csv").set_index("id")["split"].to_dict()
    print(f"{len(swapped)} labels swapped, by split: {pd.Series(swapped).value_counts().to_dict()}", flush=True)
    if not (run_dir / "best.pt").is_file():
        run(["train", "--features", str(feats), "--out", str(run_dir)], log)
    if not (run_dir / "index" / "meta.json").is_file():
        run(["index", "--run", str(run_dir)], log)
    for folds in (0, 5):
        out = args.out / f"audit_folds{folds}.csv"
        if not out.is_file():
            run(["audit", "--run", str(run_dir), "--folds", str(folds), "--out", str(out)], log)
        table = pd.read_csv(out, keep_default_na=False)
        rank = {int(i): r + 1 for r, i in enumerate(table["id"])}
        found = {i: rank.get(i) for i in swapped}
        in20 = sum(1 for r in found.values() if r is not None and r <= 20)
        in50 = sum(1 for r in found.values() if r is not None and r <= 50)
        by_split = {s: sorted((found[i] or 0) for i in swapped if swapped[i] == s) for s in sorted(set(swapped.values()))}
        print(f"--folds {folds}: {len(table)} suspects at fused probability >= 0.5; of the {len(swapped)} swapped, "
              f"{in20} in the first 20, {in50} in the first 50; their ranks by split (0 = not a suspect): {by_split}",
              flush=True)


if __name__ == "__main__":
    main()
