"""Stage one's image side (paper §4.1: images into a frozen CNN): decode a catalogue image safely,
convert any PIL mode to RGB correctly, fit it to the encoder's square input (pad | crop | squash) and
make seeded augmented views. Bad images raise `BadImage` with a short, stable reason.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from huse_pipeline.settings import DEFAULT_MAX_PIXELS, IMAGE_FITS

log = logging.getLogger(__name__)

CROP_FRACTION = 0.875  # ImageNet convention: resize the shorter side to S / 0.875, centre-crop S
PAD_FILL = (255, 255, 255)  # catalogue photos are shot on white
RESAMPLE = Image.Resampling.BICUBIC
REDUCING_GAP = 3.0  # PIL: reduce() by an integer factor first when shrinking > 3x (fast, same quality)


class BadImage(Exception):
    """An image that cannot be used; `reason` is short and stable ("missing file", ...)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ------------------------------------------------------------------------------------ decoding


@contextlib.contextmanager
def _no_pillow_bomb_check() -> Iterator[None]:
    """Let `Image.open` read any header: the size limit is checked by us, with a clear reason."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def load_rgb(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int | None = None) -> Image.Image:
    """Decode an image file into an RGB PIL image, EXIF orientation applied.

    `min_side`: the smallest shorter side the caller needs; JPEGs larger than that are decoded at a
    reduced scale (`Image.draft`, DCT scaling by 1/2, 1/4 or 1/8) so very large photos stay cheap.
    Images with more than `max_pixels` pixels are refused before decoding. Raises `BadImage`.
    """
    path = Path(path)
    try:
        if not path.exists():
            raise BadImage("missing file")
        if not path.is_file():
            raise BadImage("not a file")
        if path.stat().st_size == 0:
            raise BadImage("empty file")
    except (OSError, ValueError) as exc:  # a name too long, a NUL byte, a folder we may not enter
        log.debug("cannot stat %s: %s", path, exc)
        raise BadImage(f"unusable path ({getattr(exc, 'strerror', None) or exc})") from exc
    try:
        with _no_pillow_bomb_check():
            im = Image.open(path)
    except UnidentifiedImageError as exc:
        raise BadImage("not an image") from exc
    except PermissionError as exc:
        raise BadImage("unreadable file") from exc
    except Exception as exc:  # a broken header can fail a format plugin in many ways
        log.debug("cannot open %s: %s", path, exc)
        raise BadImage(_decode_failure(exc)) from exc
    try:
        w, h = im.size
        if w * h > max_pixels:
            raise BadImage(f"image too large ({w} x {h} > {max_pixels} pixels)")
        if min_side is not None and im.format == "JPEG":
            im.draft("RGB", (min_side, min_side))  # DCT scaling that keeps both sides >= min_side
        try:
            im.load()
        except Exception as exc:
            log.debug("cannot decode %s: %s", path, exc)
            raise BadImage(_decode_failure(exc)) from exc
        try:
            ImageOps.exif_transpose(im, in_place=True)
        except Exception as exc:  # a broken EXIF block: keep the stored orientation
            log.debug("ignoring the unreadable EXIF orientation of %s: %s", path, exc)
        rgb = to_rgb(im)
    except BadImage:
        im.close()
        raise
    except Exception as exc:
        im.close()
        log.debug("cannot convert %s: %s", path, exc)
        raise BadImage("corrupt image") from exc
    if rgb is not im or getattr(im, "fp", None) is not None:  # multi-frame files keep their file open
        rgb = rgb.copy() if rgb is im else rgb
        im.close()
    return rgb


def _decode_failure(exc: Exception) -> str:
    """The reason for a file PIL cannot open or decode: truncated (data ends early) or corrupt."""
    return "truncated image" if isinstance(exc, EOFError) or "truncat" in str(exc).lower() else "corrupt image"


def _on_white(rgba: Image.Image) -> Image.Image:
    """Composite an RGBA image over white (catalogue convention) and drop the alpha."""
    white = Image.new("RGBA", rgba.size, PAD_FILL + (255,))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _high_bit_depth_to_l(im: Image.Image) -> Image.Image:
    """16-bit (`I;16*`) and 32-bit (`I`, `F`) greyscale scaled to 8 bits, not clipped.

    `I;16*` and `I` holding values within 0..65535 are 16-bit data: v / 257 (65535 -> 255).
    Other `I` data and `F` are stretched linearly from their min..max to 0..255 (`F` within 0..1 is
    scaled by 255).
    """
    arr = np.asarray(im).astype(np.float64)  # (H, W)
    lo, hi = float(arr.min()), float(arr.max())
    if im.mode.startswith("I;16") or (im.mode == "I" and lo >= 0 and hi <= 65535):
        arr = arr / 257.0
    elif im.mode == "F" and lo >= 0 and hi <= 1:
        arr = arr * 255.0
    else:
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def _cmyk_to_rgb(im: Image.Image) -> Image.Image:
    """CMYK through its embedded ICC profile when there is one, else PIL's plain formula."""
    icc = im.info.get("icc_profile")
    if icc:
        try:
            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except Exception as exc:  # broken profile or no LittleCMS: fall back to the formula
            log.debug("ICC conversion failed (%s); using the plain CMYK formula", exc)
    return im.convert("RGB")


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB correctly.

    Alpha (RGBA, LA, PA, La, RGBa) and transparency given by `info["transparency"]` (palette, L or
    RGB with a tRNS colour) are composited on white; palette colours are looked up; 16/32-bit
    greyscale is scaled (see `_high_bit_depth_to_l`); CMYK uses its ICC profile if present.
    """
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode.startswith("I") or mode == "F":
        return _high_bit_depth_to_l(im).convert("RGB")
    if mode == "CMYK":
        return _cmyk_to_rgb(im)
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
        return _on_white(im.convert("RGBA"))
    try:
        return im.convert("RGB")  # 1, L, P (opaque), YCbCr, HSV
    except ValueError as exc:
        raise BadImage(f"unsupported image mode {mode}") from exc


# ----------------------------------------------------------------------------------- fitting


def _resize(im: Image.Image, size: tuple[int, int]) -> Image.Image:
    if im.size == size:
        return im
    return im.resize(size, RESAMPLE, reducing_gap=REDUCING_GAP)


def fit_image(im: Image.Image, size: int, fit: str = "pad") -> Image.Image:
    """Make a `size` x `size` RGB image from `im` (antialiased bicubic resizing).

    pad:    resize the longer side to `size` keeping the aspect ratio, centre it on white.
    crop:   resize the shorter side to round(size / 0.875), centre-crop `size` x `size`.
    squash: resize to `size` x `size` (aspect ratio lost).
    """
    w, h = im.size
    if fit == "pad":
        scale = size / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        canvas = Image.new("RGB", (size, size), PAD_FILL)
        canvas.paste(_resize(im, (nw, nh)), ((size - nw) // 2, (size - nh) // 2))
        return canvas
    if fit == "crop":
        short = round(size / CROP_FRACTION)
        scale = short / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        left, top = (nw - size) // 2, (nh - size) // 2
        # resize only the source region of the crop (box, in source pixels): resizing the whole image
        # first would allocate all of it at the new scale, gigabytes for a 4 x 8000 strip
        sx, sy = w / nw, h / nh
        box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
        return im.resize((size, size), RESAMPLE, box=box, reducing_gap=REDUCING_GAP)
    if fit == "squash":
        return _resize(im, (size, size))
    raise ValueError(f"unknown image fit {fit!r}; choose one of {', '.join(IMAGE_FITS)}")


def to_tensor(im: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) uint8 tensor."""
    return TF.pil_to_tensor(im)


