"""Stage one (paper §4.1): run a frozen image encoder and a frozen text encoder over a catalogue and
write the HDF5 feature cache. Work is split into fixed row ranges (parts, or shards), each written
as its own part file, so an interrupted run continues where it stopped and gives the same file; the
parts are merged into `--out` atomically at the end (`store.merge`: validated, streamed).

Any number of processes share the parts: the ranks of a torchrun job, the workers of a job array,
or one process (`distributed`); the file is the same whoever computed which part.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.distributed.elastic.multiprocessing.errors import record
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
from huse_pipeline.extract.distributed import (ConciseErrors, JobLocks, JobStopped, ShardClaims, ShardProgress, Worker,
                                               broadcast, check_failed, claim_order, clear_failed, free_missing,
                                               mark_failed, process_group)
from huse_pipeline.extract.plan import csv_line_numbers, part_path, parts_folder, plan_parts
from huse_pipeline.settings import (DEFAULT_FEATURE_DTYPE, DEFAULT_FEATURES, DEFAULT_IMAGE_ENCODER, DEFAULT_IMAGE_POOL,
                                    DEFAULT_MAX_PIXELS, DEFAULT_TEXT_ENCODER, FEATURE_DTYPES, IMAGE_FITS,
                                    check_image_pool)
from huse_pipeline.store import features, merge
from huse_pipeline.utils import added_later, atomic_path, fields_added_later

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
ENCODERS = "encoders.json"  # the loaded encoders' description, for a merge that loads none (--merge-only)
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
    num_workers: int | None = None  # DataLoader workers per process; None: `Worker.default_num_workers`
    device: str = "auto"
    part_rows: int = 1024  # rows per part file (shard): the unit of resumption and of the work shared by processes
    strict: bool = False
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    # read images outside image_root (absolute, .., symlinks); files made before it existed read them all
    allow_outside_root: bool = added_later(False, before=True)
    # storage of the features in the file (float16 halves it; readers upcast); files made before it are float32
    dtype: str = added_later(DEFAULT_FEATURE_DTYPE, before="float32")


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
    if cfg.augment_views < 0 or (cfg.num_workers is not None and cfg.num_workers < 0):
        raise HuseError("--augment-views and --num-workers must not be negative")
    if cfg.dtype not in FEATURE_DTYPES:
        raise HuseError(f"unknown --dtype {cfg.dtype!r}; choose one of {', '.join(FEATURE_DTYPES)}")
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

    def describe_encoders(self) -> dict[str, Any]:
        """What the loaded encoders and their preprocessing say about themselves (file attributes)."""
        return {
            **self.image_encoder.describe(),
            **self.text_encoder.describe(),
            "preprocessing": {"image": self.transform.describe(), "text": describe_text(self.text_encoder.max_tokens)},
        }

    def attrs(self, texts_reduced: int) -> dict[str, Any]:
        """Root attributes of the feature file (no timestamps or timings: a resumed run writes the same)."""
        return _file_attrs(self.cfg, self.catalogue, self.settings, self.fingerprint, self.describe_encoders(),
                           texts_reduced)


def _file_attrs(cfg: ExtractConfig, cat: Catalogue, settings: dict[str, Any], fingerprint: str,
                encoders: dict[str, Any], texts_reduced: int) -> dict[str, Any]:
    """Root attributes of the feature file, from the encoders' description (`describe_encoders`)."""
    preprocessing = encoders["preprocessing"]
    return {
        **{k: v for k, v in encoders.items() if k != "preprocessing"},
        "augment_views": cfg.augment_views,
        "label_sep": cat.label_sep,
        "image_root": str(cat.image_root.resolve()),
        "catalogue": str(cat.path.resolve()),
        "catalogue_sha256": cat.sha256,
        "split_source": cat.split_source,
        "duplicates": cat.duplicates,
        "device_type": settings["device_type"],
        "preprocessing": {
            "image": preprocessing["image"],
            "text": {**preprocessing["text"], "texts_reduced": texts_reduced},
        },
        "extract_config": asdict(cfg),
        "settings": settings,
        "settings_fingerprint": fingerprint,
    }


