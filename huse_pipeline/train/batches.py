"""Where stage two's batches come from: `BatchSource`, the one interface through which the training
loop reads its data, and `ResidentSource`, which holds the feature file's arrays on the device.

The loop indexes no data tensor itself, so another source (e.g. one that streams shuffled blocks of a
feature file larger than memory) plugs into `loop.fit(..., make_source=...)` without touching it.
The contract of a source:

* `n_train`, `image_dim`, `text_dim`: the number of train items (Ntr) and the feature sizes (Di, Dt).
* `train_batches(batch_size, gen)`: one epoch. Every train item exactly once, in batches of
  `batch_size` (the last one may be smaller), each item's image either its deterministic view or
  one of its augmented views (a fresh choice per item per epoch). The order and the views depend
  only on the state of `gen`, a torch.Generator on the training device that the loop uses for
  nothing else: the same state gives the same epoch, so `--resume`, which restores it, continues
  the same run. The loop calls it once per epoch and may stop reading early (the last epoch of a
  `--steps` run).
* `val_batches(batch_size)`: every val item exactly once, in a fixed order, deterministic view.
* `class_dist`: the semantic graph A, (C, C) float32 on the device, or None if the file has none.
* `input_stats()`: {"image": (mean, std), "text": (mean, std)}, (Di,) and (Dt,) float32 on the
  device: the train split's per-feature mean and (unbiased) standard deviation, computed in
  float64, of the deterministic image view; the towers standardise their inputs with them.

A `Batch` holds image (b, Di) float32, text (b, Dt) float32 and labels (b,) int64, on the training
device; row i of each is item i.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Protocol, runtime_checkable

import numpy as np
import torch

from huse_pipeline.errors import HuseError
from huse_pipeline.store.features import FeatureSet
from huse_pipeline.train.config import TrainConfig


@dataclass(frozen=True)
class Batch:
    """One batch of items, on the training device."""

    image: torch.Tensor  # (b, Di) float32, the view drawn for each item
    text: torch.Tensor  # (b, Dt) float32
    labels: torch.Tensor  # (b,) int64

    def __len__(self) -> int:
        return self.labels.shape[0]


@runtime_checkable
class BatchSource(Protocol):
    """Everything the training loop reads from the data (the contract is in the module docstring)."""

    @property
    def n_train(self) -> int: ...

    @property
    def image_dim(self) -> int: ...

    @property
    def text_dim(self) -> int: ...

    @property
    def class_dist(self) -> torch.Tensor | None: ...

    def train_batches(self, batch_size: int, gen: torch.Generator) -> Iterator[Batch]: ...

    def val_batches(self, batch_size: int) -> Iterator[Batch]: ...

    def input_stats(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]: ...


# how `loop.fit` gets its source: (feature set, config, training device) -> source
SourceFactory = Callable[[FeatureSet, TrainConfig, torch.device], BatchSource]


@dataclass
class ResidentSource:
    """A BatchSource over the feature file's arrays, held whole on the training device; a batch is a
    gather from them."""

    image: torch.Tensor  # (N, Di) float32, deterministic view
    text: torch.Tensor  # (N, Dt) float32
    labels: torch.Tensor  # (N,) int64
    train_idx: torch.Tensor  # (Ntr,) int64
    val_idx: torch.Tensor  # (Nva,) int64
    class_dist: torch.Tensor | None  # (C, C) float32
    view_emb: torch.Tensor | None  # (M, K, Di) float32 augmented views of train items
    view_row: torch.Tensor | None  # (N,) int64 row of view_emb per item, -1 if none

    @classmethod
    def from_features(cls, fs: FeatureSet, cfg: TrainConfig, device: torch.device) -> ResidentSource:
        """The items of `fs` (and, with cfg.use_views, the train items' augmented views) on `device`;
        refuses a file without train or val items or with non-finite features."""
        train_idx, val_idx = fs.indices("train"), fs.indices("val")
        if len(train_idx) == 0:
            raise HuseError(f"{fs.path} has no train items; stage two needs a train split")
        if len(val_idx) == 0:
            raise HuseError(f"{fs.path} has no val items; stage two selects the best epoch on the val split")
        for name, arr in (("image", fs.image_emb), ("text", fs.text_emb)):
            bad = int((~np.isfinite(arr)).sum())
            if bad:
                raise HuseError(f"{fs.path} holds {bad} non-finite {name} feature values; "
                                "re-run `huse extract-features`")
        view_emb = view_row = None
        if cfg.use_views and fs.view_emb is not None and fs.view_emb.shape[1] > 0:
            view_emb = torch.as_tensor(fs.view_emb, dtype=torch.float32, device=device)
            row = np.full(len(fs.labels), -1, dtype=np.int64)
            row[fs.view_item] = np.arange(len(fs.view_item))
            view_row = torch.as_tensor(row, device=device)
        as_long = dict(dtype=torch.int64, device=device)
        as_float = dict(dtype=torch.float32, device=device)
        return cls(
            image=torch.as_tensor(fs.image_emb, **as_float),
            text=torch.as_tensor(fs.text_emb, **as_float),
            labels=torch.as_tensor(fs.labels, **as_long),
            train_idx=torch.as_tensor(train_idx, **as_long),
            val_idx=torch.as_tensor(val_idx, **as_long),
            class_dist=None if fs.class_dist is None else torch.as_tensor(fs.class_dist, **as_float),
            view_emb=view_emb,
            view_row=view_row,
        )

    @property
    def n_train(self) -> int:
        return len(self.train_idx)

    @property
    def image_dim(self) -> int:
        return self.image.shape[1]

    @property
    def text_dim(self) -> int:
        return self.text.shape[1]

    def train_batches(self, batch_size: int, gen: torch.Generator) -> Iterator[Batch]:
        n_train = self.n_train
        # the whole epoch's order and views are drawn now, before any batch is read
        perm = self.train_idx[torch.randperm(n_train, generator=gen, device=gen.device)]  # (Ntr,) item indices
        choice = (None if self.view_emb is None else  # (Ntr,) 0 = deterministic view, k = augmented view k
                  torch.randint(0, self.view_emb.shape[1] + 1, (n_train,), generator=gen, device=gen.device))
        return (self.batch(perm[start:start + batch_size], None if choice is None else choice[start:start + batch_size])
                for start in range(0, n_train, batch_size))

    def val_batches(self, batch_size: int) -> Iterator[Batch]:
        return (self.batch(self.val_idx[start:start + batch_size]) for start in range(0, len(self.val_idx), batch_size))

    def input_stats(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        stats = {}
        for name, feats in (("image", self.image), ("text", self.text)):
            x = feats[self.train_idx].double()  # (Ntr, D)
            stats[name] = (x.mean(0).float(), x.std(0).float())
        return stats

    def batch(self, idx: torch.Tensor, choice: torch.Tensor | None = None) -> Batch:
        """(b,) item indices and their view choices (None: deterministic view) -> their Batch."""
        return Batch(self.image_batch(idx, choice), self.text[idx], self.labels[idx])

    def image_batch(self, idx: torch.Tensor, choice: torch.Tensor | None) -> torch.Tensor:
        """(b,) item indices and (b,) view choices (0 = deterministic view, k = augmented view k)
        -> (b, Di) image features."""
        feats = self.image[idx]  # (b, Di)
        if self.view_emb is None or choice is None:
            return feats
        row = self.view_row[idx]  # (b,)
        use = (choice > 0) & (row >= 0)
        augmented = self.view_emb[row.clamp_min(0), (choice - 1).clamp_min(0)]  # (b, Di)
        return torch.where(use[:, None], augmented, feats)
