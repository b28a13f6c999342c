"""Stage one (paper §4.1): run a frozen image encoder and a frozen text encoder over a catalogue and
write the HDF5 feature cache. Work is split into fixed row ranges ("parts"), each written as its own
part file, so an interrupted run continues where it stopped and gives the same file; the parts are
merged into `--out` atomically at the end.

"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from huse_pipeline.data.catalogue import Catalogue, read_catalogue
from huse_pipeline.data.images import CatalogueImages, ImageTransform, collate_images
from huse_pipeline.data.text import describe as describe_text
from huse_pipeline.encoders.featurizer import (Featurizer, cached_sha256, describe_staleness, installed_versions,
                                               resolve_weight_files, staleness, weight_digests)
from huse_pipeline.encoders.image import ImageEncoder
from huse_pipeline.encoders.text import TextEncoder
from huse_pipeline.errors import HuseError
from huse_pipeline.extract.plan import csv_line_numbers, part_path, parts_folder, plan_batches, plan_parts
from huse_pipeline.settings import (DEFAULT_FEATURES, DEFAULT_IMAGE_ENCODER, DEFAULT_IMAGE_POOL, DEFAULT_MAX_PIXELS,
                                    DEFAULT_TEXT_ENCODER, IMAGE_FITS, check_image_pool)
from huse_pipeline.store import features
from huse_pipeline.utils import added_later, atomic_path, fields_added_later, resolve_device

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PARTS_FORMAT = "huse-feature-parts"
# ExtractConfig fields that change how the work runs but not what is written
EXECUTION_ONLY = ("out", "num_workers", "strict", "device")
# settings keys that describe the installation (what `staleness` reports in words)
INSTALLATION_KEYS = ("versions", "weights_sha256", "image_weights_sha256")


@dataclass(frozen=True)
class ExtractConfig:
    """Everything that determines a feature file; stored as JSON in its attributes."""

    catalogue: str
    out: str = DEFAULT_FEATURES
    image_root: str | None = None  # default: the catalogue's folder
    image_encoder: str = DEFAULT_IMAGE_ENCODER
    image_weights: str | None = None  # local checkpoint; ResNets: None/"imagenet" = torchvision's weights
    image_fit: str = "pad"  # pad | crop | squash: how an image becomes the encoder's square input
    # avg | avg+mid: which feature maps are pooled into the features; files made before it are avg
    image_pool: str = added_later(DEFAULT_IMAGE_POOL, before="avg")
    text_encoder: str = DEFAULT_TEXT_ENCODER
    augment_views: int = 0  # extra augmented views per training image
    label_sep: str = "<"
    split_seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0  # augmentation seed
    batch_size: int = 64
    num_workers: int = 2
    device: str = "auto"
    part_rows: int = 1024  # rows per part file (unit of resumption and, later, of sharding)
    strict: bool = False
    max_image_pixels: int = DEFAULT_MAX_PIXELS


# ------------------------------------------------------------------------------ process set-up


def tune_cpu_allocator() -> bool:
    """Keep freed memory in the heap instead of returning it to the OS (glibc only; process-wide,
    so call it from scripts, not from library code). Returns whether it was applied.

    CNN activations of a batch are tens of MB: by default glibc serves them with mmap and unmaps
    them on free, so every batch page-faults its buffers in again. Measured here on 2 CPU cores
    (EfficientNet-Lite0, batch 64): about half of the CPU time was kernel time for those faults,
    and removing it doubled images/s (see BENCHMARKS.md).
    """
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
        return bool(libc.mallopt(m_trim_threshold, 2**31 - 1)) and bool(libc.mallopt(m_mmap_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        return False


# ------------------------------------------------------------------------------------ settings


def _settings(cfg: ExtractConfig, catalogue: Catalogue, device: torch.device,
              weight_files: dict[str, dict[str, str | None]] | None = None) -> dict[str, Any]:
    """What the written numbers depend on; its hash decides "up to date" and "same run".

    `weight_files`: the loaded encoders' (`Featurizer.weight_files`); by default found from `cfg`
    without loading them. Their sha256 and the versions of every package that computes a feature
    are part of it, so that a file made by another installation is never taken as up to date.
    """
    if weight_files is None:
        weight_files = resolve_weight_files(cfg)
    weights_sha = None
    if cfg.image_weights not in (None, "imagenet"):
        weights_sha = cached_sha256(cfg.image_weights)
    later = fields_added_later(ExtractConfig)  # at their old value they stay out: older files stay up to date
    config = {k: v for k, v in asdict(cfg).items()
              if k not in EXECUTION_ONLY and not (k in later and v == later[k])}
    return {
        "config": config,
        "device_type": device.type,
        "catalogue": str(catalogue.path.resolve()),
        "catalogue_sha256": catalogue.sha256,
        "image_root": str(catalogue.image_root.resolve()),
        "image_weights_sha256": weights_sha,  # --image-weights (also in weights_sha256; kept for older files)
        "schema_version": features.SCHEMA_VERSION,
        "versions": installed_versions(),
        "weights_sha256": weight_digests(weight_files),
    }


def _fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two settings dicts."""
    keys = sorted(set(old) | set(new))
    out = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


