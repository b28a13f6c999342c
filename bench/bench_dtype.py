"""What `huse extract-features --dtype float16` changes in stage two (issue 17, item 5).

float16 storage rounds every stored feature to 11 significant bits; `extract-features --dtype
float16` casts the encoders' float32 outputs when it writes them, so the float16 file is exactly
the float32 file cast element-wise. This script makes that cast copy of a float32 feature file
(no re-encoding), trains the default configuration on both for each seed, evaluates every run on
val and test, and prints the metrics side by side with the per-seed differences.

    python bench/bench_dtype.py --features cache/myntra.h5 --out cache/dtype --seeds 0 1 2

Runs already finished in --out are reused (`huse train --resume` finishes interrupted ones).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, str(ROOT / "cli.py")]
KEYS = ("acc/image", "acc/text", "acc/fused", "img2txt/R@1", "txt2img/R@1", "img2txt/MAP@R", "txt2img/MAP@R",
        "img2txt/inst_R@10", "txt2img/inst_R@10")
FLOAT_SETS = ("items/image_emb", "items/text_emb", "views/image_emb")


def cast_copy(src: Path, dst: Path) -> None:
    """Copy a feature file with its float feature datasets cast to float16 (everything else as is)."""
    tmp = dst.with_suffix(".tmp.h5")
    with h5py.File(src, "r") as f, h5py.File(tmp, "w") as g:
        g.attrs.update(dict(f.attrs))
        for name in f:
            if name not in ("items", "views"):
                f.copy(f[name], g, name=name)
                continue
            grp = g.create_group(name)
            grp.attrs.update(dict(f[name].attrs))
            for key, ds in f[name].items():
                full = f"{name}/{key}"
                if full not in FLOAT_SETS:
                    f.copy(ds, grp, name=key)
                    continue
                out = grp.create_dataset(key, shape=ds.shape, dtype=np.float16)
                for r0 in range(0, ds.shape[0], 1024):  # 1,024 rows at a time: memory flat in N
                    out[r0:r0 + 1024] = ds[r0:r0 + 1024].astype(np.float16)
    os.replace(tmp, dst)


def run(cmd: list[str], log: Path) -> None:
    with open(log, "a") as fh:
        subprocess.run(cmd, check=True, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)


def train_and_eval(features: Path, run_dir: Path, seed: int, log: Path) -> dict[str, dict[str, float]]:
    if not (run_dir / "best.pt").is_file() or not _finished(run_dir):
        cmd = CLI + ["train", "--features", str(features), "--out", str(run_dir), "--seed", str(seed)]
        if (run_dir / "last.pt").is_file():
            cmd = CLI + ["train", "--resume", "--out", str(run_dir)]
        run(cmd, log)
    out = {}
    for split in ("val", "test"):
        path = run_dir / f"eval_{split}.json"
        if not path.is_file():
            run(CLI + ["eval", "--run", str(run_dir), "--features", str(features), "--split", split,
                       "--out", str(path)], log)
        out[split] = json.loads(path.read_text())
    return out


def _finished(run_dir: Path) -> bool:
    cfg = json.loads((run_dir / "config.json").read_text())["train"]
    lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").is_file() else []
    return bool(lines) and json.loads(lines[-1]).get("epoch") == cfg["epochs"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", type=Path, default=ROOT / "cache/myntra.h5", help="float32 feature file with a graph")
    ap.add_argument("--out", type=Path, default=ROOT / "cache/dtype")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with h5py.File(args.features, "r") as f:
        if f["items/image_emb"].dtype != np.float32:
            sys.exit(f"{args.features} is not a float32 feature file")
    f16 = args.out / f"{args.features.stem}_f16.h5"
    if not f16.is_file():
        cast_copy(args.features, f16)
    sizes = {"float32": args.features.stat().st_size, "float16": f16.stat().st_size}
    print(f"file size: float32 {sizes['float32'] / 1e6:.1f} MB, float16 {sizes['float16'] / 1e6:.1f} MB "
          f"({sizes['float16'] / sizes['float32']:.3f}x)")
    with h5py.File(args.features, "r") as f, h5py.File(f16, "r") as g:
        a = f["items/image_emb"][:2000].astype(np.float64)
        b = g["items/image_emb"][:2000].astype(np.float64)
        rel = np.abs(a - b).max() / np.abs(a).max()
        print(f"largest rounding of the image features (first 2,000 items), relative to the largest value: {rel:.2e}")

    results: dict[str, list[dict]] = {"float32": [], "float16": []}
    for seed in args.seeds:
        for dtype, feats in (("float32", args.features), ("float16", f16)):
            run_dir = args.out / "runs" / f"{dtype}_seed{seed}"
            res = train_and_eval(feats, run_dir, seed, args.out / f"{dtype}_seed{seed}.log")
            results[dtype].append(res)
            print(f"seed {seed} {dtype}: " + "  ".join(
                f"{split} {k} {res[split][k]:.4f}" for split in ("val",) for k in KEYS[:3]), flush=True)

    for split in ("val", "test"):
        print(f"\n{split} split, mean over seeds {args.seeds} (min..max of the per-seed float16 - float32 difference)")
        print(f"{'metric':<16}{'float32':>9}{'float16':>9}{'diff':>9}   per-seed diff range")
        for k in KEYS:
            a = np.array([r[split][k] for r in results["float32"]])
            b = np.array([r[split][k] for r in results["float16"]])
            d = b - a
            print(f"{k:<16}{a.mean():>9.4f}{b.mean():>9.4f}{d.mean():>+9.4f}   {d.min():+.4f} .. {d.max():+.4f}"
                  f"   (float32 seed spread {a.max() - a.min():.4f})")


if __name__ == "__main__":
    main()
