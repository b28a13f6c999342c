"""Using the universal space: FAISS indexes over the embeddings of a trained run (`huse index`), search
(`huse search`), class-path prediction for new products (`huse predict`), catalogue clean-up
(`huse audit`) and the Python API `Space` (README, "Using the space")."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from huse_pipeline.search.space import Hit, Prediction, Space

__all__ = ["Hit", "Prediction", "Space"]


def __getattr__(name: str) -> Any:
    # lazy, so that `search.vectors` (faiss only) imports without torch
    if name in __all__:
        from huse_pipeline.search import space

        return getattr(space, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
