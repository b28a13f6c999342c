// huse serve: the search page. Plain DOM APIs only: every product text and label is inserted with
// textContent or as an attribute value, never parsed as HTML. The URL holds the query, the category
// filter and the page, so Back works and a text or item search can be shared.
"use strict";

const PER_PAGE = 24;
const SLOW_MS = 300; // show "Searching..." after this long
const VERY_SLOW_MS = 4000;
const SEP_SHOWN = " \u203a "; // "a > b" for class paths

const $ = (id) => document.getElementById(id);
const ui = {
  form: $("search-form"), q: $("q"), category: $("category"), imageButton: $("image-button"), file: $("file"),
  overlay: $("drop-overlay"), query: $("query"), queryImage: $("query-image"), queryLabel: $("query-label"),
  chips: $("chips"), status: $("status"), error: $("error"), welcome: $("welcome"), results: $("results"),
  pager: $("pager"), prev: $("prev"), next: $("next"), pageLabel: $("page-label"), footer: $("footer"),
};

let separator = "<";
const uploads = new Map(); // token -> {blob, name}: image queries live in this page only
let inflight = null; // AbortController of the running search
let lastQueryUrl = null;

function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "text") node.textContent = value;
    else if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function levels(path) {
  return String(path).split(separator).map((s) => s.trim());
}

// ------------------------------------------------------------------ state <-> URL

function readState() {
  const p = new URLSearchParams(location.search);
  const page = Math.max(1, parseInt(p.get("page") || "1", 10) || 1);
  const state = { category: p.get("category") || "", page };
  if (p.has("item")) return { ...state, mode: "item", item: parseInt(p.get("item"), 10) };
  if (p.has("image")) return { ...state, mode: "image", image: p.get("image") };
  if (p.get("q")) return { ...state, mode: "text", q: p.get("q") };
  return { ...state, mode: "none" };
}

function stateUrl(state) {
  const p = new URLSearchParams();
  if (state.mode === "text") p.set("q", state.q);
  if (state.mode === "item") p.set("item", String(state.item));
  if (state.mode === "image") p.set("image", state.image);
  if (state.category) p.set("category", state.category);
  if (state.page > 1) p.set("page", String(state.page));
  const s = p.toString();
  return s ? `/?${s}` : "/";
}

function go(state) {
  history.pushState(null, "", stateUrl(state));
  show(state);
}

function current() {
  return readState();
}

// ------------------------------------------------------------------------ search

async function show(state) {
  if (state.mode === "text") ui.q.value = state.q;
  else if (state.mode === "none") ui.q.value = "";
  ui.category.value = state.category;
  if (ui.category.value !== state.category) ui.category.value = ""; // a filter not in the tree
  document.title = state.mode === "text" ? `${state.q} - huse search` : "huse search";
  if (state.mode === "none") {
    clearResults();
    ui.query.hidden = true;
    ui.welcome.hidden = false;
    setStatus("");
    return;
  }
  ui.welcome.hidden = true;
  const qs = new URLSearchParams({ page: String(state.page), per_page: String(PER_PAGE) });
  if (state.category) qs.set("category", state.category);
  let url, init = {};
  if (state.mode === "text") {
    qs.set("q", state.q);
    url = `/api/search?${qs}`;
  } else if (state.mode === "item") {
    url = `/api/items/${encodeURIComponent(state.item)}/similar?${qs}`;
  } else {
    const upload = uploads.get(state.image);
    if (!upload) {
      clearResults();
      ui.query.hidden = true;
      showError("An image search cannot be shared or reopened from a link: choose, drop or paste the image again.");
      return;
    }
    const body = new FormData();
    body.append("file", upload.blob, upload.name);
    url = `/api/search/image?${qs}`;
    init = { method: "POST", body };
  }
  await search(url, init, state);
}

async function search(url, init, state) {
  if (inflight) inflight.abort();
  const controller = new AbortController();
  inflight = controller;
  lastQueryUrl = url;
  hideError();
  document.body.setAttribute("aria-busy", "true");
  const slow = setTimeout(() => setStatus("Searching\u2026", "slow"), SLOW_MS);
  const verySlow = setTimeout(() => setStatus("Still searching\u2026 the server is busy", "slow"), VERY_SLOW_MS);
  try {
    const response = await fetch(url, { ...init, signal: controller.signal });
    const data = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(data.error || `the server answered ${response.status}`);
    render(data, state);
  } catch (err) {
    if (err.name === "AbortError") return;
    clearResults();
    showError(err instanceof TypeError ? "The server cannot be reached. Is `huse serve` still running?" : String(err.message));
  } finally {
    clearTimeout(slow);
    clearTimeout(verySlow);
    if (inflight === controller) {
      inflight = null;
      document.body.removeAttribute("aria-busy");
      if (ui.status.dataset.kind === "slow") setStatus("");
    }
  }
}

