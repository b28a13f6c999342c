"""The web application of `huse serve`: one static page (plain HTML, JS and CSS, no build step) and a
read-only JSON API over a `Space` and its index (OpenAPI at /api/openapi.json). `create_app(space)`
needs no socket, so tests drive it with FastAPI's TestClient."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import FastAPI, File, Query, Request, Response, UploadFile
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from huse_pipeline import __version__
from huse_pipeline.errors import HuseError
from huse_pipeline.serve.catalogue import THUMBNAIL_SIZES, NoThumbnail, ServedCatalogue, UnknownItem
from huse_pipeline.serve.uploads import BodyLimit, UploadRefused, open_upload
from huse_pipeline.settings import DEFAULT_MAX_PIXELS

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
MAX_DEPTH = 1000  # paging stops after this many results
CHIPS = 3  # predicted categories shown for a query
SECURITY_HEADERS = {
    # the page loads nothing from elsewhere, runs no inline script and shows uploads through blob: URLs
    "content-security-policy": "default-src 'self'; img-src 'self' blob:; script-src 'self'; style-src 'self'; "
                               "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
}


# ---------------------------------------------------------------------------- API schema


class ClassScore(BaseModel):
    class_path: str
    probability: float


class Result(BaseModel):
    rank: int = Field(description="1-based rank over all pages")
    id: int = Field(description="item id: its 0-based catalogue row")
    score: float = Field(description="cosine similarity in the universal space")
    title: str
    class_path: str
    split: str
    thumbnail: str = Field(description="URL of the item's square thumbnail")


class SearchResponse(BaseModel):
    query: dict[str, Any] = Field(description="what was searched: {kind: text|image|item, text|item|image}")
    target: str = Field(description="which items' embeddings were searched: image or text")
    category: str | None
    page: int
    per_page: int
    has_more: bool
    results: list[Result]
    predicted: list[ClassScore] = Field(description="the query's most probable class paths (shared classifier)")
    server_ms: float


class ItemResponse(BaseModel):
    id: int
    title: str
    class_path: str
    split: str
    thumbnail: str
    predicted: dict[str, list[ClassScore]] = Field(description="top class paths from the item's stored image, "
                                                               "text and fused embeddings")


class CategoryNode(BaseModel):
    name: str
    path: str
    count: int
    children: list[CategoryNode] = []


class CategoriesResponse(BaseModel):
    separator: str
    items: int
    tree: list[CategoryNode]


class HealthResponse(BaseModel):
    status: str
    version: str
    run: str
    checkpoint: str
    features: str
    index: str
    index_kind: dict[str, str]
    items: int
    classes: int
    fusion_weight: float
    device: str


class ErrorResponse(BaseModel):
    error: str


ERRORS = {400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 422: {"model": ErrorResponse}}
UPLOAD_ERRORS = {**ERRORS, 413: {"model": ErrorResponse}, 415: {"model": ErrorResponse}}


# ------------------------------------------------------------------------------ the app


class Searcher:
    """The space's index and classifier, and its encoders behind one lock: a tokenizer and the frozen
    encoders are not safe to share between threads (the towers, the classifier and FAISS are, in
    inference), and on a small CPU one encoding at a time is fastest anyway."""

    def __init__(self, space: Any, catalogue: ServedCatalogue) -> None:
        self.space = space
        self.catalogue = catalogue
        self.lock = threading.Lock()

    @contextmanager
    def encoding(self, timing: dict[str, float]) -> Iterator[None]:
        """Hold the encoders; timing gets the wait for them and the time held."""
        t0 = time.perf_counter()
        with self.lock:
            t1 = time.perf_counter()
            timing["wait"] = t1 - t0
            yield
            timing["encode"] = time.perf_counter() - t1

    def search(self, emb: np.ndarray, target: str, category: str | None, page: int, per_page: int,
               exclude_row: int | None, timing: dict[str, float]) -> tuple[list[dict], bool, list[dict]]:
        """(D,) query embedding -> (this page's results, whether more follow, predicted classes)."""
        t0 = time.perf_counter()
        offset = (page - 1) * per_page
        exclude = None if exclude_row is None else np.asarray([exclude_row])
        scores, rows = self.space.index.search(emb[None, :], offset + per_page + 1, target, category, exclude)
        prob = self.space.class_probabilities(emb[None, :])[0]
        timing["search"] = time.perf_counter() - t0
        found = int((rows[0] >= 0).sum())
        hits = self.catalogue.hits(scores[0, offset:offset + per_page], rows[0, offset:offset + per_page], offset + 1)
        return hits, found > offset + per_page, self.top(prob, CHIPS)

    def top(self, prob: np.ndarray, k: int) -> list[dict]:
        return [{"class_path": c, "probability": round(p, 4)} for c, p in self.space.top_classes(prob[None, :], k)[0]]


def create_app(space: Any, max_upload_bytes: int = 10 << 20, max_pixels: int | None = None,
               allowed_hosts: list[str] | None = None, thumbnail_cache_bytes: int = 64 << 20) -> FastAPI:
    """The page and the API over a loaded `Space` with its index. `allowed_hosts`: the Host headers
    served (DNS-rebinding guard; None: any). Uploads over `max_upload_bytes` or `max_pixels` get 413."""
    if space.index is None:
        raise HuseError("huse serve needs an index: build it with `huse index`")
    extract_config = space.feature_attrs.get("extract_config") or {}
    catalogue = ServedCatalogue(space.index, bool(extract_config.get("allow_outside_root", False)),
                                thumbnail_cache_bytes)
    searcher = Searcher(space, catalogue)
    max_pixels = max_pixels or DEFAULT_MAX_PIXELS
    app = FastAPI(title="huse serve", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url="/api/openapi.json",
                  description="Search a product catalogue in the HUSE universal space by text, image or item. "
                              "Read-only; product texts are data, never markup.")
    app.state.space, app.state.catalogue = space, catalogue
    upload_path = "/api/search/image"
    app.add_middleware(BodyLimit, max_bytes=max_upload_bytes, paths=(upload_path,))
    if allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)

    @app.middleware("http")
    async def headers(request: Request, call_next):
        t0 = time.perf_counter()
        response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        timing = response.headers.get("server-timing")
        total = f"app;dur={1000 * (time.perf_counter() - t0):.2f}"
        response.headers["server-timing"] = f"{timing}, {total}" if timing else total
        return response

    # errors: always {"error": "..."}
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"error": str(exc.detail)}, exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        what = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'request'}: {e.get('msg')}"
                         for e in exc.errors())
        return JSONResponse({"error": what}, 422)

    @app.exception_handler(UploadRefused)
    async def refused(request: Request, exc: UploadRefused):
        return JSONResponse({"error": exc.message}, exc.status)

    @app.exception_handler(HuseError)
    async def huse_error(request: Request, exc: HuseError):
        status = 404 if isinstance(exc, (UnknownItem, NoThumbnail)) else 400
        return JSONResponse({"error": str(exc)}, status)

    def answer(response: Response, query: dict, target: str, category: str | None, page: int, per_page: int,
               found: tuple[list[dict], bool, list[dict]], timing: dict[str, float], t0: float,
               c0: float | None = None) -> dict:
        """The response body; the Server-Timing header gets the lock wait, encoding, search, the handler's
        total and its thread's CPU time (which a busy machine does not inflate)."""
        timing["total"] = time.perf_counter() - t0
        if c0 is not None:
            timing["cpu"] = time.thread_time() - c0
        response.headers["server-timing"] = ", ".join(f"{k};dur={1000 * v:.2f}" for k, v in timing.items())
        hits, more, predicted = found
        return {"query": query, "target": target, "category": category, "page": page, "per_page": per_page,
                "has_more": more, "results": hits, "predicted": predicted,
                "server_ms": round(1000 * timing["total"], 2)}

    Target = Query("image", description="search the items' image or text embeddings")
    Category = Query(None, max_length=500, description="only class paths starting with this prefix (whole levels)")
    Page = Query(1, ge=1, description="1-based page")
    PerPage = Query(24, ge=1, le=100, description="results per page")

    def check_depth(page: int, per_page: int) -> None:
        if page * per_page > MAX_DEPTH:
            raise HuseError(f"paging stops at {MAX_DEPTH} results")

    @app.get("/api/search", response_model=SearchResponse, responses=ERRORS, tags=["search"])
    def search_text(response: Response, q: str = Query(..., min_length=1, max_length=1000, description="query text"),
                    target: Literal["image", "text"] = Target, category: str | None = Category,
                    page: int = Page, per_page: int = PerPage) -> dict:
        """Items for a text query ("images for this text" by default)."""
        t0, c0 = time.perf_counter(), time.thread_time()
        check_depth(page, per_page)
        category = category or None
        timing: dict[str, float] = {}
        with searcher.encoding(timing):
            emb, reasons = space.encode_texts([q])
        if reasons[0]:
            raise StarletteHTTPException(422, f"the query text is unusable: {reasons[0]}")
        found = searcher.search(emb[0], target, category, page, per_page, None, timing)
        return answer(response, {"kind": "text", "text": q}, target, category, page, per_page, found, timing, t0, c0)

    @app.post(upload_path, response_model=SearchResponse, responses=UPLOAD_ERRORS, tags=["search"])
    async def search_image(response: Response,
                           file: Annotated[UploadFile, File(description="a JPEG, PNG, WebP, GIF or BMP image "
                                                                        "(at most `huse serve --max-upload-mb`)")],
                           target: Literal["image", "text"] = Target, category: str | None = Category,
                           page: int = Page, per_page: int = PerPage) -> dict:
        """Items for an uploaded image (multipart field `file`); it is decoded in memory and never stored."""
        t0 = time.perf_counter()
        check_depth(page, per_page)
        category = category or None
        data = await file.read(max_upload_bytes + 1)
        await file.close()

        def work() -> tuple[dict, Any]:
            timing: dict[str, float] = {}
            c0 = time.thread_time()
            image = open_upload(data, max_upload_bytes, max_pixels)
            with searcher.encoding(timing):
                emb, reasons = space.encode_images([image])
            if reasons[0]:
                raise UploadRefused(415, f"the image is unusable: {reasons[0]}")
            found = searcher.search(emb[0], target, category, page, per_page, None, timing)
            timing["cpu"] = time.thread_time() - c0
            return timing, found

        timing, found = await run_in_threadpool(work)
        query = {"kind": "image", "image": (file.filename or "upload")[:200], "bytes": len(data)}
        return answer(response, query, target, category, page, per_page, found, timing, t0)

    ItemId = PathParam(..., ge=0, description="item id: its 0-based catalogue row")

    @app.get("/api/items/{item_id}/similar", response_model=SearchResponse, responses=ERRORS, tags=["search"])
    def search_item(response: Response, item_id: int = ItemId, target: Literal["image", "text"] = Target,
                    category: str | None = Category, page: int = Page, per_page: int = PerPage) -> dict:
        """More like this: the items closest to an item's stored embedding of `target`, itself left out."""
        t0, c0 = time.perf_counter(), time.thread_time()
        check_depth(page, per_page)
        category = category or None
        timing: dict[str, float] = {}
        row = catalogue.row_of(item_id)
        emb = np.array(space.index.vectors(target)[row], dtype=np.float32)  # a copy: the stored vectors are read-only maps
        found = searcher.search(emb, target, category, page, per_page, row, timing)  # stored vector: no encoder
        query = {"kind": "item", "item": item_id, "title": catalogue.titles[row]}
        return answer(response, query, target, category, page, per_page, found, timing, t0, c0)

    @app.get("/api/items/{item_id}", response_model=ItemResponse, responses=ERRORS, tags=["items"])
    def item(item_id: int = ItemId) -> dict:
        """An item's details and what its stored image and text embeddings predict."""
        row = catalogue.row_of(item_id)
        emb = np.stack([np.array(space.index.vectors(m)[row], dtype=np.float32) for m in ("image", "text")])
        prob = space.class_probabilities(emb)  # (2, C)
        w = space.fusion_weight
        fused = w * prob[0] + (1 - w) * prob[1]
        predicted = {"image": searcher.top(prob[0], CHIPS), "text": searcher.top(prob[1], CHIPS),
                     "fused": searcher.top(fused, CHIPS)}
        return {**catalogue.item(row), "predicted": predicted}

    @app.get("/api/items/{item_id}/thumbnail", responses={**ERRORS, 200: {"content": {"image/jpeg": {}}}},
             response_class=Response, tags=["items"])
    def thumbnail(item_id: int = ItemId, size: int = Query(256, description=f"one of {THUMBNAIL_SIZES}")) -> Response:
        """A catalogue item's image as a square JPEG (by id only: no path is ever taken from a request)."""
        if size not in THUMBNAIL_SIZES:
            raise HuseError(f"size must be one of {', '.join(map(str, THUMBNAIL_SIZES))}")
        return Response(catalogue.thumbnail(item_id, size), media_type="image/jpeg",
                        headers={"cache-control": "public, max-age=86400"})

    @app.get("/api/categories", response_model=CategoriesResponse, tags=["catalogue"])
    def categories() -> dict:
        """The class tree with the number of items below each node."""
        return {"separator": catalogue.sep, "items": catalogue.n, "tree": catalogue.tree}

    @app.get("/api/health", response_model=HealthResponse, tags=["catalogue"])
    def health() -> dict:
        """What this server serves: the run, its checkpoint, feature file and index."""
        index = space.index
        return {"status": "ok", "version": __version__, "run": str(space.run_dir or space.checkpoint.parent),
                "checkpoint": str(space.checkpoint), "features": str(space.features_path), "index": str(index.folder),
                "index_kind": {m: str(v.kind) for m, v in index.indexes.items()}, "items": index.n,
                "classes": len(space.class_names), "fusion_weight": float(space.fusion_weight), "device": str(space.device)}

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
