"""Where stage two's batches come from: a batch source over the feature file's train and val items.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from huse_pipeline.errors import HuseError
from huse_pipeline.store.features import FeatureSet
from huse_pipeline.train.config import TrainConfig


@dataclass
class _DeviceData:
    """The feature file's arrays on the training device."""

    image: torch.Tensor  # (N, Di) float32, deterministic view
    text: torch.Tensor  # (N, Dt) float32
    labels: torch.Tensor  # (N,) int64
    train_idx: torch.Tensor  # (Ntr,) int64
    val_idx: torch.Tensor  # (Nva,) int64
    class_dist: torch.Tensor | None  # (C, C) float32
    view_emb: torch.Tensor | None  # (M, K, Di) float32 augmented views of train items
    view_row: torch.Tensor | None  # (N,) int64 row of view_emb per item, -1 if none

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


def _to_device(fs: FeatureSet, cfg: TrainConfig, device: torch.device) -> _DeviceData:
    train_idx, val_idx = fs.indices("train"), fs.indices("val")
    if len(train_idx) == 0:
        raise HuseError(f"{fs.path} has no train items; stage two needs a train split")
    if len(val_idx) == 0:
        raise HuseError(f"{fs.path} has no val items; stage two selects the best epoch on the val split")
    for name, arr in (("image", fs.image_emb), ("text", fs.text_emb)):
        bad = int((~np.isfinite(arr)).sum())
        if bad:
            raise HuseError(f"{fs.path} holds {bad} non-finite {name} feature values; re-run `huse extract-features`")
    if fs.class_dist is None and cfg.modality == "both" and cfg.beta > 0:
        raise HuseError(f"{fs.path} has no semantic graph: run `huse build-graph --features {fs.path}` first")
    view_emb = view_row = None
    if cfg.use_views and fs.view_emb is not None and fs.view_emb.shape[1] > 0:
        view_emb = torch.as_tensor(fs.view_emb, dtype=torch.float32, device=device)
        row = np.full(len(fs.labels), -1, dtype=np.int64)
        row[fs.view_item] = np.arange(len(fs.view_item))
        view_row = torch.as_tensor(row, device=device)
    as_long = dict(dtype=torch.int64, device=device)
    return _DeviceData(
        image=torch.as_tensor(fs.image_emb, dtype=torch.float32, device=device),
        text=torch.as_tensor(fs.text_emb, dtype=torch.float32, device=device),
        labels=torch.as_tensor(fs.labels, **as_long),
        train_idx=torch.as_tensor(train_idx, **as_long),
        val_idx=torch.as_tensor(val_idx, **as_long),
        class_dist=None if fs.class_dist is None else torch.as_tensor(fs.class_dist, dtype=torch.float32, device=device),
        view_emb=view_emb,
        view_row=view_row,
    )