function render(data, state) {
  renderQuery(data, state);
  ui.results.replaceChildren(...data.results.map(card));
  const where = state.category ? ` in ${levels(state.category).join(SEP_SHOWN)}` : "";
  if (!data.results.length) {
    setStatus(state.page > 1 ? "No more results." : `No products found${where}.` +
      (state.category ? " Try all categories." : ""), "empty");
  } else {
    const first = data.results[0].rank, last = data.results[data.results.length - 1].rank;
    setStatus(`Results ${first}\u2013${last}${where} (${data.server_ms.toFixed(0)} ms)`, "done");
  }
  ui.pager.hidden = !(state.page > 1 || data.has_more);
  ui.prev.disabled = state.page <= 1;
  ui.next.disabled = !data.has_more;
  ui.pageLabel.textContent = `Page ${state.page}`;
}

function renderQuery(data, state) {
  ui.query.hidden = false;
  ui.queryImage.hidden = true;
  if (state.mode === "image") {
    ui.queryImage.src = uploads.get(state.image).url;
    ui.queryImage.alt = "Your image";
    ui.queryImage.hidden = false;
    ui.queryLabel.textContent = `Products like your image ${data.query.image ? `\u201c${data.query.image}\u201d` : ""}`;
  } else if (state.mode === "item") {
    ui.queryImage.src = `/api/items/${encodeURIComponent(state.item)}/thumbnail?size=128`;
    ui.queryImage.alt = data.query.title || "";
    ui.queryImage.hidden = false;
    ui.queryLabel.textContent = `More like \u201c${data.query.title}\u201d`;
  } else {
    ui.queryLabel.textContent = `Products for \u201c${data.query.text}\u201d`;
  }
  ui.chips.replaceChildren(el("span", { class: "chips-label", text: "Looks like:" }),
    ...data.predicted.map((p) => {
      const chosen = state.category === p.class_path;
      return el("button", {
        type: "button", class: chosen ? "chip chosen" : "chip", "aria-pressed": String(chosen),
        title: `${chosen ? "Remove the filter" : "Only show"} ${levels(p.class_path).join(SEP_SHOWN)}`,
        onclick: () => go({ ...current(), category: chosen ? "" : p.class_path, page: 1 }),
      }, [el("span", { class: "chip-name", text: levels(p.class_path).slice(-1)[0] }),
          el("span", { class: "chip-prob", text: `${Math.round(100 * p.probability)}%` })]);
    }));
}

function breadcrumb(path) {
  const parts = levels(path);
  const shown = parts.length > 3 ? [parts[0], "\u2026", ...parts.slice(-2)] : parts;
  const crumbs = el("ol", { class: "crumbs", title: parts.join(SEP_SHOWN), "aria-label": `Category: ${parts.join(", ")}` });
  shown.forEach((part) => crumbs.append(el("li", { text: part })));
  return crumbs;
}

function card(hit) {
  const img = el("img", {
    src: `${hit.thumbnail}?size=256`, alt: hit.title, width: "256", height: "256", decoding: "async",
  });
  img.addEventListener("error", () => img.classList.add("broken"), { once: true });
  return el("li", { class: "card", "data-id": String(hit.id) }, [
    el("div", { class: "thumb" }, [img]),
    el("p", { class: "title", title: hit.title, text: hit.title }),
    breadcrumb(hit.class_path),
    el("p", { class: "score", title: "cosine similarity to the query", text: `score ${hit.score.toFixed(3)}` }),
    el("div", { class: "actions" }, [
      el("button", {
        type: "button", class: "more", text: "More like this", "aria-label": `More like ${hit.title}`,
        onclick: () => go({ mode: "item", item: hit.id, category: current().category, page: 1 }),
      }),
      el("button", {
        type: "button", class: "use-text", text: "Search this text", "aria-label": `Search for ${hit.title}`,
        onclick: () => go({ mode: "text", q: hit.title.slice(0, 1000), category: current().category, page: 1 }),
      }),
    ]),
  ]);
}

function clearResults() {
  ui.results.replaceChildren();
  ui.pager.hidden = true;
}

function setStatus(text, kind = "") {
  ui.status.textContent = text;
  ui.status.dataset.kind = kind;
}

function showError(message) {
  setStatus("");
  ui.error.replaceChildren(el("strong", { text: "Something went wrong: " }), el("span", { text: message }));
  if (lastQueryUrl) {
    ui.error.append(" ", el("button", { type: "button", text: "Try again", onclick: () => show(current()) }));
  }
  ui.error.hidden = false;
}

