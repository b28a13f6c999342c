"""The HUSE model (paper §3.2, §4.1.3): an image tower and a text tower into one L2-normalised
universal space, and ONE shared linear classifier applied separately to each modality's embedding.

Also the checkpoint contract: plain types only (`torch.load(..., weights_only=True)` works), with
what is needed to rebuild the model and to refuse a mismatched feature file. A checkpoint is
checked (keys, types, sizes, every tensor's shape against its model_config) before any model is
built, so a malformed or hostile file is one line naming it, never a traceback or a huge allocation.
"""
from __future__ import annotations

import dataclasses
import math
import pickle
from dataclasses import KW_ONLY, asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from huse_pipeline.errors import HuseError
from huse_pipeline.utils import atomic_path, is_disk_full

CHECKPOINT_FORMAT = "huse-checkpoint"
CHECKPOINT_VERSION = 1
# sizes a checkpoint may declare (checked before a model is built): far above any real run, far
# below what would exhaust memory
MAX_WIDTH = 65_536  # embed_dim, hidden_dim
MAX_FEATURE_DIM = 1_048_576  # image_dim, text_dim
MAX_CLASSES = 1_000_000
MAX_LAYERS = 64


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
    state, ...) must hold plain types and tensors only. A failed write (a full disk) leaves the
    previous file as it was and is a HuseError naming the file."""
    path = Path(path)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model_config": asdict(model.cfg),
        "model_state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "class_names": list(class_names),
        "feature_meta": dict(feature_meta),
        **extra,
    }
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:  # through a Python file, a write error is an OSError with its errno
                torch.save(payload, fh)
    except (OSError, RuntimeError) as exc:  # RuntimeError: torch's own writer ("file write failed")
        why = "the disk is full" if is_disk_full(exc) else getattr(exc, "strerror", None) or str(exc).splitlines()[0]
        kept = f"the previous {path.name} is kept as it was" if path.is_file() else "nothing was written"
        raise HuseError(f"cannot write checkpoint {path}: {why}; {kept}. Free some space (or fix the folder) "
                        "and run the command again.") from exc


def load_checkpoint(path: str | Path, *, resumable: bool = False) -> dict[str, Any]:
    """Load a checkpoint with `weights_only=True` and check it (`check_checkpoint`); one-line
    errors for missing, foreign, malformed or unsafe files. `resumable`: it must also hold the
    training state that `huse train --resume` restores (last.pt)."""
    path = Path(path)
    if not path.is_file():
        raise HuseError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if isinstance(exc, pickle.UnpicklingError) or "weights only load failed" in str(exc).lower():
            # torch's message suggests turning the protection off: never pass that on
            raise HuseError(f"checkpoint {path} is refused for safety: it holds Python objects other than plain data "
                            "(tensors, numbers, strings, lists, dicts), and loading those can run code. Checkpoints "
                            "written by `huse train` hold plain data only.") from None
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise HuseError(f"cannot read checkpoint {path}: not a complete torch checkpoint file ({first})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise HuseError(f"{path} is not a huse checkpoint")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise HuseError(f"{path} has checkpoint version {ckpt.get('version')}; this huse-pipeline reads {CHECKPOINT_VERSION}")
    check_checkpoint(ckpt, str(path), resumable=resumable)
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any], device: torch.device | str = "cpu") -> HuseModel:
    """Rebuild the model of a checkpoint (checked first: nothing is allocated for a malformed one)."""
    cfg = _checked_model_config(ckpt, "the checkpoint")
    _check_state(ckpt.get("model_state"), cfg, "the checkpoint")
    model = HuseModel(cfg)
    model.load_state_dict(ckpt["model_state"])
    return model.to(device).eval()


# ------------------------------------------------------------------------ checking a checkpoint


def expected_state_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The `state_dict` keys of `HuseModel(cfg)` and each tensor's shape, computed without building it."""
    shapes: dict[str, tuple[int, ...]] = {}
    for tower, in_dim, layers in (("image_tower", cfg.image_dim, cfg.image_layers),
                                  ("text_tower", cfg.text_dim, cfg.text_layers)):
        shapes[f"{tower}.input_mean"] = shapes[f"{tower}.input_std"] = (in_dim,)
        width = in_dim
        for i in range(layers):  # hidden = [Linear, ReLU, Dropout] * layers
            shapes[f"{tower}.hidden.{3 * i}.weight"] = (cfg.hidden_dim, width)
            shapes[f"{tower}.hidden.{3 * i}.bias"] = (cfg.hidden_dim,)
            width = cfg.hidden_dim
        shapes[f"{tower}.projection.weight"], shapes[f"{tower}.projection.bias"] = (cfg.embed_dim, width), (cfg.embed_dim,)
    shapes["classifier.weight"], shapes["classifier.bias"] = (cfg.num_classes, cfg.embed_dim), (cfg.num_classes,)
    return shapes


_INT_LIMITS = {"embed_dim": (1, MAX_WIDTH), "hidden_dim": (1, MAX_WIDTH), "image_layers": (0, MAX_LAYERS),
               "text_layers": (0, MAX_LAYERS), "image_dim": (1, MAX_FEATURE_DIM), "text_dim": (1, MAX_FEATURE_DIM),
               "num_classes": (1, MAX_CLASSES)}


