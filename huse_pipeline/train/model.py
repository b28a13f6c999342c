"""The HUSE model (paper §3.2, §4.1.3): an image tower and a text tower into one L2-normalised
universal space, and ONE shared linear classifier applied separately to each modality's embedding.

Also the checkpoint contract: plain types only (`torch.load(..., weights_only=True)` works), with
what is needed to rebuild the model and to refuse a mismatched feature file.
"""
from __future__ import annotations

from dataclasses import KW_ONLY, asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from huse_pipeline.errors import HuseError
from huse_pipeline.utils import atomic_path

CHECKPOINT_FORMAT = "huse-checkpoint"
CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class TowerSettings:
    """The towers' shape and regularisation (paper §4.1.3): the part of ModelConfig that a training
    run chooses. Both ModelConfig and TrainConfig build on it, so each field is written once."""

    embed_dim: int = 512  # D, the universal space
    hidden_dim: int = 512
    image_layers: int = 5  # hidden layers of the image tower (paper: 5)
    text_layers: int = 2  # hidden layers of the text tower (paper: 2)
    dropout: float = 0.15
    # Dropout on the image tower's standardised input features (not in the paper, default off here;
    # TrainConfig's default is 0.3, chosen on val): a regulariser for wide frozen features, e.g.
    # several image encoders concatenated.
    image_input_dropout: float = 0.0
    # The paper does not say whether a ReLU precedes the L2 norm. We leave it out by default: a
    # ReLU there confines embeddings to the positive orthant, where cosine distances only span
    # [0, 1] and the semantic graph's targets lose room.
    relu_before_norm: bool = False


@dataclass(frozen=True)
class ModelConfig(TowerSettings):
    """Everything needed to rebuild a HuseModel: the tower settings and the data's sizes
    (`asdict` goes into the checkpoint; `ModelConfig(**ckpt["model_config"])` rebuilds it)."""

    _: KW_ONLY  # the sizes follow the defaulted tower settings, so they are keyword-only
    image_dim: int  # frozen image feature size (e.g. 1280 for EfficientNet-Lite)
    text_dim: int  # frozen text feature size (e.g. 384 for MiniLM)
    num_classes: int


class Tower(nn.Module):
    """Frozen features -> [input Dropout] -> `n_hidden` x (Linear, ReLU, Dropout) -> Linear -> L2 norm.

    The input is standardised with per-feature statistics held as buffers (identity until
    `set_input_stats` is called), so a checkpoint carries its own preprocessing.
    """

    def __init__(self, in_dim: int, hidden_dim: int, n_hidden: int, out_dim: int, dropout: float,
                 relu_before_norm: bool = False, input_dropout: float = 0.0) -> None:
        super().__init__()
        self.input_dropout = nn.Dropout(input_dropout)  # no parameters: checkpoint keys do not move
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(n_hidden):
            layers += [nn.Linear(width, hidden_dim), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden_dim
        self.hidden = nn.Sequential(*layers)
        self.projection = nn.Linear(width, out_dim)
        self.relu_before_norm = relu_before_norm
        self.register_buffer("input_mean", torch.zeros(in_dim))
        self.register_buffer("input_std", torch.ones(in_dim))

    def set_input_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.input_mean.copy_(mean)
        self.input_std.copy_(std.clamp_min(1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_dim) frozen features -> (B, out_dim), unit L2 norm."""
        z = self.projection(self.hidden(self.input_dropout((x - self.input_mean) / self.input_std)))
        if self.relu_before_norm:
            z = F.relu(z)
        return F.normalize(z, dim=-1)


class HuseModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.image_tower = Tower(cfg.image_dim, cfg.hidden_dim, cfg.image_layers, cfg.embed_dim, cfg.dropout,
                                 cfg.relu_before_norm, cfg.image_input_dropout)
        self.text_tower = Tower(cfg.text_dim, cfg.hidden_dim, cfg.text_layers, cfg.embed_dim, cfg.dropout,
                                cfg.relu_before_norm)
        self.classifier = nn.Linear(cfg.embed_dim, cfg.num_classes)  # shared by both modalities

    def embed_image(self, image_feats: torch.Tensor) -> torch.Tensor:
        return self.image_tower(image_feats)  # (B, D)

    def embed_text(self, text_feats: torch.Tensor) -> torch.Tensor:
        return self.text_tower(text_feats)  # (B, D)

    def classify(self, emb: torch.Tensor) -> torch.Tensor:
        """(B, D) universal embeddings of either modality -> (B, C) logits."""
        return self.classifier(emb)

    def forward(self, image_feats: torch.Tensor, text_feats: torch.Tensor) -> dict[str, torch.Tensor]:
        image_emb = self.embed_image(image_feats)
        text_emb = self.embed_text(text_feats)
        return {
            "image_emb": image_emb,  # (B, D)
            "text_emb": text_emb,  # (B, D)
            "image_logits": self.classify(image_emb),  # (B, C)
            "text_logits": self.classify(text_emb),  # (B, C)
        }


# ------------------------------------------------------------------------------ checkpoints


def save_checkpoint(path: str | Path, model: HuseModel, class_names: list[str], feature_meta: dict[str, Any],
                    **extra: Any) -> None:
    """Write a checkpoint atomically. `extra` (train config, epoch, metrics, optimiser and RNG
    state, ...) must hold plain types and tensors only."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model_config": asdict(model.cfg),
        "model_state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "class_names": list(class_names),
        "feature_meta": dict(feature_meta),
        **extra,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint with `weights_only=True`; clear errors for missing or foreign files."""
    path = Path(path)
    if not path.is_file():
        raise HuseError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise HuseError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise HuseError(f"{path} is not a huse checkpoint")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise HuseError(f"{path} has checkpoint version {ckpt.get('version')}; this huse-pipeline reads {CHECKPOINT_VERSION}")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any], device: torch.device | str = "cpu") -> HuseModel:
    model = HuseModel(ModelConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model_state"])
    return model.to(device).eval()


FEATURE_META_KEYS = ("image_encoder", "image_dim", "text_encoder", "text_dim")


def feature_meta(attrs: dict[str, Any]) -> dict[str, Any]:
    """The part of a feature file's attributes a checkpoint must agree with."""
    return {k: attrs.get(k) for k in FEATURE_META_KEYS}


def check_compatible(ckpt: dict[str, Any], attrs: dict[str, Any], class_names: list[str], features_path: str) -> None:
    """Refuse a feature file whose classes or encoders differ from the checkpoint's, saying which."""
    problems = []
    for key in FEATURE_META_KEYS:
        if ckpt["feature_meta"].get(key) != attrs.get(key):
            problems.append(f"{key}: checkpoint {ckpt['feature_meta'].get(key)!r} vs features {attrs.get(key)!r}")
    if list(ckpt["class_names"]) != list(class_names):
        a, b = set(ckpt["class_names"]), set(class_names)
        detail = f"{len(a)} vs {len(b)} classes"
        if a - b:
            detail += f"; only in the checkpoint: {sorted(a - b)[:3]}"
        if b - a:
            detail += f"; only in the features: {sorted(b - a)[:3]}"
        if a == b:
            detail += "; same names in a different order"
        problems.append(f"classes differ ({detail})")
    if problems:
        raise HuseError(f"the checkpoint does not match {features_path}: " + "; ".join(problems))
