"""The one way an image or a text becomes a frozen feature (paper §4.1): stage one's extraction and any
later query side both go through `Featurizer`, so the same pixels or words give the same feature.
`staleness` says why a feature file's features are no longer what this installation computes
(package versions, weight files' sha256).
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from huse_pipeline import __version__
from huse_pipeline.data.catalogue import file_sha256
from huse_pipeline.data.images import BadImage, ImageTransform, fit_image, to_rgb, to_tensor
from huse_pipeline.data.text import PreparedTexts, prepare_texts
from huse_pipeline.encoders.image import ImageEncoder, image_weight_files, load_image_encoder
from huse_pipeline.encoders.text import TextEncoder, load_text_encoder, text_model_folder
from huse_pipeline.errors import HuseError
from huse_pipeline.utils import resolve_device

log = logging.getLogger(__name__)

# the packages whose code computes a feature, besides huse_pipeline itself (decoding, networks, tokenising)
FEATURE_PACKAGES = ("torch", "torchvision", "efficientnet-lite-pytorch", "transformers", "tokenizers",
                    "sentence-transformers", "Pillow")
# the config fields a featurizer is built from (`ExtractConfig` has them all)
FEATURIZER_FIELDS = ("image_encoder", "image_weights", "image_fit", "image_pool", "text_encoder", "max_image_pixels",
                     "seed", "batch_size")


# ---------------------------------------------------------------------------- the featurizer


@dataclass
class Featurizer:
    """Frozen encoders plus the preprocessing in front of them.

    Images: decode (EXIF, any mode to RGB, size guard), fit to the encoder's square input, the
    encoder's normalisation, the CNN, pooling. Texts: cleaning, the paper's per-example TF-IDF
    reduction of texts longer than the encoder reads (§4.1.1), the sentence encoder.
    """

    image_encoder: ImageEncoder
    text_encoder: TextEncoder
    transform: ImageTransform
    device: torch.device
    batch_size: int = 64  # images and texts go through the networks in chunks of this many

    @property
    def image_dim(self) -> int:
        return self.image_encoder.dim

    @property
    def text_dim(self) -> int:
        return self.text_encoder.dim

    @classmethod
    def from_config(cls, cfg: Any, device: str | torch.device = "auto") -> Featurizer:
        """Load the encoders that `cfg` (an ExtractConfig, or any object with FEATURIZER_FIELDS) names."""
        device = resolve_device(device) if isinstance(device, str) else device
        image_encoder = load_image_encoder(cfg.image_encoder, device, cfg.image_weights, cfg.image_pool)
        text_encoder = load_text_encoder(cfg.text_encoder, device)
        transform = ImageTransform(size=image_encoder.input_size, fit=cfg.image_fit, max_pixels=cfg.max_image_pixels,
                                   seed=cfg.seed)
        return cls(image_encoder, text_encoder, transform, device, cfg.batch_size)

    @classmethod
    def from_feature_file(cls, path: str | os.PathLike, device: str | torch.device = "auto") -> Featurizer:
        """The featurizer that made the feature file `path`, rebuilt from its recorded extract_config.

        Logs a warning when the file is stale for this installation (`staleness`): its stored
        features may then differ from what this featurizer computes for the same inputs.
        """
        from huse_pipeline.store import features  # the file layout's owner; it imports no encoder (no cycle)

        attrs = features.read_attrs(path)
        cfg = recorded_config(attrs, path)
        try:
            featurizer = cls.from_config(cfg, device)
        except HuseError as exc:
            raise HuseError(f"cannot rebuild the encoders of {path}: {exc}") from exc
        reasons = staleness(attrs)
        if reasons:
            log.warning("%s; features encoded now may differ from the file's (rerun `huse extract-features "
                        "--overwrite` to recompute them)", describe_staleness(path, reasons))
        if attrs.get("device_type") not in (None, featurizer.device.type):
            log.info("%s was extracted on %s, these features are computed on %s: expect differences in the last digits",
                     path, attrs["device_type"], featurizer.device.type)
        return featurizer

    def weight_files(self) -> dict[str, dict[str, str | None]]:
        """The files the loaded encoders read their weights from (see `weight_digests`)."""
        return {"image": self.image_encoder.weight_files(), "text": {self.text_encoder.name: self.text_encoder.model_folder}}

    # ---- texts

    def prepare_texts(self, texts: Sequence[str]) -> PreparedTexts:
        """Clean the texts and TF-IDF-reduce those longer than the encoder reads (no network)."""
        return prepare_texts(texts, self.text_encoder.max_tokens, self.text_encoder.count_tokens)

    def embed_texts(self, texts_used: list[str]) -> np.ndarray:
        """Prepared texts (`PreparedTexts.text_used`, all usable) -> (N, Dt) float32."""
        return self.text_encoder.encode(texts_used, batch_size=self.batch_size)

    def encode_texts(self, texts: list[str]) -> tuple[np.ndarray, list[str]]:
        """(B, Dt) float32 features and one reason per text ("" = usable, else e.g. "empty text");
        rows with a reason are zeros."""
        prepared = self.prepare_texts(texts)
        emb = np.zeros((len(texts), self.text_dim), np.float32)  # (B, Dt)
        ok = [i for i, reason in enumerate(prepared.reason) if not reason]
        if ok:
            emb[ok] = self.embed_texts([prepared.text_used[i] for i in ok])
        return emb, list(prepared.reason)

    # ---- images

    def pixels(self, image: str | os.PathLike | Image.Image) -> torch.Tensor:
        """The deterministic view of one image (a file path or a PIL image): (3, S, S) uint8. Raises
        `BadImage`. A path is decoded exactly as extraction decodes a catalogue image."""
        if isinstance(image, (str, os.PathLike)):
            return self.transform(image)
        if isinstance(image, Image.Image):
            return to_tensor(fit_image(self._decoded(image), self.transform.size, self.transform.fit))
        if image is None:
            raise BadImage("no image")
        raise BadImage(f"not an image path or PIL image ({type(image).__name__})")

    def _decoded(self, im: Image.Image) -> Image.Image:
        """What `load_rgb` makes of a file, for an image already opened: size guard, the same reduced
        JPEG decoding when it is not loaded yet (`Image.open` without `.load()`: that image itself is
        then decoded at the reduced scale), EXIF orientation, RGB."""
        w, h = im.size
        limit = self.transform.max_pixels
        if w * h > limit:
            raise BadImage(f"image too large ({w} x {h} > {limit} pixels)")
        try:
            if im.format == "JPEG":
                im.draft("RGB", (self.transform.work_size,) * 2)  # a no-op once the image is loaded
            im.load()
        except Exception as exc:
            log.debug("cannot decode %r: %s", im, exc)
            truncated = isinstance(exc, EOFError) or "truncat" in str(exc).lower()
            raise BadImage("truncated image" if truncated else "corrupt image") from exc
        try:
            im = ImageOps.exif_transpose(im)  # a transposed copy: the caller's image is left as it is
        except Exception as exc:  # a broken EXIF block: keep the stored orientation, as load_rgb does
            log.debug("ignoring the unreadable EXIF orientation of %r: %s", im, exc)
        try:
            return to_rgb(im)
        except BadImage:
            raise
        except Exception as exc:  # a conversion PIL cannot do for this file's data
            raise BadImage("corrupt image") from exc

    def embed_pixels(self, images: torch.Tensor) -> np.ndarray:
        """(M, 3, S, S) uint8 (on any device) -> (M, Di) float32, in fixed chunks of `batch_size`."""
        bs = self.batch_size
        out = [self.image_encoder.encode(images[i : i + bs]).cpu() for i in range(0, len(images), bs)]
        return torch.cat(out).numpy() if out else np.zeros((0, self.image_dim), np.float32)

    def encode_images(self, images: list) -> tuple[np.ndarray, list[str]]:
        """Items are file paths or PIL images; the deterministic view (no augmentation). Returns
        (B, Di) float32 features and one reason per image ("" = usable, else why not: "missing file",
        "not an image", "image too large (...)", ...); rows with a reason are zeros."""
        s = self.transform.size
        batch = torch.zeros((len(images), 3, s, s), dtype=torch.uint8)  # (B, 3, S, S)
        reasons = [""] * len(images)
        for i, image in enumerate(images):
            try:
                batch[i] = self.pixels(image)
            except BadImage as exc:
                reasons[i] = exc.reason
        emb = np.zeros((len(images), self.image_dim), np.float32)  # (B, Di)
        ok = [i for i, reason in enumerate(reasons) if not reason]
        if ok:
            emb[ok] = self.embed_pixels(batch[ok])
        return emb, reasons


def recorded_config(attrs: dict[str, Any], path: str | os.PathLike = "the feature file") -> SimpleNamespace:
    """The featurizer's part of a feature file's recorded extract_config (FEATURIZER_FIELDS)."""
    recorded = attrs.get("extract_config")
    if not isinstance(recorded, dict):
        raise HuseError(f"{path} does not record its extraction config (extract_config): it was not made by "
                        "`huse extract-features`; extract the catalogue again")
    # files made before --image-pool existed hold "avg" features; their image_pool attribute says so by its absence
    fields = {"image_weights": None, "image_pool": attrs.get("image_pool", "avg"), **recorded}
    missing = [f for f in FEATURIZER_FIELDS if f not in fields]
    if missing:
        raise HuseError(f"{path} records an extraction config without {', '.join(missing)}; extract the catalogue "
                        "again with `huse extract-features --overwrite`")
    return SimpleNamespace(**{f: fields[f] for f in FEATURIZER_FIELDS})


# ------------------------------------------------------------------ what a feature depends on


def installed_versions() -> dict[str, str]:
    """{package: installed version} of huse_pipeline and every FEATURE_PACKAGES entry."""
    out = {"huse_pipeline": __version__}
    for package in FEATURE_PACKAGES:
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "not installed"
    return out


def resolve_weight_files(cfg: Any, download: bool = True) -> dict[str, dict[str, str | None]]:
    """The weight files the encoders of `cfg` load, found without loading them (see `Featurizer.weight_files`)."""
    return {"image": image_weight_files(cfg.image_encoder, cfg.image_weights, download),
            "text": {cfg.text_encoder: text_model_folder(cfg.text_encoder)}}


_SHA256: dict[tuple[str, int, int], str] = {}  # (path, mtime_ns, size) -> sha256, for this process


def cached_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, computed once per process for each (path, modification time, size)."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_mtime_ns, st.st_size)
    if key not in _SHA256:
        _SHA256[key] = file_sha256(path)
    return _SHA256[key]


def folder_sha256(folder: str | os.PathLike) -> str:
    """One sha256 over every file of a model folder (relative names and contents; dot-files skipped)."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder)
        if not any(part.startswith(".") for part in rel.parts):
            digest.update(f"{rel.as_posix()}\0{cached_sha256(path)}\0".encode())
    return digest.hexdigest()


