"""Stage one: run the frozen encoders over a catalogue and write the HDF5 feature cache.

(To be implemented: see ExtractConfig for the options.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .encoders import DEFAULT_IMAGE_ENCODER, DEFAULT_TEXT_ENCODER


@dataclass(frozen=True)
class ExtractConfig:
    """Everything that determines a feature file; stored as JSON in its attributes."""

    catalogue: str
    out: str = "cache/feats.h5"
    image_root: str | None = None  # default: the catalogue's folder
    image_encoder: str = DEFAULT_IMAGE_ENCODER
    image_weights: str | None = None  # local checkpoint; ResNets: None/"imagenet" = torchvision's weights
    image_fit: str = "pad"  # pad | crop | squash: how an image becomes the encoder's square input
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
    max_image_pixels: int = 64_000_000


def extract_features(cfg: ExtractConfig, overwrite: bool = False) -> dict[str, Any]:
    raise NotImplementedError
