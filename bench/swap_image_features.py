"""Try other image features in stage two without a new extraction: copy a feature file, replacing its
image features by the concatenation of given arrays (one row per catalogue row, as
`bench/probe_finetune.py --save-features` writes them) and column ranges of the old features.

    python bench/swap_image_features.py cache/sweep_l0l2_mid.h5 cache/ft_a.h5 \
        cache/ft_lite0_11.npy old:1280:4160

The copy keeps everything else (texts, labels, splits, graph). Its settings fingerprint is marked
as swapped, so `huse extract-features` never takes it for an up-to-date extraction, and the
attribute `image_features_swapped` says what was put in. A research tool: stage one's files are
the product.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from huse_pipeline.utils import atomic_path  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="feature file to copy")
    parser.add_argument("dst", help="the copy to write (must not exist)")
    parser.add_argument("parts", nargs="+", help="ARRAY.npy (N catalogue rows x d) or old:A:B (columns A..B-1 of "
                                                 "the source's image features), concatenated in this order")
    args = parser.parse_args()
    try:
        with h5py.File(args.src, "r") as src:
            rows, old = src["items/row"][:], src["items/image_emb"]
            blocks = []
            for part in args.parts:
                if part.startswith("old:"):
                    a, b = (int(v) for v in part[4:].split(":"))
                    if not 0 <= a < b <= old.shape[1]:
                        sys.exit(f"{part}: the source has {old.shape[1]} image feature columns")
                    blocks.append(old[:, a:b])
                else:
                    try:
                        arr = np.load(part)
                    except (OSError, ValueError) as exc:
                        sys.exit(f"{part}: {exc}")
                    if arr.ndim != 2 or arr.shape[0] <= rows.max():
                        sys.exit(f"{part}: expected one row per catalogue row (at least {rows.max() + 1}), "
                                 f"got shape {arr.shape}")
                    blocks.append(arr[rows].astype(np.float32))
            image_emb = np.concatenate(blocks, axis=1)
    except (OSError, KeyError, ValueError) as exc:
        sys.exit(f"{args.src}: {exc}")
    if Path(args.dst).exists():
        sys.exit(f"{args.dst} exists; pick another name")
    with atomic_path(args.dst) as tmp:  # a failed copy leaves nothing under dst
        shutil.copyfile(args.src, tmp)
        with h5py.File(tmp, "r+") as dst:
            del dst["items/image_emb"]
            dst.create_dataset("items/image_emb", data=image_emb)
            dst.attrs["image_dim"] = json.dumps(int(image_emb.shape[1]))
            fingerprint = json.loads(dst.attrs.get("settings_fingerprint", '""'))
            dst.attrs["settings_fingerprint"] = json.dumps(f"swapped:{fingerprint}")
            dst.attrs["image_features_swapped"] = json.dumps({"source": args.src, "parts": args.parts})
    print(f"{args.dst}: image features {image_emb.shape}")


if __name__ == "__main__":
    main()
