"""The names and defaults that several commands share, each written once here. Importing this module
imports neither torch nor an encoder, so the CLI can check what a user typed before loading them."""
from __future__ import annotations

from huse_pipeline.errors import HuseError

DEFAULT_FEATURES = "cache/feats.h5"  # the feature file every command writes or reads unless told otherwise
DEFAULT_RUNS_DIR = "cache/runs"  # where `huse train` makes its run folders and `huse eval` finds the latest

# ---- stage one: encoders
RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
EFFICIENTNET_LITES = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")
IMAGE_ENCODERS = EFFICIENTNET_LITES + RESNETS + ("stub",)
ENCODER_JOIN = "+"  # "efficientnet-lite0+efficientnet-lite2": features concatenated
# chosen on the val split of the real catalogue together with --image-input-dropout 0.3 (BENCHMARKS.md)
DEFAULT_IMAGE_ENCODER = "efficientnet-lite0+efficientnet-lite2"
DEFAULT_TEXT_ENCODER = "all-MiniLM-L6-v2"
# avg: global average of the last feature map. avg+mid: also the output of the stage before it,
# averaged over a 2x2 grid (coarse layout and mid-level texture; the same forward pass)
IMAGE_POOLS = ("avg", "avg+mid")
DEFAULT_IMAGE_POOL = "avg+mid"  # chosen on the real catalogue's val split (BENCHMARKS.md, round 6)

# ---- stage one: images
IMAGE_FITS = ("pad", "crop", "squash")
DEFAULT_MAX_PIXELS = 64_000_000  # larger images are skipped as too large (decompression-bomb guard)

# ---- stage one: storage of the features in the feature file (readers upcast to float32)
FEATURE_DTYPES = ("float32", "float16")
DEFAULT_FEATURE_DTYPE = "float32"


def check_image_pool(pool: str) -> None:
    if pool not in IMAGE_POOLS:
        raise HuseError(f"unknown --image-pool {pool!r}; choose one of {', '.join(IMAGE_POOLS)}")


def split_encoder_names(name: str) -> list[str]:
    """`a+b` -> [a, b], each checked to be a known image encoder (no repeats)."""
    names = [part.strip() for part in name.split(ENCODER_JOIN)]
    unknown = [n for n in names if n not in IMAGE_ENCODERS]
    if unknown:
        raise HuseError(f"unknown image encoder {unknown[0]!r}; choose one of {', '.join(IMAGE_ENCODERS)}, "
                        f"or several joined by '{ENCODER_JOIN}' (their features are concatenated)")
    if len(set(names)) != len(names):
        raise HuseError(f"image encoder {name!r} names the same network twice")
    return names