def _validate(cfg: ExtractConfig) -> None:
    if cfg.image_fit not in IMAGE_FITS:
        raise HuseError(f"unknown --image-fit {cfg.image_fit!r}; choose one of {', '.join(IMAGE_FITS)}")
    check_image_pool(cfg.image_pool)
    for name in ("batch_size", "part_rows", "max_image_pixels"):
        if getattr(cfg, name) < 1:
            raise HuseError(f"--{name.replace('_', '-')} must be at least 1")
    if cfg.augment_views < 0 or cfg.num_workers < 0:
        raise HuseError("--augment-views and --num-workers must not be negative")
    if cfg.image_weights not in (None, "imagenet") and not Path(cfg.image_weights).is_file():
        raise HuseError(f"--image-weights {cfg.image_weights} is not a file")


# ------------------------------------------------------------------------------------- the job


@dataclass
class ExtractionJob:
    """A catalogue with its featurizer (the loaded encoders) and everything the part loop needs."""

    cfg: ExtractConfig
    catalogue: Catalogue
    featurizer: Featurizer
    settings: dict[str, Any]
    fingerprint: str
    line: list[int] = field(default_factory=list)  # CSV line of each row

    @property
    def frame(self):
        return self.catalogue.frame

    @property
    def device(self) -> torch.device:
        return self.featurizer.device

    @property
    def image_encoder(self) -> ImageEncoder:
        return self.featurizer.image_encoder

    @property
    def text_encoder(self) -> TextEncoder:
        return self.featurizer.text_encoder

    @property
    def transform(self) -> ImageTransform:
        return self.featurizer.transform

    def attrs(self, texts_reduced: int) -> dict[str, Any]:
        """Root attributes of the feature file (no timestamps or timings: a resumed run writes the same)."""
        cat = self.catalogue
        return {
            **self.image_encoder.describe(),
            **self.text_encoder.describe(),
            "augment_views": self.cfg.augment_views,
            "label_sep": cat.label_sep,
            "image_root": str(cat.image_root.resolve()),
            "catalogue": str(cat.path.resolve()),
            "catalogue_sha256": cat.sha256,
            "split_source": cat.split_source,
            "device_type": self.device.type,
            "preprocessing": {
                "image": self.transform.describe(),
                "text": {**describe_text(self.text_encoder.max_tokens), "texts_reduced": texts_reduced},
            },
            "extract_config": asdict(self.cfg),
            "settings": self.settings,
            "settings_fingerprint": self.fingerprint,
        }


def load_job(cfg: ExtractConfig, catalogue: Catalogue | None = None) -> ExtractionJob:
    """Read the catalogue (unless given) and load the featurizer for `cfg`."""
    _validate(cfg)
    if catalogue is None:
        catalogue = _read(cfg)
    featurizer = Featurizer.from_config(cfg, cfg.device)
    settings = _settings(cfg, catalogue, featurizer.device, featurizer.weight_files())  # the files actually loaded
    return ExtractionJob(cfg, catalogue, featurizer, settings, _fingerprint(settings),
                         csv_line_numbers(catalogue.path, len(catalogue)))


