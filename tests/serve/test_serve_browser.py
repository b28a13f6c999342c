"""The page in a real browser: `huse serve` runs as its own process on a free loopback port and
headless Chromium (Debian's `chromium`, driven by Playwright; never a browser download) types a
query, waits for the thumbnails, searches by file picker, drop and paste, follows "more like this",
the predicted-category chips, paging and Back, and checks that no card's text overflows its card."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from serve_fixtures import HOSTILE

REPO = Path(__file__).resolve().parents[2]
CHROMIUM_HINT = "install Debian's chromium (`apt-get install -y chromium`, as .ci/run does) or set HUSE_CHROMIUM"


def chromium_path() -> str:
    path = os.environ.get("HUSE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).is_file():
        pytest.fail(f"no Chromium at {path}: {CHROMIUM_HINT}")  # fails, never skips: CI must run this test
    return path


@pytest.fixture(scope="module")
def server(serve_demo):
    """`huse serve --port 0` in a subprocess; yields its URL, stops it after the module."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "huse_pipeline", "serve", "--run", str(serve_demo["run"]),
                             "--port", "0", "--device", "cpu"], cwd=serve_demo["root"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    found = threading.Event()
    url: list[str] = []

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            match = re.search(r"at (http://127\.0\.0\.1:\d+/)", line)
            if match and not url:
                url.append(match.group(1))
                found.set()

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + 300
    while not found.wait(0.5):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("huse serve did not start:\n" + "".join(lines))
    try:
        yield url[0]
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        assert "Traceback" not in "".join(lines), "".join(lines)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


LOADED_IMAGES = "n => [...document.querySelectorAll('#results .card img')].filter(i => i.complete && i.naturalWidth > 0).length >= n"

# every element of every card lies inside its card, and text that is not deliberately ellipsised or
# clamped does not overflow its own box: returns the offending cards' ids and elements
OVERFLOW = """() => {
  const bad = [];
  for (const card of document.querySelectorAll('#results .card')) {
    const c = card.getBoundingClientRect();
    for (const node of card.querySelectorAll('*')) {
      const r = node.getBoundingClientRect();
      if (r.width === 0 && r.height === 0) continue;
      if (r.left < c.left - 1 || r.right > c.right + 1 || r.top < c.top - 1 || r.bottom > c.bottom + 1)
        bad.push(`${card.dataset.id}: ${node.tagName}.${node.className} outside its card`);
      const style = getComputedStyle(node);
      if (style.overflowX === 'visible' && node.scrollWidth > node.clientWidth + 1 && node.clientWidth > 0)
        bad.push(`${card.dataset.id}: ${node.tagName}.${node.className} overflows`);
    }
    if (card.scrollWidth > card.clientWidth + 1) bad.push(`${card.dataset.id}: the card scrolls sideways`);
  }
  return bad;
}"""


def wait_for_results(page, n: int = 1) -> None:
    page.wait_for_function("() => !document.body.hasAttribute('aria-busy')", timeout=60_000)
    page.wait_for_function(LOADED_IMAGES, arg=n, timeout=60_000)


def card_ids(page) -> list[int]:
    return [int(x) for x in page.eval_on_selector_all("#results .card", "cards => cards.map(c => c.dataset.id)")]


def test_search_page_end_to_end(server, browser, serve_demo, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.goto(server)
    page.wait_for_selector("#welcome:not([hidden])")
    assert page.evaluate("document.activeElement.id") == "q"

    # a text query: Enter searches, at least 12 thumbnails load, the URL holds the query
    page.fill("#q", "blue denim jeans")
    page.press("#q", "Enter")
    wait_for_results(page, 12)
    assert "q=blue+denim+jeans" in page.url
    assert len(card_ids(page)) == 24 and page.locator("#chips .chip").count() == 3
    text_ids = card_ids(page)
    assert page.evaluate(OVERFLOW) == []
    page.screenshot(path=str(tmp_path / "serve.png"), full_page=False)
    assert (tmp_path / "serve.png").stat().st_size > 10_000

    # image search by file picker
    item = 42
    picked = serve_demo["catalogue"].parent / serve_demo["frame"].loc[item, "image"]
    page.set_input_files("#file", str(picked))
    page.wait_for_url(re.compile(r"image="))
    wait_for_results(page, 12)
    assert page.is_visible("#query-image") and "Products like your image" in page.inner_text("#query-label")
    assert float(page.inner_text("#results .card .score >> nth=0").split()[1]) > 0.99  # the item's own photo
    image_url = page.url

    # "more like this" on the first result
    first = card_ids(page)[0]
    page.click("#results .card >> nth=0 >> text=More like this")
    page.wait_for_url(re.compile(rf"item={first}"))
    wait_for_results(page, 12)
    assert first not in card_ids(page) and "More like" in page.inner_text("#query-label")
    assert page.evaluate(OVERFLOW) == []

    # Back returns to the image search, then to the text search, each searched again
    page.go_back()
    page.wait_for_url(image_url)
    wait_for_results(page, 12)
    page.go_back()
    page.wait_for_url(re.compile(r"q=blue\+denim\+jeans"))
    wait_for_results(page, 12)
    assert card_ids(page) == text_ids and page.input_value("#q") == "blue denim jeans"

    # a predicted-category chip filters; the filter is in the URL and in the select
    chip_path = page.get_attribute("#chips .chip >> nth=0", "title").split(" ", 2)[-1]
    page.click("#chips .chip >> nth=0")
    page.wait_for_url(re.compile(r"category="))
    wait_for_results(page, 1)
    category = page.input_value("#category")
    assert category and " \u203a ".join(category.split("<")) == chip_path
    crumbs = page.eval_on_selector_all("#results .card .crumbs", "cs => cs.map(c => c.title)")
    assert crumbs and all(c.startswith(chip_path) for c in crumbs)

    # overlong and hostile titles render as text, inside their cards, and never run
    page.goto(f"{server}?q={HOSTILE[:20]}&category=home")
    page.wait_for_function("() => document.querySelectorAll('#results .card').length > 0")
    page.evaluate("window.scrollTo(0, 0)")
    for query in ("Supercalifragilistic", "extraordinarily long description"):
        page.fill("#q", query)
        page.press("#q", "Enter")
        wait_for_results(page, 12)
        assert page.evaluate(OVERFLOW) == []
    page.goto(f"{server}?q=mug&category=home%3Ckitchen%3Cmugs")
    wait_for_results(page, 12)
    hostile = [i for i in serve_demo["rows"]["hostile"] if serve_demo["frame"].loc[i, "label"] == "home<kitchen<mugs"]
    titles = page.eval_on_selector_all("#results .card .title", "ts => ts.map(t => t.textContent)")
    if hostile:
        assert any(t.startswith(HOSTILE) for t in titles), titles
    assert page.evaluate("window.__pwned") is None and page.locator("#results script, #results b").count() == 0
    assert page.evaluate(OVERFLOW) == []

    # paging: next page continues the ranks
    page.goto(f"{server}?q=mug")
    wait_for_results(page, 12)
    page.click("#next")
    page.wait_for_url(re.compile(r"page=2"))
    wait_for_results(page, 12)
    assert page.inner_text("#status").startswith("Results 25\u201348")

    # search with a result's text
    title = page.inner_text("#results .card >> nth=0 >> .title")
    page.click("#results .card >> nth=0 >> text=Search this text")
    page.wait_for_url(re.compile(r"q="))
    wait_for_results(page, 1)
    assert page.input_value("#q") == title

    # drop and paste an image (a File made in the page from a thumbnail)
    make_file = """async () => { const b = await (await fetch('/api/items/10/thumbnail')).blob();
                   const dt = new DataTransfer(); dt.items.add(new File([b], 'dropped.jpg', {type: 'image/jpeg'}));
                   window.__dt = dt; }"""
    for event in ("new DragEvent('drop', {dataTransfer: window.__dt, bubbles: true, cancelable: true})",
                  "new ClipboardEvent('paste', {clipboardData: window.__dt, bubbles: true, cancelable: true})"):
        before = page.url
        page.evaluate(make_file)
        page.evaluate(f"document.body.dispatchEvent({event})")
        page.wait_for_function("u => location.href !== u && location.search.includes('image=')", arg=before)
        wait_for_results(page, 12)
        assert "dropped.jpg" in page.inner_text("#query-label")

    # empty, error and keyboard
    page.goto(f"{server}?q=mug&page=40")
    page.wait_for_selector("#status[data-kind='empty']")
    assert page.inner_text("#status") == "No more results."
    page.goto(f"{server}?q=mug&category=nowhere")
    page.wait_for_selector("#error:not([hidden])")
    assert "no class path starts with" in page.inner_text("#error")
    page.goto(f"{server}?image=gone")
    page.wait_for_selector("#error:not([hidden])")
    assert "cannot be shared" in page.inner_text("#error")
    page.goto(f"{server}?q=mug")
    wait_for_results(page, 1)
    page.evaluate("() => { const f = window.fetch; window.fetch = (...a) => new Promise(r => setTimeout(() => r(f(...a)), 1500)); }")
    page.fill("#q", "plates")
    page.press("#q", "Enter")
    page.wait_for_selector("#status[data-kind='slow']", timeout=1400)  # a slow answer says so
    assert page.inner_text("#status") == "Searching\u2026" and page.get_attribute("body", "aria-busy") == "true"
    wait_for_results(page, 1)
    assert page.inner_text("#status").startswith("Results 1")
    page.focus("#next")
    page.keyboard.press("/")
    assert page.evaluate("document.activeElement.id") == "q"
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.tagName") == "BUTTON"

    assert [e for e in errors if "Failed to load resource" not in e] == []
    page.close()


def test_narrow_screen_cards_do_not_overflow(server, browser):
    page = browser.new_page(viewport={"width": 360, "height": 740})
    page.goto(f"{server}?q=extraordinarily+long+description")
    wait_for_results(page, 2)
    assert page.evaluate(OVERFLOW) == []
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    page.close()
