"""Every endpoint of `huse serve` through FastAPI's TestClient (no socket) on the stub demo: results and
paging agree with `Space`, markup in titles comes back as data, bad uploads are refused with 413/415
and a JSON error, thumbnails are reachable by item id only, and nothing writes."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from serve_fixtures import HOSTILE, PIXEL_CAP, UPLOAD_CAP


def image_bytes(path, fmt: str | None = None) -> bytes:
    if fmt is None:
        return path.read_bytes()
    buf = io.BytesIO()
    Image.open(path).convert("RGB").save(buf, fmt)
    return buf.getvalue()


def demo_image(serve_demo, item: int):
    return serve_demo["catalogue"].parent / serve_demo["frame"].loc[item, "image"]


def upload(client, data: bytes, name: str = "photo.jpg", mime: str = "image/jpeg", **params):
    return client.post("/api/search/image", files={"file": (name, data, mime)}, params=params)


def assert_error(response, status: int, words: str = ""):
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and words.lower() in body["error"].lower(), body


# --------------------------------------------------------------------------- metadata


def test_health_names_the_run_and_index(client, serve_demo, space):
    body = client.get("/api/health").json()
    assert body["status"] == "ok" and body["items"] == 300 and body["classes"] == len(space.class_names)
    assert body["run"] == str(serve_demo["run"]) and body["index"] == str(serve_demo["run"] / "index")
    assert body["features"] == str(serve_demo["features"]) and body["index_kind"] == {"image": "exact", "text": "exact"}


def test_categories_tree_counts_every_item(client, space):
    body = client.get("/api/categories").json()
    assert body["separator"] == "<" and body["items"] == 300
    assert sum(node["count"] for node in body["tree"]) == 300

    def leaves(nodes):
        for node in nodes:
            assert node["count"] == sum(c["count"] for c in node["children"]) or not node["children"]
            yield from leaves(node["children"]) if node["children"] else [node["path"]]

    assert sorted(leaves(body["tree"])) == sorted(space.class_names)


def test_openapi_describes_every_endpoint_and_only_one_write_verb(client):
    doc = client.get("/api/openapi.json").json()
    paths = doc["paths"]
    assert set(paths) == {"/api/search", "/api/search/image", "/api/items/{item_id}/similar", "/api/items/{item_id}",
                          "/api/items/{item_id}/thumbnail", "/api/categories", "/api/health"}
    verbs = {(p, v) for p, ops in paths.items() for v in ops}
    assert {v for _, v in verbs} == {"get", "post"} and [p for p, v in verbs if v == "post"] == ["/api/search/image"]
    assert "413" in paths["/api/search/image"]["post"]["responses"]


@pytest.mark.parametrize("method", ["put", "delete", "patch"])
def test_read_only(client, method):
    for url in ("/api/search", "/api/items/1", "/api/categories"):
        assert getattr(client, method)(url).status_code == 405


def test_page_and_assets_are_safe(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and page.headers["x-content-type-options"] == "nosniff"
    assert "<script src=\"/static/app.js\"" in page.text and page.text.count("<script") == 1  # no inline script
    js = client.get("/static/app.js")
    assert js.status_code == 200 and "innerHTML" not in js.text and "insertAdjacentHTML" not in js.text
    assert client.get("/static/style.css").status_code == 200
    assert client.get("/static/../app.py").status_code == 404
    assert client.get("/static/%2e%2e/app.py").status_code == 404


def test_untrusted_host_is_refused(space):
    from fastapi.testclient import TestClient

    from huse_pipeline.serve.app import create_app

    app = create_app(space, allowed_hosts=["127.0.0.1", "localhost"])
    assert TestClient(app, base_url="http://127.0.0.1:8000").get("/api/health").status_code == 200
    assert TestClient(app, base_url="http://rebound.example").get("/api/health").status_code == 400


# ------------------------------------------------------------------------- text search


def test_text_search_matches_space_and_pages(client, space):
    first = client.get("/api/search", params={"q": "blue denim jeans", "per_page": 10})
    assert first.status_code == 200
    timing = first.headers["server-timing"]
    assert all(f"{part};dur=" in timing for part in ("encode", "search", "total", "app"))
    body = first.json()
    expected = space.search_text("blue denim jeans", k=20)
    assert [r["id"] for r in body["results"]] == [h.id for h in expected[:10]]
    assert [r["rank"] for r in body["results"]] == list(range(1, 11)) and body["has_more"]
    assert body["results"][0]["score"] == pytest.approx(expected[0].score, abs=1e-4)
    r0 = body["results"][0]
    assert r0["thumbnail"] == f"/api/items/{r0['id']}/thumbnail" and "image_path" not in r0  # no server paths
    second = client.get("/api/search", params={"q": "blue denim jeans", "per_page": 10, "page": 2}).json()
    assert [r["id"] for r in second["results"]] == [h.id for h in expected[10:20]]
    assert [r["rank"] for r in second["results"]] == list(range(11, 21))
    probs = [p["probability"] for p in body["predicted"]]
    assert len(probs) == 3 and probs == sorted(probs, reverse=True) and all(0 <= p <= 1 for p in probs)
    emb, _ = space.encode_texts(["blue denim jeans"])
    top = space.top_classes(space.class_probabilities(emb), 3)[0]
    assert [p["class_path"] for p in body["predicted"]] == [c for c, _ in top]


def test_last_page_and_beyond(client):
    last = client.get("/api/search", params={"q": "mug", "per_page": 100, "page": 3}).json()
    assert len(last["results"]) == 100 and not last["has_more"] and last["results"][-1]["rank"] == 300
    beyond = client.get("/api/search", params={"q": "mug", "per_page": 100, "page": 4}).json()
    assert beyond["results"] == [] and not beyond["has_more"]
    assert_error(client.get("/api/search", params={"q": "mug", "per_page": 100, "page": 11}), 400, "paging stops")


def test_category_filter_and_text_target(client, space):
    body = client.get("/api/search", params={"q": "shoes", "category": "footwear<shoes", "per_page": 50}).json()
    assert body["results"] and all(r["class_path"].startswith("footwear<shoes<") for r in body["results"])
    assert len(body["results"]) == sum(c.startswith("footwear<shoes<") for c in space.index.items["class_path"])
    texts = client.get("/api/search", params={"q": "shoes", "target": "text"}).json()
    assert texts["target"] == "text" and [r["id"] for r in texts["results"]] == \
        [h.id for h in space.search_text("shoes", k=24, target="text")]


def test_bad_queries_get_a_json_error(client):
    assert_error(client.get("/api/search"), 422, "q")
    assert_error(client.get("/api/search", params={"q": ""}), 422)
    assert_error(client.get("/api/search", params={"q": "   "}), 422, "unusable")
    assert_error(client.get("/api/search", params={"q": "x" * 1001}), 422)
    assert_error(client.get("/api/search", params={"q": "mug", "category": "nowhere"}), 400, "no class path")
    assert_error(client.get("/api/search", params={"q": "mug", "target": "audio"}), 422)
    assert_error(client.get("/api/search", params={"q": "mug", "page": 0}), 422)
    assert_error(client.get("/api/search", params={"q": "mug", "per_page": 1000}), 422)


# ----------------------------------------------------------------------- hostile texts


def test_markup_in_titles_is_data(client, serve_demo):
    item = serve_demo["rows"]["hostile"][1]
    title = serve_demo["frame"].loc[item, "text"]
    assert title.startswith(HOSTILE)
    details = client.get(f"/api/items/{item}")
    assert details.headers["content-type"] == "application/json" and details.json()["title"] == title
    found = client.get("/api/search", params={"q": title, "target": "text", "per_page": 1}).json()
    assert found["results"][0]["title"] == title  # verbatim, never escaped or stripped by the server
    assert found["query"]["text"] == title


# ------------------------------------------------------------------------ image search


def test_image_search_finds_the_item_itself(client, serve_demo, space):
    item = 42
    for data, name in ((image_bytes(demo_image(serve_demo, item)), "photo.jpg"),
                       (image_bytes(demo_image(serve_demo, item), "PNG"), "photo.png")):
        response = upload(client, data, name, per_page=5)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["query"] == {"kind": "image", "image": name, "bytes": len(data)}
        top = body["results"][0]
        assert top["score"] == pytest.approx(1.0, abs=1e-3)
        same = [h.id for h in space.search_image(str(demo_image(serve_demo, item)), k=5)]
        assert item in same[: sum(h["score"] > 0.999 for h in body["results"])] or top["id"] == item


@pytest.mark.parametrize("data, status, words", [
    (b"", 415, "empty"),
    (b"hello, I am not an image" * 10, 415, "not an image"),
    (b"%PDF-1.4\n" + bytes(500), 415, "not an image"),
], ids=["empty", "text", "pdf"])
def test_non_images_are_refused(client, data, status, words):
    assert_error(upload(client, data), status, words)


def test_truncated_and_foreign_formats_are_refused(client, serve_demo):
    jpeg = image_bytes(demo_image(serve_demo, 1))
    assert_error(upload(client, jpeg[: len(jpeg) // 2]), 415, "truncated or corrupt")
    assert_error(upload(client, image_bytes(demo_image(serve_demo, 1), "TIFF"), "x.tif", "image/tiff"), 415, "TIFF")


def test_oversized_uploads_are_refused(client):
    noise = np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "PNG")  # ~480 kB: a real image, over the 200 kB cap
    assert len(buf.getvalue()) > UPLOAD_CAP
    assert_error(upload(client, buf.getvalue(), "big.png", "image/png"), 413, "larger than")
    # a declared length over the cap is refused before the body is read
    huge = client.post("/api/search/image", content=b"x" * 10, headers={"content-length": str(50 << 20),
                                                                         "content-type": "multipart/form-data; boundary=b"})
    assert_error(huge, 413, "larger than")
    side = int(PIXEL_CAP ** 0.5) + 100  # few bytes, too many pixels: a decompression bomb in miniature
    buf = io.BytesIO()
    Image.new("RGB", (side, side), "white").save(buf, "PNG")
    assert len(buf.getvalue()) < UPLOAD_CAP
    assert_error(upload(client, buf.getvalue(), "bomb.png", "image/png"), 413, "too large")


def test_upload_without_a_file(client):
    assert_error(client.post("/api/search/image", data={"x": "1"}), 422, "file")


# --------------------------------------------------------------------- items and more


def test_more_like_this_leaves_the_item_out(client, space):
    body = client.get("/api/items/17/similar", params={"per_page": 8}).json()
    assert body["query"]["kind"] == "item" and body["query"]["item"] == 17
    ids = [r["id"] for r in body["results"]]
    assert 17 not in ids and ids == [h.id for h in space.search_item(17, k=8)]
    scores = [r["score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True)
    assert_error(client.get("/api/items/99999/similar"), 404, "no item")
    assert_error(client.get("/api/items/-1/similar"), 422)


def test_item_details(client, serve_demo, space):
    body = client.get("/api/items/5").json()
    frame = serve_demo["frame"]
    assert body["id"] == 5 and body["title"] == frame.loc[5, "text"] and body["class_path"] == frame.loc[5, "label"]
    assert set(body["predicted"]) == {"image", "text", "fused"} and all(len(v) == 3 for v in body["predicted"].values())
    assert_error(client.get("/api/items/99999"), 404, "no item")
    assert_error(client.get("/api/items/abc"), 422)


def test_thumbnails_by_id_only(client):
    response = client.get("/api/items/5/thumbnail")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    im = Image.open(io.BytesIO(response.content))
    assert im.format == "JPEG" and im.size[0] == im.size[1] <= 256
    small = Image.open(io.BytesIO(client.get("/api/items/5/thumbnail", params={"size": 128}).content))
    assert small.size == (128, 128)
    assert client.get("/api/items/5/thumbnail").content == response.content  # cached, identical
    assert_error(client.get("/api/items/5/thumbnail", params={"size": 4000}), 400, "size")
    assert_error(client.get("/api/items/99999/thumbnail"), 404, "no item")
    for sneaky in ("..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "5%2F..%2F..%2Fcli.py"):
        assert client.get(f"/api/items/{sneaky}/thumbnail").status_code in (404, 422)
