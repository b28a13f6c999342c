"""`huse eval`: the evaluation protocol of paper §4.3-4.5 on one split of a feature file.

Classification (per modality and fused, the fusion weight tuned on the validation split), class-
and instance-level retrieval for the four tasks, hierarchical precision, mistake severity and the
fidelity of the universal space; optionally the paper's "separate models" and raw-feature
baselines (§4.4), an attribute-aware search measure for catalogues with a colour attribute
(`--attributes`) and an HTML report. Writes one flat JSON; returns the same dict.

Scale: the feature file is read in blocks, never whole. `--data resident` holds the split's model
outputs (about 4.6 kB an item) and retrieves from them; `--data stream` holds only the queries and
reads the split again in blocks, embedding each on the fly, through `retrieval.GalleryScan` (the
same tiles, so the same answers); auto streams when the outputs would take over a quarter of the free
memory. `--max-queries N` makes a seeded class-stratified sample of N items the queries of every
retrieval task (the gallery stays the whole split); classification and the universal-space metrics
always use every item. MAP@R is MAP@min(R, map_cap).
"""
from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from huse_pipeline.data.hierarchy import Hierarchy, hierarchical_sets
from huse_pipeline.data.text import prepare_texts
from huse_pipeline.encoders.text import TextEncoder, load_text_encoder
from huse_pipeline.errors import HuseError
from huse_pipeline.measures import metrics
from huse_pipeline.measures.keys import IN_MODAL_TASKS, TASKS
from huse_pipeline.measures.retrieval import (
    DEFAULT_GALLERY_CHUNK,
    DEFAULT_QUERY_CHUNK,
    GalleryScan,
    iter_topk,
    l2_normalize,
    target_ranks,
)
from huse_pipeline.measures.sampling import stratified_sample
from huse_pipeline.store import features
from huse_pipeline.train.model import HuseModel, check_compatible, load_checkpoint, model_from_checkpoint
from huse_pipeline.utils import atomic_path, resolve_device

log = logging.getLogger(__name__)

from huse_pipeline.runs import latest_run, resolve_checkpoint, resolve_features  # noqa: F401 (latest_run: API)
from huse_pipeline.eval.outputs import EvalConfig, EvalResult, SplitOutputs
from huse_pipeline.train.batches import RESIDENT_SHARE, available_memory
from huse_pipeline.train.config import TrainConfig
from huse_pipeline.train.loop import fit

# ------------------------------------------------------------------------------ model outputs


def read_item_rows(fs: features.FeatureSet | features.FeatureFile, name: str, items: np.ndarray) -> np.ndarray:
    """Rows `items` (ascending) of fs.image_emb / fs.text_emb as float32, from memory or from the file."""
    rows = fs.read_items(name, items) if isinstance(fs, features.FeatureFile) else getattr(fs, name)[items]
    return rows.astype(np.float32, copy=False)


@torch.inference_mode()
def embed_batch(image_model: HuseModel, text_model: HuseModel, image_feats: np.ndarray, text_feats: np.ndarray,
                device: torch.device) -> dict[str, torch.Tensor]:
    """(B, Di), (B, Dt) float32 features -> image_emb, text_emb (B, D) and image_prob, text_prob (B, C), float32."""
    image_emb = image_model.embed_image(torch.from_numpy(image_feats).to(device))  # (B, D)
    text_emb = text_model.embed_text(torch.from_numpy(text_feats).to(device))  # (B, D)
    return {"image_emb": image_emb.float(), "text_emb": text_emb.float(),
            "image_prob": image_model.classify(image_emb).float().softmax(dim=1),  # (B, C)
            "text_prob": text_model.classify(text_emb).float().softmax(dim=1)}


@torch.inference_mode()
def split_outputs(image_model: HuseModel, text_model: HuseModel, fs: features.FeatureSet | features.FeatureFile,
                  items: np.ndarray, device: torch.device, batch_size: int) -> SplitOutputs:
    """Embed and classify the items `items` (image side with `image_model`, text side with `text_model`;
    the same model for HUSE, two separate models for the baseline)."""
    parts: dict[str, list[torch.Tensor]] = defaultdict(list)
    for b0 in range(0, len(items), batch_size):
        batch = items[b0:b0 + batch_size]
        out = embed_batch(image_model, text_model, read_item_rows(fs, "image_emb", batch),
                          read_item_rows(fs, "text_emb", batch), device)
        for k, v in out.items():
            parts[k].append(v)
    return SplitOutputs(items=items, labels=torch.from_numpy(fs.labels[items]).to(device),
                        **{k: torch.cat(v) for k, v in parts.items()})


def _split_items(fs: features.FeatureSet, split: str) -> np.ndarray:
    items = fs.indices(split)
    if len(items) == 0:
        have = ", ".join(sorted(set(fs.split.tolist())))
        raise HuseError(f"{fs.path} has no items in split {split!r}; it has: {have}")
    if len(items) < 2:
        raise HuseError(f"split {split!r} of {fs.path} has a single item; retrieval needs at least two")
    return items


# ------------------------------------------------------------------------------ metric groups


def classification_metrics(out: SplitOutputs, image_weight: float) -> dict[str, float]:
    """acc/*, acc5/*, macro_acc/* for one split, fused with `image_weight` (and with 0.5)."""
    y = out.labels
    return {
        "acc/image": metrics.accuracy(out.image_prob, y),
        "acc/text": metrics.accuracy(out.text_prob, y),
        "acc/fused": metrics.accuracy(metrics.fuse(out.image_prob, out.text_prob, image_weight), y),
        "acc/fused@0.5": metrics.accuracy(metrics.fuse(out.image_prob, out.text_prob, 0.5), y),
        "acc5/image": metrics.topk_accuracy(out.image_prob, y, 5),
        "acc5/text": metrics.topk_accuracy(out.text_prob, y, 5),
        "macro_acc/image": metrics.macro_accuracy(out.image_prob, y),
        "macro_acc/text": metrics.macro_accuracy(out.text_prob, y),
    }


