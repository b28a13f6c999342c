"""Stage one throughput: is decoding hidden behind the image network, and is the text stage's own
work (normalise, count word pieces, TF-IDF) small next to the text encoder?

Measured side by side in ONE process on the same rows and batch size, after a warm-up:
  (1) images/s of the real extraction loop (`process_parts`: DataLoader workers decode + fit,
      network, part files written; stub TEXT encoder so text costs nothing) vs the image
      network's own images/s on the same images already decoded into memory. Target ratio >= 0.8.
  (2) texts/s of the pipeline's text stage (`prepare_texts` + encode, per batch as in
      `process_parts`) vs the text encoder's `encode` alone on the same (cleaned) texts.
      Target ratio >= 0.9.
The members are interleaved (images: chunks of --chunk-rows, each chunk a full `process_parts` call
with its own DataLoader start-up; texts: batch by batch), alternating which goes first, so both see
the same load on a shared machine; `--repeats` such passes.

    python bench/bench_extract.py --catalogue $HUSE_REAL_CATALOGUE --limit 1024
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/machine.py

from huse_pipeline.data.text import normalise_text, prepare_texts  # noqa: E402
from huse_pipeline.encoders.text import load_text_encoder  # noqa: E402
from huse_pipeline.extract.run import ExtractConfig, load_job, process_parts, tune_cpu_allocator  # noqa: E402
from machine import cpu_model  # noqa: E402


def pooled(rates: list[float]) -> float:
    """Throughput over all repeats (same work in each): total items / total time."""
    return len(rates) / sum(1 / r for r in rates)


def bench_images(args: argparse.Namespace, catalogue: Path, work: Path) -> None:
    frame = pd.read_csv(catalogue, dtype=str, keep_default_na=False).head(args.limit)
    small = work / "catalogue.csv"
    frame.to_csv(small, index=False)
    cfg = ExtractConfig(catalogue=str(small), out=str(work / "feats.h5"), image_root=str(catalogue.parent),
                        image_encoder=args.image_encoder, image_fit=args.image_fit, text_encoder="stub",
                        batch_size=args.batch_size, num_workers=args.num_workers, device=args.device,
                        part_rows=args.part_rows)
    job = load_job(cfg)
    encoder, bs, n = job.image_encoder, args.batch_size, len(frame)
    paths = [str(catalogue.parent / p) for p in frame["image"]]
    t = time.perf_counter()
    n = n // bs * bs  # whole batches only, so both members see identical batches
    decoded = [torch.stack([job.transform(p) for p in paths[i : i + bs]]) for i in range(0, n, bs)]  # in memory
    decode_rate = n / (time.perf_counter() - t)
    if job.device.type == "cuda":
        decoded = [b.pin_memory() for b in decoded]

    def network_only(start: int, end: int) -> float:
        t = time.perf_counter()
        for batch in decoded[start // bs : end // bs]:
            encoder.encode(batch).cpu()
        return time.perf_counter() - t

    def pipeline(start: int, end: int, tag: str) -> float:
        parts = [(s, min(s + args.part_rows, end)) for s in range(start, end, args.part_rows)]
        stats = process_parts(job, parts, work / tag)  # a fresh DataLoader: worker start-up counted
        assert stats.images == end - start
        return stats.seconds

    for batch in decoded[:2]:  # warm-up: kernels, allocator, caches
        encoder.encode(batch).cpu()
    process_parts(job, [(0, min(n, 2 * bs))], work / "warm")
    # the machine may be shared: interleave the two members chunk by chunk (alternating which goes
    # first) so that both see the same load
    chunk = max(bs, args.chunk_rows // bs * bs)
    net, pipe = [], []
    for i in range(args.repeats):
        t_net = t_pipe = 0.0
        for j, start in enumerate(range(0, n, chunk)):
            end = min(start + chunk, n)
            if (i + j) % 2:
                t_net += network_only(start, end)
            t_pipe += pipeline(start, end, f"r{i}c{j}")
            if not (i + j) % 2:
                t_net += network_only(start, end)
        net.append(n / t_net)
        pipe.append(n / t_pipe)
        print(f"  repeat {i}: network only {net[-1]:7.1f} img/s   pipeline {pipe[-1]:7.1f} img/s   "
              f"ratio {pipe[-1] / net[-1]:.3f}", flush=True)
    print(f"(1) images: {n} images, batch {bs}, {args.num_workers} workers, {cfg.image_encoder} {cfg.image_fit} "
          f"{encoder.input_size}px on {job.device}")
    print(f"    pipeline end to end  {pooled(pipe):8.1f} images/s (all repeats)")
    print(f"    network alone        {pooled(net):8.1f} images/s (all repeats)")
    print(f"    decode + fit alone   {decode_rate:8.1f} images/s (main process, once, not interleaved)")
    print(f"    ratio                {pooled(pipe) / pooled(net):8.3f}   per repeat "
          f"{', '.join(f'{r:.3f}' for r in np.divide(pipe, net))}   (target >= 0.8)")


def bench_texts(args: argparse.Namespace, catalogue: Path) -> None:
    texts = pd.read_csv(catalogue, dtype=str, keep_default_na=False)["text"].head(args.text_limit).tolist()
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device)
    encoder = load_text_encoder(args.text_encoder, device)
    bs, n = args.batch_size, len(texts)
    batches = [texts[i : i + bs] for i in range(0, n, bs)]
    cleaned = [[normalise_text(t) for t in b] for b in batches]

    def encoder_only(batch: list[str]) -> float:
        t = time.perf_counter()
        encoder.encode(batch, batch_size=bs)
        return time.perf_counter() - t

    def text_stage(batch: list[str]) -> tuple[float, int]:
        t = time.perf_counter()
        prepared = prepare_texts(batch, encoder.max_tokens, encoder.count_tokens)
        encoder.encode([u for u, r in zip(prepared.text_used, prepared.reason) if not r], batch_size=bs)
        return time.perf_counter() - t, int(prepared.reduced.sum())

    encoder.encode(cleaned[0], batch_size=bs)  # warm-up
    # the machine is shared: interleave the two members batch by batch (alternating which goes
    # first) so that both see the same load
    enc, stage = [], []
    for i in range(args.repeats):
        t_enc = t_stage = 0.0
        reduced = 0
        for j, (raw, clean) in enumerate(zip(batches, cleaned)):
            if (i + j) % 2:
                t_enc += encoder_only(clean)
            dt, r = text_stage(raw)
            t_stage, reduced = t_stage + dt, reduced + r
            if not (i + j) % 2:
                t_enc += encoder_only(clean)
        enc.append(n / t_enc)
        stage.append(n / t_stage)
        print(f"  repeat {i}: encoder only {enc[-1]:7.1f} texts/s   text stage {stage[-1]:7.1f} texts/s   "
              f"ratio {stage[-1] / enc[-1]:.3f}", flush=True)
    print(f"(2) texts: {n} texts, batch {bs}, {args.text_encoder} on {device}, {reduced} reduced by TF-IDF")
    print(f"    text stage           {pooled(stage):8.1f} texts/s (all repeats)")
    print(f"    encoder alone        {pooled(enc):8.1f} texts/s (all repeats)")
    print(f"    ratio                {pooled(stage) / pooled(enc):8.3f}   per repeat "
          f"{', '.join(f'{r:.3f}' for r in np.divide(stage, enc))}   (target >= 0.9)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalogue", default=os.environ.get("HUSE_REAL_CATALOGUE"),
                        help="real catalogue CSV (default: $HUSE_REAL_CATALOGUE)")
    parser.add_argument("--limit", type=int, default=1024, help="images for (1)")
    parser.add_argument("--text-limit", type=int, default=4096, help="texts for (2)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--part-rows", type=int, default=1024)
    parser.add_argument("--chunk-rows", type=int, default=512, help="images per interleaved chunk in (1)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in this process (default: torch's)")
    parser.add_argument("--image-encoder", default="efficientnet-lite0")
    parser.add_argument("--image-fit", default="pad")
    parser.add_argument("--text-encoder", default="all-MiniLM-L6-v2")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip", choices=["images", "texts"], default=None)
    parser.add_argument("--no-tune-allocator", action="store_true", help="leave glibc malloc as it is (as before the fix)")
    args = parser.parse_args()
    if not args.catalogue:
        parser.error("--catalogue (or HUSE_REAL_CATALOGUE) is required")
    if args.threads:
        torch.set_num_threads(args.threads)
    tuned = not args.no_tune_allocator and tune_cpu_allocator()
    catalogue = Path(args.catalogue)
    if catalogue.is_dir():
        catalogue = catalogue / "catalogue.csv"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, GPU: {gpu}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads; python {platform.python_version()}; "
          f"malloc tuned: {tuned}")
    print("command: python " + " ".join(sys.argv))
    with tempfile.TemporaryDirectory() as tmp:
        if args.skip != "images":
            bench_images(args, catalogue, Path(tmp))
    if args.skip != "texts":
        bench_texts(args, catalogue)


if __name__ == "__main__":
    main()
