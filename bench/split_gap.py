"""Why a model scores differently on val and test: image-classification accuracy of one checkpoint
on both splits, broken down by what might differ between them (photo aspect, near-duplicate
groups, rare classes), and the confusions whose counts differ most between the splits.

    python bench/split_gap.py --run cache/bench_quality/runs/huse-seed0 \
        --features cache/bench_quality/feats.h5 --dataset ../shared/datasets/myntra_fashion_small

`--dataset` is the real catalogue's folder (its attributes.csv gives each photo's size and
near-duplicate group); the feature file must be made from its catalogue.csv, row for row.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from huse_pipeline.eval.evaluate import split_outputs  # noqa: E402
from huse_pipeline.store import features  # noqa: E402
from huse_pipeline.train.model import load_checkpoint, model_from_checkpoint  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run folder (its best.pt is used)")
    parser.add_argument("--features", required=True)
    parser.add_argument("--dataset", required=True, help="folder with catalogue.csv and attributes.csv")
    parser.add_argument("--top", type=int, default=12, help="how many confusions to list")
    args = parser.parse_args()
    torch.set_num_threads(1)
    fs = features.read_features(args.features)
    model = model_from_checkpoint(load_checkpoint(Path(args.run) / "best.pt")).eval()
    cat = pd.read_csv(Path(args.dataset) / "catalogue.csv")
    if len(cat) != len(fs.labels):
        sys.exit(f"{args.features} has {len(fs.labels)} items but the catalogue has {len(cat)}")
    cat["id"] = cat.image.str.extract(r"(\d+)", expand=False).astype(int)
    cat = cat.merge(pd.read_csv(Path(args.dataset) / "attributes.csv"), on="id", how="left")
    train_count = pd.Series(fs.labels[fs.indices("train")]).value_counts()
    leaf = [name.split("<")[-1] for name in fs.class_names]
    confusions = {}
    with torch.no_grad():
        for split in ("val", "test"):
            idx = fs.indices(split)
            out = split_outputs(model, model, fs, idx, torch.device("cpu"), 4096)
            pred, y = out.image_prob.argmax(1).numpy(), out.labels.numpy()
            ok = pred == y
            rows = cat.iloc[idx]
            tall = rows.height.values == 300
            dup = rows.dup_group.values != -1
            rare = train_count.reindex(y).fillna(0).values < 50
            print(f"{split}: {len(idx)} items, image acc {ok.mean():.3f} ({(~ok).sum()} errors) | "
                  f"3:4 photos {tall.mean():.3f} of items, acc {ok[tall].mean():.3f} vs square {ok[~tall].mean():.3f} | "
                  f"in a near-duplicate group {dup.mean():.3f} | "
                  f"class with <50 train items {rare.mean():.3f}, acc {ok[rare].mean():.3f} vs {ok[~rare].mean():.3f}")
            confusions[split] = pd.Series([f"{leaf[a]} -> {leaf[b]}" for a, b in zip(y[~ok], pred[~ok])]).value_counts()
    table = pd.concat(confusions, axis=1).fillna(0).astype(int)
    table["test - val"] = table["test"] - table["val"]
    print(table.sort_values("test - val", ascending=False).head(args.top).to_string())


if __name__ == "__main__":
    main()
