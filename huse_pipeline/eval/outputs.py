"""What `huse eval` is given (`EvalConfig`) and what it computes (`SplitOutputs`, `EvalResult`),
shared by the evaluation and its report."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from huse_pipeline.errors import HuseError
from huse_pipeline.measures.retrieval import DEFAULT_GALLERY_CHUNK, DEFAULT_QUERY_CHUNK
from huse_pipeline.settings import DEFAULT_RUNS_DIR


@dataclass(frozen=True)
class EvalConfig:
    run: str | None = None  # run folder (uses its best.pt); default: the latest run under runs_dir
    checkpoint: str | None = None  # or a checkpoint file
    features: str | None = None  # default: the file the run was trained on (its config.json), else cache/feats.h5
    other_features: bool = False  # allow a feature file other than the one the checkpoint was trained on
    split: str = "test"
    out: str | None = None  # default: <run>/eval_<split>.json
    baselines: bool = False  # also train the separate-model baselines and score raw features
    attributes: str | None = None  # attributes CSV (image, baseColour): adds the attr/* colour-and-class search
    report: str | None = None  # folder for the HTML report (index.html)
    device: str = "auto"
    runs_dir: str = DEFAULT_RUNS_DIR
    batch_size: int = 4096  # items per forward pass
    query_chunk: int = DEFAULT_QUERY_CHUNK  # retrieval block size: memory ~ query_chunk x gallery_chunk
    gallery_chunk: int = DEFAULT_GALLERY_CHUNK
    fusion_step: float = 0.05  # grid of the fusion weight
    report_map: str = "tsne"  # tsne | pca: the 2-D map of the universal space in the report
    report_max_items: int = 1000  # items drawn on the map (each gives an image and a text point)
    seed: int = 0  # sampling for the report
    # scale (issue 18): a split of millions of items in bounded memory
    data: str = "auto"  # resident: the split's outputs held | stream: the gallery re-read from the file in blocks | auto
    max_queries: int = 0  # queries per retrieval task: a seeded class-stratified sample of the split (0: every item)
    query_seed: int = 0  # the sample's seed
    map_cap: int = 1000  # MAP@R is MAP@min(R, map_cap): exact for classes of up to map_cap + 1 items
    similarity: str = "auto"  # float64 | float32 | auto (float32 beyond 2**28 query-gallery pairs)
    block_rows: int = 16384  # stream: split items read and embedded at a time (rounded to whole gallery chunks)

    def __post_init__(self) -> None:
        for name, allowed in (("data", ("auto", "resident", "stream")), ("similarity", ("auto", "float64", "float32"))):
            if getattr(self, name) not in allowed:
                raise HuseError(f"{name} {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if self.max_queries < 0 or self.map_cap < 1 or self.block_rows < 1:
            raise HuseError("max_queries must be >= 0, map_cap and block_rows >= 1")


@dataclass
class SplitOutputs:
    """Model outputs for the items of one split (torch tensors on the evaluation device)."""

    items: np.ndarray  # (N,) indices into the feature file
    labels: torch.Tensor  # (N,) int64
    image_emb: torch.Tensor  # (N, D) unit norm
    text_emb: torch.Tensor  # (N, D) unit norm
    image_prob: torch.Tensor  # (N, C) softmax of the image logits
    text_prob: torch.Tensor  # (N, C)


@dataclass
class EvalResult:
    """What `run_evaluation` computed: the flat metrics and what the report draws from."""

    metrics: dict[str, Any]
    outputs: SplitOutputs
    fusion_weight: float
    tree_dist: np.ndarray
    checkpoint: Path
    run_dir: Path | None
    out: Path
    extra: dict[str, Any] = field(default_factory=dict)


