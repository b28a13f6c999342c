"""Stage two (paper §3.2, §3.4, §4.1.3): train the towers and the shared classifier on the cached
frozen features with L = alpha*L_class + beta*L_graph + gamma*L_gap (+ delta*L_inst, not in the
paper; delta 0 is the paper's loss). Validation every epoch (on all
val items, or a seeded class-stratified sample of them), best/last checkpoints, resumable and
bit-reproducible on CPU. `fit` reads every batch from a `batches.BatchSource` (default
`batches.make_source`: the items held on the device, or streamed from the file when they do not
fit); `train` opens the file for reading in blocks and adds the run folder.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from huse_pipeline.errors import HuseError
from huse_pipeline.measures import metrics
from huse_pipeline.measures.sampling import stratified_sample
from huse_pipeline.store.features import FeatureFile, FeatureSet, features_digest, open_features
from huse_pipeline.train.batches import Batch, BatchSource, SourceFactory, make_source as default_source
from huse_pipeline.train.config import RESUME_MAY_CHANGE, SELECT_METRICS, TrainConfig
from huse_pipeline.train.losses import classification_loss, huse_loss
from huse_pipeline.train.model import (
    HuseModel,
    check_compatible,
    feature_meta,
    load_checkpoint,
    save_checkpoint,
)
from huse_pipeline.train.run import _Run, new_run_dir
from huse_pipeline.utils import fields_added_later, resolve_device

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------- training


def _lr_factor(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """Learning-rate multiplier at `step` (a function of the step alone, so resuming restores it)."""
    if cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
    return 1.0


def _make_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _trained_params(model: HuseModel, modality: str) -> list[torch.nn.Parameter]:
    towers = {"both": [model.image_tower, model.text_tower], "image": [model.image_tower], "text": [model.text_tower]}
    return [p for m in [*towers[modality], model.classifier] for p in m.parameters()]


def _forward(model: HuseModel, batch: Batch, cfg: TrainConfig, amp: bool) -> dict[str, torch.Tensor | None]:
    """Embeddings (b, D) and logits (b, C) of the modalities `cfg` trains, in float32 (None for an
    untrained modality); the towers run under bf16 autocast when `amp`."""
    with torch.autocast(device_type=batch.labels.device.type, dtype=torch.bfloat16, enabled=amp):
        image_emb = model.embed_image(batch.image) if cfg.modality != "text" else None
        text_emb = model.embed_text(batch.text) if cfg.modality != "image" else None
        out = {"image_emb": image_emb, "text_emb": text_emb,
               "image_logits": None if image_emb is None else model.classify(image_emb),
               "text_logits": None if text_emb is None else model.classify(text_emb)}
    return {k: None if v is None else v.float() for k, v in out.items()}


def _loss(out: dict[str, torch.Tensor | None], labels: torch.Tensor, class_dist: torch.Tensor | None,
          cfg: TrainConfig, groups: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The total loss and its parts (float32) for one batch's `_forward` output; `groups` (b,) are the
    batch's item groups for the instance loss (None: every item its own)."""
    if cfg.modality != "both":  # the "separate models" baseline: classification loss only
        loss = classification_loss(out["image_logits"], out["text_logits"], labels)
        return loss, {"class": loss}
    return huse_loss(out["image_emb"], out["text_emb"], out["image_logits"], out["text_logits"], labels,
                     class_dist, alpha=cfg.alpha, beta=cfg.beta, gamma=cfg.gamma, margin=cfg.zeta,
                     margin_rule=cfg.margin_rule, pairs=cfg.graph_pairs, delta=cfg.delta, groups=groups,
                     temperature=cfg.temperature, instance_kind=cfg.instance_loss, instance_margin=cfg.instance_margin)


