"""Is the *frozen* network the limit? Fine-tune the top stages of an EfficientNet-Lite on the train
split and print val and test image accuracy per epoch, beside the same classifier head on the frozen
network. Stage two never does this (its encoders are frozen, as in the paper); this script measures
what fine-tuning would add, to tell "the frozen features are the ceiling" from "any image model of
this size is".

    python bench/probe_finetune.py --catalogue ../shared/datasets/myntra_fashion_small/catalogue.csv

The network runs once over the catalogue up to the end of block `--cut` (by default the end of the
third-to-last stage); those maps are cached in `--maps` (float16; the default name holds the
encoder, the cut and the catalogue's hash, so later runs with the same three reuse it). Each
variant then trains the blocks from `--train-from` on, the head conv and a new linear classifier
(AdamW, one-cycle schedule, label smoothing, dropout before the classifier, random horizontal
flips of the cached maps). Batch norms keep their ImageNet statistics. Images
are fitted as stage one's default does (`pad`). Test accuracy is printed for reference only;
compare variants on val.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from huse_pipeline.data.catalogue import read_catalogue  # noqa: E402
from huse_pipeline.data.images import ImageTransform  # noqa: E402
from huse_pipeline.encoders.image import load_image_encoder  # noqa: E402


def stage_ends(network: nn.Module) -> list[int]:
    """Indices of the last block of each stage (a stage = consecutive blocks with one output width)."""
    widths = [b._project_conv.out_channels for b in network._blocks]  # as encoders.EfficientNetLiteEncoder
    return [i for i in range(len(widths)) if i == len(widths) - 1 or widths[i + 1] != widths[i]]


def cache_maps(encoder, paths: list[Path], cut: int, out: Path, batch: int = 64) -> np.ndarray:
    """(N, C, h, w) float16 output of block `cut` for every image, written to `out` (.npy)."""
    net, transform = encoder.network, ImageTransform(size=encoder.input_size)  # stage one's default view

    def load(chunk: list[Path]) -> torch.Tensor:
        return torch.stack([transform(p) for p in chunk])

    chunks = [paths[i:i + batch] for i in range(0, len(paths), batch)]
    tmp = out.with_suffix(".part.npy")
    maps = None
    t0 = time.perf_counter()
    with ThreadPoolExecutor(1) as pool, torch.inference_mode():
        nxt = pool.submit(load, chunks[0])
        for k in range(len(chunks)):
            x = nxt.result()
            if k + 1 < len(chunks):
                nxt = pool.submit(load, chunks[k + 1])
            h = net._swish(net._bn0(net._conv_stem(encoder._prepare(x))))
            for block in net._blocks[:cut + 1]:
                h = block(h)
            if maps is None:
                maps = np.lib.format.open_memmap(tmp, "w+", np.float16, (len(paths), *h.shape[1:]))
            maps[k * batch:k * batch + len(x)] = h.float().numpy()
            if k % 20 == 0:
                print(f"  maps: {k * batch + len(x)}/{len(paths)} images, "
                      f"{(k * batch + len(x)) / (time.perf_counter() - t0):.1f}/s", flush=True)
    maps.flush()
    del maps
    tmp.rename(out)  # complete files only: an interrupted run starts again
    return np.load(out)


class Top(nn.Module):
    """Blocks `train_from`.. of the network, its head conv, global average, dropout, new classifier."""

    def __init__(self, network: nn.Module, train_from: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*copy.deepcopy(network._blocks[train_from:]))
        self.conv_head, self.bn, self.act = (copy.deepcopy(m) for m in (network._conv_head, network._bn1, network._swish))
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(network._conv_head.out_channels, num_classes)
        self.requires_grad_(True)  # the loaded encoder is frozen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) maps -> (B, num_classes) logits."""
        return self.fc(self.drop(self.act(self.bn(self.conv_head(self.blocks(x)))).mean((2, 3))))