def _read(cfg: ExtractConfig) -> Catalogue:
    return read_catalogue(cfg.catalogue, cfg.image_root, cfg.label_sep, cfg.split_seed, cfg.val_fraction, cfg.test_fraction)


@dataclass
class RunStats:
    """What one call of `process_parts` did (timings are for the summary, never for the file)."""

    rows: int = 0
    images: int = 0  # network inputs: deterministic views + augmented views
    texts: int = 0
    skipped: int = 0
    seconds: float = 0.0  # wall time of the whole loop
    text_seconds: float = 0.0  # main-process time in the text stage (normalise, count, TF-IDF, encode)


def _image_loader(job: ExtractionJob, batches: list[list[int]]) -> DataLoader:
    """One DataLoader over all batches of all parts: its workers live across parts and keep
    prefetching while the main process encodes (text and images)."""
    frame, root = job.frame, job.catalogue.image_root
    paths = [None if c is None else str(root / p) for p, c in zip(frame["image"], frame["class_name"])]
    n_views = [job.cfg.augment_views if s == "train" else 0 for s in frame["split"]]
    workers = job.cfg.num_workers
    return DataLoader(
        CatalogueImages(paths, n_views, job.transform),
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=collate_images,
        pin_memory=job.device.type == "cuda",
        prefetch_factor=4 if workers else None,
        persistent_workers=False,  # a single pass over every part: the workers already outlive each part
    )


class _PartBuffer:
    """Collects the batches of one part until it is complete."""

    def __init__(self, start: int, end: int, image_dim: int, text_dim: int, n_views: int) -> None:
        n = end - start
        self.start, self.end, self.filled = start, end, 0
        self.reason = [""] * n
        self.text_used = [""] * n
        self.reduced = np.zeros(n, dtype=bool)
        self.image_emb = np.zeros((n, image_dim), np.float32)
        self.text_emb = np.zeros((n, text_dim), np.float32)
        self.views = np.zeros((n, n_views, image_dim), np.float32) if n_views else None

    def to_part(self, fingerprint: str) -> features.Part:
        ok = np.asarray([r == "" for r in self.reason])
        return features.Part(
            rows=np.arange(self.start, self.end, dtype=np.int64),
            reason=self.reason,
            image_emb=self.image_emb,
            text_emb=self.text_emb,
            text_used=self.text_used,
            image_views=self.views,
            attrs={"fingerprint": fingerprint, "start": self.start, "end": self.end,
                   "texts_reduced": int(self.reduced[ok].sum())},
        )


