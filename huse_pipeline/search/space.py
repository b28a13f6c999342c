"""The Python API of the universal space: `Space` is a trained run ready to use — its model, the
featurizer that made its feature file (the same preprocessing and frozen encoders, loaded on first
use) and its index. Encode texts and images, search ("images for this text", "more like this") and
predict class paths::

    from huse_pipeline.search import Space

    space = Space.load()                                   # the latest run, its feature file and index
    hits = space.search_text("red cotton t-shirt", k=5)    # images for this text
    similar = space.search_item(hits[0].id, k=5)           # products like that one
    pred = space.predict(texts=["blue denim jeans"], images=["photo.jpg"])[0]
    pred.fused[0]                                          # ('apparel<bottomwear<jeans', 0.97)
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from huse_pipeline.errors import HuseError
from huse_pipeline.measures import metrics
from huse_pipeline.search.index import CatalogueIndex, embed_features, load_index, resolve_run
from huse_pipeline.settings import DEFAULT_RUNS_DIR
from huse_pipeline.store import features
from huse_pipeline.train.model import HuseModel, check_compatible, load_checkpoint, model_from_checkpoint
from huse_pipeline.utils import resolve_device

if TYPE_CHECKING:
    from huse_pipeline.encoders.featurizer import Featurizer

log = logging.getLogger(__name__)

TARGETS = ("image", "text")


@dataclass
class Hit:
    """One search result: the item's id (its catalogue row), cosine score, class path, title and image."""

    rank: int
    id: int
    score: float
    class_path: str
    title: str
    image_path: str  # absolute: the feature file's image root joined with the catalogue's path
    split: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Prediction:
    """Top-k (class path, probability) per modality and fused; a modality whose input is unusable has
    None and says why in `reason` ("" when both were usable)."""

    image: list[tuple[str, float]] | None
    text: list[tuple[str, float]] | None
    fused: list[tuple[str, float]] | None
    reason: str = ""


