"""`huse serve`: a local product-search page and a read-only JSON API over the universal space (README,
"Searching in a browser"). `create_app(space)` builds the application; `serve(ServeConfig(...))` loads
the run and its index and runs it under uvicorn. Needs the `serve` extra (FastAPI, uvicorn)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from huse_pipeline.serve.app import create_app
    from huse_pipeline.serve.server import ServeConfig, serve

__all__ = ["ServeConfig", "create_app", "serve"]


def __getattr__(name: str) -> Any:
    # lazy: the config imports neither FastAPI nor torch
    if name == "create_app":
        from huse_pipeline.serve.app import create_app

        return create_app
    if name in ("ServeConfig", "serve"):
        from huse_pipeline.serve import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
