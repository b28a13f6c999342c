"""How much class information do frozen image features hold? A linear probe (softmax regression on
standardised features) scored by 5-fold cross-validation over train+val, so the test split is never
used to compare feature files; train->val and train->test accuracies are printed beside it for
reference. Separates "the features are the limit" from "the towers are the limit".

    python bench/probe_features.py cache/sweep_lite0.h5 cache/sweep_lite2.h5 \
        cache/sweep_lite0.h5+cache/sweep_lite2.h5

An argument `a.h5+b.h5` concatenates the image features of two files of the same catalogue.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from huse_pipeline.store import features  # noqa: E402


def probe_accuracy(x: torch.Tensor, y: torch.Tensor, train: np.ndarray, held: np.ndarray, num_classes: int,
                   epochs: int = 40, lr: float = 1e-3, weight_decay: float = 1e-2, seed: int = 0) -> float:
    """Train a linear softmax classifier on x[train] (standardised with train statistics) with AdamW,
    batch 256; return its accuracy on x[held]. x: (N, D) float32, y: (N,) int64."""
    mean, std = x[train].mean(0), x[train].std(0) + 1e-6
    xn = (x - mean) / std
    gen = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(x.shape[1], num_classes)
    torch.nn.init.normal_(lin.weight, std=0.01, generator=gen)
    torch.nn.init.zeros_(lin.bias)
    opt = torch.optim.AdamW(lin.parameters(), lr, weight_decay=weight_decay)
    idx = torch.as_tensor(train)
    for _ in range(epochs):
        order = idx[torch.randperm(len(idx), generator=gen)]
        for start in range(0, len(order), 256):
            batch = order[start:start + 256]
            loss = F.cross_entropy(lin(xn[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return (lin(xn[torch.as_tensor(held)]).argmax(1) == y[torch.as_tensor(held)]).float().mean().item()


def load(spec: str) -> tuple[np.ndarray, features.FeatureSet]:
    """`a.h5` or `a.h5+b.h5` -> (N, D) image features (concatenated) and the first file's FeatureSet."""
    sets = [features.read_features(p) for p in spec.split("+")]
    for other in sets[1:]:
        if not np.array_equal(other.row, sets[0].row) or not np.array_equal(other.labels, sets[0].labels):
            sys.exit(f"{spec}: the files do not hold the same catalogue rows")
    return np.concatenate([s.image_emb for s in sets], axis=1), sets[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("specs", nargs="+", help="feature files, or a.h5+b.h5 to concatenate their image features")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print("| image features | dim | 5-fold CV acc (train+val) | ± sd | train→val | train→test |")
    print("|---|---|---|---|---|---|", flush=True)
    for spec in args.specs:
        x, fs = load(spec)
        x, y = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(fs.labels)
        train, val, test = fs.indices("train"), fs.indices("val"), fs.indices("test")
        pool = np.random.default_rng(0).permutation(np.concatenate([train, val]))
        folds = np.array_split(pool, args.folds)
        cv = [probe_accuracy(x, y, np.concatenate(folds[:k] + folds[k + 1:]), folds[k], fs.num_classes)
              for k in range(args.folds)]
        print(f"| `{spec}` | {x.shape[1]} | {np.mean(cv):.4f} | {np.std(cv):.4f} | "
              f"{probe_accuracy(x, y, train, val, fs.num_classes):.3f} | "
              f"{probe_accuracy(x, y, train, test, fs.num_classes):.3f} |", flush=True)


if __name__ == "__main__":
    main()
