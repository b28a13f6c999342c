"""Running `huse serve`: load the run, its feature file and index (all item metadata into memory, the
encoders warmed up), bind the socket (loopback unless told otherwise) and serve the app with uvicorn."""
from __future__ import annotations

import importlib.util
import ipaddress
import logging
import socket
from dataclasses import dataclass
from typing import Any

from huse_pipeline.errors import HuseError
from huse_pipeline.settings import DEFAULT_RUNS_DIR

log = logging.getLogger(__name__)

SERVE_PACKAGES = {"fastapi": "fastapi", "uvicorn": "uvicorn", "python_multipart": "python-multipart"}
SERVE_EXTRA_HINT = 'huse serve needs the serve extra: pip install -e ".[serve]"'


@dataclass(frozen=True)
class ServeConfig:
    """What `huse serve` is given."""

    run: str | None = None  # run folder; default: the latest under runs_dir
    features: str | None = None  # default: the run's own feature file
    index: str | None = None  # index folder; default <run>/index
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (the log line says which)
    max_upload_mb: float = 10.0
    threads: int = 1  # torch and FAISS threads: one query is fastest on one (BENCHMARKS.md)
    device: str = "auto"
    access_log: bool = False
    runs_dir: str = DEFAULT_RUNS_DIR


def missing_packages() -> list[str]:
    """The serve extra's packages that are not installed (their pip names)."""
    return [pip for module, pip in SERVE_PACKAGES.items() if importlib.util.find_spec(module) is None]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); HuseError saying what to change if that fails."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise HuseError(f"--host {host!r} is not an address of this machine ({exc.strerror})") from exc
    family, kind, proto, _, address = infos[0]
    # proto must be IPPROTO_TCP: asyncio sets TCP_NODELAY on accepted connections only then (without it a
    # response on a kept-alive connection waits ~40 ms for a delayed ACK)
    sock = socket.socket(family, kind, proto or socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise HuseError(f"cannot listen on {host}:{port} ({exc.strerror}): choose another --port") from exc
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def load_space(cfg: ServeConfig) -> Any:
    """The run's Space with its index, threads set and encoders warmed up (the first query is then not slow)."""
    import faiss
    import numpy as np
    import torch
    from PIL import Image

    from huse_pipeline.search.space import Space

    torch.set_num_threads(cfg.threads)
    faiss.omp_set_num_threads(cfg.threads)  # torch and faiss may each load an OpenMP runtime
    space = Space.load(cfg.run, cfg.features, index=cfg.index or True, device=cfg.device, runs_dir=cfg.runs_dir)
    for m in ("image", "text"):
        float(np.asarray(space.index.vectors(m)).sum())  # page the stored vectors in now, not on first use
    space.encode_texts(["warm up"])
    space.encode_images([Image.new("RGB", (64, 64), (255, 255, 255))])
    return space


def make_server(app: Any, access_log: bool = False) -> Any:
    """A uvicorn server for `app` (run it with `.run(sockets=[sock])`; `.should_exit = True` stops it)."""
    import uvicorn

    config = uvicorn.Config(app, log_config=None, access_log=access_log, server_header=False,
                            timeout_graceful_shutdown=5)
    return uvicorn.Server(config)


def serve(cfg: ServeConfig) -> None:
    """Serve the page and the API until interrupted."""
    missing = missing_packages()
    if missing:
        raise HuseError(f"{SERVE_EXTRA_HINT} (missing: {', '.join(missing)})")
    if cfg.max_upload_mb <= 0:
        raise HuseError("--max-upload-mb must be positive")
    from huse_pipeline.serve.app import create_app

    sock = bind(cfg.host, cfg.port)  # first: a busy port is reported before the model loads
    try:
        space = load_space(cfg)
        loopback = is_loopback(cfg.host)
        allowed = ["127.0.0.1", "localhost", "::1", cfg.host] if loopback else None  # DNS-rebinding guard
        app = create_app(space, max_upload_bytes=int(cfg.max_upload_mb * (1 << 20)),
                         max_pixels=space.featurizer.transform.max_pixels, allowed_hosts=allowed)
        if not loopback:
            log.warning("listening on %s: anyone who can reach this machine can search the catalogue", cfg.host)
        log.info("serving %s (%d items, index %s) at %s  (Ctrl-C stops)", space.run_dir or space.checkpoint,
                 space.index.n, space.index.folder, url_of(sock))
        make_server(app, cfg.access_log).run(sockets=[sock])
    finally:
        sock.close()
