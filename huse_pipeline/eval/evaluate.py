"""`huse eval`: the evaluation protocol of paper §4.3-4.5 on one split of a feature file.

Classification (per modality and fused, the fusion weight tuned on the validation split), class-
and instance-level retrieval for the four tasks, hierarchical precision, mistake severity and the
fidelity of the universal space; optionally the paper's "separate models" and raw-feature
baselines (§4.4) and an HTML report. Writes one flat JSON; returns the same dict.

"""
from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from huse_pipeline.data.hierarchy import Hierarchy, hierarchical_sets
from huse_pipeline.errors import HuseError
from huse_pipeline.measures import metrics
from huse_pipeline.measures.keys import IN_MODAL_TASKS, TASKS
from huse_pipeline.measures.retrieval import (
    DEFAULT_GALLERY_CHUNK,
    DEFAULT_QUERY_CHUNK,
    iter_topk,
    l2_normalize,
    target_ranks,
)
from huse_pipeline.store import features
from huse_pipeline.train.model import HuseModel, check_compatible, load_checkpoint, model_from_checkpoint
from huse_pipeline.utils import atomic_path, resolve_device

log = logging.getLogger(__name__)

from huse_pipeline.runs import latest_run, resolve_checkpoint, resolve_features  # noqa: F401 (latest_run: API)
from huse_pipeline.eval.outputs import EvalConfig, EvalResult, SplitOutputs
from huse_pipeline.train.config import TrainConfig
from huse_pipeline.train.loop import fit

# ------------------------------------------------------------------------------ model outputs


@torch.inference_mode()
def split_outputs(image_model: HuseModel, text_model: HuseModel, fs: features.FeatureSet, items: np.ndarray,
                  device: torch.device, batch_size: int) -> SplitOutputs:
    """Embed and classify the items `items` (image side with `image_model`, text side with `text_model`;
    the same model for HUSE, two separate models for the baseline)."""
    parts: dict[str, list[torch.Tensor]] = defaultdict(list)
    for b0 in range(0, len(items), batch_size):
        batch = items[b0:b0 + batch_size]
        image_emb = image_model.embed_image(torch.from_numpy(fs.image_emb[batch]).to(device))  # (B, D)
        text_emb = text_model.embed_text(torch.from_numpy(fs.text_emb[batch]).to(device))  # (B, D)
        parts["image_emb"].append(image_emb.float())
        parts["text_emb"].append(text_emb.float())
        parts["image_prob"].append(image_model.classify(image_emb).float().softmax(dim=1))  # (B, C)
        parts["text_prob"].append(text_model.classify(text_emb).float().softmax(dim=1))
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


def retrieval_metrics(query_emb: torch.Tensor, gallery_emb: torch.Tensor, labels: torch.Tensor, in_modal: bool,
                      tree_dist: torch.Tensor, num_classes: int, query_chunk: int = DEFAULT_QUERY_CHUNK,
                      gallery_chunk: int = DEFAULT_GALLERY_CHUNK, progress: str | None = None) -> dict[str, float | None]:
    """Class-level retrieval metrics (R@K, MAP@R, HP@K, severity) of one task over one split.

    query_emb, gallery_emb: (N, D) unit norm, item i of both has class labels[i]. Every item is a
    query; in-modal (`in_modal`: the gallery is the query set) the query itself is excluded;
    cross-modal the gallery holds every item, the query's own paired item included. Memory stays
    O(query_chunk x max(gallery_chunk, largest class)).
    """
    counts = torch.bincount(labels, minlength=num_classes)
    n_relevant = counts[labels] - int(in_modal)  # (N,) relevant gallery items per query
    k = max(max(metrics.RECALL_KS), max(metrics.HP_KS), int(n_relevant.max()))
    exclude = torch.arange(len(labels), device=labels.device) if in_modal else None
    hp_sets = {k_: torch.as_tensor(hierarchical_sets(tree_dist.cpu().numpy(), k_), device=labels.device)
               for k_ in metrics.HP_KS}
    per_query: dict[str, list[torch.Tensor]] = defaultdict(list)
    for sl, _, idx in iter_topk(query_emb, gallery_emb, k, exclude, query_chunk, gallery_chunk, progress):
        pq = metrics.class_retrieval_per_query(labels[idx], labels[sl], n_relevant[sl], tree_dist, hp_sets)
        for key, v in pq.items():
            per_query[key].append(v)
    return {key: metrics.mean_or_none(torch.cat(v)) for key, v in per_query.items()}


def universal_space_metrics(out: SplitOutputs, num_classes: int, class_dist: np.ndarray | None,
                            tree_dist: np.ndarray) -> dict[str, float | None]:
    """graph_fidelity, tree_fidelity (Spearman over class-centroid distances) and modality_gap."""
    centroids, present = metrics.class_centroids(out.image_emb, out.text_emb, out.labels, num_classes)
    return {
        "graph_fidelity": None if class_dist is None else metrics.centroid_fidelity(centroids, present, class_dist),
        "tree_fidelity": metrics.centroid_fidelity(centroids, present, tree_dist),
        "modality_gap": metrics.modality_gap(out.image_emb, out.text_emb),
    }