# ------------------------------------------------------------------------------ augmentation


@dataclass(frozen=True)
class Augmentation:
    """Random view of a training image: random resized crop, horizontal flip, colour jitter.

    The crop is taken from the image fitted (same fit as the deterministic view) at
    round(size / 0.875), so a full-scale crop looks like the deterministic view.
    """

    crop_scale: tuple[float, float] = (0.35, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    brightness: float = 0.3
    contrast: float = 0.3
    saturation: float = 0.3
    hue: float = 0.05

    def transform(self, size: int) -> v2.Transform:
        return v2.Compose([
            v2.RandomResizedCrop(size, scale=self.crop_scale, ratio=self.crop_ratio, antialias=True),
            v2.RandomHorizontalFlip(self.flip_p),
            v2.ColorJitter(self.brightness, self.contrast, self.saturation, self.hue),
        ])


def view_seed(seed: int, row: int, view: int) -> int:
    """A 63-bit seed for one augmented view, a pure function of (seed, catalogue row, view index)."""
    digest = hashlib.sha256(f"huse-view\0{seed}\0{row}\0{view}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# ---------------------------------------------------------------------------- the transform


@dataclass(frozen=True)
class ImageTransform:
    """Everything that turns an image file into encoder input; recorded in the feature file."""

    size: int
    fit: str = "pad"
    max_pixels: int = DEFAULT_MAX_PIXELS
    seed: int = 0
    augmentation: Augmentation = Augmentation()

    def __post_init__(self) -> None:
        if self.fit not in IMAGE_FITS:
            raise ValueError(f"unknown image fit {self.fit!r}; choose one of {', '.join(IMAGE_FITS)}")

    @property
    def work_size(self) -> int:
        """Size of the fitted image augmented views are cropped from (and the JPEG draft target)."""
        return math.ceil(self.size / CROP_FRACTION)

    def describe(self) -> dict[str, Any]:
        return {
            "fit": self.fit,
            "size": self.size,
            "resample": "bicubic (PIL, antialiased)",
            "pad_fill": list(PAD_FILL),
            "crop_fraction": CROP_FRACTION,
            "jpeg_draft_min_side": self.work_size,
            "max_pixels": self.max_pixels,
            "conversion": "EXIF orientation applied; alpha/transparency composited on white; 16-bit scaled "
                          "v/257; CMYK via ICC profile if present",
            "augmentation": {**asdict(self.augmentation), "work_size": self.work_size, "seed": self.seed,
                             "seeding": "torch RNG seeded per (seed, catalogue row, view index)"},
        }

    def __call__(self, path: str | Path) -> torch.Tensor:
        """The deterministic view: (3, S, S) uint8. Raises `BadImage`."""
        return to_tensor(fit_image(load_rgb(path, self.max_pixels, self.work_size), self.size, self.fit))

    def views(self, im: Image.Image, row: int, n_views: int) -> torch.Tensor:
        """`n_views` augmented views of a decoded RGB image: (n_views, 3, S, S) uint8.

        View v is a pure function of (seed, row, v): the global torch RNG is forked, seeded with
        `view_seed` and restored, so neither workers, batches nor resumption change it.
        """
        base = to_tensor(fit_image(im, self.work_size, self.fit))  # (3, W, W)
        transform = self.augmentation.transform(self.size)
        out = torch.empty((n_views, 3, self.size, self.size), dtype=torch.uint8)
        for v in range(n_views):  # a handful of views per image; each needs its own seed
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(view_seed(self.seed, row, v))
                out[v] = transform(base)
        return out

    def sample(self, path: str | Path, row: int, n_views: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Deterministic view (3, S, S) and `n_views` augmented views (n_views, 3, S, S), uint8."""
        im = load_rgb(path, self.max_pixels, self.work_size)
        image = to_tensor(fit_image(im, self.size, self.fit))
        views = self.views(im, row, n_views) if n_views else torch.empty((0, 3, self.size, self.size), dtype=torch.uint8)
        return image, views


# ------------------------------------------------------------------------------ data loading


class CatalogueImages(Dataset):
    """Images of catalogue rows for a DataLoader; item `row` -> dict (decoded in a worker).

    `paths[row]` is the absolute image path, or None for rows already known to be unusable (they
    are not decoded). `n_views[row]` augmented views are made for that row (0 for val/test).
    A bad image gives zero tensors and its reason instead of an exception.
    """

    def __init__(self, paths: list[str | None], n_views: list[int], transform: ImageTransform) -> None:
        self.paths, self.n_views, self.transform = paths, n_views, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, row: int) -> dict[str, Any]:
        s, k = self.transform.size, self.n_views[row]
        path = self.paths[row]
        if path is None:
            return {"row": row, "image": torch.zeros((3, s, s), dtype=torch.uint8),
                    "views": torch.zeros((0, 3, s, s), dtype=torch.uint8), "reason": "not decoded"}
        try:
            image, views = self.transform.sample(path, row, k)
            reason = ""
        except BadImage as exc:
            image, views, reason = torch.zeros((3, s, s), dtype=torch.uint8), torch.zeros((0, 3, s, s), dtype=torch.uint8), exc.reason
        return {"row": row, "image": image, "views": views, "reason": reason}


def collate_images(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack a batch: rows (B,), images (B, 3, S, S), views (sum k, 3, S, S), view_counts (B,)."""
    return {
        "rows": torch.tensor([s["row"] for s in samples], dtype=torch.int64),
        "images": torch.stack([s["image"] for s in samples]),
        "views": torch.cat([s["views"] for s in samples]),
        "view_counts": torch.tensor([len(s["views"]) for s in samples], dtype=torch.int64),
        "reasons": [s["reason"] for s in samples],
    }
