"""The HUSE losses (paper §3.4, Eqs. 5-12) on the universal embeddings: classification through the
shared layer, the semantic-graph loss against the class graph A, the cross-modal gap loss, (not in
the paper) an instance-level alignment term, and their weighted sum
L = alpha*L_class + beta*L_graph + gamma*L_gap + delta*L_inst. Every loss takes embeddings (or the
shared layer's logits), never the model, and returns a 0-dim tensor.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from huse_pipeline.errors import HuseError
from huse_pipeline.measures import metrics

MARGIN_RULES = ("and", "or")
GRAPH_PAIRS = ("all", "cross", "within")
INSTANCE_LOSSES = ("infonce", "hinge")

# The defaults of Eq. 5's weights and of the graph loss, chosen on the val split of the real
# catalogue (BENCHMARKS.md); written once: these functions and TrainConfig's fields default to them.
DEFAULT_ALPHA = 1.0
DEFAULT_BETA = 1.0
DEFAULT_GAMMA = 0.1
DEFAULT_MARGIN = 0.5  # zeta, on cosine distances
DEFAULT_MARGIN_RULE = "and"  # Eq. 10 as printed
DEFAULT_GRAPH_PAIRS = "cross"  # image-text pairs
# The instance-level term (not in the paper; BENCHMARKS.md, round 8): delta 0 is the paper's loss.
DEFAULT_DELTA = 0.0  # off: 0.3 was best on the real catalogue's val split but hurts small catalogues (README)
DEFAULT_INSTANCE_LOSS = "infonce"  # the hinge with the hardest negative did not learn instances on val
DEFAULT_TEMPERATURE = 0.05  # InfoNCE's fixed temperature (0.05 beat 0.1 on val)
DEFAULT_INSTANCE_MARGIN = 0.2  # the hinge's margin, on cosine similarities


def cosine_distance(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """u: (N, D), v: (M, D), rows L2-normalised -> (N, M) cosine distances 1 - u_n . v_m (one GEMM)."""
    return torch.addmm(u.new_ones(()), u, v.T, alpha=-1)


def classification_loss(image_logits: torch.Tensor | None, text_logits: torch.Tensor | None,
                        labels: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy of the shared layer (Eqs. 6-8), per modality, then their mean.

    image_logits, text_logits: (B, C) logits of the ONE shared layer applied to each modality's
    embeddings (either may be None for a single-modality model); labels: (B,) class indices.
    With both given this is the mean cross-entropy over all 2B embeddings.
    """
    parts = [F.cross_entropy(z, labels) for z in (image_logits, text_logits) if z is not None]
    if not parts:
        raise ValueError("classification_loss needs image or text logits")
    return parts[0] if len(parts) == 1 else (parts[0] + parts[1]) / 2


def _distance_threshold(class_dist: torch.Tensor, margin: float, margin_rule: str) -> torch.Tensor:
    """(C, C) t_ij such that sigma_mn (Eq. 10) = [d_mn < t_{y_m y_n}] for every finite d.

    "and" (A < zeta AND d < zeta): t = zeta where A < zeta, else -inf (never kept).
    "or"  (A < zeta OR d < zeta):  t = +inf where A < zeta (always kept), else zeta.
    """
    close = class_dist < margin
    zeta = torch.full_like(class_dist, margin)
    if margin_rule == "and":
        return torch.where(close, zeta, torch.full_like(class_dist, -torch.inf))
    return torch.where(close, torch.full_like(class_dist, torch.inf), zeta)


