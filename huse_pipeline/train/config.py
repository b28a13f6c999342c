"""Stage two's settings (paper §4.1.3): `TrainConfig`, the optimiser presets and how a saved run's
configuration is read back.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huse_pipeline.errors import HuseError
from huse_pipeline.settings import DEFAULT_RUNS_DIR
from huse_pipeline.train import losses
from huse_pipeline.train.losses import GRAPH_PAIRS, INSTANCE_LOSSES, MARGIN_RULES
from huse_pipeline.train.model import ModelConfig, TowerSettings
from huse_pipeline.utils import added_later, fields_added_later

log = logging.getLogger(__name__)


MODALITIES = ("both", "image", "text")
OPTIMIZERS = ("adamw", "rmsprop", "sgd")
SCHEDULES = ("cosine", "constant")
INPUT_NORMS = ("standardize", "none")
DATA_MODES = ("auto", "resident", "stream")  # where the training items live (train/batches.py)
# selection metric -> direction (+1: higher is better)
SELECT_METRICS = {"val/acc/mean": 1, "val/acc/fused": 1, "val/acc/image": 1, "val/acc/text": 1, "val/loss": -1}
# what --resume may change; everything else must match the interrupted run
RESUME_MAY_CHANGE = ("epochs", "steps", "patience", "eval_every", "device", "amp", "data", "stream_buffer_mb",
                     "stream_block_rows", "val_sample")
RUNS_ROOT = Path(DEFAULT_RUNS_DIR)

# Optimiser presets. "paper": §4.1.3 (RMSProp, lr 1.6192e-5, momentum 0.9, batch 1024, no schedule
# given; the paper ran 250,000 steps: --steps 250000). "default": AdamW with a cosine schedule that
# converges in a few CPU minutes on ~10k items; its batch of 256 was chosen on val (BENCHMARKS.md, round 4).
PRESETS: dict[str, dict[str, Any]] = {
    "default": dict(optimizer="adamw", lr=3e-3, weight_decay=1e-4, momentum=0.9, batch_size=256, epochs=60,
                    steps=None, schedule="cosine"),
    "paper": dict(optimizer="rmsprop", lr=1.6192e-5, weight_decay=0.0, momentum=0.9, batch_size=1024, epochs=100,
                  steps=None, schedule="constant"),
}


@dataclass(frozen=True)
class TrainConfig(TowerSettings):
    """Everything stage two needs besides the feature file; `asdict` (flat: the tower settings it
    inherits, then its own fields) goes into every artefact."""

    modality: str = "both"  # both | image | text (one tower + its classifier, classification loss only)
    preset: str = "default"  # which preset the optimiser fields came from (for the record)
    # optimiser (defaults = the "default" preset)
    optimizer: str = "adamw"  # adamw | rmsprop | sgd
    lr: float = 3e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9  # rmsprop and sgd
    batch_size: int = 256
    epochs: int = 60
    steps: int | None = None  # total optimiser steps; when set it overrides epochs (last epoch may be partial)
    schedule: str = "cosine"  # cosine (to zero over the run) | constant
    # loss (Eq. 5); chosen on the validation split of the real catalogue (BENCHMARKS.md, "sweep")
    alpha: float = losses.DEFAULT_ALPHA
    beta: float = losses.DEFAULT_BETA
    gamma: float = losses.DEFAULT_GAMMA
    zeta: float = losses.DEFAULT_MARGIN  # margin of the graph loss, on cosine distances
    margin_rule: str = losses.DEFAULT_MARGIN_RULE  # and (Eq. 10 as printed) | or
    graph_pairs: str = losses.DEFAULT_GRAPH_PAIRS  # all | cross | within (see losses.graph_loss)
    # the instance-level term (not in the paper; losses.instance_loss), chosen on val (BENCHMARKS.md, round 8);
    # delta 0 is the paper's loss, and runs saved before the field existed trained without it
    delta: float = added_later(losses.DEFAULT_DELTA, before=0.0)
    instance_loss: str = losses.DEFAULT_INSTANCE_LOSS  # infonce | hinge (VSE++ hardest negative)
    temperature: float = losses.DEFAULT_TEMPERATURE  # InfoNCE's fixed temperature
    instance_margin: float = losses.DEFAULT_INSTANCE_MARGIN  # the hinge's margin, on cosine similarities
    # model: embed_dim ... relu_before_norm are inherited from TowerSettings (paper §4.1.3). Training
    # overrides one default, the model's "off" for dropout on the image tower's standardised inputs
    # (not in the paper; 0.3 chosen on val); runs saved before the field existed had none
    image_input_dropout: float = added_later(0.3, before=0.0)
    input_norm: str = "standardize"  # standardize (train-split mean/std) | none
    use_views: bool = True  # draw a fresh image view per item per epoch when the file has augmented views
    # selection, stopping, runtime
    select: str = "val/acc/mean"  # single-modality runs always select on their own accuracy
    patience: int = 0  # evaluations without improvement before stopping; 0 = never stop early
    eval_every: int = 1  # validate (and write checkpoints) every this many epochs
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda[:N]
    amp: bool = True  # bf16 autocast of the towers on CUDA (losses stay float32); ignored on CPU
    # where the items live (train/batches.py): resident = all on the device; stream = shuffled blocks read
    # from the file in the background (memory set by the buffer, not by the file); auto = resident when the
    # arrays take under a quarter of the free memory. Each mode is deterministic under the seed, but the two
    # draw different orders, so a run's result depends on the mode it ran in.
    data: str = "auto"  # auto | resident | stream
    stream_buffer_mb: int = 1024  # stream: memory of the shuffle buffer (a window of blocks, and the next read ahead)
    stream_block_rows: int = 1024  # stream: contiguous file rows read at a time, the unit that is shuffled
    val_sample: int = 0  # validate each epoch on a seeded class-stratified sample of this many val items (0: all)

    def __post_init__(self) -> None:
        choices = {"modality": MODALITIES, "preset": tuple(PRESETS), "optimizer": OPTIMIZERS, "schedule": SCHEDULES,
                   "margin_rule": MARGIN_RULES, "graph_pairs": GRAPH_PAIRS, "instance_loss": INSTANCE_LOSSES,
                   "input_norm": INPUT_NORMS,
                   "select": tuple(SELECT_METRICS), "data": DATA_MODES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise HuseError(f"{name} {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        positive = ("lr", "batch_size", "epochs", "embed_dim", "hidden_dim", "eval_every", "stream_buffer_mb",
                    "stream_block_rows", "temperature")
        for name in positive:
            if not getattr(self, name) > 0:
                raise HuseError(f"{name} must be positive, got {getattr(self, name)}")
        weights = {k: getattr(self, k) for k in ("alpha", "beta", "gamma", "delta", "zeta", "temperature",
                                                 "instance_margin", "lr", "weight_decay")}
        if not all(math.isfinite(v) for v in weights.values()):
            raise HuseError(f"loss weights, margin and optimiser settings must be finite numbers, got {weights}")
        if not 0 <= self.zeta <= 2:
            raise HuseError(f"zeta is a margin on cosine distances, which lie in [0, 2]; got {self.zeta}")
        if self.steps is not None and self.steps <= 0:
            raise HuseError(f"steps must be positive, got {self.steps}")
        if min(self.alpha, self.beta, self.gamma, self.delta, self.instance_margin, self.weight_decay, self.patience,
               self.image_layers, self.text_layers, self.val_sample) < 0 or not (0 <= self.dropout < 1 and
                                                                                0 <= self.image_input_dropout < 1):
            raise HuseError("alpha, beta, gamma, delta, instance_margin, weight_decay, patience, layer counts and "
                            "val_sample must be >= 0 and dropouts in [0, 1)")

    @classmethod
    def from_saved(cls, saved: dict[str, Any]) -> TrainConfig:
        """The TrainConfig of a saved run (config.json or a checkpoint's train_config); fields added
        after it was saved take the value they had before they existed (`utils.added_later`)."""
        return cls(**{**fields_added_later(cls), **saved})

    def model_config(self, image_dim: int, text_dim: int, num_classes: int) -> ModelConfig:
        """The ModelConfig of this run's towers for features of these sizes."""
        towers = {f.name: getattr(self, f.name) for f in dataclasses.fields(TowerSettings)}
        return ModelConfig(image_dim=image_dim, text_dim=text_dim, num_classes=num_classes, **towers)

    @property
    def select_key(self) -> str:
        """The validation metric that picks the best epoch."""
        if self.modality != "both" and self.select != "val/loss":
            return f"val/acc/{self.modality}"
        return self.select


def make_config(preset: str = "default", **overrides: Any) -> TrainConfig:
    """A TrainConfig from a preset, then the individual `overrides` (None means "keep")."""
    if preset not in PRESETS:
        raise HuseError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise HuseError(f"unknown training option(s): {', '.join(sorted(unknown))}")
    values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}, "preset": preset}
    return TrainConfig(**values)