def n_relevant_capped(counts: torch.Tensor, query_labels: torch.Tensor, in_modal: bool,
                      map_cap: int | None) -> torch.Tensor:
    """(Q,) R, the gallery items of each query's class (less the query itself in-modal), capped at
    `map_cap`: MAP@R is then MAP@min(R, map_cap), and the lists need only min(max R, map_cap) items."""
    n_relevant = counts[query_labels] - int(in_modal)
    return n_relevant if map_cap is None else n_relevant.clamp_max(map_cap)


def list_length(n_relevant: torch.Tensor) -> int:
    """How many retrieved items the class-level metrics read: max(K of R@K and HP@K, max R)."""
    return max(max(metrics.RECALL_KS), max(metrics.HP_KS), int(n_relevant.max()))


def _hp_sets(tree_dist: torch.Tensor) -> dict[int, torch.Tensor]:
    return {k_: torch.as_tensor(hierarchical_sets(tree_dist.cpu().numpy(), k_), device=tree_dist.device)
            for k_ in metrics.HP_KS}


def retrieval_metrics(query_emb: torch.Tensor, gallery_emb: torch.Tensor, labels: torch.Tensor, in_modal: bool,
                      tree_dist: torch.Tensor, num_classes: int, query_chunk: int = DEFAULT_QUERY_CHUNK,
                      gallery_chunk: int = DEFAULT_GALLERY_CHUNK, progress: str | None = None, *,
                      query_pos: torch.Tensor | None = None, map_cap: int | None = None,
                      precision: str = "float64") -> dict[str, float | None]:
    """Class-level retrieval metrics (R@K, MAP@R, HP@K, severity) of one task over one split.

    gallery_emb: (N, D) unit norm, item i of class labels[i]. Every item is a query (query_emb (N, D),
    item i of both the same item), or with `query_pos` (Q,) ascending positions, those items only
    (query_emb (Q, D)); in-modal (`in_modal`: the gallery is the query set) the query itself is
    excluded; cross-modal the gallery holds every item, the query's own paired item included. MAP@R
    is MAP@min(R, map_cap). Memory stays O(query_chunk x max(gallery_chunk, list length)).
    """
    counts = torch.bincount(labels, minlength=num_classes)
    pos = torch.arange(len(labels), device=labels.device) if query_pos is None else query_pos
    n_relevant = n_relevant_capped(counts, labels[pos], in_modal, map_cap)  # (Q,)
    exclude = pos if in_modal else None
    hp_sets = _hp_sets(tree_dist)
    per_query: dict[str, list[torch.Tensor]] = defaultdict(list)
    for sl, _, idx in iter_topk(query_emb, gallery_emb, list_length(n_relevant), exclude, query_chunk, gallery_chunk,
                                progress, precision):
        pq = metrics.class_retrieval_per_query(labels[idx], labels[pos[sl]], n_relevant[sl], tree_dist, hp_sets)
        for key, v in pq.items():
            per_query[key].append(v)
    return {key: metrics.mean_or_none(torch.cat(v)) for key, v in per_query.items()}