def process_parts(job: ExtractionJob, parts: Sequence[tuple[int, int]], folder: Path,
                  progress: tqdm | None = None, skipped_before: int = 0) -> RunStats:
    """Encode the given parts and write each as `part_path(folder, start, end)` (atomically).

    Per batch: the main process prepares and encodes the texts while the loader's workers decode
    the next images; then the images of the usable rows (and their augmented views) go through
    the image network. A row is unusable for the first of: malformed label, empty text, bad image.
    """
    cfg, frame, featurizer = job.cfg, job.frame, job.featurizer
    stats = RunStats()
    if not parts:
        return stats
    t_start = time.perf_counter()
    class_ok = frame["class_name"].notna().to_numpy()
    raw_text = frame["text"].to_numpy()
    queue = list(parts)
    buffer: _PartBuffer | None = None
    for batch in _image_loader(job, plan_batches(parts, cfg.batch_size)):
        rows = batch["rows"].numpy()  # (B,) catalogue rows, consecutive
        if buffer is None:
            start, end = queue.pop(0)
            buffer = _PartBuffer(start, end, featurizer.image_dim, featurizer.text_dim, cfg.augment_views)
        at = slice(rows[0] - buffer.start, rows[-1] + 1 - buffer.start)

        t_text = time.perf_counter()
        prepared = featurizer.prepare_texts(raw_text[rows].tolist())
        reasons = [
            "malformed label" if not class_ok[r] else text_reason or image_reason
            for r, text_reason, image_reason in zip(rows, prepared.reason, batch["reasons"])
        ]
        ok = np.asarray([r == "" for r in reasons])  # (B,)
        if cfg.strict and not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            row = int(rows[i])
            raise HuseError(
                f"row {row} (CSV line {job.line[row]}, image {frame['image'].iat[row]!r}) is unusable: {reasons[i]}. "
                "Fix it, or run without --strict to skip such rows."
            )
        ok_idx = np.flatnonzero(ok)
        if len(ok_idx):
            buffer.text_emb[at][ok_idx] = featurizer.embed_texts([prepared.text_used[i] for i in ok_idx])
        stats.text_seconds += time.perf_counter() - t_text

        if len(ok_idx):
            images = batch["images"].to(job.device, non_blocking=True)  # pinned uint8 on CUDA
            keep = torch.from_numpy(ok_idx).to(job.device)
            buffer.image_emb[at][ok_idx] = featurizer.embed_pixels(images[keep])
        counts = batch["view_counts"].numpy()  # (B,) views made per row (0 for val/test and bad images)
        with_views = np.flatnonzero(ok & (counts > 0))
        if len(with_views):
            first = np.concatenate([[0], np.cumsum(counts)[:-1]])  # offset of each row's views
            take = (first[with_views, None] + np.arange(cfg.augment_views)).reshape(-1)  # (V * K,)
            views = batch["views"].to(job.device, non_blocking=True)[torch.from_numpy(take).to(job.device)]
            emb = featurizer.embed_pixels(views)  # (V * K, Di)
            buffer.views[at][with_views] = emb.reshape(len(with_views), cfg.augment_views, -1)

        for i, r in enumerate(reasons):
            buffer.reason[at.start + i] = r
            buffer.text_used[at.start + i] = prepared.text_used[i] if r == "" else ""
        buffer.reduced[at] = prepared.reduced
        buffer.filled += len(rows)
        stats.rows += len(rows)
        stats.images += len(ok_idx) + len(with_views) * cfg.augment_views
        stats.texts += len(ok_idx)
        stats.skipped += int((~ok).sum())
        if progress is not None:
            progress.update(len(rows))
            progress.set_postfix(skipped=skipped_before + stats.skipped, refresh=False)
        if buffer.filled == buffer.end - buffer.start:
            features.write_part(part_path(folder, buffer.start, buffer.end), buffer.to_part(job.fingerprint))
            buffer = None
    stats.seconds = time.perf_counter() - t_start
    return stats


# ----------------------------------------------------------------------------- the command


def _skip_summary(parts: Sequence[features.Part], job_line: list[int], frame, n_examples: int = 5) -> dict[str, Any]:
    """Counts per reason kind ("image too large (...)" counts as "image too large") and examples."""
    by_kind: dict[str, int] = {}
    examples = []
    for part in parts:
        for row, reason in zip(part.rows, part.reason):
            if reason:
                kind = reason.split(" (")[0]
                by_kind[kind] = by_kind.get(kind, 0) + 1
                if len(examples) < n_examples:
                    examples.append(f"CSV line {job_line[row]} (row {row}, image {frame['image'].iat[row]!r}): {reason}")
    return {"skipped_by_reason": dict(sorted(by_kind.items())), "skipped_examples": examples}


