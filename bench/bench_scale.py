"""Stage two and evaluation at scale (issue 18), in one run:

    nice -n 10 python bench/bench_scale.py --out /tmp/huse_scale [--reuse-files] [--keep]

1. Writes synthetic feature files of the real dimensions (image 4,160 = EfficientNet-Lite0+Lite2
   `avg+mid`, text 384 = MiniLM; float32) and class structure (64 classes in three levels, class
   sizes skewed like a catalogue's: share of the r-th largest ~ r^-1.1; split 80/10/10), at 100,000
   and 1,000,000 items, a block at a time (`features.write_synthetic_blocks`), with a tree graph.
2. Peak RSS (ru_maxrss of the command alone: os.wait4 in a small launcher process, see `measure`),
   wall and CPU time of one `huse train --epochs 1` epoch for each size with `--data stream`, and at
   100 k also `--data resident` (`--large-steps N`: only the first N steps of the 1 M epoch, then
   validation, where a whole epoch takes too long).
3. Items/s of the training loop fed by the streaming source against the resident one at 100 k:
   the same loop (`loop._train_epoch`, the default model and optimiser) for a fixed number of
   steps, the two sources interleaved in one process (the machine is shared: interleaving exposes
   both to the same load); and the streaming source alone, without a model (what one reader thread
   could feed a faster device).
4. Time and peak RSS of `huse eval --max-queries 20000 --data stream` over a split of 1,000,000
   items (a second file: 1 M test items and 50 k val items; the 1 M training file is deleted first
   unless --keep, to bound the disk used), with the 1 M run's checkpoint; `--eval-only RUN` runs this
   part alone with RUN's checkpoint (any run of (2): the cost does not depend on which).

Every figure is printed as measured; the load average is printed beside each, since other jobs
share the machine. The summary is also written to OUT/summary.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

IMAGE_DIM, TEXT_DIM = 4160, 384
LEVELS = (4, 4, 4)  # 64 classes: 4 top levels x 4 x 4
SPLIT_P = {"train": 0.8, "val": 0.1, "test": 0.1}


def class_names() -> list[str]:
    a, b, c = LEVELS
    return sorted(f"t{i}<t{i}m{j}<t{i}m{j}l{k}" for i in range(a) for j in range(b) for k in range(c))


def class_shares(n_classes: int, skew: float, seed: int) -> np.ndarray:
    """(C,) probabilities: the r-th largest class ~ r^-skew, assigned to the classes in a seeded order."""
    p = 1.0 / np.arange(1, n_classes + 1) ** skew
    return np.random.default_rng(seed).permutation(p / p.sum())


def centres(names: list[str], dim: int, rng: np.random.Generator) -> np.ndarray:
    """(C, D) class centres that follow the hierarchy: a sum of one random vector per level of the path."""
    parts: dict[str, np.ndarray] = {}
    out = np.zeros((len(names), dim), np.float32)
    for c, name in enumerate(names):
        levels = name.split("<")
        for depth in range(len(levels)):
            key = "<".join(levels[:depth + 1])
            if key not in parts:
                parts[key] = (0.4 * rng.standard_normal(dim)).astype(np.float32)
            out[c] += parts[key]
    return out


def item_blocks(n: int, seed: int, split_p: dict[str, float], block: int = 8192):
    names = class_names()
    rng = np.random.default_rng(seed)
    image_c, text_c = centres(names, IMAGE_DIM, rng), centres(names, TEXT_DIM, rng)
    shares = class_shares(len(names), 1.1, 0)
    splits, p = list(split_p), np.array(list(split_p.values()))
    for start in range(0, n, block):
        b = min(block, n - start)
        labels = rng.choice(len(names), size=b, p=shares)
        image = image_c[labels] + rng.standard_normal((b, IMAGE_DIM), dtype=np.float32)
        text = text_c[labels] + rng.standard_normal((b, TEXT_DIM), dtype=np.float32)
        yield image, text, labels, list(np.asarray(splits)[rng.choice(len(splits), size=b, p=p)])


def write_file(path: Path, n: int, seed: int, split_p: dict[str, float]) -> float:
    from huse_pipeline.extract.graph import GraphConfig, build_graph
    from huse_pipeline.store import features

    t0 = time.perf_counter()
    features.write_synthetic_blocks(path, n, class_names(), item_blocks(n, seed, split_p))
    build_graph(GraphConfig(features=str(path), method="tree"))
    return time.perf_counter() - t0


# Runs the command and writes its rusage. A child's ru_maxrss starts from the RSS of the process it
# was forked from (Linux keeps the high-water mark across fork and exec), so the command is started
# from this small launcher, not from the benchmark process, which holds hundreds of MB or more.
LAUNCHER = """
import json, os, subprocess, sys
out, cmd = sys.argv[1], sys.argv[2:]
proc = subprocess.Popen(cmd)
_, status, usage = os.wait4(proc.pid, 0)
json.dump({"code": os.waitstatus_to_exitcode(status), "maxrss_kb": usage.ru_maxrss,
           "cpu_s": usage.ru_utime + usage.ru_stime}, open(out, "w"))