class _SpaceSums:
    """The universal-space metrics of a split, added a block of items at a time: class sums of the
    L2-normalised image and text embeddings (float64) and each item's image-text cosine distance."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.sums: torch.Tensor | None = None  # (C, D) float64
        self.gaps: list[torch.Tensor] = []  # (b,) float64 per block
        self.labels: list[torch.Tensor] = []

    def add(self, image_emb: torch.Tensor, text_emb: torch.Tensor, labels: torch.Tensor) -> None:
        image, text = F.normalize(image_emb.double(), dim=1), F.normalize(text_emb.double(), dim=1)
        emb = torch.cat([image, text])  # (2b, D), as metrics.class_centroids
        if self.sums is None:
            self.sums = torch.zeros(self.num_classes, emb.shape[1], dtype=emb.dtype, device=emb.device)
        self.sums.index_add_(0, torch.cat([labels, labels]), emb)
        self.gaps.append(1.0 - (image * text).sum(dim=-1))  # (b,) Eq. 12 per item, as metrics.cross_modal_gap
        self.labels.append(labels)

    def result(self, class_dist: np.ndarray | None, tree_dist: np.ndarray) -> dict[str, float | None]:
        """graph_fidelity, tree_fidelity (Spearman over class-centroid distances) and modality_gap."""
        centroids = F.normalize(self.sums, dim=1)
        present = torch.bincount(torch.cat(self.labels), minlength=self.num_classes) > 0
        return {
            "graph_fidelity": None if class_dist is None else metrics.centroid_fidelity(centroids, present, class_dist),
            "tree_fidelity": metrics.centroid_fidelity(centroids, present, tree_dist),
            "modality_gap": float(torch.cat(self.gaps).mean()),
        }


def universal_space_metrics(out: SplitOutputs, num_classes: int, class_dist: np.ndarray | None,
                            tree_dist: np.ndarray, block_rows: int = 16384) -> dict[str, float | None]:
    """graph_fidelity, tree_fidelity (Spearman over class-centroid distances) and modality_gap, the class
    sums added `block_rows` items at a time as the streamed evaluation adds them (for a split of one
    block, exactly `metrics.class_centroids` and `metrics.modality_gap`)."""
    sums = _SpaceSums(num_classes)
    for b0 in range(0, len(out.labels), block_rows):
        sl = slice(b0, b0 + block_rows)
        sums.add(out.image_emb[sl], out.text_emb[sl], out.labels[sl])
    return sums.result(class_dist, tree_dist)


def all_retrieval_metrics(out: SplitOutputs, tree_dist: torch.Tensor, num_classes: int, query_chunk: int,
                          gallery_chunk: int, tasks: tuple[str, ...] = TASKS, *, query_pos: torch.Tensor | None = None,
                          map_cap: int | None = None, precision: str = "float64") -> dict[str, float | None]:
    """`<task>/<metric>` for the class-level tasks and the instance-level img2txt / txt2img; with
    `query_pos`, only those items of the split are queries (the gallery is the whole split)."""
    emb = {"img": out.image_emb, "txt": out.text_emb}
    result: dict[str, float | None] = {}
    for task in tasks:
        q, g = emb[task[:3]], emb[task[-3:]]
        if query_pos is not None:
            q = q[query_pos]
        scores = retrieval_metrics(q, g, out.labels, task in IN_MODAL_TASKS, tree_dist, num_classes,
                                   query_chunk, gallery_chunk, progress=task, query_pos=query_pos, map_cap=map_cap,
                                   precision=precision)
        result.update({f"{task}/{k}": v for k, v in scores.items()})
        if task not in IN_MODAL_TASKS:
            own = torch.arange(len(out.labels), device=q.device) if query_pos is None else query_pos
            ranks = target_ranks(q, g, own, None, query_chunk, gallery_chunk, progress=f"{task} ranks",
                                 precision=precision)  # the paired item is the only hit
            result.update({f"{task}/{k}": v for k, v in metrics.instance_retrieval(ranks).items()})
    return result


def tune_or_default(val: SplitOutputs | None, step: float) -> tuple[float, str]:
    """(image weight, where it came from): tuned on the val split, or 0.5 without one."""
    if val is None:
        return 0.5, "default 0.5 (no val split)"
    return metrics.tune_fusion_weight(val.image_prob, val.text_prob, val.labels, step), "tuned on val"


# ------------------------------------------------------------------------ attribute-aware search

COLOUR_COLUMN = "baseColour"  # the attributes CSV's colour column, joined on its `image` column
ATTRIBUTE_K = 10
ATTRIBUTE_MIN_ITEMS = 3  # a (colour, class) pair becomes a query when the split holds this many such items


@dataclass(frozen=True)
class AttributeQueries:
    """Text queries "<colour> <class leaf>" for the (colour, class) pairs of one split."""

    text: list[str]  # (Q,)
    features: np.ndarray  # (Q, Dt) float32 frozen text features of `text` (the feature file's text encoder)
    colour: np.ndarray  # (Q,) int64 colour id the query names
    label: np.ndarray  # (Q,) int64 class the query names
    item_colour: np.ndarray  # (N,) int64 colour id of each item of the split, -1 where unknown
    colours: list[str]  # colour id -> name


def _split_image_paths(fs: features.FeatureSet | features.FeatureFile, items: np.ndarray) -> list[str]:
    """The image paths of `items` (ascending), a FeatureFile's read a block of rows at a time."""
    if isinstance(fs, features.FeatureSet):
        return [fs.image_path[i] for i in items]
    wanted = np.zeros(len(fs.labels), dtype=bool)
    wanted[items] = True
    paths: list[str] = []
    for start, block in features.iter_item_blocks(fs.path, ["image_path"]):
        paths += [p for p, w in zip(block["image_path"], wanted[start:start + len(block["image_path"])]) if w]
    return paths


def attribute_queries(fs: features.FeatureSet | features.FeatureFile, items: np.ndarray, attributes: str | Path,
                      encoder: TextEncoder | None = None, device: torch.device | str = "cpu",
                      min_items: int = ATTRIBUTE_MIN_ITEMS) -> AttributeQueries:
    """Read the attributes CSV (columns `image`, as in the catalogue, and `baseColour`), make one query
    per (colour, class) pair with at least `min_items` items among `items`, and encode the queries
    with the feature file's text encoder through stage one's text preparation."""
    try:
        table = pd.read_csv(attributes, usecols=["image", COLOUR_COLUMN], dtype=str)
    except (OSError, ValueError) as exc:
        raise HuseError(f"cannot read the attributes {attributes} (it needs columns image and {COLOUR_COLUMN}): "
                        f"{exc}") from exc
    table = table.dropna().drop_duplicates("image")
    colour_of = dict(zip(table["image"], table[COLOUR_COLUMN].str.strip()))
    names = [colour_of.get(path) or None for path in _split_image_paths(fs, items)]
    if not any(names):
        raise HuseError(f"no item of the split has a {COLOUR_COLUMN} in {attributes}: its `image` column must hold "
                        "the catalogue's image paths")
    colours = sorted({c for c in names if c})
    index = {c: i for i, c in enumerate(colours)}
    item_colour = np.array([index[c] if c else -1 for c in names], dtype=np.int64)  # (N,)
    known = item_colour >= 0
    pairs, counts = np.unique(np.stack([item_colour[known], fs.labels[items][known]], 1), axis=0, return_counts=True)
    pairs = pairs[counts >= min_items]  # (Q, 2) by colour, then class
    sep = fs.attrs.get("label_sep", "<")
    text = [f"{colours[c]} {fs.class_names[y].split(sep)[-1].strip()}" for c, y in pairs]
    if encoder is None:
        name = (fs.attrs.get("extract_config") or {}).get("text_encoder") or fs.attrs.get("text_encoder", "")
        encoder = load_text_encoder(name, device)
    dim = fs.text_emb.shape[1]
    feats = np.zeros((0, dim), np.float32)
    if text:
        feats = encoder.encode(prepare_texts(text, encoder.max_tokens, encoder.count_tokens).text_used)
    if feats.shape[1] != dim:
        raise HuseError(f"the text encoder gives {feats.shape[1]}-d features, the feature file holds {dim}-d")
    return AttributeQueries(text=text, features=np.asarray(feats, np.float32), colour=pairs[:, 0].astype(np.int64),
                            label=pairs[:, 1].astype(np.int64), item_colour=item_colour, colours=colours)


