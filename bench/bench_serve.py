"""`huse serve` under load on loopback: latency, errors and the server's memory.

Starts `huse serve --port 0` over a run as its own process, then

1. warms it up (every kind of request once, the thumbnails of a fixed set of items);
2. times text queries one at a time: client latency and the server's own time from its Server-Timing
   header (wall `total`, and `cpu`, the handler thread's CPU time, which other load does not inflate);
3. runs C concurrent clients (threads with keep-alive connections), first for 2,000 warm-up requests,
   then for a fixed time and on until at least 10,000 requests have been made, with a mix of requests (text search 70 %, more
   like this 15 %, item details 5 %, thumbnails of the fixed set 5 %, categories and health 5 %):
   p50 / p95 per kind, errors (any status other than 200), throughput;
4. reads the server's resident memory (RSS) after the warm-up, every 2,500 requests and at the end;
5. times a few image uploads one at a time (optional, `--images`).

    python bench/bench_serve.py --run cache/runs/myntra_default --features cache/myntra.h5
    python bench/bench_serve.py                  # the latest run under cache/runs (e.g. the demo)
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]


def start_server(run: str | None, features: str | None, threads: int) -> tuple[subprocess.Popen, str, list[str]]:
    cmd = [sys.executable, "-m", "huse_pipeline", "serve", "--port", "0", "--device", "cpu", "--threads", str(threads)]
    cmd += ["--run", run] if run else []
    cmd += ["--features", features] if features else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log: list[str] = []
    for line in proc.stderr:
        log.append(line)
        match = re.search(r"at (http://127\.0\.0\.1:\d+/)", line)
        if match:
            threading.Thread(target=lambda: [log.append(x) for x in proc.stderr], daemon=True).start()
            return proc, match.group(1), log
    raise SystemExit("huse serve did not start:\n" + "".join(log))


def server_timing(response: httpx.Response) -> dict[str, float]:
    out = {}
    for part in response.headers.get("server-timing", "").split(","):
        match = re.match(r"\s*(\w+);dur=([\d.]+)", part)
        if match:
            out[match.group(1)] = float(match.group(2))
    return out


def pct(values, q) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else float("nan")


def line(name: str, ms: list[float]) -> str:
    return f"  {name:<14} n = {len(ms):>6}   p50 {pct(ms, 50):8.2f} ms   p95 {pct(ms, 95):8.2f} ms"


class Mix:
    """Draws requests: (kind, method, url, kwargs)."""

    def __init__(self, titles: list[str], ids: list[int], thumb_ids: list[int], seed: int) -> None:
        self.titles, self.ids, self.thumb_ids = titles, ids, thumb_ids
        self.rng = random.Random(seed)

    def query(self) -> str:
        words = self.rng.choice(self.titles).split()
        n = self.rng.randint(1, min(4, len(words)))  # a few words of a title, like a person types
        start = self.rng.randint(0, len(words) - n)
        return " ".join(words[start:start + n])

    def draw(self) -> tuple[str, str]:
        r = self.rng.random()
        if r < 0.70:
            page = 1 if self.rng.random() < 0.8 else 2
            return "text", "/api/search?" + str(httpx.QueryParams({"q": self.query(), "page": page}))
        if r < 0.85:
            return "similar", f"/api/items/{self.rng.choice(self.ids)}/similar"
        if r < 0.90:
            return "item", f"/api/items/{self.rng.choice(self.ids)}"
        if r < 0.95:
            return "thumbnail", f"/api/items/{self.rng.choice(self.thumb_ids)}/thumbnail"
        return ("categories", "/api/categories") if r < 0.975 else ("health", "/api/health")


def rss_mb(pid: int) -> float:
    """Resident memory of a process (Linux: VmRSS in /proc/PID/status)."""
    for row in Path(f"/proc/{pid}/status").read_text().splitlines():
        if row.startswith("VmRSS:"):
            return int(row.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def run_load(url: str, mix: Mix, ids: list[int], thumb_ids: list[int], clients: int, duration: float,
             min_requests: int, seed: int, rss=None, every: int = 2500):
    """`clients` threads with keep-alive connections, each drawing requests from its own Mix, until
    `duration` seconds have passed and `min_requests` were made. Returns per client (kind, client ms,
    status, server ms) and, with `rss`, (requests made, rss()) every `every` requests."""
    results: list[list[tuple[str, float, int, float]]] = [[] for _ in range(clients)]
    steps: list[tuple[int, float]] = []
    count = [0]
    lock = threading.Lock()
    stop_at = time.perf_counter() + duration

    def client_loop(k: int) -> None:
        own = Mix(mix.titles, ids, thumb_ids, seed + k)
        with httpx.Client(base_url=url, timeout=60) as c:
            while True:
                with lock:
                    if time.perf_counter() >= stop_at and count[0] >= min_requests:
                        return
                    count[0] += 1
                    if rss is not None and count[0] % every == 0:
                        steps.append((count[0], rss()))
                kind, path = own.draw()
                t0 = time.perf_counter()
                try:
                    r = c.get(path)
                    status, server = r.status_code, server_timing(r).get("total", float("nan"))
                except httpx.HTTPError:
                    status, server = -1, float("nan")
                results[k].append((kind, 1000 * (time.perf_counter() - t0), status, server))

    workers = [threading.Thread(target=client_loop, args=(k,)) for k in range(clients)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return (results, steps) if rss is not None else results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=None, help="run folder (default: the latest under cache/runs)")
    ap.add_argument("--features", default=None, help="feature file (default: the run's own)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load at least")
    ap.add_argument("--min-requests", type=int, default=10_000, help="requests of the load phase at least")
    ap.add_argument("--warmup-requests", type=int, default=2000, help="concurrent requests before the measured phase")
    ap.add_argument("--sequential", type=int, default=200, help="text queries timed one at a time")
    ap.add_argument("--images", type=int, default=10, help="image uploads timed one at a time")
    ap.add_argument("--threads", type=int, default=1, help="the server's --threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json-out", default=None, help="also write the figures as JSON")
    args = ap.parse_args()

    load0 = os.getloadavg()
    t_start = time.perf_counter()
    proc, url, log = start_server(args.run, args.features, args.threads)
    started_s = time.perf_counter() - t_start
    figures: dict = {"url": url, "clients": args.clients, "start_s": round(started_s, 1)}
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            health = client.get("/api/health").json()
            index = Path(health["index"])
            if not index.is_absolute():
                index = Path.cwd() / index
            items = pd.read_csv(index / "items.csv", keep_default_na=False)
            ids = items["id"].astype(int).tolist()
            rng = random.Random(args.seed)
            thumb_ids = rng.sample(ids, min(200, len(ids)))
            mix = Mix(items["title"].astype(str).tolist(), ids, thumb_ids, args.seed)
            print(f"huse serve at {url}: {health['items']} items, index {health['index']} "
                  f"({health['index_kind']['image']}), run {health['run']}; started in {started_s:.1f} s")

            # 1. warm-up
            for i in thumb_ids:
                assert client.get(f"/api/items/{i}/thumbnail").status_code == 200
            for _ in range(100):
                kind, path = mix.draw()
                client.get(path)

            # 2. text queries one at a time
            seq = {"client": [], "app": [], "total": [], "cpu": [], "encode": [], "search": []}
            for _ in range(args.sequential):
                q = mix.query()
                t0 = time.perf_counter()
                r = client.get("/api/search", params={"q": q})
                seq["client"].append(1000 * (time.perf_counter() - t0))
                assert r.status_code == 200, r.text
                st = server_timing(r)
                for key in ("app", "total", "cpu", "encode", "search"):
                    seq[key].append(st[key])
            print(f"\ntext queries one at a time ({args.sequential}, top 24 of a page, with predicted classes):")
            print(line("client", seq["client"]))
            print(line("server app", seq["app"]) + "   (the whole app: routing, handler, JSON)")
            print(line("server total", seq["total"]) + "   (the handler)")
            print(line("server CPU", seq["cpu"]))
            print(line("  encode", seq["encode"]))
            print(line("  search", seq["search"]))
            figures["sequential_text_ms"] = {k: {"p50": round(pct(v, 50), 2), "p95": round(pct(v, 95), 2)}
                                             for k, v in seq.items()}

        # 3. load: first a concurrent warm-up (the server's worker threads and their allocator arenas come
        # into being), then the measured phase, the server's RSS sampled every 2,500 requests
        run_load(url, mix, ids, thumb_ids, args.clients, 0.0, args.warmup_requests, args.seed + 500)
        rss_before = rss_mb(proc.pid)
        t_load = time.perf_counter()
        results, rss_steps = run_load(url, mix, ids, thumb_ids, args.clients, args.duration, args.min_requests,
                                      args.seed + 1000, lambda: rss_mb(proc.pid))
        load_s = time.perf_counter() - t_load
        rss_after = rss_mb(proc.pid)
        flat = [x for r in results for x in r]
        errors = sum(1 for _, _, s, _ in flat if s != 200)
        print(f"\n{args.clients} concurrent clients, {len(flat)} requests in {load_s:.1f} s "
              f"({len(flat) / load_s:.1f} requests/s), errors: {errors}")
        print(line("all", [ms for _, ms, _, _ in flat]))
        kinds = ["text", "similar", "item", "thumbnail", "categories", "health"]
        for kind in kinds:
            print(line(kind, [ms for kd, ms, _, _ in flat if kd == kind]))
        text_server = [s for kd, _, st, s in flat if kd == "text" and st == 200]
        print(line("text (server)", text_server) + "   (handler time, lock wait included)")
        print(f"\nserver RSS after {args.warmup_requests} concurrent warm-up requests {rss_before:.1f} MB, after "
              f"{len(flat)} more {rss_after:.1f} MB ({rss_after - rss_before:+.1f} MB); along the way: "
              + ", ".join(f"{n}: {mb:.1f}" for n, mb in rss_steps))
        figures["load"] = {"requests": len(flat), "seconds": round(load_s, 1), "errors": errors,
                           "requests_per_s": round(len(flat) / load_s, 1),
                           "ms": {k: {"p50": round(pct([m for kd, m, _, _ in flat if kd == k], 50), 2),
                                      "p95": round(pct([m for kd, m, _, _ in flat if kd == k], 95), 2)}
                                  for k in kinds},
                           "all_ms": {"p50": round(pct([m for _, m, _, _ in flat], 50), 2),
                                      "p95": round(pct([m for _, m, _, _ in flat], 95), 2)}}
        figures["rss_mb"] = {"before": round(rss_before, 1), "after": round(rss_after, 1),
                             "steps": [(n, round(mb, 1)) for n, mb in rss_steps]}

        # 5. image uploads one at a time
        if args.images:
            image_root = Path(json.loads((index / "meta.json").read_text()).get("image_root", "."))
            paths = [image_root / p for p in items["image_path"].sample(args.images, random_state=args.seed)]
            up = {"client": [], "total": [], "cpu": []}
            with httpx.Client(base_url=url, timeout=60) as client:
                for p in paths:
                    t0 = time.perf_counter()
                    r = client.post("/api/search/image", files={"file": (p.name, p.read_bytes(), "image/jpeg")})
                    up["client"].append(1000 * (time.perf_counter() - t0))
                    assert r.status_code == 200, r.text
                    st = server_timing(r)
                    up["total"].append(st["total"])
                    up["cpu"].append(st["cpu"])
            print(f"\nimage uploads one at a time ({args.images}):")
            for k, v in up.items():
                print(line(k if k == "client" else f"server {k}", v))
            figures["sequential_image_ms"] = {k: {"p50": round(pct(v, 50), 2), "p95": round(pct(v, 95), 2)}
                                              for k, v in up.items()}
    finally:
        proc.terminate()
        proc.wait(30)
    load1 = os.getloadavg()
    figures["loadavg"] = {"start": [round(x, 2) for x in load0], "end": [round(x, 2) for x in load1]}
    print(f"\nload average (1, 5, 15 min) at the start {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, "
          f"at the end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}; {os.cpu_count()} CPUs")
    if "Traceback" in "".join(log):
        print("the server logged a traceback:\n" + "".join(log))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