def _checked_model_config(ckpt: dict[str, Any], where: str) -> ModelConfig:
    """The checkpoint's ModelConfig, every field checked for its type and a sane size first."""
    raw = ckpt.get("model_config")
    if not isinstance(raw, dict):
        raise HuseError(f"{where} has no model_config: it is not a complete huse checkpoint")
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(raw) - set(fields))
    missing = [name for name, f in fields.items() if name not in raw and f.default is dataclasses.MISSING]
    if unknown or missing:
        detail = "; ".join(x for x in (f"unknown keys {', '.join(map(str, unknown[:5]))}" if unknown else "",
                                       f"missing {', '.join(missing)}" if missing else "") if x)
        raise HuseError(f"{where} has a malformed model_config ({detail})")
    for name, value in raw.items():
        if name in _INT_LIMITS:
            lo, hi = _INT_LIMITS[name]
            if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
                raise HuseError(f"{where} has model_config {name} = {value!r}: expected a whole number in [{lo}, {hi:,}]")
        elif name == "relu_before_norm":
            if not isinstance(value, bool):
                raise HuseError(f"{where} has model_config {name} = {value!r}: expected true or false")
        elif not isinstance(value, (int, float)) or isinstance(value, bool) or not (math.isfinite(value) and 0 <= value < 1):
            raise HuseError(f"{where} has model_config {name} = {value!r}: expected a dropout rate in [0, 1)")
    return ModelConfig(**raw)


def _check_state(state: Any, cfg: ModelConfig, where: str, finite: bool = False) -> None:
    """The state's keys and tensor shapes are exactly those of HuseModel(cfg) (and, with `finite`,
    every value is finite)."""
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise HuseError(f"{where} has no model_state of named tensors: it is not a complete huse checkpoint")
    expected = expected_state_shapes(cfg)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} (expected {expected[k]})" for k in expected
             if k in state and tuple(state[k].shape) != expected[k]]
    problems = [f"{label} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                for label, keys in (("missing tensors", missing), ("unexpected tensors", unexpected),
                                    ("wrong shapes:", wrong)) if keys]
    if problems:
        raise HuseError(f"{where} does not match its model_config: {'; '.join(problems)}")
    not_float = [k for k, v in state.items() if not v.is_floating_point()]
    if not_float:
        raise HuseError(f"{where} holds non-float weights ({', '.join(not_float[:3])})")
    if finite:
        bad = [k for k, v in state.items() if not bool(torch.isfinite(v).all())]
        if bad:
            raise HuseError(f"{where} holds non-finite weights (NaN or infinity) in {', '.join(bad[:3])}")


# key -> (accepted types, what it is): ALWAYS_CHECKED when present, all with resumable (RESUME_KEYS present too)
_OPTIONAL_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "train_config": ((dict,), "a dict"), "epoch": ((int,), "a whole number"), "step": ((int,), "a whole number"),
    "metrics": ((dict,), "a dict"), "features_digest": ((str,), "a string"),
    "optimizer_state": ((dict,), "a dict"), "rng_state": ((dict,), "a dict"), "history": ((list,), "a list"),
    "best_value": ((int, float), "a number"), "best_epoch": ((int,), "a whole number"),
    "bad_evals": ((int,), "a whole number"),
}
ALWAYS_CHECKED = ("train_config", "epoch", "step", "metrics", "features_digest")  # read by eval and --resume
RESUME_KEYS = ("train_config", "epoch", "step", "features_digest", "optimizer_state", "rng_state", "history",
               "best_value", "best_epoch", "bad_evals")


def check_checkpoint(ckpt: dict[str, Any], path: str, resumable: bool = False) -> None:
    """Refuse a malformed checkpoint with one line naming `path`: missing or mistyped keys, a
    model_config with absurd sizes, tensors missing, unexpected or of the wrong shape, non-finite
    weights, class names that do not fit; with `resumable`, the training state --resume needs."""
    where = f"checkpoint {path}"
    cfg = _checked_model_config(ckpt, where)
    _check_state(ckpt.get("model_state"), cfg, where, finite=True)
    names = ckpt.get("class_names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise HuseError(f"{where} has no list of class names")
    if len(names) != cfg.num_classes or len(set(names)) != len(names):
        raise HuseError(f"{where} has {len(names)} class names ({len(set(names))} distinct) for num_classes "
                        f"{cfg.num_classes}")
    if not isinstance(ckpt.get("feature_meta"), dict):
        raise HuseError(f"{where} has no feature_meta (the encoders it was trained on)")
    for key in RESUME_KEYS if resumable else ():
        if key not in ckpt:
            raise HuseError(f"{where} lacks {key}: it is not a checkpoint `huse train --resume` can continue from "
                            "(that is last.pt)")
    for key, (types, what) in _OPTIONAL_KEYS.items():
        value = ckpt.get(key)
        if key in ckpt and (resumable or key in ALWAYS_CHECKED) and (not isinstance(value, types) or isinstance(value, bool)):
            raise HuseError(f"{where} has {key} of type {type(value).__name__}, expected {what}")
    if resumable:
        opt, rng = ckpt["optimizer_state"], ckpt["rng_state"]
        if not isinstance(opt.get("state"), dict) or not isinstance(opt.get("param_groups"), list):
            raise HuseError(f"{where} has a malformed optimizer_state (no state / param_groups)")
        if not all(isinstance(rng.get(k), torch.Tensor) for k in ("cpu", "data")):
            raise HuseError(f"{where} has a malformed rng_state (no cpu / data generator states)")
        if not all(isinstance(row, dict) for row in ckpt["history"]):
            raise HuseError(f"{where} has a malformed history (one dict per epoch expected)")


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