"""


def measure(cmd: list[str], log: Path) -> dict:
    """Run `cmd`; its wall time, CPU time and peak RSS (ru_maxrss of the command alone, os.wait4 in a
    small launcher process)."""
    load = os.getloadavg()[0]
    usage_file = log.with_suffix(".rusage.json")
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        subprocess.run([sys.executable, "-c", LAUNCHER, str(usage_file), *cmd], stdout=fh, stderr=subprocess.STDOUT,
                       check=False)
    wall = time.perf_counter() - t0
    usage = json.loads(usage_file.read_text())
    if usage["code"] != 0:
        sys.exit(f"failed ({usage['code']}): {' '.join(cmd)}; see {log}:\n" + log.read_text()[-3000:])
    return {"wall_s": round(wall, 1), "cpu_s": round(usage["cpu_s"], 1),
            "peak_rss_gb": round(usage["maxrss_kb"] * 1024 / 1e9, 3), "load_before": round(load, 1),
            "load_after": round(os.getloadavg()[0], 1)}


def train_run(features_path: Path, run: Path, mode: str, steps: int | None = None) -> dict:
    """One epoch of `huse train` (or its first `steps` steps, then validation on every val item, as at
    an epoch's end), measured."""
    cmd = ["huse", "train", "--features", str(features_path), "--out", str(run), "--epochs", "1", "--data", mode,
           "--device", "cpu", *(["--steps", str(steps)] if steps else [])]
    res = measure(cmd, run.with_suffix(".log"))
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    config = json.loads((run / "config.json").read_text())
    n_train = config["items"]["train"]
    trained = min(n_train, steps * config["train"]["batch_size"]) if steps else n_train
    res.update(epoch_s=round(row["time_s"], 1), n_train=n_train, n_trained=trained,
               items_per_s=round(trained / row["time_s"], 1), val_acc_mean=round(row["val/acc/mean"], 4),
               command=" ".join(cmd))
    return res


def loop_throughput(features_path: Path, steps: int, repeats: int) -> dict:
    """Items/s of the training loop fed by each source, interleaved in this process."""
    import torch
    from tqdm.auto import tqdm

    from huse_pipeline.store import features
    from huse_pipeline.train import loop
    from huse_pipeline.train.batches import ResidentSource, StreamingSource
    from huse_pipeline.train.config import make_config
    from huse_pipeline.train.model import HuseModel

    ff = features.open_features(features_path)
    cfg = make_config(device="cpu")
    dev = torch.device("cpu")
    sources = {"resident": ResidentSource.from_features(ff, cfg, dev), "stream": StreamingSource(ff, cfg, dev)}
    times: dict[str, list[float]] = {k: [] for k in sources}
    for r in range(repeats):
        for name in (list(sources) if r % 2 == 0 else list(sources)[::-1]):
            torch.manual_seed(0)
            model = HuseModel(cfg.model_config(IMAGE_DIM, TEXT_DIM, ff.num_classes))
            stats = sources[name].input_stats()
            model.image_tower.set_input_stats(*stats["image"])
            model.text_tower.set_input_stats(*stats["text"])
            opt = loop._make_optimizer(cfg, loop._trained_params(model, "both"))
            gen = torch.Generator().manual_seed(r)
            bar = tqdm(disable=True)
            t0 = time.perf_counter()
            loop._train_epoch(model, opt, sources[name], cfg, gen, 1, 0, steps, False, bar, None)
            times[name].append(time.perf_counter() - t0)
            print(f"  repeat {r}: {name:8s} {steps * cfg.batch_size / times[name][-1]:8.1f} items/s "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)
    items = steps * cfg.batch_size
    out = {k: round(items * len(v) / sum(v), 1) for k, v in times.items()}
    out["ratio"] = round(out["stream"] / out["resident"], 3)
    out["per_repeat_ratio"] = [round(r / s, 3) for s, r in zip(times["stream"], times["resident"])]
    return out


def reader_rate(features_path: Path, repeats: int = 2) -> dict:
    """Items/s of StreamingSource alone (no model): what one reader thread can feed a faster device."""
    import torch

    from huse_pipeline.store import features
    from huse_pipeline.train.batches import StreamingSource
    from huse_pipeline.train.config import make_config

    cfg = make_config(device="cpu")
    source = StreamingSource(features.open_features(features_path), cfg, torch.device("cpu"))
    row_bytes = 4 * (source.image_dim + source.text_dim)
    out = {}
    for r in range(repeats):
        t0, c0, n = time.perf_counter(), time.process_time(), 0
        for batch in source.train_batches(cfg.batch_size, torch.Generator().manual_seed(r)):
            n += len(batch)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        out[f"repeat {r}"] = {"items_per_s": round(n / wall), "items_per_cpu_s": round(n / cpu)}
        print(f"  repeat {r}: {n} items in {wall:.1f} s: {n / wall:.0f} items/s ({n * row_bytes / wall / 1e9:.2f} GB/s of "
              f"float32 rows), CPU {cpu:.1f} s ({n / cpu:.0f} items per CPU-s), load {os.getloadavg()[0]:.1f}", flush=True)
    return out


def eval_run(run: Path, out: Path, n_items: int, max_queries: int, keep: bool) -> dict:
    """(4): writes a file of `n_items` test and n_items / 20 val items, then times `huse eval
    --max-queries --data stream` over its test split with `run`'s checkpoint."""
    eval_path = out / f"eval_{n_items}.h5"
    n_val = n_items // 20
    t = write_file(eval_path, n_items + n_val, seed=7,
                   split_p={"test": n_items / (n_items + n_val), "val": n_val / (n_items + n_val)})
    print(f"wrote {eval_path} (~{n_items} test + ~{n_val} val items, {eval_path.stat().st_size / 1e9:.2f} GB) "
          f"in {t:.0f} s", flush=True)
    cmd = ["huse", "eval", "--run", str(run), "--features", str(eval_path), "--other-features",
           "--max-queries", str(max_queries), "--data", "stream", "--device", "cpu", "--out", str(out / "eval.json")]
    res = measure(cmd, out / "eval.log")
    m = json.loads((out / "eval.json").read_text())
    res.update(command=" ".join(cmd), n_items=m["meta/n_items"], n_queries=m["meta/n_queries"],
               similarity=m["meta/similarity"], eval_time_s=m["meta/eval_time_s"],
               pairs=4 * m["meta/n_items"] * m["meta/n_queries"])
    print(f"(4) huse eval --max-queries {max_queries} over {m['meta/n_items']} items: wall {res['wall_s']:.0f} s "
          f"({res['wall_s'] / 60:.1f} min; target < 15 min), peak RSS {res['peak_rss_gb']:.2f} GB (target < 4 GB), "
          f"CPU {res['cpu_s']:.0f} s, similarity {res['similarity']}, load {res['load_before']}->{res['load_after']}; "
          f"img2txt R@1 {m['img2txt/R@1']:.4f} MAP@R {m['img2txt/MAP@R']:.4f} acc/fused {m['acc/fused']:.4f}", flush=True)
    print(f"    {res['cpu_s'] / res['pairs'] * 1e9:.3f} CPU ns per query-gallery pair and task", flush=True)
    if not keep:
        eval_path.unlink()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/tmp/huse_scale"))
    ap.add_argument("--small", type=int, default=100_000)
    ap.add_argument("--large", type=int, default=1_000_000)
    ap.add_argument("--eval-items", type=int, default=1_000_000)
    ap.add_argument("--max-queries", type=int, default=20_000)
    ap.add_argument("--loop-steps", type=int, default=120, help="training steps per source per repeat (items/s)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the feature files")
    ap.add_argument("--loop-only", action="store_true", help="only (3), on the --small file")
    ap.add_argument("--reuse-files", action="store_true", help="keep feature files already written in --out")
    ap.add_argument("--large-steps", type=int, default=None, metavar="N",
                    help="train the large file for its first N steps, then validate, instead of a whole epoch (the "
                         "streamed peak RSS is set by the buffers, the streaming pass and validation, not the steps)")
    ap.add_argument("--eval-only", type=Path, metavar="RUN",
                    help="only (4), with this run's checkpoint (a run of (2): same classes and dimensions)")
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    import torch

    print(f"machine: {os.cpu_count()} cores, {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.1f} GiB, "
          f"GPU: {'yes' if torch.cuda.is_available() else 'none'}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; load {os.getloadavg()[0]:.1f}; nice {os.nice(0)}", flush=True)
    summary: dict = {}
    if args.eval_only:
        summary["eval"] = eval_run(args.eval_only, out, args.eval_items, args.max_queries, args.keep)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return
    small, large = out / f"feats_{args.small}.h5", out / f"feats_{args.large}.h5"
    for n, path in ((args.small, small),) if args.loop_only else ((args.small, small), (args.large, large)):
        if (args.loop_only or args.reuse_files) and path.is_file():
            print(f"reusing {path}", flush=True)
            continue
        t = write_file(path, n, seed=n, split_p=SPLIT_P)
        print(f"wrote {path} ({n} items, {path.stat().st_size / 1e9:.2f} GB) in {t:.0f} s", flush=True)

    print(f"(3) training loop items/s at {args.small} items, {args.loop_steps} steps per source, interleaved:", flush=True)
    summary["loop"] = loop_throughput(small, args.loop_steps, args.repeats)
    print(f"    resident {summary['loop']['resident']} items/s, stream {summary['loop']['stream']} items/s, "
          f"ratio {summary['loop']['ratio']} (per repeat {summary['loop']['per_repeat_ratio']}; target >= 0.8)", flush=True)
    print(f"(3b) the streaming source alone (no model) at {args.small} items:", flush=True)
    summary["reader"] = reader_rate(small)
    if args.loop_only:
        return

    print("(2) one training epoch, `huse train --epochs 1` in a child process:", flush=True)
    runs = {}
    for name, path, mode in ((f"{args.small}/stream", small, "stream"), (f"{args.small}/resident", small, "resident"),
                             (f"{args.large}/stream", large, "stream")):
        run = out / ("run_" + name.replace("/", "_"))
        shutil.rmtree(run, ignore_errors=True)
        runs[name] = run
        summary[f"train {name}"] = res = train_run(path, run, mode, args.large_steps if path == large else None)
        print(f"    {name:18s} peak RSS {res['peak_rss_gb']:.2f} GB  wall {res['wall_s']:.0f} s (epoch {res['epoch_s']:.0f} s, "
              f"{res['items_per_s']:.0f} train items/s)  CPU {res['cpu_s']:.0f} s  val acc {res['val_acc_mean']}  "
              f"load {res['load_before']}->{res['load_after']}", flush=True)
    ratio = summary[f"train {args.large}/stream"]["peak_rss_gb"] / summary[f"train {args.small}/stream"]["peak_rss_gb"]
    summary["rss_ratio_large_small_stream"] = round(ratio, 3)
    print(f"    peak RSS {args.large} / {args.small} (stream): {ratio:.3f} (target <= 1.25, and under 4 GB)", flush=True)

    if not args.keep:
        large.unlink()
    summary["eval"] = eval_run(runs[f"{args.large}/stream"], out, args.eval_items, args.max_queries, args.keep)
    if not args.keep:
        small.unlink()
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"summary: {out / 'summary.json'}")


if __name__ == "__main__":
    main()