class AttributeScan:
    """attr/* of `huse eval`: the queries through the text tower, their top ATTRIBUTE_K images found
    from a gallery of the split's image embeddings that arrives a block at a time (`add`, as
    `retrieval.GalleryScan`: held outputs or a streamed pass alike)."""

    def __init__(self, model: HuseModel, queries: AttributeQueries, labels: torch.Tensor, cfg: EvalConfig,
                 precision: str, k: int = ATTRIBUTE_K) -> None:
        self.queries, self.labels, self.k, device = queries, labels, k, labels.device
        self.scan = None
        if queries.text:
            with torch.inference_mode():
                query_emb = model.embed_text(torch.from_numpy(queries.features).to(device)).float()  # (Q, D)
            self.scan = GalleryScan(query_emb, len(labels), k, query_chunk=cfg.query_chunk,
                                    gallery_chunk=cfg.gallery_chunk, precision=precision)

    def add(self, start: int, image_emb: torch.Tensor) -> None:
        """Gallery items start .. start + len(image_emb) - 1 of the split, (g, D) unit norm."""
        if self.scan is not None:
            self.scan.add(start, image_emb)

    def result(self) -> dict[str, float | int | None]:
        k, q = self.k, self.queries
        if self.scan is None:
            return {f"attr/colour_class@{k}": None, f"attr/class@{k}": None, f"attr/colour@{k}": None,
                    "attr/n_queries": 0}
        _, ranked = self.scan.topk()  # (Q, k) positions in the split
        dev = self.labels.device
        scores = metrics.attribute_search(ranked, torch.from_numpy(q.colour).to(dev), torch.from_numpy(q.label).to(dev),
                                          torch.from_numpy(q.item_colour).to(dev), self.labels)
        # named by the K asked for, also when a split of fewer images gives shorter lists
        return {**{f"attr/{key.split('@')[0]}@{k}": v for key, v in scores.items()}, "attr/n_queries": len(q.text)}


def attribute_metrics(model: HuseModel, queries: AttributeQueries, out: SplitOutputs, cfg: EvalConfig,
                      precision: str = "float64", k: int = ATTRIBUTE_K) -> dict[str, float | int | None]:
    """attr/colour_class@K (the mean share of a query's top K images of the split matching its colour
    AND class), attr/class@K, attr/colour@K and attr/n_queries, from held outputs of the split."""
    scan = AttributeScan(model, queries, out.labels, cfg, precision, k)
    for b0 in range(0, len(out.labels), cfg.gallery_chunk):
        scan.add(b0, out.image_emb[b0:b0 + cfg.gallery_chunk])
    return scan.result()


# ------------------------------------------------------------------------------------ baselines


def train_baselines(fs: features.FeatureSet | features.FeatureFile, train_config: dict[str, Any] | None,
                    device: torch.device) -> tuple[HuseModel, HuseModel]:
    """The paper's "separate models": (image model, text model), each one tower + its own classifier
    trained with the classification loss only and the run's TrainConfig."""
    if train_config is None:
        raise HuseError("the checkpoint has no train_config, so the separate-model baselines cannot be trained "
                        "with the run's settings; evaluate a checkpoint written by `huse train`")
    try:
        train_cfg = TrainConfig.from_saved(train_config)
    except TypeError as exc:
        raise HuseError(f"the checkpoint's train_config does not fit this version's TrainConfig ({exc})") from exc
    models = {}
    for modality in ("image", "text"):
        log.info("training the separate %s model (baseline)", modality)
        model, _history = fit(fs, replace(train_cfg, modality=modality))
        models[modality] = model.to(device).eval()
    return models["image"], models["text"]


def baseline_metrics(fs: features.FeatureSet | features.FeatureFile, train_config: dict[str, Any] | None,
                     items: np.ndarray, val_items: np.ndarray | None, tree_dist: torch.Tensor, cfg: EvalConfig,
                     device: torch.device, precision: str = "float64") -> dict[str, float | None]:
    """The paper's "separate models" (one tower + own classifier per modality, classification loss
    only, the run's TrainConfig) and retrieval with the raw frozen features, L2-normalised."""
    result: dict[str, float | None] = {}
    labels = torch.from_numpy(fs.labels[items]).to(device)
    for task, name in (("img2img", "image_emb"), ("txt2txt", "text_emb")):
        emb = l2_normalize(torch.from_numpy(read_item_rows(fs, name, items)).to(device).float())
        scores = retrieval_metrics(emb, emb, labels, True, tree_dist, fs.num_classes, cfg.query_chunk,
                                   cfg.gallery_chunk, progress=f"raw {task}", map_cap=cfg.map_cap, precision=precision)
        result.update({f"baseline/{task}/{k}": v for k, v in scores.items()})

    image_model, text_model = train_baselines(fs, train_config, device)
    out = split_outputs(image_model, text_model, fs, items, device, cfg.batch_size)
    val = split_outputs(image_model, text_model, fs, val_items, device, cfg.batch_size) \
        if val_items is not None else None
    weight, _ = tune_or_default(val, cfg.fusion_step)
    result.update({
        "baseline/acc/image": metrics.accuracy(out.image_prob, out.labels),
        "baseline/acc/text": metrics.accuracy(out.text_prob, out.labels),
        "baseline/acc/fused": metrics.accuracy(metrics.fuse(out.image_prob, out.text_prob, weight), out.labels),
        "baseline/fusion_weight": weight,
    })
    return result