def _check_existing_out(out: Path, fingerprint: str, settings: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """Attributes of an up-to-date `out`; None when it must be (re)made. Refuses a foreign file."""
    if not out.exists():
        return None
    try:
        attrs = features.read_attrs(out)
    except HuseError:
        attrs = {}
    if attrs.get("settings_fingerprint") == fingerprint and not overwrite:
        return attrs
    recorded = attrs.get("settings")
    stale = staleness(attrs) if isinstance(recorded, dict) else []
    if not overwrite:
        if stale:  # another installation made it: say what changed, not just which settings keys
            other = [k for k in _differences(recorded, settings) if not k.startswith(INSTALLATION_KEYS)]
            also = f" (and other settings differ: {', '.join(other[:8])})" if other else ""
            raise HuseError(f"{describe_staleness(out, stale)}{also}; rerun with --overwrite to recompute it, "
                            "or choose another --out.")
        what = ("was made with different settings (" + ", ".join(_differences(recorded, settings)[:8]) + " differ)"
                if isinstance(recorded, dict) else "is not a feature file made by this version")
        raise HuseError(f"{out} already exists and {what}. Use --overwrite to replace it, or choose another --out.")
    if stale:
        log.info("--overwrite: %s", describe_staleness(out, stale))
    log.info("--overwrite: %s will be replaced when the new file is complete", out)
    return None  # the old file stays until the merge replaces it atomically


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    """The parts folder's manifest, or None if it is missing or unreadable."""
    try:
        old = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return old if isinstance(old, dict) else None


def _open_parts_folder(folder: Path, job_settings: dict[str, Any], fingerprint: str, n_rows: int, part_rows: int,
                       overwrite: bool) -> None:
    """Create the parts folder with its manifest, or check that an existing one is this run's."""
    manifest = folder / MANIFEST
    if folder.exists():
        old = _read_manifest(folder)
        finished = [p for p in folder.iterdir() if not p.name.startswith(".") and p.name != MANIFEST]
        if old is not None and old.get("fingerprint") == fingerprint:
            for tmp in folder.glob(".*.tmp"):  # temporary files of a killed run
                tmp.unlink()
            return
        if not finished:  # stopped before its first part (e.g. its weights failed to load): nothing to keep
            log.info("discarding %s: an unfinished extraction with no finished part", folder)
            shutil.rmtree(folder)
        elif overwrite:
            log.info("--overwrite: discarding the unfinished run in %s made with other settings", folder)
            shutil.rmtree(folder)
        else:
            changed = _differences(old.get("settings", {}), job_settings) if old else []
            if changed == ["catalogue_sha256"]:  # the same CSV file, edited (say, fixed after --strict)
                raise HuseError(f"{folder} holds an unfinished extraction of this catalogue as it was before its "
                                "CSV changed; use --overwrite to discard it and start again.")
            diff = ", ".join(changed[:8]) + " differ" if changed else "no manifest"
            raise HuseError(
                f"{folder} holds an unfinished extraction made with different settings ({diff}). Run that "
                "command again to finish it, or use --overwrite to discard it."
            )
    folder.mkdir(parents=True)
    with atomic_path(manifest) as tmp:
        tmp.write_text(json.dumps({"format": PARTS_FORMAT, "fingerprint": fingerprint, "settings": job_settings,
                                   "n_rows": n_rows, "part_rows": part_rows}, indent=2, sort_keys=True))


def _done_parts(folder: Path, planned: list[tuple[int, int]], fingerprint: str) -> set[tuple[int, int]]:
    """Planned parts whose (atomically written, hence complete) file exists and belongs to this run."""
    done = set()
    for start, end in planned:
        path = part_path(folder, start, end)
        if path.exists():
            try:
                same = features.read_part(path).attrs.get("fingerprint") == fingerprint
            except OSError:
                same = False
            if same:
                done.add((start, end))
            else:  # only possible if someone copied files in: redo that part
                log.warning("%s does not belong to this run; it will be computed again", path)
                path.unlink()
    return done


def _summary_from_attrs(out: Path, attrs: dict[str, Any]) -> dict[str, Any]:
    return {
        "out": str(out),
        "items": attrs.get("n_items"),
        "classes": attrs.get("n_classes"),
        "splits": attrs.get("split_counts"),
        "skipped": attrs.get("n_skipped"),
        "skipped_by_reason": attrs.get("skipped_by_reason"),
    }


def extract_features(cfg: ExtractConfig, overwrite: bool = False) -> dict[str, Any]:
    """Stage one: encode every catalogue row into the feature file `cfg.out`; returns a summary.

    Resumable: parts already written by an interrupted run with the same settings are kept; the
    result is the same file as an uninterrupted run's. `out` made with the same settings: nothing
    to do (summary has "up_to_date": True). Different settings: HuseError unless `overwrite`.
    Summary keys: out, items, classes, splits, skipped, skipped_by_reason, skipped_examples,
    texts_reduced, images_per_s, texts_per_s (this run: images incl. augmented views over the loop's
    wall time; texts over the text stage's time), parts_reused, seconds.
    """
    _validate(cfg)
    catalogue = _read(cfg)  # fails on a bad CSV before any model is loaded
    out = Path(cfg.out)
    settings = _settings(cfg, catalogue, resolve_device(cfg.device))
    fingerprint = _fingerprint(settings)
    folder = parts_folder(out)
    for stale in out.parent.glob(f".{glob.escape(out.name)}.*.tmp"):  # a merge or build-graph killed before its rename
        log.info("removing %s, left by a killed run", stale)
        stale.unlink(missing_ok=True)
    attrs = _check_existing_out(out, fingerprint, settings, overwrite)
    if attrs is not None:
        if folder.exists():
            if (_read_manifest(folder) or {}).get("fingerprint") == fingerprint:  # killed after the merge, before the clean-up
                shutil.rmtree(folder)
            else:  # another settings' unfinished run (started with --overwrite): its parts are not ours to drop
                log.warning("%s is up to date; %s holds an unfinished extraction with other settings, left as it is",
                            out, folder)
        log.debug("%s is up to date: nothing to do", out)
        return {"up_to_date": True, **_summary_from_attrs(out, attrs)}

    planned = plan_parts(len(catalogue), cfg.part_rows)
    _open_parts_folder(folder, settings, fingerprint, len(catalogue), cfg.part_rows, overwrite)
    done = _done_parts(folder, planned, fingerprint)
    todo = [p for p in planned if p not in done]
    if done:
        log.info("resuming: %d of %d parts already done in %s", len(done), len(planned), folder)

    t0 = time.perf_counter()
    try:
        job = load_job(cfg, catalogue)
    except BaseException:
        if not done:  # the folder holds only this run's manifest: leave nothing behind
            shutil.rmtree(folder, ignore_errors=True)
        raise
    assert job.fingerprint == fingerprint
    rows_done = sum(e - s for s, e in done)
    skipped_before = sum(sum(r != "" for r in features.read_part(part_path(folder, *p)).reason) for p in done)
    with tqdm(total=len(catalogue), initial=rows_done, unit="row", desc="extract-features", dynamic_ncols=True) as bar:
        bar.set_postfix(skipped=skipped_before)
        stats = process_parts(job, todo, folder, bar, skipped_before)

    parts = [features.read_part(part_path(folder, *p)) for p in planned]
    skips = _skip_summary(parts, job.line, job.frame)
    ok_rows = np.concatenate([p.rows[np.asarray([r == "" for r in p.reason])] for p in parts])
    splits = job.frame["split"].to_numpy()[ok_rows]
    texts_reduced = sum(p.attrs.get("texts_reduced", 0) for p in parts)
    file_attrs = {
        **job.attrs(texts_reduced),
        "split_counts": {s: int((splits == s).sum()) for s in ("train", "val", "test")},
        "skipped_by_reason": skips["skipped_by_reason"],
    }
    for kind, n in skips["skipped_by_reason"].items():
        log.warning("skipped %d row(s): %s", n, kind)
    for example in skips["skipped_examples"]:
        log.warning("  e.g. %s", example)
    if len(ok_rows) == 0:
        shutil.rmtree(folder)  # nothing worth resuming; a fixed catalogue or --image-root starts afresh
        counts = ", ".join(f"{kind}: {n}" for kind, n in skips["skipped_by_reason"].items())
        raise HuseError(f"no usable rows in {cfg.catalogue}: every row was skipped ({counts}; e.g. "
                        f"{skips['skipped_examples'][0]}). Check the catalogue and --image-root.")
    merged = features.write_merged(out, parts, job.frame, file_attrs)
    shutil.rmtree(folder)
    return {
        "up_to_date": False,
        "out": str(out),
        "items": merged["n_items"],
        "classes": merged["n_classes"],
        "splits": file_attrs["split_counts"],
        "skipped": merged["n_skipped"],
        **skips,
        "texts_reduced": texts_reduced,
        "augment_views": cfg.augment_views,
        "parts_reused": len(done),
        "rows_this_run": stats.rows,
        "images_per_s": round(stats.images / stats.seconds, 1) if stats.seconds else None,
        "texts_per_s": round(stats.texts / stats.text_seconds, 1) if stats.text_seconds else None,
        "seconds": round(time.perf_counter() - t0, 1),
    }