def load_job(cfg: ExtractConfig, catalogue: Catalogue | None = None,
             device: torch.device | None = None) -> ExtractionJob:
    """Read the catalogue (unless given) and load the featurizer for `cfg` (on `device`, default `cfg.device`)."""
    _validate(cfg)
    if catalogue is None:
        catalogue = _read(cfg)
    featurizer = Featurizer.from_config(cfg, cfg.device if device is None else device)
    settings = _settings(cfg, catalogue, featurizer.device, featurizer.weight_files())  # the files actually loaded
    return ExtractionJob(cfg, catalogue, featurizer, settings, _fingerprint(settings),
                         csv_line_numbers(catalogue.path, len(catalogue)))


def _read(cfg: ExtractConfig, report_duplicates: bool = True) -> Catalogue:
    return read_catalogue(cfg.catalogue, cfg.image_root, cfg.label_sep, cfg.split_seed, cfg.val_fraction, cfg.test_fraction,
                          cfg.allow_outside_root, report_duplicates=report_duplicates)


@dataclass
class RunStats:
    """What one call of `process_parts` did (timings are for the summary, never for the file)."""

    rows: int = 0
    images: int = 0  # network inputs: deterministic views + augmented views
    texts: int = 0
    skipped: int = 0
    parts: int = 0  # part files written
    seconds: float = 0.0  # wall time of the whole loop
    job_rows: int = 0  # rank 0 of a torchrun job: rows of the shards all ranks wrote, ...
    job_seconds: float = 0.0  # ... from rank 0's first batch to the last shard
    text_seconds: float = 0.0  # main-process time in the text stage (normalise, count, TF-IDF, encode)


class _PartBatches:
    """The batches of a sequence of parts, in order, each part cut from its own start (fixed
    boundaries: a part's numbers never depend on the parts before it). `parts` may be lazy (shard
    claims): a part is taken only when the loader asks for its first batch, and is then appended
    to `taken`, so the consumer knows which part each batch belongs to."""

    def __init__(self, parts: Iterable[tuple[int, int]], batch_size: int) -> None:
        self.parts, self.batch_size = parts, batch_size
        self.taken: deque[tuple[int, int]] = deque()

    def __iter__(self) -> Iterator[list[int]]:
        for start, end in self.parts:
            self.taken.append((start, end))
            for b in range(start, end, self.batch_size):
                yield list(range(b, min(b + self.batch_size, end)))


def num_workers(cfg: ExtractConfig) -> int:
    """`--num-workers`, or by default the CPUs this process may use (`Worker.default_num_workers`)."""
    return cfg.num_workers if cfg.num_workers is not None else Worker.from_env().default_num_workers()


def _image_loader(job: ExtractionJob, batches: Iterable[list[int]]) -> DataLoader:
    """One DataLoader over all batches of all parts: its workers live across parts and keep
    prefetching while the main process encodes (text and images). Uint8 batches are pinned on
    CUDA, so that their copy to the GPU overlaps the next batch."""
    frame, root = job.frame, job.catalogue.image_root
    paths = [None if c is None else str(root / p) for p, c in zip(frame["image"], frame["class_name"])]
    n_views = [job.cfg.augment_views if s == "train" else 0 for s in frame["split"]]
    workers = num_workers(job.cfg)
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