@torch.no_grad()
def validate(model: HuseModel, source: BatchSource, cfg: TrainConfig, amp: bool = False,
             items: np.ndarray | None = None) -> dict[str, float]:
    """Val-split metrics: `metrics.accuracy` of the image, text and fused (`metrics.fuse` of the two
    softmaxes with equal weights) predictions, `val/acc/mean` (mean of image and text accuracy), and
    the loss and its parts (over batches of cfg.batch_size, deterministic image view, dropout off).
    `items`: only these val items (ascending item indices; the --val-sample sample)."""
    model.eval()
    sums: dict[str, float] = {}
    probs: dict[str, list[torch.Tensor]] = {}  # modality -> (b, C) softmax of each batch
    labels: list[torch.Tensor] = []
    batches = source.val_batches(cfg.batch_size) if items is None else source.val_batches(cfg.batch_size, items)
    for batch in batches:
        out = _forward(model, batch, cfg, amp)
        loss, parts = _loss(out, batch.labels, source.class_dist, cfg, batch.groups)
        for k, v in {"loss": loss, **parts}.items():
            sums[k] = sums.get(k, 0.0) + float(v) * len(batch)
        for m in ("image", "text"):
            if out[f"{m}_logits"] is not None:
                probs.setdefault(m, []).append(out[f"{m}_logits"].softmax(-1))
        labels.append(batch.labels)
    val_labels = torch.cat(labels)  # (Nva,)
    prob = {m: torch.cat(p) for m, p in probs.items()}  # (Nva, C) each
    if len(prob) == 2:
        prob["fused"] = metrics.fuse(prob["image"], prob["text"], 0.5)
    result = {f"val/{k}": v / len(val_labels) for k, v in sums.items()}
    result.update({f"val/acc/{k}": metrics.accuracy(p, val_labels) for k, p in prob.items()})
    result["val/acc/mean"] = float(np.mean([result[f"val/acc/{m}"] for m in ("image", "text") if m in prob]))
    return result