function hideError() {
  ui.error.hidden = true;
  ui.error.replaceChildren();
}

// ---------------------------------------------------------------------- images

function searchImage(blob, name) {
  if (!blob || !String(blob.type || "image/").startsWith("image/")) {
    showError("That is not an image: use a JPEG, PNG, WebP, GIF or BMP file.");
    return;
  }
  const token = Math.random().toString(36).slice(2, 10);
  for (const [key, old] of uploads) { // keep a few, for Back
    if (uploads.size < 8) break;
    URL.revokeObjectURL(old.url);
    uploads.delete(key);
  }
  uploads.set(token, { blob, name: name || "pasted image", url: URL.createObjectURL(blob) });
  go({ mode: "image", image: token, category: current().category, page: 1 });
}

function imageFrom(dataTransfer) {
  if (!dataTransfer) return null;
  for (const file of dataTransfer.files || []) if (file.type.startsWith("image/")) return file;
  for (const item of dataTransfer.items || []) {
    if (item.kind === "file" && item.type.startsWith("image/")) return item.getAsFile();
  }
  return dataTransfer.files && dataTransfer.files[0] ? dataTransfer.files[0] : null;
}

// ---------------------------------------------------------------- categories

function fillCategories(tree) {
  const options = [el("option", { value: "", text: "All categories" })];
  const walk = (nodes, depth) => {
    for (const node of nodes) {
      options.push(el("option", { value: node.path, text: `${"\u2003".repeat(depth)}${node.name} (${node.count})` }));
      walk(node.children, depth + 1);
    }
  };
  walk(tree, 0);
  ui.category.replaceChildren(...options);
  ui.category.value = current().category;
}

// ---------------------------------------------------------------------- wiring

ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  const q = ui.q.value.trim();
  if (!q) {
    ui.q.focus();
    return;
  }
  go({ mode: "text", q, category: ui.category.value, page: 1 });
});

ui.category.addEventListener("change", () => {
  const state = current();
  go({ ...state, category: ui.category.value, page: 1 });
});

ui.prev.addEventListener("click", () => {
  const state = current();
  go({ ...state, page: Math.max(1, state.page - 1) });
});
ui.next.addEventListener("click", () => {
  const state = current();
  go({ ...state, page: state.page + 1 });
  ui.results.focus({ preventScroll: true });
  window.scrollTo(0, 0);
});

ui.imageButton.addEventListener("click", () => ui.file.click());
ui.file.addEventListener("change", () => {
  if (ui.file.files[0]) searchImage(ui.file.files[0], ui.file.files[0].name);
  ui.file.value = "";
});

let dragDepth = 0;
window.addEventListener("dragenter", (e) => {
  if (![...(e.dataTransfer?.types || [])].includes("Files")) return;
  dragDepth += 1;
  ui.overlay.hidden = false;
});
window.addEventListener("dragleave", () => {
  dragDepth = Math.max(0, dragDepth - 1);
  if (!dragDepth) ui.overlay.hidden = true;
});
window.addEventListener("dragover", (e) => e.preventDefault());
window.addEventListener("drop", (e) => {
  e.preventDefault();
  dragDepth = 0;
  ui.overlay.hidden = true;
  const file = imageFrom(e.dataTransfer);
  if (file) searchImage(file, file.name);
});
window.addEventListener("paste", (e) => {
  const file = imageFrom(e.clipboardData);
  if (file) {
    e.preventDefault();
    searchImage(file, file.name);
  }
});

document.addEventListener("keydown", (e) => {
  const typing = ["INPUT", "TEXTAREA", "SELECT"].includes(document.activeElement?.tagName);
  if (e.key === "/" && !typing) {
    e.preventDefault();
    ui.q.focus();
    ui.q.select();
  } else if (e.key === "Escape" && document.activeElement === ui.q) {
    ui.q.value = "";
  }
});

window.addEventListener("popstate", () => show(current()));

async function start() {
  try {
    const [categories, health] = await Promise.all(["/api/categories", "/api/health"].map(async (url) => {
      const r = await fetch(url);
      if (!r.ok) throw new Error(`${url}: ${r.status}`);
      return r.json();
    }));
    separator = categories.separator;
    fillCategories(categories.tree);
    ui.footer.textContent = `${health.items} products in ${health.classes} categories \u00b7 run ${health.run} \u00b7 ` +
      `index ${health.index_kind.image} \u00b7 huse ${health.version}`;
  } catch (err) {
    showError("The server cannot be reached. Is `huse serve` still running?");
    return;
  }
  show(current());
  if (current().mode === "none") ui.q.focus();
}

start();
