"""Query latency and recall of the universal space (`huse search`), in one run on this machine.

1. The real catalogue: a trained run, its feature file and its index (`huse index`). Text queries are
   catalogue titles, image queries catalogue photos, each through the whole query path of
   `Space.search_text` / `Space.search_image` (cleaning or decoding, the frozen encoder recorded in
   the feature file, the tower, the index, the result rows): p50 and p95 latency. recall@10 of the
   index against exact search on the query vectors. Class-name queries: for every class its
   leaf-path text ("tshirts (topwear, apparel)") searches the images; the share of the top 10 whose
   class is the query's class (mean over classes).
2. A synthetic index of N = 1,000,000 unit vectors of D = 512, drawn from a mixture fitted to the
   real run's image embeddings (per class, in the real class proportions: a Gaussian with the
   class's mean and covariance, then L2-normalised), so the clusters are shaped like the real ones. The index kind follows `huse index`'s rule (HNSW at this size), efSearch tuned on
   500 fresh queries to recall@10 >= 0.95 and measured on 500 others. A text (image) query at 1M
   is timed end to end as the real query encoding of a catalogue title (photo) followed by a search
   of the 1M index with a fresh query vector from the mixture.

    python bench/bench_search.py --run cache/runs/myntra_default
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/machine.py

from huse_pipeline.search import vectors
from machine import cpu_model  # noqa: E402


def percentiles(times: list[tuple[float, float]]) -> str:
    """Wall-clock p50 / p95 of (wall, cpu) pairs, and the p50 of this process's CPU time: what a query
    costs on a core of its own, which the shared machine's load does not inflate."""
    wall = np.asarray([w for w, _ in times]) * 1e3
    cpu = np.asarray([c for _, c in times]) * 1e3
    return (f"p50 {np.percentile(wall, 50):7.2f} ms   p95 {np.percentile(wall, 95):7.2f} ms   "
            f"(CPU time p50 {np.percentile(cpu, 50):6.2f} ms; n = {len(wall)})")