def _rng_state(gen: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state(), "data": gen.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], gen: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    gen.set_state(state["data"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _check_resumable(ckpt: dict[str, Any], fs: FeatureSet | FeatureFile, cfg: TrainConfig) -> None:
    check_compatible(ckpt, fs.attrs, fs.class_names, str(fs.path))
    if ckpt.get("features_digest") != features_digest(fs):
        raise HuseError(f"{fs.path} holds different items or features than the run being resumed was trained on; "
                        "resume with the original feature file or start a new run")
    saved = {**fields_added_later(TrainConfig), **ckpt["train_config"]}  # as from_saved: a field it lacks had its old value
    changed = [f"{k} ({saved.get(k)!r} -> {v!r})" for k, v in asdict(cfg).items()
               if k not in RESUME_MAY_CHANGE and saved.get(k) != v]
    if changed:
        raise HuseError(f"--resume cannot change {', '.join(changed)}; only {', '.join(RESUME_MAY_CHANGE)} may "
                        "change. Start a new run (another --out) instead.")


def _val_sample(fs: FeatureSet | FeatureFile, cfg: TrainConfig) -> np.ndarray | None:
    """The val items of per-epoch validation under --val-sample (ascending; seeded by cfg.seed,
    class-stratified), or None for all of them."""
    val = fs.indices("val")
    if not cfg.val_sample or cfg.val_sample >= len(val):
        return None
    return val[stratified_sample(fs.labels[val], cfg.val_sample, cfg.seed)]


def fit(fs: FeatureSet | FeatureFile, cfg: TrainConfig, run_dir: str | Path | None = None, *, resume: bool = False,
        progress: bool = False, make_source: SourceFactory = default_source,
        ) -> tuple[HuseModel, list[dict[str, Any]]]:
    """Train on `fs` (in memory, or a file open for reading in blocks) and return the best model (by
    `cfg.select_key` on the val split, in eval mode) and the per-epoch history (one flat dict per
    epoch, as in metrics.jsonl).

    run_dir None: nothing is written. Otherwise the run folder gets config.json, metrics.jsonl,
    best.pt, last.pt and curves.png; `resume` continues from run_dir/last.pt. Every batch comes from
    `make_source(fs, cfg, device)` (default `batches.make_source`: resident or streamed, by cfg.data);
    `fs` gives the rest (classes, encoders, the content digest). With cfg.val_sample each epoch is
    validated on a sample of the val split, and the best checkpoint at the end on all of it (those are
    the metrics best.pt records).
    """
    run = _Run(Path(run_dir)) if run_dir is not None else None
    if resume and run is None:
        raise HuseError("resuming needs the run folder (--out) of the interrupted run")
    device = resolve_device(cfg.device)
    amp = cfg.amp and device.type == "cuda"
    source_cfg = cfg
    if resume and cfg.data == "auto" and run.last.is_file():  # continue in the mode the run was in (its random stream)
        ran_in = load_checkpoint(run.last).get("data_mode")
        source_cfg = dataclasses.replace(cfg, data=ran_in) if ran_in in ("resident", "stream") else cfg
    source = make_source(fs, source_cfg, device)
    data_mode = getattr(source, "data_mode", type(source).__name__)
    log.info("training items: %s (%d train items)", data_mode, source.n_train)
    val_items = _val_sample(fs, cfg)
    if val_items is not None:
        log.info("validating each epoch on %d of the %d val items (stratified, seed %d); the best checkpoint on all",
                 len(val_items), len(fs.indices("val")), cfg.seed)
    if source.class_dist is None and cfg.modality == "both" and cfg.beta > 0:
        raise HuseError(f"{fs.path} has no semantic graph: run `huse build-graph --features {fs.path}` first")
    mcfg = cfg.model_config(source.image_dim, source.text_dim, fs.num_classes)
    steps_per_epoch = math.ceil(source.n_train / cfg.batch_size)
    total_steps = cfg.steps or cfg.epochs * steps_per_epoch
    n_epochs = math.ceil(total_steps / steps_per_epoch)
    key, sign = cfg.select_key, SELECT_METRICS.get(cfg.select_key, 1)
    meta = feature_meta(fs.attrs)
    digest = features_digest(fs)

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # leave the caller's RNG alone
        torch.manual_seed(cfg.seed)
        model = HuseModel(mcfg).to(device)
        if cfg.input_norm == "standardize":
            stats = source.input_stats()
            model.image_tower.set_input_stats(*stats["image"])
            model.text_tower.set_input_stats(*stats["text"])
        optimizer = _make_optimizer(cfg, _trained_params(model, cfg.modality))
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
        epoch, step, history = 0, 0, []
        best_value, best_epoch, bad_evals = -math.inf, 0, 0
        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

        if resume:
            ckpt = load_checkpoint(run.last)
            _check_resumable(ckpt, fs, cfg)
            model.load_state_dict(ckpt["model_state"])
            optimizer.load_state_dict(ckpt["optimizer_state"])
            _set_rng_state(ckpt["rng_state"], gen, device)
            epoch, step, history = ckpt["epoch"], ckpt["step"], list(ckpt["history"])
            best_value, best_epoch, bad_evals = ckpt["best_value"], ckpt["best_epoch"], ckpt["bad_evals"]
            if run.best.is_file():
                best_state = {k: v.to(device) for k, v in load_checkpoint(run.best)["model_state"].items()}
            run.rewrite_metrics(history)
            run.record_resume(cfg)
            log.info("resuming %s at epoch %d, step %d (best %s %.4f at epoch %d)", run.dir, epoch, step, key,
                     sign * best_value, best_epoch)
        elif run is not None:
            run.start(cfg, mcfg, fs, device, key)

        def save(path: Path, metrics: dict[str, Any], full: bool) -> None:
            extra: dict[str, Any] = dict(train_config=asdict(cfg), epoch=epoch, step=step, metrics=metrics,
                                         features_digest=digest, data_mode=data_mode)
            if full:
                extra.update(optimizer_state=optimizer.state_dict(), rng_state=_rng_state(gen, device),
                             history=history, best_value=best_value, best_epoch=best_epoch, bad_evals=bad_evals)
            save_checkpoint(path, model, fs.class_names, meta, **extra)

        bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not progress, leave=False)
        t0 = time.perf_counter() - (history[-1]["time_s"] if history else 0.0)
        stop = patience_reached = cfg.patience > 0 and bad_evals >= cfg.patience
        try:
            while epoch < n_epochs and step < total_steps and not stop:
                epoch += 1
                row, step = _train_epoch(model, optimizer, source, cfg, gen, epoch, step, total_steps, amp, bar, run)
                last = epoch >= n_epochs or step >= total_steps
                evaluated = epoch % cfg.eval_every == 0 or last
                improved = False
                if evaluated:
                    row.update(validate(model, source, cfg, amp, val_items))
                    value = sign * row[key]
                    improved = value > best_value
                    if improved:
                        best_value, best_epoch, bad_evals = value, epoch, 0
                        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                    else:
                        bad_evals += 1
                    stop = patience_reached = cfg.patience > 0 and bad_evals >= cfg.patience
                row["time_s"] = time.perf_counter() - t0
                history.append(row)
                log.info(_epoch_line(row, n_epochs, key, improved))
                if run is not None and evaluated:
                    if improved:
                        save(run.best, {k: v for k, v in row.items() if k.startswith("val/")}, full=False)
                    save(run.last, {k: v for k, v in row.items() if k.startswith("val/")}, full=True)
                    run.append_metrics(history)
                    run.maybe_plot(history, key, best_epoch)
        finally:
            bar.close()
        if patience_reached:
            log.info("early stop: %s did not improve for %d evaluations", key, cfg.patience)
        if run is not None and history:
            run.maybe_plot(history, key, best_epoch, force=True)
        model.load_state_dict(best_state)
        if val_items is not None and best_epoch > 0:  # the sample chose the epoch; all val items score it
            full_val = validate(model, source, cfg, amp)
            log.info("best epoch %d on all %d val items: %s", best_epoch, len(fs.indices("val")),
                     " ".join(f"{k[8:]} {v:.4f}" for k, v in full_val.items() if k.startswith("val/acc/")))
            if run is not None and run.best.is_file():
                best_ckpt = load_checkpoint(run.best)
                sampled = best_ckpt["metrics"].get("val/sample_metrics", best_ckpt["metrics"])  # (rewritten already)
                epoch, step = best_ckpt["epoch"], best_ckpt["step"]  # what `save` records: the best epoch's
                save(run.best, {**full_val, "val/items": len(fs.indices("val")), "val/sample_metrics": sampled},
                     full=False)
    return model.eval(), history


def _train_epoch(model: HuseModel, optimizer: torch.optim.Optimizer, source: BatchSource, cfg: TrainConfig,
                 gen: torch.Generator, epoch: int, step: int, total_steps: int, amp: bool, bar: tqdm,
                 run: "_Run | None") -> tuple[dict[str, Any], int]:
    """One pass over the train split in a fresh random order (and a fresh view per item), stopping
    early at `total_steps`. Returns the epoch's row (batch-size-weighted mean losses) and the step."""
    model.train()
    sums, seen = None, 0
    for batch in itertools.islice(source.train_batches(cfg.batch_size, gen), total_steps - step):
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * _lr_factor(cfg, step, total_steps)
        out = _forward(model, batch, cfg, amp)
        loss, parts = _loss(out, batch.labels, source.class_dist, cfg, batch.groups)
        if not torch.isfinite(loss):
            raise _non_finite(loss, parts, epoch, step + 1, run)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        seen += len(batch)
        weighted = torch.stack([loss.detach(), *(p.detach() for p in parts.values())]) * len(batch)  # (1 + parts,)
        sums = weighted if sums is None else sums + weighted
        bar.update(1)
    names = ["train/loss", *(f"train/{k}" for k in parts)]
    row = {"epoch": epoch, "step": step, "lr": optimizer.param_groups[0]["lr"],
           **{k: v / seen for k, v in zip(names, sums.tolist())}}
    return row, step


def _non_finite(loss: torch.Tensor, parts: dict[str, torch.Tensor], epoch: int, step: int, run: "_Run | None") -> HuseError:
    detail = ", ".join(f"{k} {float(v.detach()):.4g}" for k, v in parts.items())
    kept = (f"the last good checkpoint is kept in {run.last}" if run is not None and run.last.is_file()
            else "no checkpoint had been written yet")
    return HuseError(f"non-finite loss {float(loss.detach())} ({detail}) at epoch {epoch}, step {step}: training stopped; "
                     f"{kept}. Lower --lr (or check the feature file) and start a new run.")


def _epoch_line(row: dict[str, Any], n_epochs: int, key: str, improved: bool) -> str:
    parts = " ".join(f"{k.split('/')[1]} {row[k]:.4f}" for k in row if k.startswith("train/") and k != "train/loss")
    line = f"epoch {row['epoch']}/{n_epochs} step {row['step']} | loss {row['train/loss']:.4f} ({parts})"
    if key in row:
        accs = " ".join(f"{m} {row[f'val/acc/{m}']:.4f}" for m in ("image", "text", "fused") if f"val/acc/{m}" in row)
        line += f" | val acc {accs}" + ("  * best" if improved else "")
    return line + f" | {row['time_s']:.0f}s"


def train(features: str | Path, cfg: TrainConfig, out: str | Path | None = None, *, resume: bool = False,
          progress: bool = True) -> dict[str, Any]:
    """`huse train`: open the feature file (read in blocks: nothing is read whole unless the items are
    held resident), fit into the run folder `out` (default: a new folder under cache/runs/), and
    return a summary (run folder, best epoch and its val metrics)."""
    run_dir = Path(out) if out is not None else new_run_dir()
    with open_features(features) as fs:
        _, history = fit(fs, cfg, run_dir, resume=resume, progress=progress)
    best = load_checkpoint(run_dir / "best.pt")
    return {"run": str(run_dir), "epochs": len(history), "steps": history[-1]["step"] if history else 0,
            "best_epoch": best["epoch"], "select": cfg.select_key, "best": best["metrics"]}