@dataclass
class Space:
    """A trained run over its feature file, with its index if one has been built (`huse index`)."""

    model: HuseModel
    class_names: list[str]
    checkpoint: Path
    run_dir: Path | None
    features_path: Path
    feature_attrs: dict[str, Any]
    device: torch.device
    fusion_weight: float
    fusion_weight_source: str
    index: CatalogueIndex | None = None
    train_config: dict[str, Any] | None = None  # the run's TrainConfig as saved in its checkpoint
    _featurizer: Featurizer | None = field(default=None, repr=False)

    # ------------------------------------------------------------------------ loading

    @classmethod
    def load(cls, run: str | Path | None = None, features_path: str | Path | None = None,
             index: str | Path | bool | None = True, device: str = "auto", runs_dir: str = DEFAULT_RUNS_DIR,
             fusion_weight: float | None = None) -> Space:
        """Load a run (default: the latest under `runs_dir`) with its feature file (default: the one it
        was trained on) and its index (`True`: `<run>/index`, required; `None`: that folder if it
        exists; `False`: none; or a folder). An index built from another run or feature file is refused."""
        ckpt_path, run_dir, feats = resolve_run(None if run is None else str(run), runs_dir,
                                                None if features_path is None else str(features_path))
        ckpt = load_checkpoint(ckpt_path)
        attrs = features.read_attrs(feats)
        class_names = features.read_class_names(feats)
        check_compatible(ckpt, attrs, class_names, feats)
        dev = resolve_device(device)
        model = model_from_checkpoint(ckpt, dev)
        default_folder = (run_dir or ckpt_path.parent) / "index"
        loaded = None
        if index is True or (index is None and default_folder.is_dir()):
            loaded = load_index(default_folder, ckpt_path, feats)
        elif index not in (None, False):
            loaded = load_index(Path(index), ckpt_path, feats)
        space = cls(model, class_names, ckpt_path, run_dir, Path(feats), attrs, dev, 0.5, "", loaded,
                    ckpt.get("train_config"))
        space.fusion_weight, space.fusion_weight_source = space._resolve_fusion_weight(fusion_weight)
        return space

    def _resolve_fusion_weight(self, given: float | None) -> tuple[float, str]:
        """Given > what `huse eval` reported for this checkpoint and feature file (tuned on val) > the
        index's (tuned on val when it was built) > tuned on the val split now > 0.5 without a val split."""
        if given is not None:
            if not 0 <= given <= 1:
                raise HuseError(f"the fusion weight must be in [0, 1], not {given}")
            return float(given), "given"
        if self.run_dir is not None:
            for name in ("eval_test.json", "eval_val.json"):
                try:
                    m = json.loads((self.run_dir / name).read_text())
                except (OSError, ValueError):
                    continue
                same = (Path(str(m.get("meta/checkpoint", ""))) == self.checkpoint.resolve()
                        and Path(str(m.get("meta/features", ""))) == self.features_path.resolve())
                if same and isinstance(m.get("fusion_weight"), (int, float)):
                    return float(m["fusion_weight"]), f"huse eval ({name}: {m.get('meta/fusion_weight_source')})"
        if self.index is not None and "fusion_weight" in self.index.meta:
            return float(self.index.meta["fusion_weight"]), f"the index ({self.index.meta.get('fusion_weight_source')})"
        return self._tune_fusion_weight()

    def _tune_fusion_weight(self, block_rows: int = 16384) -> tuple[float, str]:
        probs: dict[str, list[np.ndarray]] = {m: [] for m in TARGETS}
        labels = []
        for _, block in features.iter_item_blocks(self.features_path, ("image_emb", "text_emb", "label", "split"),
                                                  block_rows):
            val = np.asarray(block["split"]) == "val"
            if not val.any():
                continue
            for m in TARGETS:
                probs[m].append(embed_features(self.model, block[f"{m}_emb"][val], m, self.device)[1])
            labels.append(block["label"][val])
        if not labels:
            return 0.5, "default 0.5 (no val split)"
        w = metrics.tune_fusion_weight(*(torch.from_numpy(np.concatenate(probs[m])) for m in TARGETS),
                                       torch.from_numpy(np.concatenate(labels)))
        return w, "tuned on the val split, as huse eval does"

    @property
    def featurizer(self) -> Featurizer:
        """The frozen encoders and preprocessing recorded in the feature file (loaded on first use)."""
        if self._featurizer is None:
            from huse_pipeline.encoders.featurizer import Featurizer

            self._featurizer = Featurizer.from_feature_file(self.features_path, self.device)
            if (self._featurizer.image_dim, self._featurizer.text_dim) != (self.model.cfg.image_dim, self.model.cfg.text_dim):
                raise HuseError(f"the encoders rebuilt from {self.features_path} give {self._featurizer.image_dim}/"
                                f"{self._featurizer.text_dim}-d features, the model reads {self.model.cfg.image_dim}/"
                                f"{self.model.cfg.text_dim}")
        return self._featurizer

    def _index(self) -> CatalogueIndex:
        if self.index is None:
            run = self.run_dir or self.checkpoint.parent
            raise HuseError(f"no index for {run}: build it with `huse index --run {run}`")
        return self.index

    # ----------------------------------------------------------------------- encoding

    def embed_features(self, feats: np.ndarray, modality: str) -> np.ndarray:
        """Frozen features (B, Df) of `modality` -> (B, D) universal embeddings, unit norm."""
        return embed_features(self.model, np.atleast_2d(feats), modality, self.device)[0]

    def encode_texts(self, texts: Sequence[str]) -> tuple[np.ndarray, list[str]]:
        """Texts -> (B, D) universal embeddings (zeros where unusable) and one reason per text ("" usable),
        through the feature file's cleaning, TF-IDF reduction and text encoder, then the text tower."""
        feats, reasons = self.featurizer.encode_texts(list(texts))
        return self._embed_usable(feats, reasons, "text"), reasons

    def encode_images(self, images: Sequence[Any]) -> tuple[np.ndarray, list[str]]:
        """Image paths or PIL images -> (B, D) universal embeddings (zeros where unusable) and reasons,
        through the feature file's decoding, fit and image encoder (deterministic view), then the image tower."""
        feats, reasons = self.featurizer.encode_images(list(images))
        return self._embed_usable(feats, reasons, "image"), reasons

    def _embed_usable(self, feats: np.ndarray, reasons: list[str], modality: str) -> np.ndarray:
        out = np.zeros((len(reasons), self.model.cfg.embed_dim), np.float32)
        ok = [i for i, r in enumerate(reasons) if not r]
        if ok:
            out[ok] = self.embed_features(feats[ok], modality)
        return out

    def class_probabilities(self, emb: np.ndarray) -> np.ndarray:
        """(B, D) universal embeddings of either modality -> (B, C) softmax of the shared classifier."""
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(np.atleast_2d(emb), dtype=np.float32)).to(self.device)
            return self.model.classify(x).float().softmax(dim=1).cpu().numpy()

    # ------------------------------------------------------------------------- search

    def search(self, queries: np.ndarray, k: int = 10, target: str = "image", category: str | None = None,
               exclude_ids: Sequence[int] | None = None) -> list[list[Hit]]:
        """Universal embeddings (Q, D) -> per query the top-k items of `target` (image or text) by
        cosine, optionally only those whose class path starts with `category`; `exclude_ids` (one id
        per query, the query item itself) are left out."""
        index = self._index()
        if k < 1:
            raise HuseError("k must be at least 1")
        exclude = None if exclude_ids is None else np.asarray([index.position(i) for i in exclude_ids])
        scores, rows = index.search(np.atleast_2d(queries), k, target, category, exclude)
        return [self._hits(s, r) for s, r in zip(scores, rows)]

    def _hits(self, scores: np.ndarray, rows: np.ndarray) -> list[Hit]:
        index = self._index()
        root = Path(index.meta.get("image_root", "."))
        col = {name: index.column(name) for name in ("id", "class_path", "title", "image_path", "split")}
        hits = []
        for rank, (score, row) in enumerate(zip(scores.tolist(), rows.tolist()), start=1):
            if row < 0:
                break
            hits.append(Hit(rank, int(col["id"][row]), round(float(score), 6), str(col["class_path"][row]),
                            str(col["title"][row]), str(root / str(col["image_path"][row])), str(col["split"][row])))
        return hits

    def search_text(self, text: str, k: int = 10, target: str = "image", category: str | None = None) -> list[Hit]:
        """Items whose `target` embedding is closest to the text's ("images for this text" by default)."""
        emb, reasons = self.encode_texts([text])
        if reasons[0]:
            raise HuseError(f"the query text is unusable: {reasons[0]}")
        return self.search(emb, k, target, category)[0]

    def search_image(self, image: Any, k: int = 10, target: str = "image", category: str | None = None) -> list[Hit]:
        """Items closest to an image (a path or a PIL image)."""
        emb, reasons = self.encode_images([image])
        if reasons[0]:
            raise HuseError(f"the query image {image if isinstance(image, (str, Path)) else ''} is unusable: {reasons[0]}")
        return self.search(emb, k, target, category)[0]

    def search_item(self, item_id: int, k: int = 10, target: str = "image", category: str | None = None) -> list[Hit]:
        """"More like this": the items closest to item `item_id` (its catalogue row) in `target`'s
        embeddings, using the item's own stored `target` embedding; the item itself is left out."""
        index = self._index()
        query = np.asarray(index.vectors(target)[index.position(item_id)])[None, :]
        return self.search(query, k, target, category, exclude_ids=[item_id])[0]

    # ------------------------------------------------------------------------ predict

    def top_classes(self, prob: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """(B, C) probabilities -> per row the k most probable (class path, probability), ties by lower class."""
        k = min(k, prob.shape[1])
        order = np.argsort(-prob, axis=1, kind="stable")[:, :k]
        return [[(self.class_names[c], float(p[c])) for c in row] for p, row in zip(prob, order)]

    def predict_features(self, image_feats: np.ndarray | None, text_feats: np.ndarray | None,
                         image_ok: Sequence[bool] | None = None, text_ok: Sequence[bool] | None = None
                         ) -> dict[str, np.ndarray | None]:
        """Frozen features -> {"image", "text", "fused"}: (B, C) probabilities (rows of unusable inputs NaN)."""
        out: dict[str, np.ndarray | None] = {}
        n = len(image_feats) if image_feats is not None else len(text_feats)
        for m, feats, ok in (("image", image_feats, image_ok), ("text", text_feats, text_ok)):
            if feats is None:
                out[m] = None
                continue
            ok = np.ones(n, bool) if ok is None else np.asarray(ok, bool)
            prob = np.full((n, len(self.class_names)), np.nan, np.float32)
            if ok.any():
                prob[ok] = embed_features(self.model, feats[ok], m, self.device)[1]
            out[m] = prob
        if out["image"] is not None and out["text"] is not None:
            w = self.fusion_weight
            out["fused"] = w * out["image"] + (1 - w) * out["text"]  # NaN where either is unusable
        else:
            out["fused"] = None
        return out

    def predict(self, texts: Sequence[str] | None = None, images: Sequence[Any] | None = None,
                k: int = 3) -> list[Prediction]:
        """Top-k class paths with probabilities from the image, the text and fused (w = `fusion_weight`)
        for B items given as texts and/or images (paths or PIL images) of equal length."""
        if texts is None and images is None:
            raise HuseError("predict needs texts, images or both")
        n = len(texts) if texts is not None else len(images)
        if texts is not None and images is not None and len(images) != n:
            raise HuseError(f"{len(texts)} texts but {len(images)} images")
        reasons = [[] for _ in range(n)]
        feats: dict[str, np.ndarray | None] = {"image": None, "text": None}
        ok: dict[str, np.ndarray | None] = {"image": None, "text": None}
        for m, inputs in (("text", texts), ("image", images)):
            if inputs is None:
                continue
            f, why = (self.featurizer.encode_texts(list(inputs)) if m == "text"
                      else self.featurizer.encode_images(list(inputs)))
            feats[m], ok[m] = f, np.asarray([not r for r in why])
            for i, r in enumerate(why):
                if r:
                    reasons[i].append(f"{m}: {r}")
        prob = self.predict_features(feats["image"], feats["text"], ok["image"], ok["text"])
        tops = {m: None if p is None else self.top_classes(np.nan_to_num(p, nan=0.0), k) for m, p in prob.items()}
        out = []
        for i in range(n):
            row = {m: (tops[m][i] if tops[m] is not None and not np.isnan(prob[m][i]).any() else None)
                   for m in ("image", "text", "fused")}
            out.append(Prediction(row["image"], row["text"], row["fused"], "; ".join(reasons[i])))
        return out
