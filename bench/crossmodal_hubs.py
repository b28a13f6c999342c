"""Why class-level txt2img R@1 swings from seed to seed: hubs. For each run, the text->image top-1
on the test split (class-level, as `huse eval`): how many queries miss, how many of the missed
queries' texts the model itself classifies right, how many of the retrieved images are themselves
misclassified, and how many queries the most-retrieved images ("hubs") answer. Also R@1 after two
standard hub remedies, to check whether the misses are a property of the space or of the ranking:
centring each modality on its train-split mean (a modality-gap correction) and CSLS (cross-domain
similarity local scaling, Conneau et al. 2018, k = 10).

    python bench/crossmodal_hubs.py --features cache/bench_quality/feats.h5 \
        cache/bench_quality/runs/huse-seed{0,1,2} cache/bench_quality/runs/class-only-seed{0,1,2}
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from huse_pipeline.eval.evaluate import split_outputs  # noqa: E402
from huse_pipeline.store import features  # noqa: E402
from huse_pipeline.train.model import load_checkpoint, model_from_checkpoint  # noqa: E402


def top1_hits(scores: torch.Tensor, query_labels: torch.Tensor, gallery_labels: torch.Tensor) -> torch.Tensor:
    """(Q, G) scores -> (Q,) bool: the best-scoring gallery item has the query's class."""
    return gallery_labels[scores.argmax(dim=1)] == query_labels


def csls_scores(sim: torch.Tensor, k: int = 10) -> torch.Tensor:
    """(Q, G) cosine similarities -> 2 cos - r_gallery - r_query, r = mean similarity to the k nearest
    items of the other side; lowers the score of items that are near everything (hubs)."""
    k_g, k_q = min(k, sim.shape[0]), min(k, sim.shape[1])
    r_gallery = sim.topk(k_g, dim=0).values.mean(dim=0)  # (G,)
    r_query = sim.topk(k_q, dim=1).values.mean(dim=1)  # (Q,)
    return 2 * sim - r_gallery[None, :] - r_query[:, None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders (their best.pt is used)")
    parser.add_argument("--features", required=True)
    parser.add_argument("--split", default="test", choices=["val", "test"])
    parser.add_argument("--top", type=int, default=4, help="how many hubs and confusions to list")
    args = parser.parse_args()
    torch.set_num_threads(1)
    fs = features.read_features(args.features)
    sep = features.read_attrs(args.features).get("label_sep", "<")
    leaf = [name.split(sep)[-1] for name in features.read_class_names(args.features)]
    items, train = fs.indices(args.split), fs.indices("train")
    device = torch.device("cpu")
    for run in args.runs:
        model = model_from_checkpoint(load_checkpoint(Path(run) / "best.pt")).eval()
        with torch.no_grad():
            out = split_outputs(model, model, fs, items, device, 2048)
            fit = split_outputs(model, model, fs, train, device, 2048)
        y = out.labels
        sim = out.text_emb @ out.image_emb.T  # (N, N) text queries x image gallery
        nearest = sim.argmax(dim=1)  # (N,)
        miss = y[nearest] != y
        text_right = out.text_prob.argmax(dim=1) == y
        image_right = out.image_prob.argmax(dim=1) == y  # per gallery image
        hubs = Counter(nearest.tolist()).most_common(args.top)
        centred = (F.normalize(out.text_emb - fit.text_emb.mean(0), dim=1)
                   @ F.normalize(out.image_emb - fit.image_emb.mean(0), dim=1).T)
        pairs = Counter((leaf[int(a)], leaf[int(b)]) for a, b in zip(y[miss], y[nearest][miss]))
        n = len(items)
        print(f"{run}: txt2img R@1 {1 - miss.float().mean():.3f} ({int(miss.sum())} of {n} miss); "
              f"of the misses: text classified right {int((miss & text_right).sum())}, "
              f"retrieved image itself misclassified {int((miss & ~image_right[nearest]).sum())}, "
              f"{len(set(nearest[miss].tolist()))} distinct images retrieved, the most often by "
              f"{Counter(nearest[miss].tolist()).most_common(1)[0][1] if miss.any() else 0} missed queries")
        print("   hubs (queries answered, image's class right?): "
              + ", ".join(f"{count} ({'yes' if image_right[i] else 'no'})" for i, count in hubs)
              + f"; share of queries answered by the {args.top} largest: {sum(c for _, c in hubs) / n:.3f}")
        print(f"   R@1 with train-mean centring {top1_hits(centred, y, y).float().mean():.3f}, "
              f"with CSLS {top1_hits(csls_scores(sim), y, y).float().mean():.3f}; "
              "most frequent misses (query -> retrieved): "
              + ", ".join(f"{a} -> {b} {c}" for (a, b), c in pairs.most_common(args.top)))


if __name__ == "__main__":
    main()