def process_parts(job: ExtractionJob, parts: Iterable[tuple[int, int]], folder: Path,
                  progress: tqdm | None = None, skipped_before: int = 0,
                  on_part_written: Callable[[int, int], None] | None = None) -> RunStats:
    """Encode the given parts and write each as `part_path(folder, start, end)` (atomically).

    `parts` may be lazy (`distributed.ShardClaims`); `on_part_written(start, end)` is called once a
    part's file exists. Per batch: the main process prepares and encodes the texts while the
    loader's workers decode the next images; then the images of the usable rows (and their
    augmented views) go through the image network. A row is unusable for the first of: malformed
    label, empty text, bad image.
    """
    cfg, frame, featurizer = job.cfg, job.frame, job.featurizer
    stats = RunStats()
    if isinstance(parts, Sequence) and not parts:
        return stats
    t_start = time.perf_counter()
    class_ok = frame["class_name"].notna().to_numpy()
    row_reason = frame["reason"].to_numpy()  # why the catalogue refused a row (malformed label, outside the root, ...)
    raw_text = frame["text"].to_numpy()
    batches = _PartBatches(parts, cfg.batch_size)
    buffer: _PartBuffer | None = None
    for batch in _image_loader(job, batches):
        rows = batch["rows"].numpy()  # (B,) catalogue rows, consecutive
        if buffer is None:
            start, end = batches.taken.popleft()
            buffer = _PartBuffer(start, end, featurizer.image_dim, featurizer.text_dim, cfg.augment_views)
        at = slice(rows[0] - buffer.start, rows[-1] + 1 - buffer.start)

        t_text = time.perf_counter()
        prepared = featurizer.prepare_texts(raw_text[rows].tolist())
        reasons = [
            row_reason[r] if not class_ok[r] else text_reason or image_reason
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
            stats.parts += 1
            if on_part_written is not None:
                on_part_written(buffer.start, buffer.end)
            buffer = None
    stats.seconds = time.perf_counter() - t_start
    return stats


# ----------------------------------------------------------------------------- the command

# how to redo a shard the merge refuses (after "delete it, then" when the file exists)
REDO = "run the same `huse extract-features` command again (with any number of processes) to compute it"


def _skip_summary(survey: merge.Survey, catalogue: Catalogue, line: list[int] | None) -> dict[str, Any]:
    """Counts per reason kind ("image too large (...)" counts as "image too large") and examples."""
    frame, examples = catalogue.frame, []
    if survey.skip_examples:
        line = line or csv_line_numbers(catalogue.path, len(catalogue))
        examples = [f"CSV line {line[row]} (row {row}, image {frame['image'].iat[row]!r}): {reason}"
                    for row, reason in survey.skip_examples]
    return {"skipped_by_reason": survey.reasons_by_kind(), "skipped_examples": examples}


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


def _is_ours(folder: Path, fingerprint: str) -> bool:
    return (_read_manifest(folder) or {}).get("fingerprint") == fingerprint


def _open_parts_folder(folder: Path, job_settings: dict[str, Any], fingerprint: str, n_rows: int, part_rows: int,
                       overwrite: bool, locks: JobLocks | None = None) -> None:
    """Create the parts folder with its manifest, or check that an existing one is this run's.

    With the exclusive job lock (one process, rank 0 of a torchrun job) nobody else writes here,
    so temporary files of a killed run are removed. An array worker shares the folder with the
    other workers: it discards another run's folder (--overwrite) only once it holds the job lock
    alone.
    """
    exclusive = locks is None or locks.mine is None
    if _is_ours(folder, fingerprint):
        if exclusive:
            for tmp in folder.glob(".*.tmp"):  # temporary files of a killed run
                tmp.unlink(missing_ok=True)
        return
    if folder.exists():
        old = _read_manifest(folder)
        finished = any(folder.glob("part-*.h5"))
        if finished and not overwrite:
            changed = _differences(old.get("settings", {}), job_settings) if old else []
            if changed == ["catalogue_sha256"]:  # the same CSV file, edited (say, fixed after --strict)
                raise HuseError(f"{folder} holds an unfinished extraction of this catalogue as it was before its "
                                "CSV changed; use --overwrite to discard it and start again.")
            diff = ", ".join(changed[:8]) + " differ" if changed else "no manifest"
            raise HuseError(
                f"{folder} holds an unfinished extraction made with different settings ({diff}). Run that "
                "command again to finish it, or use --overwrite to discard it."
            )
        if not exclusive and not locks.exclusive():
            locks.shared()
            if _is_ours(folder, fingerprint):  # another worker of this array has just set it up
                return
            raise HuseError(f"{folder} holds an unfinished extraction with other settings, and workers are still "
                            f"running on it ({'; '.join(locks.others_running()) or 'see its claim files'}): stop "
                            "them before discarding it")
        try:
            if _is_ours(folder, fingerprint):
                return
            if finished:
                log.info("--overwrite: discarding the unfinished run in %s made with other settings", folder)
            else:  # stopped before its first part (e.g. its weights failed to load): nothing to keep
                log.info("discarding %s: an unfinished extraction with no finished part", folder)
            shutil.rmtree(folder)
            _create_parts_folder(folder, job_settings, fingerprint, n_rows, part_rows)
        finally:
            if not exclusive:
                locks.shared()
        return
    _create_parts_folder(folder, job_settings, fingerprint, n_rows, part_rows)


def _create_parts_folder(folder: Path, job_settings: dict[str, Any], fingerprint: str, n_rows: int,
                         part_rows: int) -> None:
    """The folder with its manifest: made under a temporary name and renamed, so that it never
    exists without its manifest (workers of a job array may start together: the first one wins)."""
    manifest = {"format": PARTS_FORMAT, "fingerprint": fingerprint, "settings": job_settings, "n_rows": n_rows,
                "part_rows": part_rows}
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        try:
            os.rename(tmp, folder)  # fails if the folder exists and is not empty
        except OSError:
            if not _is_ours(folder, fingerprint):
                if folder.exists() and not any(folder.iterdir()):  # an empty folder (say, made by hand)
                    folder.rmdir()
                    os.rename(tmp, folder)
                    return
                raise HuseError(f"{folder} was just set up by another extraction with other settings") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _done_parts(folder: Path, planned: list[tuple[int, int]], fingerprint: str) -> set[tuple[int, int]]:
    """Planned parts whose (atomically written, hence complete) file exists; from their attributes
    only. A part file of other settings, or unreadable, is refused by name: never mixed in."""
    done = set()
    for start, end in planned:
        shard = merge.Shard(start, end, part_path(folder, start, end))
        if shard.path.exists():
            theirs = merge.shard_fingerprint(shard, REDO)
            if theirs != fingerprint:
                raise merge.ShardError(shard, f"was made with other settings (settings fingerprint "
                                              f"{str(theirs)[:12]}…, this run's is {fingerprint[:12]}…) and is "
                                              "never mixed in", REDO)
            done.add((start, end))
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


def extract_features(cfg: ExtractConfig, overwrite: bool = False, *, worker: Worker | None = None,
                     merge_only: bool = False) -> dict[str, Any]:
    """Stage one: encode every catalogue row into the feature file `cfg.out`; returns a summary.

    Resumable: parts already written by an interrupted run with the same settings are kept, whatever
    the number of processes that wrote them; the result is the same file as an uninterrupted run's.
    `out` made with the same settings: nothing to do (summary has "up_to_date": True). Different
    settings: HuseError unless `overwrite`.

    `worker` (default: from the torchrun environment): under torchrun every rank computes shards and
    rank 0 merges; a job-array worker (`Worker.array_index`) computes shards and returns without
    merging; `merge_only` merges the finished shards of such a job without loading any encoder.
    Summary keys: out, items, classes, splits, skipped, skipped_by_reason, skipped_examples,
    texts_reduced, images_per_s, texts_per_s (this process: images incl. augmented views over the
    loop's wall time; texts over the text stage's time), parts_reused, seconds; under torchrun also
    job_images_per_s (every rank's shards over the time from rank 0's first batch to the last shard).
    Ranks other than 0 return {"follower": True, ...}; array workers {"worker": ..., "shards_missing": ...}.
    """
    _validate(cfg)
    worker = worker or Worker.from_env()
    if merge_only and (worker.world > 1 or worker.in_array):
        raise HuseError("--merge-only merges the shards of a finished job in one process: run it without torchrun "
                        "and without --worker-index")
    run = _extract
    if worker.world > 1 and os.environ.get("TORCHELASTIC_ERROR_FILE"):
        run = record(_extract, ConciseErrors())  # torchrun's summary then shows this rank's error
    with process_group(worker):
        return run(cfg, overwrite, worker, merge_only)


def _extract(cfg: ExtractConfig, overwrite: bool, worker: Worker, merge_only: bool) -> dict[str, Any]:
    catalogue = _read(cfg, report_duplicates=worker.leads)  # fails on a bad CSV before any model is loaded
    out = Path(cfg.out)
    folder = parts_folder(out)
    planned = plan_parts(len(catalogue), cfg.part_rows)
    device = _merge_device(out, folder) if merge_only else worker.device(cfg.device)
    settings = _settings(cfg, catalogue, device)
    fingerprint = _fingerprint(settings)
    locks = JobLocks(out, worker)
    try:
        decision = None
        if worker.leads:
            try:
                decision = _set_up(cfg, out, folder, len(catalogue), planned, settings, fingerprint, overwrite, locks,
                                   merge_only)
            except BaseException:
                broadcast(worker, {"state": "refused"})  # the other ranks stop quietly: this rank says why
                raise
        decision = broadcast(worker, decision)
        if decision["state"] == "refused":
            return {"up_to_date": False, "follower": True, "stopped": True}
        if decision["state"] == "up_to_date":
            if not worker.leads:
                return {"up_to_date": True, "follower": True}
            return {"up_to_date": True, **_summary_from_attrs(out, decision["attrs"])}
        if decision["fingerprint"] != fingerprint:  # a node with another installation, catalogue or options
            diff = ", ".join(_differences(decision["settings"], settings)[:8])
            raise HuseError(f"{worker.label} on host {socket.gethostname()} computes other settings than rank 0 "
                            f"({diff} differ): every node must run the same installation, catalogue and options")
        done = {tuple(p) for p in decision["done"]}
        try:
            return _run(cfg, catalogue, out, folder, planned, settings, fingerprint, done, device, worker, merge_only)
        except JobStopped:  # another rank failed and reports it
            return {"up_to_date": False, "follower": True, "stopped": True}
    finally:
        locks.release()


def _merge_device(out: Path, folder: Path) -> torch.device:
    """--merge-only loads no encoder: the device type its shards were made on (or its file was)."""
    recorded = (_read_manifest(folder) or {}).get("settings", {}).get("device_type")
    if recorded is None and out.exists():
        try:
            recorded = features.read_attrs(out).get("device_type")
        except HuseError:
            recorded = None
    return torch.device(recorded or "cpu")


def _set_up(cfg: ExtractConfig, out: Path, folder: Path, n_rows: int, planned: list[tuple[int, int]],
            settings: dict[str, Any], fingerprint: str, overwrite: bool, locks: JobLocks,
            merge_only: bool) -> dict[str, Any]:
    """What the leading process decides for the job, under the job lock: up to date, or go with the
    shards already done."""
    locks.acquire()
    exclusive = locks.mine is None
    if exclusive:
        for stale in out.parent.glob(f".{glob.escape(out.name)}.*.tmp"):  # a merge or build-graph killed before its rename
            log.info("removing %s, left by a killed run", stale)
            if stale.is_dir():  # a parts folder being set up
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
    attrs = _check_existing_out(out, fingerprint, settings, overwrite)
    if attrs is not None:
        if folder.exists() and exclusive:
            if _is_ours(folder, fingerprint):  # killed after the merge, before the clean-up
                shutil.rmtree(folder)
            else:  # another settings' unfinished run (started with --overwrite): its parts are not ours to drop
                log.warning("%s is up to date; %s holds an unfinished extraction with other settings, left as it is",
                            out, folder)
        log.debug("%s is up to date: nothing to do", out)
        return {"state": "up_to_date", "attrs": attrs}
    if merge_only:
        manifest = _read_manifest(folder)
        if manifest is None:
            raise HuseError(f"--merge-only: {folder} holds no extraction to merge; compute the shards first "
                            "(torchrun, job-array workers or one process)")
        if manifest.get("fingerprint") != fingerprint:
            diff = ", ".join(_differences(manifest.get("settings", {}), settings)[:8])
            raise HuseError(f"--merge-only: the shards in {folder} were made with other settings ({diff} differ); "
                            "give the options the workers ran with")
    else:
        _open_parts_folder(folder, settings, fingerprint, n_rows, cfg.part_rows, overwrite, locks)
    if exclusive:
        clear_failed(folder)
    done = _done_parts(folder, planned, fingerprint)
    if done:
        log.info("reusing %d of %d shards already done in %s (same settings fingerprint %s…)", len(done),
                 len(planned), folder, fingerprint[:12])
    return {"state": "go", "fingerprint": fingerprint, "settings": settings, "done": sorted(done)}


def _run(cfg: ExtractConfig, catalogue: Catalogue, out: Path, folder: Path, planned: list[tuple[int, int]],
         settings: dict[str, Any], fingerprint: str, done: set[tuple[int, int]], device: torch.device, worker: Worker,
         merge_only: bool) -> dict[str, Any]:
    """Compute the missing shards (unless merge_only), then merge them (one process, rank 0)."""
    t0 = time.perf_counter()
    todo = [p for p in planned if p not in done]
    job, stats = None, RunStats()
    if todo and not merge_only:
        try:
            job = load_job(cfg, catalogue, device)
        except BaseException:
            if not done and worker.count == 1:  # the folder holds only this run's manifest: leave nothing behind
                shutil.rmtree(folder, ignore_errors=True)
            raise
        if job.fingerprint != fingerprint:
            diff = ", ".join(_differences(settings, job.settings)[:8])
            raise HuseError(f"internal error: the loaded encoders change the settings ({diff} differ)")
        if worker.leads:
            _write_encoders(folder, job.describe_encoders())
        stats = _encode(job, folder, planned, done, worker)
    if worker.in_array or not worker.leads:
        missing = [p for p in planned if not part_path(folder, *p).exists()]
        if worker.leads:
            log.info("%s: %d shard(s) computed here, %d of %d still missing or in progress; once every worker has "
                     "finished, merge with the same options and --merge-only (no --worker-index)",
                     worker.label, stats.parts, len(missing), len(planned))
        return {"up_to_date": False, "follower": not worker.leads, "worker": worker.label, "out": str(out),
                "shards_total": len(planned), "shards_reused": len(done), "shards_computed": stats.parts,
                "shards_missing": len(missing), "rows_this_run": stats.rows, **_rates(stats)}
    return _merge(cfg, catalogue, out, folder, planned, settings, fingerprint, job, done, stats, t0, merge_only)


def _rates(stats: RunStats) -> dict[str, float | None]:
    return {"images_per_s": round(stats.images / stats.seconds, 1) if stats.seconds else None,
            "texts_per_s": round(stats.texts / stats.text_seconds, 1) if stats.text_seconds else None}


def _write_encoders(folder: Path, description: dict[str, Any]) -> None:
    path = folder / ENCODERS
    text = json.dumps(description, indent=2, sort_keys=True)
    if not path.exists() or path.read_text() != text:
        with atomic_path(path) as tmp:
            tmp.write_text(text)


def _read_encoders(folder: Path, cfg: ExtractConfig, catalogue: Catalogue) -> dict[str, Any]:
    """The encoders' description the workers recorded; loads them (on CPU) only if none did."""
    try:
        return json.loads((folder / ENCODERS).read_text())
    except (OSError, ValueError):
        return load_job(cfg, catalogue, torch.device("cpu")).describe_encoders()


def _encode(job: ExtractionJob, folder: Path, planned: list[tuple[int, int]], done: set[tuple[int, int]],
            worker: Worker) -> RunStats:
    """This process's share of the missing shards, then (rank 0 of a torchrun job) any shard nobody
    holds until every shard exists. A failure is reported with the process and its shard."""
    one = worker.count == 1
    if one:
        skipped_before = sum(merge.shard_skipped(merge.Shard(s, e, part_path(folder, s, e))) for s, e in done)
        progress: Any = tqdm(total=len(job.catalogue), initial=sum(e - s for s, e in done), unit="row",
                             desc="extract-features", dynamic_ncols=True)
        progress.set_postfix(skipped=skipped_before)
    else:
        skipped_before = 0
        progress = ShardProgress(folder, len(planned), done, enabled=worker.leads)
    claims = ShardClaims(folder, claim_order(planned, worker), worker)
    stats = RunStats()
    t_job = time.perf_counter()
    try:
        stats = _add(stats, process_parts(job, claims, folder, progress, skipped_before, claims.release))
        while worker.leads and not worker.in_array and not one:
            free, held = free_missing(folder, planned)
            if free:  # a process stopped early (or was never started): compute its shards here
                claims.close()
                claims = ShardClaims(folder, free, worker)
                stats = _add(stats, process_parts(job, claims, folder, progress, 0, claims.release))
            elif held:
                check_failed(folder)
                progress.poll()
                time.sleep(0.5)
            else:
                stats.job_rows = sum(e - s for s, e in planned if (s, e) not in done)
                stats.job_seconds = time.perf_counter() - t_job
                break
    except (KeyboardInterrupt, JobStopped):
        raise
    except Exception as exc:
        if one:
            raise
        failure = _failure(worker, claims.in_progress(), folder, exc)
        mark_failed(folder, worker, str(failure))  # the other ranks stop instead of meeting the same problem
        raise failure from exc
    finally:
        claims.close()
        progress.close()
    return stats


def _failure(worker: Worker, shard: tuple[int, int] | None, folder: Path, exc: Exception) -> HuseError:
    where = "" if shard is None else f" on shard {part_path(folder, *shard).name} (rows {shard[0]}-{shard[1] - 1})"
    what = (str(exc) if isinstance(exc, HuseError) else f"{type(exc).__name__}: {exc}").rstrip(".")
    log.debug("%s failed", worker.label, exc_info=exc)
    return HuseError(f"{worker.label} on host {socket.gethostname()} failed{where}: {what}. Finished shards are "
                     "kept: run the same command again (with any number of processes) to continue.")


def _add(a: RunStats, b: RunStats) -> RunStats:
    return RunStats(**{k: getattr(a, k) + getattr(b, k) for k in asdict(a)})


def _merge(cfg: ExtractConfig, catalogue: Catalogue, out: Path, folder: Path, planned: list[tuple[int, int]],
           settings: dict[str, Any], fingerprint: str, job: ExtractionJob | None, done: set[tuple[int, int]],
           stats: RunStats, t0: float, merge_only: bool) -> dict[str, Any]:
    """Validate every shard, write the feature file from them (streamed), remove the parts folder."""
    redo = (REDO.replace("again", "without --merge-only, or rerun the workers,") if merge_only else REDO)
    frame = catalogue.frame
    shards = [merge.Shard(s, e, part_path(folder, s, e)) for s, e in planned]
    if merge_only:
        missing = [s for s in shards if not s.path.exists()]
        if missing:
            names = ", ".join(s.path.name for s in missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise HuseError(f"--merge-only: {len(missing)} of {len(shards)} shards are missing ({names}); {redo}")
    survey = merge.survey_shards(shards, fingerprint, frame, redo)
    skips = _skip_summary(survey, catalogue, job.line if job is not None else None)
    encoders = job.describe_encoders() if job is not None else _read_encoders(folder, cfg, catalogue)
    file_attrs = {
        **_file_attrs(cfg, catalogue, settings, fingerprint, encoders, survey.texts_reduced),
        "split_counts": survey.split_counts,
        "skipped_by_reason": skips["skipped_by_reason"],
    }
    for kind, n in skips["skipped_by_reason"].items():
        log.warning("skipped %d row(s): %s", n, kind)
    for example in skips["skipped_examples"]:
        log.warning("  e.g. %s", example)
    if survey.n_items == 0:
        shutil.rmtree(folder)  # nothing worth resuming; a fixed catalogue or --image-root starts afresh
        counts = ", ".join(f"{kind}: {n}" for kind, n in skips["skipped_by_reason"].items())
        raise HuseError(f"no usable rows in {cfg.catalogue}: every row was skipped ({counts}; e.g. "
                        f"{skips['skipped_examples'][0]}). Check the catalogue and --image-root.")
    t_merge = time.perf_counter()
    merged = merge.write_from_shards(out, survey, frame, file_attrs, cfg.dtype, redo)
    log.debug("merged %d shards into %s in %.1f s", len(shards), out, time.perf_counter() - t_merge)
    shutil.rmtree(folder)
    return {
        "up_to_date": False,
        "out": str(out),
        "items": merged["n_items"],
        "classes": merged["n_classes"],
        "splits": file_attrs["split_counts"],
        "skipped": merged["n_skipped"],
        **skips,
        "texts_reduced": survey.texts_reduced,
        "duplicates": catalogue.duplicates,
        "augment_views": cfg.augment_views,
        "dtype": cfg.dtype,
        "parts_reused": len(done),
        "rows_this_run": stats.rows,
        **_rates(stats),
        **({"job_images_per_s": round(stats.job_rows / stats.job_seconds, 1)} if stats.job_seconds else {}),
        "seconds": round(time.perf_counter() - t0, 1),
    }
