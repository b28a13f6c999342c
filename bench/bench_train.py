"""Stage-two speed, measured side by side in one run (see BENCHMARKS.md, "Stage two").

(a) graph loss forward+backward at B=1024, D=512: our blockwise (B, B) version against the (B^2, D)
    pairwise formulation of public implementations (every image-text pair materialised as rows);
    both on the image-text ("cross") pool so they compute the same number; values must agree.
(b) one full training step at B=1024 (forward, the full loss with the default TrainConfig,
    backward, AdamW step) against the bare towers' forward and backward on the same batch.

    python bench/bench_train.py [--repeats 15] [--threads N] [--device cpu|cuda] [--skip-pairwise]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from huse_pipeline.train.config import TrainConfig
from huse_pipeline.train.losses import graph_loss, huse_loss
from huse_pipeline.train.model import HuseModel


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def side_by_side(fns: dict[str, callable], repeats: int, warmup: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved so load affects all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def pairwise_cross_graph_loss(image_emb, text_emb, labels, class_dist, margin, margin_rule="and"):
    """The (B^2, D) formulation: every (image m, text n) pair as a row, distances per pair."""
    b = len(labels)
    left = image_emb.repeat_interleave(b, dim=0)  # (B^2, D)
    right = text_emb.repeat(b, 1)  # (B^2, D)
    dist = 1.0 - (left * right).sum(dim=1)  # (B^2,)
    target = class_dist[labels.repeat_interleave(b), labels.repeat(b)]  # (B^2,)
    keep = (target < margin) & (dist < margin) if margin_rule == "and" else (target < margin) | (dist < margin)
    return torch.where(keep, dist - target, 0.0).square().mean()


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--dim", type=int, default=512, help="D, the universal space")
    ap.add_argument("--classes", type=int, default=64)
    ap.add_argument("--image-dim", type=int, default=1280, help="EfficientNet-Lite0 features")
    ap.add_argument("--text-dim", type=int, default=384, help="MiniLM features")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--pairwise-repeats", type=int, default=5, help="the pairwise version takes seconds per call")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-pairwise", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = TrainConfig()
    print(f"machine: {machine()}; device {device}")
    g = torch.Generator().manual_seed(0)
    b, d, c = args.batch, args.dim, args.classes
    labels = torch.randint(0, c, (b,), generator=g).to(device)
    a = torch.rand(c, c, generator=g)
    class_dist = ((a + a.T) / 2).fill_diagonal_(0).to(device)  # distances in [0, 1)
    image = F.normalize(torch.randn(b, d, generator=g), dim=1).to(device).requires_grad_(True)
    text = F.normalize(torch.randn(b, d, generator=g), dim=1).to(device).requires_grad_(True)
    margin = 0.9  # most pairs of random unit vectors (d ~ 1) sit near it: a real mix of kept and dropped pairs

    # ---------------------------------------------------------------- (a) graph loss
    def ours(pairs: str = "cross"):
        def run():
            image.grad = text.grad = None
            loss = graph_loss(image, text, labels, class_dist, margin, cfg.margin_rule, pairs)
            loss.backward()
            return loss
        return run

    def pairwise():
        image.grad = text.grad = None
        loss = pairwise_cross_graph_loss(image, text, labels, class_dist, margin, cfg.margin_rule)
        loss.backward()
        return loss

    value_ours = ours()().item()
    grad_ours = (image.grad.clone(), text.grad.clone())
    print(f"\n(a) graph loss forward+backward, B={b}, D={d}, image-text pool, margin rule {cfg.margin_rule}")
    if not args.skip_pairwise:
        value_pair = pairwise().item()
        grad_diff = max((image.grad - grad_ours[0]).abs().max().item(), (text.grad - grad_ours[1]).abs().max().item())
        print(f"  value ours {value_ours:.8f}  pairwise {value_pair:.8f}  max abs diff {abs(value_ours - value_pair):.3g}"
              f"  (gradients: max abs diff {grad_diff:.3g})")
        t = side_by_side({"ours": ours(), "pairwise": pairwise}, args.pairwise_repeats, 1, device)
        print(f"  ours {t['ours'] * 1e3:.2f} ms   pairwise (B^2, D) {t['pairwise'] * 1e3:.1f} ms   "
              f"speed-up {t['pairwise'] / t['ours']:.0f}x (target >= 100x)")
    t = side_by_side({p: ours(p) for p in ("cross", "within", "all")}, args.repeats, 2, device)
    print("  ours by pair pool: " + ", ".join(f"{p} {s * 1e3:.2f} ms" for p, s in t.items()))

    # ---------------------------------------------------------- (b) a full training step
    torch.manual_seed(0)
    model = HuseModel(cfg.model_config(args.image_dim, args.text_dim, c)).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    x_image = torch.randn(b, args.image_dim, generator=g).to(device)
    x_text = torch.randn(b, args.text_dim, generator=g).to(device)

    def bare():
        model.zero_grad(set_to_none=True)
        (model.embed_image(x_image).sum() + model.embed_text(x_text).sum()).backward()

    groups = torch.arange(b, device=device)

    def step(pairs: str, delta: float = 0.0):
        def run():
            optimizer.zero_grad(set_to_none=True)
            out = model(x_image, x_text)
            loss, _ = huse_loss(out["image_emb"], out["text_emb"], out["image_logits"], out["text_logits"], labels,
                                class_dist, alpha=cfg.alpha, beta=cfg.beta, gamma=cfg.gamma, margin=cfg.zeta,
                                margin_rule=cfg.margin_rule, pairs=pairs, delta=delta, groups=groups,
                                temperature=cfg.temperature, instance_kind=cfg.instance_loss,
                                instance_margin=cfg.instance_margin)
            loss.backward()
            optimizer.step()
        return run

    fns = {"bare": bare, **{f"step/{p}": step(p) for p in ("cross", "within", "all")},
           "step/cross+inst": step("cross", cfg.delta or 1.0)}
    t = side_by_side(fns, args.repeats, 2, device)
    print(f"\n(b) training step, B={b}, towers {args.image_dim}->{cfg.image_layers}x{cfg.hidden_dim}->{d} and "
          f"{args.text_dim}->{cfg.text_layers}x{cfg.hidden_dim}->{d}, {c} classes, AdamW")
    print(f"  bare towers forward+backward {t['bare'] * 1e3:.1f} ms")
    for p in ("cross", "within", "all"):
        mark = "  <- default graph_pairs" if p == cfg.graph_pairs else ""
        print(f"  full step, graph pairs {p:6s} {t[f'step/{p}'] * 1e3:.1f} ms  ratio {t[f'step/{p}'] / t['bare']:.2f}x"
              f" (target <= 1.3x){mark}")
    print(f"  full step, graph pairs cross + instance loss ({cfg.instance_loss}, delta {cfg.delta or 1.0}) "
          f"{t['step/cross+inst'] * 1e3:.1f} ms  ratio {t['step/cross+inst'] / t['bare']:.2f}x "
          f"({t['step/cross+inst'] / t['step/cross']:.3f}x the step without it)")


if __name__ == "__main__":
    main()
