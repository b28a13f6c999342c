"""The pieces of `huse serve` without the app: the class tree, the image-root rule of thumbnails (a
catalogue row naming a file outside the root is not served unless stage one was told to read it), the
thumbnail cache's bound, and the upload check on hand-made files."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from huse_pipeline.serve.catalogue import NoThumbnail, ServedCatalogue, class_tree
from huse_pipeline.serve.uploads import UploadRefused, open_upload


def test_class_tree_by_hand():
    names = ["a<x<1", "a<x<2", "a<y<1", "b<z<1"]
    tree = class_tree(names, np.array([3, 4, 0, 5]))
    assert [(n["path"], n["count"]) for n in tree] == [("a", 7), ("b", 5)]
    a = tree[0]
    assert [(n["path"], n["count"]) for n in a["children"]] == [("a<x", 7), ("a<y", 0)]
    assert [(n["name"], n["count"]) for n in a["children"][0]["children"]] == [("1", 3), ("2", 4)]
    assert class_tree(["mugs", "plates"], np.array([1, 2])) == [
        {"name": "mugs", "path": "mugs", "count": 1, "children": []},
        {"name": "plates", "path": "plates", "count": 2, "children": []}]


@pytest.fixture()
def catalogue(space, tmp_path):
    served = ServedCatalogue(space.index, allow_outside_root=False, thumbnail_cache_bytes=30_000)
    served.image_paths = list(served.image_paths)
    secret = tmp_path / "secret.png"
    Image.new("RGB", (10, 10)).save(secret)
    served.image_paths[served.row_of(3)] = str(secret)  # absolute, outside the root
    served.image_paths[served.row_of(4)] = "../../../../../../../../etc/passwd"
    served.image_paths[served.row_of(6)] = ""
    return served, secret


def test_thumbnails_stay_inside_the_image_root(catalogue):
    served, _ = catalogue
    for item in (3, 4):
        with pytest.raises(NoThumbnail, match="outside"):
            served.thumbnail(item)
    with pytest.raises(NoThumbnail, match="no image"):
        served.thumbnail(6)
    assert Image.open(io.BytesIO(served.thumbnail(5))).format == "JPEG"
    served.allow_outside_root = True  # what stage one was told for the bundled demo's ../images
    assert Image.open(io.BytesIO(served.thumbnail(3))).size == (10, 10)  # never enlarged


def test_thumbnail_cache_is_bounded(catalogue):
    served, _ = catalogue
    for item in range(10, 40):
        served.thumbnail(item, 256)
    assert 0 < served._thumb_bytes <= 30_000 and len(served._thumbs) < 30


def png(im: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


def test_open_upload_accepts_ordinary_images():
    for fmt in ("PNG", "JPEG", "WEBP", "GIF", "BMP"):
        im = open_upload(png(Image.new("RGB", (30, 20), "red"), fmt), 10_000, 10_000)
        assert im.size == (30, 20) and im.format == fmt


@pytest.mark.parametrize("data, status, words", [
    (png(Image.new("RGB", (200, 200))), 413, "too large"),  # 40,000 pixels > 10,000
    (b"GIF89a" + bytes(20), 415, "not an image"),  # a GIF header, no image
    (png(Image.new("RGB", (50, 50)))[:-30], 415, "truncated or corrupt"),
    (png(Image.new("RGB", (10, 10)), "TIFF"), 415, "not accepted"),
    (bytes(20_000), 413, "larger than"),
])
def test_open_upload_refuses(data, status, words):
    with pytest.raises(UploadRefused, match=words) as caught:
        open_upload(data, 10_000, 10_000)
    assert caught.value.status == status