class _MaskedStress(torch.autograd.Function):
    """sum_(n, m) sigma_nm * (d_nm - A_nm)^2 over the (N, M) pairs of rows of u and v, with
    d = 1 - u v^T and sigma = [d < threshold]; the gradient is written out (d/du = -2 r v,
    d/dv = -2 r^T u, r the kept residuals) so only r is kept for backward and nothing else of
    size (N, M) is allocated. When u is v, one GEMM serves both factors: -2 (r + r^T) u."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, v: torch.Tensor, target: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        dist = cosine_distance(u, v)  # (N, M)
        keep = dist < threshold  # (N, M) sigma
        resid = dist.sub_(target).mul_(keep)  # (N, M) sigma * (d - A), in place in our own buffer
        ctx.save_for_backward(u, v, resid)
        ctx.symmetric = u is v
        flat = resid.view(-1)
        return torch.dot(flat, flat)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        u, v, resid = ctx.saved_tensors
        scale = -2 * grad
        if ctx.symmetric:
            return torch.mm(resid + resid.T, u) * scale, None, None, None
        grad_u = torch.mm(resid, v) * scale if ctx.needs_input_grad[0] else None
        grad_v = torch.mm(resid.T, u) * scale if ctx.needs_input_grad[1] else None
        return grad_u, grad_v, None, None


def graph_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, labels: torch.Tensor, class_dist: torch.Tensor,
               margin: float, margin_rule: str = DEFAULT_MARGIN_RULE, pairs: str = DEFAULT_GRAPH_PAIRS) -> torch.Tensor:
    """Semantic-graph loss (Eqs. 9-11) over ordered pairs of the batch's universal embeddings.

    image_emb, text_emb: (B, D), L2-normalised, row i of each is item i; labels: (B,);
    class_dist: (C, C) the semantic graph A (symmetric, zero diagonal).

        L = (1 / #pairs) * sum_(m, n) in pool  sigma_mn * (d(u_m, u_n) - A_{y_m y_n})^2

    with d the cosine distance 1 - cos and sigma_mn from `margin_rule` ("and": A < zeta AND
    d < zeta, Eq. 10 as printed; "or": A < zeta OR d < zeta, the reading of the prose that also
    pushes close pairs of distant classes apart). `pairs` picks the pool, normalised by its size:

    * "all":    every ordered pair of the 2B embeddings (image-image, text-text, image-text and
                text-image; (2B)^2 pairs, self pairs included as in the paper's double sum);
    * "cross":  image-text pairs only (B^2 pairs, each unordered pair counted once per order);
    * "within": image-image and text-text pairs (2 B^2 pairs).

    Computed blockwise from (B, B) distance matrices (one GEMM each) and (B, B) gathers from A;
    the text-image block mirrors the image-text one, so it is computed once and counted twice.
    Always evaluated in the embeddings' dtype, also under autocast.
    """
    if margin_rule not in MARGIN_RULES:
        raise HuseError(f"unknown margin rule {margin_rule!r}; choose one of {', '.join(MARGIN_RULES)}")
    if pairs not in GRAPH_PAIRS:
        raise HuseError(f"unknown graph pair pool {pairs!r}; choose one of {', '.join(GRAPH_PAIRS)}")
    batch = labels.shape[0]
    with torch.autocast(device_type=image_emb.device.type, enabled=False):
        class_dist = class_dist.to(image_emb.dtype)
        threshold_c = _distance_threshold(class_dist, margin, margin_rule)  # (C, C)
        target = class_dist.index_select(0, labels).index_select(1, labels)  # (B, B) A_{y_m y_n}
        threshold = threshold_c.index_select(0, labels).index_select(1, labels)  # (B, B)
        cross = within = image_emb.new_zeros(())
        if pairs in ("all", "cross"):
            cross = _MaskedStress.apply(image_emb, text_emb, target, threshold)
        if pairs in ("all", "within"):
            within = (_MaskedStress.apply(image_emb, image_emb, target, threshold)
                      + _MaskedStress.apply(text_emb, text_emb, target, threshold))
        if pairs == "cross":
            return cross / batch**2
        if pairs == "within":
            return within / (2 * batch**2)
        return (within + 2 * cross) / (4 * batch**2)


def gap_loss(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """Cross-modal gap (Eq. 12): mean cosine distance between each item's image and text embedding.

    image_emb, text_emb: (B, D), L2-normalised. Zero when they coincide; minimising it pulls them together.
    The same function as evaluation's modality gap (`measures.metrics.cross_modal_gap`).
    """
    return metrics.cross_modal_gap(image_emb, text_emb)


def instance_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, groups: torch.Tensor,
                  temperature: float = DEFAULT_TEMPERATURE, kind: str = DEFAULT_INSTANCE_LOSS,
                  margin: float = DEFAULT_INSTANCE_MARGIN) -> torch.Tensor:
    """Instance-level alignment (not in the paper): each item's image embedding against its own text
    and the other texts of the batch, and each text against its own image and the other images.

    image_emb, text_emb: (B, D), L2-normalised, row i of each is item i; groups: (B,) int64 item
    groups (`batches.item_groups`: the same title, an identical image): items of one group are not
    negatives of each other, so only pairs i, j with groups[i] != groups[j] push apart. With
    s_ij = cos(image_i, text_j):

    * "infonce" (symmetric InfoNCE with a fixed `temperature` tau): the mean over both directions
      and all i of -log( exp(s_ii/tau) / (exp(s_ii/tau) + sum_{j: other group} exp(s_ij/tau)) );
    * "hinge" (VSE++'s hardest negative, mean over i):
      [margin - s_ii + max_{j: other group} s_ij]_+ + [margin - s_ii + max_{j: other group} s_ji]_+.

    An item with no negative in the batch contributes 0. Always evaluated in the embeddings' dtype.
    """
    if kind not in INSTANCE_LOSSES:
        raise HuseError(f"unknown instance loss {kind!r}; choose one of {', '.join(INSTANCE_LOSSES)}")
    with torch.autocast(device_type=image_emb.device.type, enabled=False):
        sim = image_emb @ text_emb.T  # (B, B) s_ij: row i = image i, column j = text j
        negative = groups[:, None] != groups[None, :]  # (B, B) j pushes i away (symmetric)
        if kind == "infonce":
            keep = negative | torch.eye(len(groups), dtype=torch.bool, device=sim.device)  # (B, B) own pair + negatives
            logits = (sim / temperature).masked_fill(~keep, -torch.inf)  # (B, B)
            own = torch.arange(len(groups), device=sim.device)
            return (F.cross_entropy(logits, own) + F.cross_entropy(logits.T, own)) / 2
        hardest = sim.masked_fill(~negative, -torch.inf)  # (B, B); a row without negatives: all -inf, clamps to 0
        to_text = (margin - sim.diagonal() + hardest.max(dim=1).values).clamp_min(0)  # (B,) image i -> texts
        to_image = (margin - sim.diagonal() + hardest.max(dim=0).values).clamp_min(0)  # (B,) text i -> images
        return (to_text + to_image).mean()


def huse_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, image_logits: torch.Tensor,
              text_logits: torch.Tensor, labels: torch.Tensor, class_dist: torch.Tensor | None, *,
              alpha: float = DEFAULT_ALPHA, beta: float = DEFAULT_BETA, gamma: float = DEFAULT_GAMMA,
              margin: float = DEFAULT_MARGIN, margin_rule: str = DEFAULT_MARGIN_RULE,
              pairs: str = DEFAULT_GRAPH_PAIRS, delta: float = DEFAULT_DELTA, groups: torch.Tensor | None = None,
              temperature: float = DEFAULT_TEMPERATURE, instance_kind: str = DEFAULT_INSTANCE_LOSS,
              instance_margin: float = DEFAULT_INSTANCE_MARGIN) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The total loss (Eq. 5, plus delta * L_inst) and its parts {"class", "graph", "gap", "inst"}
    (unweighted) for logging.

    Shapes as in the parts: embeddings (B, D) L2-normalised, logits (B, C), labels (B,), class_dist (C, C),
    groups (B,) the items' groups for `instance_loss` (None: every item its own). delta 0 is the paper's loss.
    A part whose weight is 0 is still reported but computed without a graph (no backward cost);
    without a semantic graph (class_dist None, allowed only at beta 0) there is no "graph" part.
    """
    if class_dist is None and beta:
        raise HuseError("the semantic-graph loss (beta > 0) needs a graph: run `huse build-graph` first")
    def part(weight: float, fn, *args, **kwargs) -> torch.Tensor:
        if weight:
            return fn(*args, **kwargs)
        with torch.no_grad():
            return fn(*args, **kwargs)

    parts = {"class": part(alpha, classification_loss, image_logits, text_logits, labels)}
    if class_dist is not None:
        parts["graph"] = part(beta, graph_loss, image_emb, text_emb, labels, class_dist, margin, margin_rule, pairs)
    parts["gap"] = part(gamma, gap_loss, image_emb, text_emb)
    if groups is None:
        groups = torch.arange(labels.shape[0], device=labels.device)
    parts["inst"] = part(delta, instance_loss, image_emb, text_emb, groups, temperature, instance_kind, instance_margin)
    total = alpha * parts["class"]
    if "graph" in parts:
        total = total + beta * parts["graph"]
    return total + gamma * parts["gap"] + delta * parts["inst"], parts