def timed(fn, *args, **kw) -> tuple[float, float]:
    """(wall-clock, process CPU) seconds of one call."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn(*args, **kw)
    return time.perf_counter() - t0, time.process_time() - c0


def fit_mixture(emb: np.ndarray, labels: np.ndarray):
    """Per class: its mean, the principal directions of its items and their std (the class's empirical
    covariance, rank below the class size), and its item count."""
    parts = []
    for c in np.unique(labels):
        x = emb[labels == c].astype(np.float64)
        mu = x.mean(0)
        _, s, vt = np.linalg.svd(x - mu, full_matrices=False)
        parts.append((mu, vt, s / np.sqrt(max(len(x) - 1, 1)), len(x)))
    return parts


def draw(parts, n: int, rng: np.random.Generator, block: int = 65536) -> np.ndarray:
    """n unit vectors from the fitted mixture (class chosen by the real class frequencies)."""
    weights = np.asarray([p[3] for p in parts], dtype=np.float64)
    cls = rng.choice(len(parts), size=n, p=weights / weights.sum())
    dim = parts[0][0].shape[0]
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, block):
        c = cls[start:start + block]
        x = np.empty((len(c), dim), np.float64)
        for k in np.unique(c):
            at = np.flatnonzero(c == k)
            mu, v, sd, _ = parts[k]
            x[at] = mu + (rng.standard_normal((len(at), len(sd))) * sd) @ v
        out[start:start + len(c)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default=None, help="Run folder (default: the latest under cache/runs).")
    ap.add_argument("--features", default=None, help="Its feature file (default: the run's own).")
    ap.add_argument("--index", default=None, help="Index folder (default: <run>/index).")
    ap.add_argument("--text-queries", type=int, default=200)
    ap.add_argument("--image-queries", type=int, default=40)
    ap.add_argument("--synthetic-n", type=int, default=1_000_000)
    ap.add_argument("--synthetic-queries", type=int, default=1000, help="Half tune efSearch, half measure recall.")
    ap.add_argument("--skip-synthetic", action="store_true")
    ap.add_argument("--flat-sizes", type=int, nargs="*", default=[50_000, 100_000, 200_000, 400_000],
                    help="Sizes at which a query of an exact index is timed (on the synthetic vectors).")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch and FAISS (OpenMP) threads. 1: a single query is fastest on one thread; on this "
                         "shared 2-core machine two FAISS threads made an exact query 4x slower (barrier waits)")
    args = ap.parse_args()

    import faiss
    import torch

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)  # torch and faiss may load separate OpenMP runtimes: set both

    from huse_pipeline.extract.graph import class_text
    from huse_pipeline.search.space import Space

    rng = np.random.default_rng(args.seed)
    cpu = cpu_model()
    print(f"machine: {cpu}, {os.cpu_count()} cores; torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"faiss {faiss.__version__} ({faiss.omp_get_max_threads()} threads), python {platform.python_version()}; load average {os.getloadavg()[0]:.1f}")

    space = Space.load(args.run, args.features, index=args.index or True, device="cpu")
    index = space.index
    meta = index.meta
    print(f"\n[real catalogue] run {space.run_dir}, {index.n} items, D = {meta['dim']}, index kind {meta['kind']} "
          f"({meta['rule']['why']})")
    for m in ("image", "text"):
        mi = meta["modalities"][m]
        print(f"  {m} index: {mi['kind']} {mi['params']}, recall@10 {mi['recall@10']} on {mi['recall_queries']} "
              f"held-out queries (recorded by huse index)")

    items = index.items
    root = Path(meta["image_root"])
    pick_t = rng.choice(index.n, size=min(args.text_queries, index.n), replace=False)
    pick_i = rng.choice(index.n, size=min(args.image_queries, index.n), replace=False)
    titles = items["title"].to_numpy()[pick_t].tolist()
    photos = [str(root / p) for p in items["image_path"].to_numpy()[pick_i]]

    # warm-up: load the encoders, touch the index
    space.search_text(titles[0]), space.search_image(photos[0])
    q_text = space.encode_texts(titles)[0]
    t_text, t_encode, t_lookup, t_image, t_encode_img = [], [], [], [], []
    for i, title in enumerate(titles):  # interleaved, so that the three see the same machine load
        t_text.append(timed(space.search_text, title, 10))
        t_encode.append(timed(space.encode_texts, [title]))
        t_lookup.append(timed(space.search, q_text[i:i + 1], 10))
    for photo in photos:
        t_image.append(timed(space.search_image, photo, 10))
        t_encode_img.append(timed(space.encode_images, [photo]))
    print(f"  text query  (huse search TEXT, k = 10):    {percentiles(t_text)}")
    print(f"  image query (huse search --image, k = 10): {percentiles(t_image)}")
    print(f"    encoding alone, a text:  {percentiles(t_encode)}")
    print(f"    encoding alone, an image: {percentiles(t_encode_img)}")
    print(f"    search alone (vector -> 10 result rows): {percentiles(t_lookup)}")

    found = index.search(q_text, 10, "image")[1]
    truth_scores, truth = vectors.exact_topk(q_text, index.vectors("image"), 10)
    recall = vectors.recall_at_k(found, truth, q_text, index.vectors("image"), truth_scores)
    print(f"  recall@10 of the image index vs exact search on the {len(titles)} text queries: {recall:.4f}")

    sep = meta.get("label_sep", "<")
    names = index.class_names
    shares, top1 = [], []
    q_cls = space.encode_texts([class_text(tuple(n.split(sep))) for n in names])[0]
    _, rows = index.search(q_cls, 10, "image")
    for c, r in enumerate(rows):
        got = index.labels[r[r >= 0]]
        shares.append(float(np.mean(got == c)))
        top1.append(bool(got[0] == c))
    worst = sorted(range(len(names)), key=lambda c: shares[c])[:5]
    print(f"  class-name queries ({len(names)} classes, leaf-path text -> images): share of the top 10 in the "
          f"query's class {np.mean(shares):.3f} (mean over classes), top-1 in class {np.mean(top1):.3f}; "
          f"classes with every one of the 10 in class: {sum(s == 1.0 for s in shares)}")
    print("    lowest: " + "; ".join(f"{class_text(tuple(names[c].split(sep)))!r} {shares[c]:.1f}" for c in worst))

    if args.skip_synthetic:
        return
    n, dim = args.synthetic_n, int(meta["dim"])
    print(f"\n[synthetic] {n} unit vectors, D = {dim}, a Gaussian per class fitted to the run's image embeddings "
          f"({len(names)} classes, their mean and covariance)")
    parts = fit_mixture(np.asarray(index.vectors("image")), index.labels)
    t0 = time.perf_counter()
    x = draw(parts, n, rng)
    q = draw(parts, args.synthetic_queries + 200, rng)
    print(f"  drawn in {time.perf_counter() - t0:.1f} s")
    for size in args.flat_sizes:  # what an exact index costs per query as it grows: the rule's threshold
        if size > n:
            continue
        flat = faiss.IndexFlatIP(dim)
        flat.add(x[:size])
        t_flat = [timed(flat.search, q[i:i + 1], 10) for i in range(100)]
        print(f"  exact IndexFlatIP, {size:>7} items: {percentiles(t_flat)}")
        del flat
    kind, why = vectors.choose_kind(n, dim, "auto", vectors.parse_memory("auto"))
    print(f"  rule: {kind} ({why})")
    half = args.synthetic_queries // 2
    t0 = time.perf_counter()
    vi, info = vectors.build_vector_index(x, kind, q[:half], q[half:args.synthetic_queries])
    print(f"  built and tuned in {time.perf_counter() - t0:.1f} s: {info['params']}, recall@10 vs exact "
          f"{info['recall@10']} on {info['recall_queries']} held-out queries (tuning: {info.get('tune_recall@10')})")
    extra = q[args.synthetic_queries:]
    def text_query_1m(i: int) -> None:
        space.encode_texts([titles[i]])
        vi.search(extra[i % len(extra)][None], 10)

    def image_query_1m(i: int) -> None:
        space.encode_images([photos[i]])
        vi.search(extra[i % len(extra)][None], 10)

    t_text_1m, t_search, t_image_1m = [], [], []
    for i in range(len(titles)):  # interleaved, as above
        t_text_1m.append(timed(text_query_1m, i))
        t_search.append(timed(vi.search, extra[i % len(extra)][None], 10))
    t_image_1m = [timed(image_query_1m, i) for i in range(len(photos))]
    print(f"  search alone (k = 10):        {percentiles(t_search)}")
    print(f"  text query at {n}:  {percentiles(t_text_1m)}")
    print(f"  image query at {n}: {percentiles(t_image_1m)}")


if __name__ == "__main__":
    main()