def weight_digests(files: dict[str, dict[str, str | None]]) -> dict[str, dict[str, str | None]]:
    """The same shape as `files`, each path replaced by its sha256 (a folder's by `folder_sha256`)."""
    def sha(path: str | None) -> str | None:
        if path is None:
            return None
        return folder_sha256(path) if Path(path).is_dir() else cached_sha256(path)

    return {kind: {name: sha(path) for name, path in named.items()} for kind, named in files.items()}


def staleness(attrs: dict[str, Any]) -> list[str]:
    """Why the features of a feature file (its root attributes) are not what this installation computes
    for its recorded config: one phrase per reason, to follow the file's name ("was made with
    efficientnet-lite-pytorch 0.1.0, this installation has 0.2.0"); [] when nothing says so.

    Checks the versions of huse_pipeline and FEATURE_PACKAGES and the sha256 of the weight files;
    a file that does not record them (made before they were recorded) is reported as such. Weight
    files that cannot be found here are not checked (loading them would fail anyway). Another
    catalogue or config is not staleness: `huse extract-features` reports those as settings.
    """
    settings = attrs.get("settings")
    if not isinstance(settings, dict):
        return ["does not record the settings its features were made with"]
    reasons: list[str] = []
    unrecorded: list[str] = []
    made_with = settings.get("versions") if isinstance(settings.get("versions"), dict) else {}
    for package, installed in installed_versions().items():
        made = made_with.get(package)
        if made is None:
            unrecorded.append(package)
        elif made != installed:
            reasons.append(f"was made with {package} {made}, this installation has {installed}")
    recorded = settings.get("weights_sha256")
    if isinstance(recorded, dict):
        reasons += _weight_reasons(attrs, recorded)
    what = []
    if unrecorded:
        what.append(f"the version{'s' if len(unrecorded) > 1 else ''} of {', '.join(unrecorded)}")
    if not isinstance(recorded, dict):
        what.append("the sha256 of its weight files")
    if what:
        reasons.append(f"does not record {' or '.join(what)} (it was made before huse-pipeline recorded them)")
    return reasons


def _weight_reasons(attrs: dict[str, Any], recorded: dict[str, Any]) -> list[str]:
    try:
        files = resolve_weight_files(recorded_config(attrs), download=False)
        now = weight_digests(files)
    except (HuseError, OSError) as exc:  # weights not installed here: nothing to compare with
        log.debug("cannot check the weight files of a feature file: %s", exc)
        return []
    reasons = []
    for kind in ("image", "text"):
        for name, made in (recorded.get(kind) or {}).items():
            current = now.get(kind, {}).get(name)
            if made is not None and current is not None and made != current:
                reasons.append(f"was made with {kind} weights {name} of sha256 {made[:12]}…, the weight file here "
                               f"({files[kind][name]}) has sha256 {current[:12]}…")
    return reasons


def describe_staleness(path: str | os.PathLike, reasons: list[str]) -> str:
    """`path` followed by its staleness reasons and the verdict, one sentence without advice."""
    definite = any(not r.startswith("does not record") for r in reasons)
    return f"{path} {'; '.join(reasons)}: its features {'are' if definite else 'may be'} stale"
