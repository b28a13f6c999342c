"""What `huse serve` holds in memory about the catalogue it serves: the item metadata of the index
(read once at start), the class tree with item counts, result rows as plain dicts, and thumbnails
made from catalogue images only (resolved by item id inside the image root, resized, cached)."""
from __future__ import annotations

import io
import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from huse_pipeline.errors import HuseError
from huse_pipeline.search.index import CatalogueIndex

log = logging.getLogger(__name__)

THUMBNAIL_SIZES = (128, 256, 512)


class UnknownItem(HuseError):
    """No item with this id in the index."""


class NoThumbnail(HuseError):
    """The item's image is missing, unreadable or outside the image root."""


class ServedCatalogue:
    """The index's items as arrays in memory (id -> stored row, columns), the class tree and thumbnails."""

    def __init__(self, index: CatalogueIndex, allow_outside_root: bool = False,
                 thumbnail_cache_bytes: int = 64 << 20) -> None:
        self.index = index
        self.sep = str(index.meta.get("label_sep", "<"))
        self.image_root = Path(index.meta.get("image_root", "."))
        self.allow_outside_root = allow_outside_root  # as stage one was told (the bundled demo's ../images)
        items = index.items
        self.ids = items["id"].to_numpy(np.int64)
        self.titles = items["title"].astype(str).tolist()
        self.class_paths = items["class_path"].astype(str).tolist()
        self.splits = items["split"].astype(str).tolist()
        self.image_paths = items["image_path"].astype(str).tolist()
        self.position = {int(i): p for p, i in enumerate(self.ids)}
        for name in ("id", "class_path", "title", "image_path", "split"):
            index.column(name)  # the columns Space.search reads, cached now rather than on the first query
        self.tree = class_tree(index.class_names, np.bincount(index.labels, minlength=len(index.class_names)), self.sep)
        self._thumbs: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._thumb_bytes = 0
        self._thumb_cap = thumbnail_cache_bytes
        self._lock = threading.Lock()

    @property
    def n(self) -> int:
        return len(self.ids)

    def row_of(self, item_id: int) -> int:
        try:
            return self.position[int(item_id)]
        except KeyError:
            raise UnknownItem(f"no item with id {item_id} ({self.n} items)") from None

    def item(self, row: int) -> dict[str, Any]:
        """One stored row as the API shows it (no server path: the image is reached by id only)."""
        item_id = int(self.ids[row])
        return {"id": item_id, "title": self.titles[row], "class_path": self.class_paths[row],
                "split": self.splits[row], "thumbnail": f"/api/items/{item_id}/thumbnail"}

    def hits(self, scores: np.ndarray, rows: np.ndarray, first_rank: int = 1) -> list[dict[str, Any]]:
        """(k,) scores and stored rows (-1 = none) -> result dicts with rank and score."""
        out = []
        for rank, (score, row) in enumerate(zip(scores.tolist(), rows.tolist()), start=first_rank):
            if row < 0:
                break
            out.append({"rank": rank, "score": round(float(score), 4), **self.item(row)})
        return out

    # ------------------------------------------------------------------------ thumbnails

    def image_file(self, item_id: int) -> Path:
        """The item's image file, by the rule stage one read it with: inside the image root (symlinks
        and `..` followed) unless the extraction was told --allow-outside-root."""
        from huse_pipeline.data.catalogue import resolve_image

        rel = self.image_paths[self.row_of(item_id)]
        if not rel:
            raise NoThumbnail(f"item {item_id} has no image")
        path, why = resolve_image(self.image_root, rel, self.allow_outside_root)
        if path is None:
            raise NoThumbnail(f"the image of item {item_id} is not served: {why}")
        return Path(path)

    def thumbnail(self, item_id: int, size: int = 256) -> bytes:
        """A square JPEG of the item's image (padded on white, never enlarged), cached by (id, size)."""
        if size not in THUMBNAIL_SIZES:
            raise HuseError(f"thumbnail size must be one of {', '.join(map(str, THUMBNAIL_SIZES))}")
        key = (int(item_id), size)
        with self._lock:
            data = self._thumbs.get(key)
            if data is not None:
                self._thumbs.move_to_end(key)
                return data
        data = make_thumbnail(self.image_file(item_id), size)
        with self._lock:
            if key not in self._thumbs:
                self._thumbs[key] = data
                self._thumb_bytes += len(data)
                while self._thumb_bytes > self._thumb_cap and self._thumbs:
                    _, old = self._thumbs.popitem(last=False)
                    self._thumb_bytes -= len(old)
        return data


def make_thumbnail(path: Path, size: int) -> bytes:
    from huse_pipeline.data.images import BadImage, fit_image, load_rgb

    try:
        im = load_rgb(path, min_side=size)
    except BadImage as exc:
        raise NoThumbnail(f"the image cannot be read ({exc})") from exc
    im = fit_image(im, min(size, max(im.size)), "pad")
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=85, optimize=True)
    return buf.getvalue()


def class_tree(class_names: list[str], counts: np.ndarray, sep: str = "<") -> list[dict[str, Any]]:
    """Class paths and their item counts -> nested nodes {name, path, count, children}, in class order
    (the index's classes are sorted); a node's count is the sum over the classes below it."""
    roots: list[dict[str, Any]] = []
    nodes: dict[str, dict[str, Any]] = {}
    for name, count in zip(class_names, counts.tolist()):
        levels = name.split(sep)
        siblings = roots
        for depth in range(len(levels)):
            path = sep.join(levels[: depth + 1])
            node = nodes.get(path)
            if node is None:
                node = {"name": levels[depth], "path": path, "count": 0, "children": []}
                nodes[path] = node
                siblings.append(node)
            node["count"] += int(count)
            siblings = node["children"]
    return roots
