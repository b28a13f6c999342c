"""Chunked exact retrieval vs the naive full-matrix path, side by side in one run.

    PYTHONPATH=. python bench/bench_retrieval.py [--n 2000 8000] [--dim 512] [--device cpu|cuda]

For each split size N: time of (a) one full (N, N) similarity matrix + torch.topk (memory O(N^2))
and (b) `retrieval.topk` in chunks (memory O(query_chunk x gallery_chunk)), the ratio b / a, the
largest similarity block each path holds, whether the top-k scores agree exactly, and in how many
rows the indices differ (only where scores tie: torch.topk orders ties arbitrarily, the chunked
path by lower index).
"""
from __future__ import annotations

import argparse
import time

import torch

from huse_pipeline.measures.retrieval import l2_normalize, similarity, topk


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[2000, 8000])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--query-chunk", type=int, default=1024)
    ap.add_argument("--gallery-chunk", type=int, default=4096)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    print(f"{'N':>7} {'full s':>8} {'chunked s':>10} {'ratio':>6} {'full block MiB':>15} {'chunk block MiB':>16} "
          "scores_equal rows_tie_order")
    for n in args.n:
        g = torch.Generator().manual_seed(n)
        x = l2_normalize(torch.randn(n, args.dim, generator=g)).to(args.device)
        sync()
        t0 = time.perf_counter()
        full = similarity(x, x)
        full.fill_diagonal_(float("-inf"))
        ref_s, ref_i = torch.topk(full, args.k, dim=1)
        sync()
        t_full = time.perf_counter() - t0
        del full
        t0 = time.perf_counter()
        scores, idx = topk(x, x, args.k, torch.arange(n, device=x.device), args.query_chunk, args.gallery_chunk)
        sync()
        t_chunk = time.perf_counter() - t0
        mib_full = n * n * 4 / 2**20
        mib_chunk = min(n, args.query_chunk) * (min(n, args.gallery_chunk) + args.k) * 4 / 2**20
        print(f"{n:>7} {t_full:>8.2f} {t_chunk:>10.2f} {t_chunk / t_full:>6.2f} {mib_full:>15.1f} {mib_chunk:>16.1f} "
              f"{str(torch.equal(scores, ref_s)):>12} {int((idx != ref_i).any(1).sum()):>14}")


if __name__ == "__main__":
    main()
