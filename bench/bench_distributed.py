"""Stage one on several processes, and the merge at scale, in one run:

  (1) images/s of `huse extract-features` with 1 process and with 2 torchrun ranks (gloo) on this
      CPU, one encoder thread each, on the first --limit rows of a catalogue (default encoders:
      EfficientNet-Lite0 + Lite2 and MiniLM). 1 process: its encoding loop's images/s; 2 ranks: the
      job's (rows of every shard / time from rank 0's first batch to the last shard). Both files
      are compared: the same embeddings, bit for bit.
  (2) the streaming merge (`store.merge`) of synthetic shards of the real dimensions (image 4160,
      text 384) into a float16 feature file, for each of --merge-rows, each in a fresh process:
      seconds and peak RSS, before the merge (the catalogue frame) and during it. Flat in the rows
      means: the merge's own memory is one shard's block whatever their number.
  (3) for contrast, the in-memory merge it replaces (`features.merge_parts`) on --old-rows rows.

    nice -n 10 python bench/bench_distributed.py --catalogue ../shared/datasets/myntra_fashion_small/catalogue.csv

Disk: the shards are float32 part files (18 GB for 1,000,000 rows) plus the merged file (9 GB);
everything under --work is deleted at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/machine.py
from machine import cpu_model  # noqa: E402

IMAGE_DIM, TEXT_DIM = 4160, 384  # Lite0+Lite2 with avg+mid pooling, MiniLM
FINGERPRINT = "f" * 64


# ------------------------------------------------------------------------------------ (1) ranks


def bench_ranks(args: argparse.Namespace, work: Path) -> None:
    frame = pd.read_csv(args.catalogue, dtype=str, keep_default_na=False).head(args.limit)
    small = work / "catalogue.csv"
    frame.to_csv(small, index=False)
    common = ["extract-features", "--catalogue", str(small), "--image-root", str(Path(args.catalogue).parent),
              "--part-rows", str(args.part_rows), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    results = {}
    for ranks in (1, 2):
        out = work / f"ranks{ranks}.h5"
        if ranks == 1:
            cmd = [sys.executable, "-m", "huse_pipeline", *common, "--out", str(out), "--threads", "1"]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                   "-m", "huse_pipeline", *common, "--out", str(out)]
        t0 = time.perf_counter()
        run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if run.returncode:
            sys.exit(f"{' '.join(cmd)} failed:\n{run.stderr[-3000:]}")
        summary = json.loads(run.stdout[run.stdout.index("{"):])
        rate = summary["images_per_s"] if ranks == 1 else summary["job_images_per_s"]
        results[ranks] = rate
        print(f"  {ranks} rank(s): {rate:.1f} images/s ({summary['items']} items, command wall {wall:.1f} s "
              "incl. start-up and model loading)", flush=True)
    from huse_pipeline.store import features

    a, b = features.read_features(work / "ranks1.h5"), features.read_features(work / "ranks2.h5")
    same = all(np.array_equal(x, y) for x, y in ((a.image_emb, b.image_emb), (a.text_emb, b.text_emb),
                                                 (a.labels, b.labels))) and list(a.split) == list(b.split)
    print(f"  2 ranks / 1 rank: {results[2] / results[1]:.2f}x; same embeddings, labels, splits: {same}")


# ------------------------------------------------------------------------------------ (2) merge


def write_shards(folder: Path, n_rows: int, shard_rows: int) -> None:
    from huse_pipeline.store import features

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    image = (rng.standard_normal((shard_rows, IMAGE_DIM), dtype=np.float32) * 3).astype(np.float32)
    text = (rng.standard_normal((shard_rows, TEXT_DIM), dtype=np.float32) * 0.05).astype(np.float32)
    t0 = time.perf_counter()
    for start in range(0, n_rows, shard_rows):
        end = min(start + shard_rows, n_rows)
        n, k = end - start, (start // shard_rows) % shard_rows
        path = folder / f"part-{start:09d}-{end:09d}.h5"
        if path.exists():
            continue
        part = features.Part(rows=np.arange(start, end), reason=[""] * n,
                             image_emb=np.roll(image, k, axis=0)[:n], text_emb=np.roll(text, k, axis=0)[:n],
                             text_used=[f"product {r} title" for r in range(start, end)],
                             attrs={"fingerprint": FINGERPRINT, "start": start, "end": end, "texts_reduced": 0})
        features.write_part(path, part)
    print(f"  wrote {n_rows:,} rows in {len(list(folder.glob('part-*.h5'))):,} shards of {shard_rows} "
          f"({sum(p.stat().st_size for p in folder.glob('part-*.h5')) / 1e9:.1f} GB, float32) in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)


def synthetic_frame(n_rows: int) -> pd.DataFrame:
    classes = [f"group{c // 8}<class{c}" for c in range(64)]
    cls = np.asarray(classes, dtype=object)[np.arange(n_rows) % 64]
    split = np.asarray(["train"] * 8 + ["val", "test"], dtype=object)[np.arange(n_rows) % 10]
    return pd.DataFrame({"image": [f"images/{r}.jpg" for r in range(n_rows)],
                         "text": [f"product {r} title" for r in range(n_rows)], "label": cls, "class_name": cls,
                         "split": split})


def _rss_mb(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def merge_child(args: argparse.Namespace) -> None:
    """One merge in this (fresh) process; prints a JSON line."""
    from huse_pipeline.store import features, merge

    folder = Path(args.shards)
    frame = synthetic_frame(args.rows)
    shards = [merge.Shard(s, min(s + args.shard_rows, args.rows),
                          folder / f"part-{s:09d}-{min(s + args.shard_rows, args.rows):09d}.h5")
              for s in range(0, args.rows, args.shard_rows)]
    before = _rss_mb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    except OSError:
        pass
    t0 = time.perf_counter()
    if args.old:
        features.merge_parts(args.out, [s.path for s in shards], frame, {"bench": True})
    else:
        merge.merge_shards(args.out, shards, frame, {"bench": True}, FINGERPRINT, dtype="float16")
    seconds = time.perf_counter() - t0
    print(json.dumps({"rows": args.rows, "shards": len(shards), "seconds": round(seconds, 1),
                      "rss_before_mb": round(before), "peak_rss_mb": round(_rss_mb("VmHWM")),
                      "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                      "file_gb": round(Path(args.out).stat().st_size / 1e9, 2)}))


def run_merge(args: argparse.Namespace, folder: Path, rows: int, old: bool) -> dict:
    out = folder.parent / ("old.h5" if old else f"merged-{rows}.h5")
    cmd = [sys.executable, __file__, "_merge", "--shards", str(folder), "--rows", str(rows), "--shard-rows",
           str(args.shard_rows), "--out", str(out)] + (["--old"] if old else [])
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode:
        sys.exit(f"merge of {rows} rows failed:\n{run.stderr[-3000:]}")
    out.unlink(missing_ok=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def bench_merge(args: argparse.Namespace, work: Path) -> None:
    folder = work / "feats.h5.parts"
    write_shards(folder, max(args.merge_rows), args.shard_rows)
    for rows in args.merge_rows:
        r = run_merge(args, folder, rows, old=False)
        grew = r["peak_rss_mb"] - r["rss_before_mb"]
        print(f"  streaming merge, {r['rows']:,} rows, {r['shards']:,} shards -> float16 file of {r['file_gb']} GB: "
              f"{r['seconds']} s, peak RSS {r['peak_rss_mb']} MB (before the merge {r['rss_before_mb']} MB, of which "
              f"the catalogue frame; the merge added {grew} MB)", flush=True)
    if args.old_rows:
        r = run_merge(args, folder, args.old_rows, old=True)
        grew = r["peak_rss_mb"] - r["rss_before_mb"]
        print(f"  in-memory merge it replaces, {r['rows']:,} rows, {r['shards']} shards -> float32 file of "
              f"{r['file_gb']} GB: {r['seconds']} s, peak RSS {r['peak_rss_mb']} MB (the merge added {grew} MB, "
              f"{grew * 1e3 / r['rows']:.1f} kB per row)", flush=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_merge":
        p = argparse.ArgumentParser()
        p.add_argument("_merge")
        p.add_argument("--shards", required=True)
        p.add_argument("--rows", type=int, required=True)
        p.add_argument("--shard-rows", type=int, required=True)
        p.add_argument("--out", required=True)
        p.add_argument("--old", action="store_true")
        return merge_child(p.parse_args())
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--catalogue", default=str(REPO.parent / "shared/datasets/myntra_fashion_small/catalogue.csv"))
    p.add_argument("--limit", type=int, default=384, help="rows of the catalogue for (1)")
    p.add_argument("--part-rows", type=int, default=32, help="shard rows for (1)")
    p.add_argument("--merge-rows", type=lambda s: [int(x) for x in s.split(",")], default=[250_000, 1_000_000])
    p.add_argument("--shard-rows", type=int, default=1000, help="rows per synthetic shard for (2)")
    p.add_argument("--old-rows", type=int, default=50_000, help="rows for (3); 0 skips it")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--skip-ranks", action="store_true")
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_distributed_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}")
    try:
        if not args.skip_ranks:
            print(f"(1) extract-features, first {args.limit} rows of {args.catalogue}, default encoders, one "
                  "encoder thread per process, --part-rows", args.part_rows, flush=True)
            bench_ranks(args, work)
        print(f"(2) streaming merge, image {IMAGE_DIM} + text {TEXT_DIM} dims, float16 output", flush=True)
        bench_merge(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