def all_retrieval_metrics(out: SplitOutputs, tree_dist: torch.Tensor, num_classes: int, query_chunk: int,
                          gallery_chunk: int, tasks: tuple[str, ...] = TASKS) -> dict[str, float | None]:
    """`<task>/<metric>` for the class-level tasks and the instance-level img2txt / txt2img."""
    emb = {"img": out.image_emb, "txt": out.text_emb}
    result: dict[str, float | None] = {}
    for task in tasks:
        q, g = emb[task[:3]], emb[task[-3:]]
        scores = retrieval_metrics(q, g, out.labels, task in IN_MODAL_TASKS, tree_dist, num_classes,
                                   query_chunk, gallery_chunk, progress=task)
        result.update({f"{task}/{k}": v for k, v in scores.items()})
        if task not in IN_MODAL_TASKS:
            own = torch.arange(len(out.labels), device=q.device)  # the paired item is the only hit
            ranks = target_ranks(q, g, own, None, query_chunk, gallery_chunk, progress=f"{task} ranks")
            result.update({f"{task}/{k}": v for k, v in metrics.instance_retrieval(ranks).items()})
    return result


def tune_or_default(val: SplitOutputs | None, step: float) -> tuple[float, str]:
    """(image weight, where it came from): tuned on the val split, or 0.5 without one."""
    if val is None:
        return 0.5, "default 0.5 (no val split)"
    return metrics.tune_fusion_weight(val.image_prob, val.text_prob, val.labels, step), "tuned on val"


# ------------------------------------------------------------------------------------ baselines


def baseline_metrics(fs: features.FeatureSet, train_config: dict[str, Any] | None, items: np.ndarray,
                     val_items: np.ndarray | None, tree_dist: torch.Tensor, cfg: EvalConfig,
                     device: torch.device) -> dict[str, float | None]:
    """The paper's "separate models" (one tower + own classifier per modality, classification loss
    only, the run's TrainConfig) and retrieval with the raw frozen features, L2-normalised."""
    result: dict[str, float | None] = {}
    labels = torch.from_numpy(fs.labels[items]).to(device)
    for task, raw in (("img2img", fs.image_emb), ("txt2txt", fs.text_emb)):
        emb = l2_normalize(torch.from_numpy(raw[items]).to(device).float())
        scores = retrieval_metrics(emb, emb, labels, True, tree_dist, fs.num_classes, cfg.query_chunk,
                                   cfg.gallery_chunk, progress=f"raw {task}")
        result.update({f"baseline/{task}/{k}": v for k, v in scores.items()})

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
    out = split_outputs(models["image"], models["text"], fs, items, device, cfg.batch_size)
    val = split_outputs(models["image"], models["text"], fs, val_items, device, cfg.batch_size) \
        if val_items is not None else None
    weight, _ = tune_or_default(val, cfg.fusion_step)
    result.update({
        "baseline/acc/image": metrics.accuracy(out.image_prob, out.labels),
        "baseline/acc/text": metrics.accuracy(out.text_prob, out.labels),
        "baseline/acc/fused": metrics.accuracy(metrics.fuse(out.image_prob, out.text_prob, weight), out.labels),
        "baseline/fusion_weight": weight,
    })
    return result


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
    fs = features.read_features(cfg.features, views=cfg.baselines)  # the baselines train like the run did
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
    out = split_outputs(model, model, fs, items, device, cfg.batch_size)
    val = split_outputs(model, model, fs, val_items, device, cfg.batch_size) if val_items is not None else None
    weight, source = tune_or_default(val, cfg.fusion_step)
    if val is None:
        log.warning("%s has no val split: the fusion weight is fixed at 0.5", cfg.features)
    elif cfg.split == "val":
        log.warning("evaluating on val, where the fusion weight was tuned: acc/fused is optimistic")

    result: dict[str, Any] = {**classification_metrics(out, weight), "fusion_weight": weight}
    result.update(all_retrieval_metrics(out, tree_t, fs.num_classes, cfg.query_chunk, cfg.gallery_chunk))
    result.update(universal_space_metrics(out, fs.num_classes, fs.class_dist, tree))
    if cfg.baselines:
        result.update(baseline_metrics(fs, ckpt.get("train_config"), items, val_items, tree_t, cfg, device))
    result.update({
        "meta/split": cfg.split,
        "meta/n_items": int(len(items)),
        "meta/checkpoint": str(ckpt_path.resolve()),
        "meta/features": str(Path(cfg.features).resolve()),
        "meta/features_match_training": same_items,
        "meta/fusion_weight_source": source,
        "meta/eval_time_s": round(time.perf_counter() - start, 3),
    })
    result = {k: _clean(v) for k, v in result.items()}
    with atomic_path(out_path) as tmp:
        tmp.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    log.debug("wrote %s", out_path)

    res = EvalResult(metrics=result, outputs=out, fusion_weight=weight, tree_dist=np.asarray(tree),
                     checkpoint=ckpt_path, run_dir=run_dir, out=out_path,
                     extra={"checkpoint_epoch": ckpt.get("epoch")})
    if cfg.report:
        from huse_pipeline.eval.report import write_report

        res.extra["report"] = str(write_report(res, fs, cfg))
    return res


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate a checkpoint on one split; returns the flat dict written to the JSON file."""
    return run_evaluation(cfg).metrics