def run(maps: torch.Tensor, y: torch.Tensor, split: dict[str, np.ndarray], network: nn.Module, cut: int,
        train_from: int, args: argparse.Namespace, backbone_lr: float
        ) -> tuple[list[tuple[float, float]], np.ndarray]:
    """Train one variant; (val acc, test acc) after each epoch, and the trained network's pooled
    features (N, head width) of every item (the input of the dropout and classifier)."""
    torch.manual_seed(args.seed)
    frozen = nn.Sequential(*network._blocks[cut + 1:train_from])
    if len(frozen):
        with torch.inference_mode():
            maps = torch.cat([frozen(maps[i:i + 256].float()).half() for i in range(0, len(maps), 256)])
    model = Top(network, train_from, int(y.max()) + 1, args.dropout)
    groups = [{"params": list(model.fc.parameters()), "lr": args.head_lr}]
    backbone = [p for n, p in model.named_parameters() if not n.startswith("fc.")]
    if backbone_lr > 0:
        groups.append({"params": backbone, "lr": backbone_lr})
    else:
        for p in backbone:
            p.requires_grad_(False)
    opt = torch.optim.AdamW(groups, weight_decay=args.weight_decay)
    train = torch.as_tensor(split["train"])
    steps = args.epochs * -(-len(train) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, [g["lr"] for g in groups], total_steps=steps, pct_start=0.1)

    def mode(training: bool) -> None:
        model.train(training)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()

    def accuracy(idx: np.ndarray) -> float:
        mode(False)
        with torch.inference_mode():
            pred = torch.cat([model(maps[idx[i:i + 256]].float()).argmax(1) for i in range(0, len(idx), 256)])
        return (pred == y[idx]).float().mean().item()

    history = []
    for epoch in range(args.epochs):
        mode(True)
        t0, total = time.perf_counter(), 0.0
        for batch in train[torch.randperm(len(train))].split(args.batch_size):
            x = maps[batch].float()
            flip = torch.rand(len(batch)) < 0.5
            x[flip] = x[flip].flip(3)
            loss = F.cross_entropy(model(x), y[batch], label_smoothing=args.label_smoothing)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(batch)
        history.append((accuracy(split["val"]), accuracy(split["test"])))
        print(f"  epoch {epoch + 1}: loss {total / len(train):.4f}, val {history[-1][0]:.4f}, "
              f"test {history[-1][1]:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    mode(False)
    with torch.inference_mode():
        pooled = torch.cat([model.act(model.bn(model.conv_head(model.blocks(maps[i:i + 256].float())))).mean((2, 3))
                            for i in range(0, len(maps), 256)])
    return history, pooled.numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalogue", required=True)
    parser.add_argument("--encoder", default="efficientnet-lite0")
    parser.add_argument("--cut", type=int, default=None, help="cache the output of this block (default: the end of "
                        "the third-to-last stage)")
    parser.add_argument("--train-from", type=int, nargs="+", default=None,
                        help="first trained block of each fine-tuned variant (default: the last stage, and the "
                             "last two stages)")
    parser.add_argument("--maps", default=None,
                        help="cache of the maps (default cache/finetune_maps_<encoder>_<cut>_<catalogue sha256[:12]>.npy)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-4, help="peak learning rate of the fine-tuned blocks")
    parser.add_argument("--head-lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-2)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--save-features", default=None, metavar="PREFIX",
                        help="write each variant's pooled features of every catalogue row (with a usable label) "
                             "to PREFIX_<first trained block>.npy, for trying them in stage two")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.encoder.startswith("efficientnet-lite") or "+" in args.encoder:
        sys.exit("--encoder: one EfficientNet-Lite network (efficientnet-lite0, -lite1 or -lite2)")

    cat = read_catalogue(args.catalogue)
    frame = cat.frame[cat.frame.class_name.notna()]
    classes = sorted(frame.class_name.unique())
    y = torch.tensor(frame.class_name.map({c: i for i, c in enumerate(classes)}).to_numpy())
    split = {s: np.flatnonzero(frame.split.to_numpy() == s) for s in ("train", "val", "test")}
    encoder = load_image_encoder(args.encoder)
    network = encoder.network.float().eval()
    ends = stage_ends(network)
    cut = ends[-3] if args.cut is None else args.cut
    train_from = args.train_from or [ends[-2] + 1, ends[-3] + 1]
    if any(t <= cut or t >= len(network._blocks) for t in train_from):
        sys.exit(f"--train-from must lie in {cut + 1}..{len(network._blocks) - 1} (after --cut {cut})")
    print(f"{args.encoder}: {len(network._blocks)} blocks, stage ends {ends}; caching block {cut}'s output; "
          f"{len(classes)} classes, train/val/test {len(split['train'])}/{len(split['val'])}/{len(split['test'])}")

    maps_path = Path(args.maps or f"cache/finetune_maps_{args.encoder}_{cut}_{cat.sha256[:12]}.npy")
    if maps_path.exists() and np.load(maps_path, mmap_mode="r").shape[0] == len(frame):
        print(f"maps: reusing {maps_path}")
        maps = np.load(maps_path)
    else:
        maps_path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        maps = cache_maps(encoder, [cat.image_root / p for p in frame.image], cut, maps_path)
        print(f"maps: {maps.shape} in {time.perf_counter() - t0:.0f} s -> {maps_path}")
    maps = torch.from_numpy(np.ascontiguousarray(maps))

    variants = [("frozen network, new head", len(network._blocks) - 1, 0.0)]
    variants += [(f"blocks {t}.. fine-tuned", t, args.lr) for t in sorted(train_from, reverse=True)]
    rows = []
    for name, start, lr in variants:
        print(f"{name} (lr {lr:g}, head lr {args.head_lr:g}, {args.epochs} epochs, seed {args.seed})", flush=True)
        t0 = time.perf_counter()
        history, pooled = run(maps, y, split, network, cut, start, args, lr)
        if args.save_features:
            np.save(f"{args.save_features}_{start if lr else 'frozen'}.npy", pooled)
        best = max(range(len(history)), key=lambda e: history[e][0])
        rows.append((name, *history[-1], best + 1, *history[best], time.perf_counter() - t0))
    print("\n| variant | val (last epoch) | test (last epoch) | best val epoch | val | test | seconds |")
    print("|---|---|---|---|---|---|---|")
    for name, v, t, e, bv, bt, s in rows:
        print(f"| {name} | {v:.3f} | {t:.3f} | {e} | {bv:.3f} | {bt:.3f} | {s:.0f} |")


if __name__ == "__main__":
    main()