# ------------------------------------------------------------------------------ at scale

QUERY_STATE_BYTES = 1 << 30  # top-k lists a streamed evaluation holds at once (more queries: another pass)
REPORT_ITEMS = 20_000  # a streamed evaluation keeps the outputs of at most this many queries for the report
PAIRS_FLOAT32 = 1 << 28  # --similarity auto: float32 beyond this many query-gallery pairs per task


def choose_eval_mode(cfg: EvalConfig, n_items: int, n_val: int, model: HuseModel, device: torch.device) -> str:
    """`resident` or `stream`: cfg.data, or for auto resident when the split's and the val split's
    outputs (2 embeddings + 2 softmaxes, float32) take under RESIDENT_SHARE of the free memory."""
    if cfg.data != "auto":
        return cfg.data
    need = (n_items + n_val) * 4 * 2 * (model.cfg.embed_dim + model.cfg.num_classes)
    free = available_memory(device)
    mode = "resident" if need < RESIDENT_SHARE * free else "stream"
    log.info("--data auto: %s (the outputs take %.2f GB, %.2f GB free on %s)", mode, need / 1e9, free / 1e9, device.type)
    return mode


def aligned_block(cfg: EvalConfig) -> int:
    """Items per block of a streamed pass: whole gallery chunks and whole forward batches, as close to
    cfg.block_rows as that allows, so a block is embedded in the batches and cut into the tiles of
    the resident path."""
    step = math.lcm(cfg.gallery_chunk, cfg.batch_size)
    return step * max(1, cfg.block_rows // step)


def _embed_rows(models: dict[str, tuple[HuseModel, HuseModel]], image: np.ndarray, text: np.ndarray,
                device: torch.device, batch_size: int) -> dict[str, dict[str, torch.Tensor]]:
    """{name: embed_batch outputs} of rows (b, Di), (b, Dt) for each (image model, text model), in
    batches of batch_size from the first row."""
    out = {}
    for name, (image_model, text_model) in models.items():
        parts = [embed_batch(image_model, text_model, image[i:i + batch_size], text[i:i + batch_size], device)
                 for i in range(0, len(image), batch_size)]
        out[name] = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return out


def _file_blocks(fs: features.FeatureSet | features.FeatureFile, items: np.ndarray, block: int,
                 models: dict[str, tuple[HuseModel, HuseModel]], raw: bool, device: torch.device, batch_size: int,
                 progress: str | None = None) -> Iterator[tuple[int, dict[str, dict[str, torch.Tensor]]]]:
    """(first position, {name: outputs}) over the items `items` in blocks of `block`, read from the file
    and embedded on the fly; with `raw`, also "raw": the L2-normalised frozen features."""
    for b0 in tqdm(range(0, len(items), block), desc=progress, disable=progress is None, leave=False, delay=2.0):
        part = items[b0:b0 + block]
        image, text = read_item_rows(fs, "image_emb", part), read_item_rows(fs, "text_emb", part)
        out = _embed_rows(models, image, text, device, batch_size)
        if raw:
            out["raw"] = {"image_emb": l2_normalize(torch.from_numpy(image).to(device)),
                          "text_emb": l2_normalize(torch.from_numpy(text).to(device))}
        yield b0, out


class _ClassCounts:
    """Top-1 and top-5 hits per class of named class scores, added a block at a time: the
    classification metrics of a split without holding its probabilities (exact counts, so equal to
    metrics.accuracy, topk_accuracy and macro_accuracy over the whole split)."""

    def __init__(self, num_classes: int) -> None:
        self.count = np.zeros(num_classes, dtype=np.int64)
        self.hits: dict[str, dict[int, np.ndarray]] = {}

    def add(self, labels: torch.Tensor, scores: dict[str, torch.Tensor]) -> None:
        c = len(self.count)
        self.count += torch.bincount(labels, minlength=c).cpu().numpy()
        for name, sc in scores.items():
            rank = metrics.true_class_rank(sc, labels)  # (b,)
            hits = self.hits.setdefault(name, {1: np.zeros(c, np.int64), 5: np.zeros(c, np.int64)})
            for k in hits:
                hits[k] += torch.bincount(labels[rank <= k], minlength=c).cpu().numpy()

    def accuracy(self, name: str, k: int = 1) -> float:
        return int(self.hits[name][k].sum()) / int(self.count.sum())

    def macro_accuracy(self, name: str) -> float:
        recall = np.where(self.count > 0, self.hits[name][1] / np.maximum(self.count, 1), np.nan)
        return float(np.nanmean(recall))


def _fused(out: dict[str, torch.Tensor], weight: float) -> torch.Tensor:
    return metrics.fuse(out["image_prob"], out["text_prob"], weight)


def tune_streaming(models: tuple[HuseModel, HuseModel], fs: features.FeatureSet | features.FeatureFile,
                   val_items: np.ndarray | None, cfg: EvalConfig, device: torch.device) -> tuple[float, str]:
    """`tune_or_default` from one pass over the val split in blocks: the fused top-1 hits of every
    weight of the grid are counted, then chosen by the rule of metrics.tune_fusion_weight."""
    if val_items is None:
        return 0.5, "default 0.5 (no val split)"
    grid = metrics.fusion_grid(cfg.fusion_step)
    correct = np.zeros(len(grid), dtype=np.int64)
    for b0, out in _file_blocks(fs, val_items, aligned_block(cfg), {"m": models}, False, device, cfg.batch_size):
        out, y = out["m"], torch.from_numpy(fs.labels[val_items[b0:b0 + aligned_block(cfg)]]).to(device)
        for j, w in enumerate(grid):
            correct[j] += int((metrics.true_class_rank(_fused(out, float(w)), y) == 1).sum())
    acc = np.array([c / len(val_items) for c in correct])
    best = np.flatnonzero(acc == acc.max())
    return float(grid[min(best, key=lambda i: (abs(grid[i] - 0.5), grid[i]))]), "tuned on val"


def _query_groups(n_queries: int, k_max: int, n_tasks: int, cfg: EvalConfig) -> int:
    """Queries per gallery pass: as many as QUERY_STATE_BYTES of top-k lists hold, in whole query
    chunks and forward batches (so the groups cut the queries where one pass would)."""
    step = math.lcm(cfg.query_chunk, cfg.batch_size)
    per_query = max(1, n_tasks * k_max * 12)  # float32 score + int64 index
    return max(step, QUERY_STATE_BYTES // per_query // step * step)


def scanned_metrics(fs: features.FeatureSet | features.FeatureFile, items: np.ndarray, query_pos: np.ndarray,
                    model: HuseModel, weight: float, tree_t: torch.Tensor, class_dist: np.ndarray | None,
                    tree: np.ndarray, cfg: EvalConfig, device: torch.device, precision: str,
                    resident: SplitOutputs | None = None, baseline_models: tuple[HuseModel, HuseModel] | None = None,
                    baseline_weight: float = 0.5, raw_baseline: bool = False,
                    attribute_scan: AttributeScan | None = None) -> tuple[dict[str, float | None], SplitOutputs]:
    """Every metric of the split with the items at positions `query_pos` (ascending) as the queries of
    each retrieval task and the whole split as its gallery, the gallery taken a block at a time:
    from `resident` (the split's outputs, held) or, without it, read from the file and embedded on
    the fly. Queries are embedded in their own pass, a group at a time (`_query_groups`); each
    group's gallery pass feeds one `GalleryScan` per task. Classification, the universal space and
    the baselines' classification use every item of the split (first pass), and so does
    `attribute_scan` (its images are the whole split). Also returns the outputs of (a sample of at most
    REPORT_ITEMS of) the queries, for the report.
    """
    n, num_classes, block = len(items), fs.num_classes, aligned_block(cfg)
    labels = torch.from_numpy(fs.labels[items]).to(device)  # (N,) the gallery's classes
    counts = torch.bincount(labels, minlength=num_classes)
    qpos = torch.from_numpy(query_pos).to(device)
    hp_sets = _hp_sets(tree_t)
    # task -> (query space, query modality, gallery modality, in-modal)
    tasks = {t: ("huse", t[:3], t[-3:], t in IN_MODAL_TASKS) for t in TASKS}
    if raw_baseline:
        tasks.update({f"baseline/{t}": ("raw", t[:3], t[-3:], True) for t in IN_MODAL_TASKS})
    key = {"img": "image_emb", "txt": "text_emb"}
    n_rel = {t: n_relevant_capped(counts, labels[qpos], spec[3], cfg.map_cap) for t, spec in tasks.items()}
    k = {t: list_length(r) for t, r in n_rel.items()}
    group = _query_groups(len(query_pos), max(k.values()), len(tasks), cfg)
    models = {"huse": (model, model)} | ({"sep": baseline_models} if baseline_models is not None else {})
    report_pos = query_pos if len(query_pos) <= REPORT_ITEMS else \
        np.sort(query_pos[stratified_sample(fs.labels[items[query_pos]], REPORT_ITEMS, cfg.query_seed)])
    report_parts: dict[str, list[torch.Tensor]] = defaultdict(list)
    per_query: dict[str, list[torch.Tensor]] = defaultdict(list)
    ranks: dict[str, list[torch.Tensor]] = defaultdict(list)
    cls, space = _ClassCounts(num_classes), _SpaceSums(num_classes)

    def gallery(first: bool) -> Iterator[tuple[int, dict[str, dict[str, torch.Tensor]]]]:
        """The split a block at a time (the separate models only in the first pass: classification)."""
        if resident is None:
            used = models if first else {"huse": models["huse"]}
            yield from _file_blocks(fs, items, block, used, raw_baseline, device, cfg.batch_size, progress="gallery")
            return
        for b0 in range(0, n, block):
            sl = slice(b0, b0 + block)
            out = {"huse": {k_: getattr(resident, k_)[sl] for k_ in ("image_emb", "text_emb", "image_prob", "text_prob")}}
            sep = first and baseline_models is not None
            if raw_baseline or sep:  # what the held outputs lack: from the file, as a streamed pass makes it
                image, text = read_item_rows(fs, "image_emb", items[sl]), read_item_rows(fs, "text_emb", items[sl])
                if sep:
                    out.update(_embed_rows({"sep": baseline_models}, image, text, device, cfg.batch_size))
                if raw_baseline:
                    out["raw"] = {"image_emb": l2_normalize(torch.from_numpy(image).to(device)),
                                  "text_emb": l2_normalize(torch.from_numpy(text).to(device))}
            yield b0, out

    for g0 in range(0, len(query_pos), group):
        gpos = query_pos[g0:g0 + group]
        gpos_t = qpos[g0:g0 + group]
        q = next(iter(_file_blocks(fs, items[gpos], len(gpos), {"huse": (model, model)}, raw_baseline, device,
                                   cfg.batch_size)))[1]  # the group's queries, embedded in their own batches
        keep = np.isin(gpos, report_pos)
        for k_, v in q["huse"].items():
            report_parts[k_].append(v[torch.from_numpy(keep).to(device)])
        scans = {}
        for t, (sp, qm, gm, in_modal) in tasks.items():
            other = "txt" if qm == "img" else "img"
            scans[t] = GalleryScan(q[sp][key[qm]], n, k[t], exclude=gpos_t if in_modal else None,
                                   target=None if in_modal else gpos_t,
                                   target_emb=None if in_modal else q[sp][key[other]],
                                   query_chunk=cfg.query_chunk, gallery_chunk=cfg.gallery_chunk, precision=precision)
        for b0, out in gallery(g0 == 0):
            if g0 == 0:
                y = labels[b0:b0 + block]
                h = out["huse"]
                scores = {"image": h["image_prob"], "text": h["text_prob"], "fused": _fused(h, weight),
                          "fused@0.5": _fused(h, 0.5)}
                if baseline_models is not None:
                    sep = out["sep"]
                    scores.update({"baseline/image": sep["image_prob"], "baseline/text": sep["text_prob"],
                                   "baseline/fused": _fused(sep, baseline_weight)})
                cls.add(y, scores)
                space.add(h["image_emb"], h["text_emb"], y)
                if attribute_scan is not None:
                    attribute_scan.add(b0, h["image_emb"])
            for t, (sp, qm, gm, in_modal) in tasks.items():
                scans[t].add(b0, out[sp][key[gm]])
        for t, scan in scans.items():
            _, idx = scan.topk()
            for c0 in range(0, len(gpos), cfg.query_chunk):
                sl = slice(c0, c0 + cfg.query_chunk)
                pq = metrics.class_retrieval_per_query(labels[idx[sl]], labels[gpos_t[sl]],
                                                       n_rel[t][g0:g0 + group][sl], tree_t, hp_sets)
                for m, v in pq.items():
                    per_query[f"{t}/{m}"].append(v)
            if not tasks[t][3]:
                ranks[t].append(scan.ranks())
        del scans

    result: dict[str, float | None] = {
        "acc/image": cls.accuracy("image"), "acc/text": cls.accuracy("text"), "acc/fused": cls.accuracy("fused"),
        "acc/fused@0.5": cls.accuracy("fused@0.5"), "acc5/image": cls.accuracy("image", 5),
        "acc5/text": cls.accuracy("text", 5), "macro_acc/image": cls.macro_accuracy("image"),
        "macro_acc/text": cls.macro_accuracy("text"), "fusion_weight": weight}
    for t in tasks:
        result.update({k_: metrics.mean_or_none(torch.cat(v)) for k_, v in per_query.items() if k_.startswith(f"{t}/")})
        if t in ranks:
            result.update({f"{t}/{m}": v for m, v in metrics.instance_retrieval(torch.cat(ranks[t])).items()})
    result.update(space.result(class_dist, tree))
    if attribute_scan is not None:
        result.update(attribute_scan.result())
    if baseline_models is not None:
        result.update({"baseline/acc/image": cls.accuracy("baseline/image"),
                       "baseline/acc/text": cls.accuracy("baseline/text"),
                       "baseline/acc/fused": cls.accuracy("baseline/fused"), "baseline/fusion_weight": baseline_weight})
    report_items = items[report_pos]
    outputs = SplitOutputs(items=report_items, labels=torch.from_numpy(fs.labels[report_items]).to(device),
                           **{k_: torch.cat(v) for k_, v in report_parts.items()})
    return result, outputs


# ------------------------------------------------------------------------------------- driver


def _clean(value: Any) -> Any:
    """JSON-safe: NaN / inf floats become None (null)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def check_same_items(ckpt: dict[str, Any], fs: features.FeatureSet, cfg: EvalConfig) -> bool:
    """Whether `fs` holds the items (features, labels, splits) the checkpoint was trained on. If not,
    its test items may be the model's training items, so this refuses unless --other-features."""
    if "features_digest" not in ckpt or ckpt["features_digest"] == features.features_digest(fs):
        return True
    message = (f"{fs.path} is not the feature file this model was trained on (its items, features or splits "
               "differ), so its evaluation items may include items the model was trained on")
    if not cfg.other_features:
        raise HuseError(f"{message}. Pass --features with the training file (the run's config.json names it), "
                        "or --other-features to evaluate on this file anyway (say, another catalogue)")
    log.warning("%s (--other-features)", message)
    return False


def run_evaluation(cfg: EvalConfig) -> EvalResult:
    """Evaluate a checkpoint on one split; write the JSON (and the report); return everything."""
    start = time.perf_counter()
    ckpt_path, run_dir = resolve_checkpoint(cfg.run, cfg.checkpoint, cfg.runs_dir)
    ckpt = load_checkpoint(ckpt_path)
    cfg = replace(cfg, features=resolve_features(cfg.features, run_dir))
    attrs = features.read_attrs(cfg.features)
    class_names = features.read_class_names(cfg.features)
    check_compatible(ckpt, attrs, class_names, cfg.features)
    fs = features.open_features(cfg.features)  # read in blocks: never whole
    try:
        return _evaluate_file(cfg, ckpt, ckpt_path, run_dir, fs, start)
    finally:
        fs.close()


def _evaluate_file(cfg: EvalConfig, ckpt: dict[str, Any], ckpt_path: Path, run_dir: Path | None,
                   fs: features.FeatureFile, start: float) -> EvalResult:
    non_finite = {name: n for name, n in fs.summary().non_finite.items() if n}  # the digest's pass: no extra read
    if non_finite:  # refused as training refuses them, before retrieval would meet NaN
        raise HuseError(f"{fs.path} holds " + " and ".join(f"{n} non-finite {name} feature values"
                                                           for name, n in non_finite.items())
                        + "; re-run `huse extract-features`")
    same_items = check_same_items(ckpt, fs, cfg)
    modality = (ckpt.get("train_config") or {}).get("modality", "both")
    if modality != "both":
        log.warning("this checkpoint was trained with --modality %s: the other tower, and every text-side or "
                    "cross-modal metric, come from untrained weights", modality)
    items = _split_items(fs, cfg.split)
    val_items = fs.indices("val")
    val_items = val_items if len(val_items) else None
    device = resolve_device(cfg.device)
    out_path = Path(cfg.out) if cfg.out else (run_dir or ckpt_path.parent) / f"eval_{cfg.split}.json"

    tree = fs.tree_dist if fs.tree_dist is not None else \
        Hierarchy(tuple(fs.class_names), fs.attrs.get("label_sep", "<")).tree_distance()
    tree_t = torch.as_tensor(tree, device=device)
    if fs.class_dist is None:
        log.warning("%s has no semantic graph (run `huse build-graph`): graph_fidelity is null", cfg.features)

    model = model_from_checkpoint(ckpt, device)
    mode = choose_eval_mode(cfg, len(items), 0 if val_items is None else len(val_items), model, device)
    query_pos = np.arange(len(items))
    if cfg.max_queries and cfg.max_queries < len(items):  # stratified by class, seeded
        query_pos = stratified_sample(fs.labels[items], cfg.max_queries, cfg.query_seed)
        log.info("queries: %d of the %d items (class-stratified, seed %d)", len(query_pos), len(items), cfg.query_seed)
    sampled = len(query_pos) < len(items)
    precision = cfg.similarity if cfg.similarity != "auto" else \
        ("float32" if len(query_pos) * len(items) > PAIRS_FLOAT32 else "float64")
    queries = attribute_queries(fs, items, cfg.attributes, device=device) if cfg.attributes else None

    if mode == "resident":
        out = split_outputs(model, model, fs, items, device, cfg.batch_size)
        val = split_outputs(model, model, fs, val_items, device, cfg.batch_size) if val_items is not None else None
        weight, source = tune_or_default(val, cfg.fusion_step)
    else:
        out = None
        weight, source = tune_streaming((model, model), fs, val_items, cfg, device)
    if val_items is None:
        log.warning("%s has no val split: the fusion weight is fixed at 0.5", cfg.features)
    elif cfg.split == "val":
        log.warning("evaluating on val, where the fusion weight was tuned: acc/fused is optimistic")

    if mode == "resident" and not sampled:  # the split's outputs held, every item a query
        result: dict[str, Any] = {**classification_metrics(out, weight), "fusion_weight": weight}
        result.update(all_retrieval_metrics(out, tree_t, fs.num_classes, cfg.query_chunk, cfg.gallery_chunk,
                                            map_cap=cfg.map_cap, precision=precision))
        result.update(universal_space_metrics(out, fs.num_classes, fs.class_dist, tree, aligned_block(cfg)))
        if queries is not None:
            result.update(attribute_metrics(model, queries, out, cfg, precision))
        if cfg.baselines:
            result.update(baseline_metrics(fs, ckpt.get("train_config"), items, val_items, tree_t, cfg, device,
                                           precision))
        report_out = out
    else:  # the gallery a block at a time (held or read again), the queries in their own pass
        base_models, base_weight = None, 0.5
        if cfg.baselines:
            base_models = train_baselines(fs, ckpt.get("train_config"), device)
            base_weight = (tune_or_default(split_outputs(*base_models, fs, val_items, device, cfg.batch_size)
                                           if val_items is not None else None, cfg.fusion_step)[0]
                           if mode == "resident" else tune_streaming(base_models, fs, val_items, cfg, device)[0])
        scan = None if queries is None else \
            AttributeScan(model, queries, torch.from_numpy(fs.labels[items]).to(device), cfg, precision)
        result, report_out = scanned_metrics(fs, items, query_pos, model, weight, tree_t, fs.class_dist, tree, cfg,
                                             device, precision, resident=out, baseline_models=base_models,
                                             baseline_weight=base_weight, raw_baseline=cfg.baselines,
                                             attribute_scan=scan)
        # the report draws from the queries' outputs (a sample: its examples cost O(sample^2), not O(N^2))
    result.update({
        "meta/split": cfg.split,
        "meta/n_items": int(len(items)),
        "meta/checkpoint": str(ckpt_path.resolve()),
        "meta/features": str(Path(cfg.features).resolve()),
        "meta/features_match_training": same_items,
        "meta/fusion_weight_source": source,
        "meta/data": mode,
        "meta/max_queries": cfg.max_queries or None,
        "meta/query_seed": cfg.query_seed,
        "meta/n_queries": int(len(query_pos)),
        "meta/similarity": precision,
        "meta/map_r_cap": cfg.map_cap,
        "meta/eval_time_s": round(time.perf_counter() - start, 3),
    })
    result = {k: _clean(v) for k, v in result.items()}
    with atomic_path(out_path) as tmp:
        tmp.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    log.debug("wrote %s", out_path)

    res = EvalResult(metrics=result, outputs=report_out, fusion_weight=weight, tree_dist=np.asarray(tree),
                     checkpoint=ckpt_path, run_dir=run_dir, out=out_path,
                     extra={"checkpoint_epoch": ckpt.get("epoch")})
    if cfg.report:
        from huse_pipeline.eval.report import write_report

        res.extra["report"] = str(write_report(res, fs, cfg))
    return res


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate a checkpoint on one split; returns the flat dict written to the JSON file."""
    return run_evaluation(cfg).metrics


