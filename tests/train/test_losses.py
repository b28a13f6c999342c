"""The HUSE losses against plain double loops in float64 (values and gradients), edge cases whose
answers are known by construction, mutants the reference comparison must catch, and a check that
no (B^2, D) tensor is ever materialised."""
from __future__ import annotations

import dataclasses
import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from huse_pipeline.errors import HuseError
from huse_pipeline.measures import metrics
from huse_pipeline.train import losses
from huse_pipeline.train.config import TrainConfig
from huse_pipeline.train.losses import classification_loss, gap_loss, graph_loss, huse_loss, instance_loss

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}


# ------------------------------------------------------------------------ brute-force references


def ref_graph(image, text, labels, class_dist, margin, rule, pairs):
    """Eqs. 9-11 written as a double loop over the 2B embeddings, one pair at a time."""
    items = [(image[i], "image", int(labels[i])) for i in range(len(labels))]
    items += [(text[i], "text", int(labels[i])) for i in range(len(labels))]
    total, count = 0.0, 0
    for u, mod_u, y_u in items:
        for v, mod_v, y_v in items:
            if (pairs == "cross" and mod_u == mod_v) or (pairs == "within" and mod_u != mod_v):
                continue
            count += 1
            d = 1.0 - sum(u[k] * v[k] for k in range(len(u)))  # cosine distance of unit vectors
            a = float(class_dist[y_u][y_v])
            if rule == "and":
                inside = a < margin and float(d.detach()) < margin
            else:
                inside = a < margin or float(d.detach()) < margin
            if inside:
                total = total + (d - a) ** 2
    return total / count


def ref_gap(image, text):
    n = len(image)
    return sum(1.0 - sum(image[i][k] * text[i][k] for k in range(len(image[i]))) for i in range(n)) / n


def ref_instance(image, text, groups, temperature, kind, margin):
    """The instance loss as loops: each query (image i against the texts, text i against the images)
    scores its own pair against the items of other groups, one similarity at a time."""
    n = len(groups)

    def s(i, j):  # cosine similarity of image i and text j (unit vectors)
        return sum(image[i][k] * text[j][k] for k in range(len(image[i])))

    total = (image[0][0] + text[0][0]) * 0.0  # on the graph of both, even when nothing is added
    for i in range(n):
        negatives = [j for j in range(n) if int(groups[j]) != int(groups[i])]
        for sim in (lambda a, b: s(a, b), lambda a, b: s(b, a)):  # image -> texts, then text -> images
            own = sim(i, i)
            if kind == "infonce":
                denominator = torch.exp(own / temperature) + sum(torch.exp(sim(i, j) / temperature) for j in negatives)
                total = total - (own / temperature - torch.log(denominator)) / 2
            elif negatives:
                hardest = max((sim(i, j) for j in negatives), key=lambda v: float(v.detach()))
                total = total + torch.clamp(margin - own + hardest, min=0)
    return total / n


def ref_class(image_logits, text_logits, labels):
    def ce(z):
        n = len(z)
        return sum(torch.log(sum(torch.exp(z[i][c]) for c in range(len(z[i])))) - z[i][int(labels[i])]
                   for i in range(n)) / n
    return (ce(image_logits) + ce(text_logits)) / 2


# ---------------------------------------------------------------------------------- fixtures


def make_batch(dtype, b=6, d=5, c=4, seed=0):
    """Unit-norm image/text embeddings, labels with repeats, and a symmetric A with zero diagonal."""
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=1).to(dtype)
    text = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=1).to(dtype)
    labels = torch.tensor([0, 1, 1, 2, 3, 0][:b])
    a = torch.rand(c, c, generator=g, dtype=torch.float64) * 1.2
    class_dist = ((a + a.T) / 2).fill_diagonal_(0.0).to(dtype)
    return image, text, labels, class_dist


def value_and_grads(fn, *tensors):
    """fn(*leaves) and d fn / d leaves, on fresh leaf copies of `tensors`."""
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    return out.detach(), torch.autograd.grad(out, leaves, allow_unused=True)


def matches_reference_graph(fn, dtype, margin, rule, pairs) -> bool:
    """Does `fn` (graph-loss signature) agree with the loop reference in value and gradient?"""
    image, text, labels, class_dist = make_batch(dtype)
    val, grads = value_and_grads(lambda i, t: fn(i, t, labels, class_dist, margin, rule, pairs), image, text)
    ref_val, ref_grads = value_and_grads(
        lambda i, t: ref_graph(i, t, labels, class_dist.double(), margin, rule, pairs), image.double(), text.double())
    if val.dtype != dtype:
        return False
    ok = torch.allclose(val.double(), ref_val, **TOL[dtype])
    for g, rg in zip(grads, ref_grads):
        ok = ok and g is not None and torch.allclose(g.double(), rg, **TOL[dtype])
    return bool(ok)


# -------------------------------------------------------------------------- graph loss vs loops


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rule", ["and", "or"])
@pytest.mark.parametrize("pairs", ["all", "cross", "within"])
def test_graph_loss_matches_double_loop(dtype, rule, pairs):
    assert matches_reference_graph(graph_loss, dtype, 0.8, rule, pairs)


def test_graph_fixture_exercises_both_sides_of_the_margin():
    """The random batch must have pairs in and out of sigma under each rule, or the test is blind."""
    image, text, labels, class_dist = make_batch(torch.float64)
    u = torch.cat([image, text])
    d = 1 - u @ u.T
    y = torch.cat([labels, labels])
    a = class_dist[y][:, y]
    for keep in ((a < 0.8) & (d < 0.8), (a < 0.8) | (d < 0.8)):
        assert 0 < keep.sum() < keep.numel()
    assert ((a < 0.8) & (d >= 0.8)).any() and ((a >= 0.8) & (d < 0.8)).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gap_loss_matches_loop(dtype):
    image, text, _, _ = make_batch(dtype)
    val, grads = value_and_grads(gap_loss, image, text)
    ref_val, ref_grads = value_and_grads(ref_gap, image.double(), text.double())
    assert val.dtype == dtype
    torch.testing.assert_close(val.double(), ref_val, **TOL[dtype])
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), rg, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_classification_loss_matches_loop(dtype):
    g = torch.Generator().manual_seed(1)
    image_logits = torch.randn(5, 3, generator=g, dtype=torch.float64).to(dtype)
    text_logits = torch.randn(5, 3, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.tensor([0, 2, 1, 1, 0])
    val, grads = value_and_grads(lambda i, t: classification_loss(i, t, labels), image_logits, text_logits)
    ref_val, ref_grads = value_and_grads(lambda i, t: ref_class(i, t, labels), image_logits.double(),
                                         text_logits.double())
    torch.testing.assert_close(val.double(), ref_val, **TOL[dtype])
    for g_, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g_.double(), rg, **TOL[dtype])
    # one modality: just that modality's cross-entropy
    single = classification_loss(image_logits, None, labels)
    torch.testing.assert_close(single, F.cross_entropy(image_logits, labels))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_total_loss_is_the_weighted_sum_of_the_references(dtype):
    image, text, labels, class_dist = make_batch(dtype)
    g = torch.Generator().manual_seed(2)
    w = torch.randn(image.shape[1], 4, generator=g, dtype=torch.float64).to(dtype)
    groups = torch.tensor([0, 1, 1, 2, 3, 4])
    kw = dict(alpha=0.7, beta=3.0, gamma=0.4, margin=0.8, margin_rule="or", pairs="all", delta=0.6, groups=groups,
              temperature=0.3)

    def ours(i, t):
        return huse_loss(i, t, i @ w, t @ w, labels, class_dist, **kw)[0]

    def ref(i, t):
        wd = w.double()
        return (0.7 * ref_class(i @ wd, t @ wd, labels) + 3.0 * ref_graph(i, t, labels, class_dist.double(), 0.8, "or", "all")
                + 0.4 * ref_gap(i, t) + 0.6 * ref_instance(i, t, groups, 0.3, "infonce", 0.2))

    val, grads = value_and_grads(ours, image, text)
    ref_val, ref_grads = value_and_grads(ref, image.double(), text.double())
    torch.testing.assert_close(val.double(), ref_val, **TOL[dtype])
    for g_, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g_.double(), rg, **TOL[dtype])
    _, parts = huse_loss(image, text, image @ w, text @ w, labels, class_dist, **kw)
    assert set(parts) == {"class", "graph", "gap", "inst"} and all(p.dim() == 0 for p in parts.values())


def test_zero_weight_part_is_reported_but_not_differentiated():
    image, text, labels, class_dist = make_batch(torch.float64)
    image.requires_grad_(True)
    total, parts = huse_loss(image, text, image[:, :4], text[:, :4], labels, class_dist, beta=0.0, gamma=1.0,
                             margin=0.8, delta=0.0)
    assert not parts["graph"].requires_grad and parts["graph"] > 0
    torch.testing.assert_close(parts["graph"], graph_loss(image, text, labels, class_dist, 0.8).detach())
    assert not parts["inst"].requires_grad and parts["inst"] > 0  # delta 0: the paper's loss, the term only logged
    torch.testing.assert_close(total, parts["class"] + parts["gap"])


# ------------------------------------------------------------------------------- instance loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["infonce", "hinge"])
@pytest.mark.parametrize("groups", [[0, 1, 2, 3, 4, 5], [0, 1, 1, 2, 3, 1], [7, 7, 7, 7, 7, 7]])
def test_instance_loss_matches_loop(dtype, kind, groups):
    """Values and gradients against the loops: every item its own group; a group of three (a shared
    title: not negatives of each other); one group (no negatives at all: zero)."""
    image, text, _, _ = make_batch(dtype)
    groups = torch.tensor(groups)
    val, grads = value_and_grads(lambda i, t: instance_loss(i, t, groups, 0.3, kind, 0.5), image, text)
    ref_val, ref_grads = value_and_grads(lambda i, t: ref_instance(i, t, groups, 0.3, kind, 0.5),
                                         image.double(), text.double())
    assert val.dtype == dtype and val.dim() == 0
    torch.testing.assert_close(val.double(), ref_val, **TOL[dtype])
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), rg, **TOL[dtype])
    if len(set(groups.tolist())) == 1:
        assert float(val) == 0.0


def test_instance_loss_masks_the_group_pairs_and_only_them():
    """Items 1 and 2 are exact duplicates (image = text = e1, one group); items 0 and 3 are e0 and e2.
    Masked, item 1's only negatives are items 0 and 3 (similarity 0); unmasked, item 2 would be a
    negative at similarity 1, the value of its own pair. Known answers by construction, both ways."""
    emb = torch.eye(3, dtype=torch.float64)[[0, 1, 1, 2]]  # (4, 3)
    groups = torch.tensor([0, 1, 1, 2])
    tau, x = 0.5, math.exp(-2.0)  # x = e^{-1/tau}: the share of a negative at similarity 0
    masked = instance_loss(emb, emb, groups, tau, "infonce")
    # items 0 and 3: three negatives at 0; items 1 and 2: two negatives at 0 (the duplicate is masked)
    torch.testing.assert_close(masked, torch.tensor((2 * math.log(1 + 3 * x) + 2 * math.log(1 + 2 * x)) / 4,
                                                    dtype=torch.float64))
    unmasked = instance_loss(emb, emb, torch.arange(4), tau, "infonce")
    # items 1 and 2 now also have a negative at similarity 1: a term e^{1/tau}, as large as their own
    torch.testing.assert_close(unmasked, torch.tensor((2 * math.log(1 + 3 * x) + 2 * math.log(2 + 2 * x)) / 4,
                                                      dtype=torch.float64))
    # the hinge: masked, every hardest negative is at 0 (no loss below margin 1); unmasked, items 1 and 2
    # meet their duplicate at 1: margin - 1 + 1 in each direction
    assert float(instance_loss(emb, emb, groups, kind="hinge", margin=0.2)) == 0.0
    torch.testing.assert_close(instance_loss(emb, emb, torch.arange(4), kind="hinge", margin=0.2),
                               torch.tensor(2 * 2 * 0.2 / 4, dtype=torch.float64))


def test_instance_loss_known_answers():
    """Aligned, orthogonal items: InfoNCE = log(1 + (B-1) e^{-1/tau}); the hinge is 0 below margin 1
    and 2 (margin - 1) above it; a batch whose other items are all of its group contributes 0."""
    b = 4
    emb = torch.eye(b, dtype=torch.float64)
    groups = torch.arange(b)
    torch.testing.assert_close(instance_loss(emb, emb, groups, 0.5, "infonce"),
                               torch.tensor(math.log(1 + (b - 1) * math.exp(-2.0)), dtype=torch.float64))
    assert float(instance_loss(emb, emb, groups, kind="hinge", margin=0.2)) == 0.0
    torch.testing.assert_close(instance_loss(emb, emb, groups, kind="hinge", margin=1.5),
                               torch.tensor(1.0, dtype=torch.float64))
    # two groups of two: each item has 2 negatives, not 3
    torch.testing.assert_close(instance_loss(emb, emb, torch.tensor([0, 0, 1, 1]), 0.5, "infonce"),
                               torch.tensor(math.log(1 + 2 * math.exp(-2.0)), dtype=torch.float64))


def test_instance_loss_bad_kind_is_a_clear_error():
    image, text, _, _ = make_batch(torch.float64)
    with pytest.raises(HuseError, match="infonce"):
        instance_loss(image, text, torch.arange(6), kind="triplet")


def test_losses_of_raw_vectors_through_normalize_match_true_cosine():
    """Through F.normalize, our d = 1 - u.v is the true cosine distance: compare with 1 - cos(x, y)
    computed with norms in the loop, gradients w.r.t. the raw (unnormalised) vectors."""
    image, text, labels, class_dist = make_batch(torch.float64)
    raw_i, raw_t = image * torch.arange(1.0, 7.0, dtype=torch.float64)[:, None], text * 3.0

    def ours(i, t):
        ni, nt = F.normalize(i, dim=1), F.normalize(t, dim=1)
        return graph_loss(ni, nt, labels, class_dist, 0.8, "or", "all") + gap_loss(ni, nt)

    def ref(i, t):
        def unit(x):
            return [x[r] / torch.sqrt(sum(x[r][k] ** 2 for k in range(len(x[r])))) for r in range(len(x))]
        ui, ut = unit(i), unit(t)
        return ref_graph(ui, ut, labels, class_dist, 0.8, "or", "all") + ref_gap(ui, ut)

    val, grads = value_and_grads(ours, raw_i, raw_t)
    ref_val, ref_grads = value_and_grads(ref, raw_i, raw_t)
    torch.testing.assert_close(val, ref_val)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg)


# ---------------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_single_class_batch_known_answer(dtype):
    """All items of one class (A_yy = 0, the zero diagonal): images at e0, texts at e1. Image-text
    distances are 1, same-modality distances 0, so with zeta > 1 every cross pair contributes 1."""
    b = 4
    image = torch.zeros(b, 3, dtype=dtype)
    image[:, 0] = 1
    text = torch.zeros(b, 3, dtype=dtype)
    text[:, 1] = 1
    labels = torch.full((b,), 2)
    class_dist = torch.tensor([[0.0, 0.3, 0.6], [0.3, 0.0, 0.9], [0.6, 0.9, 0.0]], dtype=dtype)
    for rule in ("and", "or"):
        assert graph_loss(image, text, labels, class_dist, 1.5, rule, "cross").item() == 1.0
        assert graph_loss(image, text, labels, class_dist, 1.5, rule, "within").item() == 0.0
        assert graph_loss(image, text, labels, class_dist, 1.5, rule, "all").item() == 0.5  # 2 B^2 / (2B)^2
    # zeta below the cross distance: AND drops the cross pairs, OR keeps them (A = 0 < zeta)
    assert graph_loss(image, text, labels, class_dist, 0.5, "and", "cross").item() == 0.0
    assert graph_loss(image, text, labels, class_dist, 0.5, "or", "cross").item() == 1.0
    assert gap_loss(image, text).item() == 1.0
    assert matches_reference_graph(graph_loss, dtype, 0.8, "and", "all")  # and the loop agrees in general


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_identical_image_and_text_give_zero_gap_and_zero_gap_gradient(dtype):
    g = torch.Generator().manual_seed(3)
    raw = torch.randn(5, 4, generator=g, dtype=torch.float64).to(dtype)
    x_i = raw.clone().requires_grad_(True)
    x_t = raw.clone().requires_grad_(True)
    loss = gap_loss(F.normalize(x_i, dim=1), F.normalize(x_t, dim=1))
    gi, gt = torch.autograd.grad(loss, [x_i, x_t])
    eps = torch.finfo(dtype).eps
    assert abs(loss.item()) <= 4 * eps
    # on the sphere the gradient vanishes: d(1 - cos)/dx = 0 at x_i = x_t
    assert gi.abs().max().item() <= 10 * eps and gt.abs().max().item() <= 10 * eps


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pairs_exactly_at_the_margin_are_excluded(dtype):
    """Axis-aligned embeddings: distinct items are orthogonal (d = 1 exactly), self pairs d = 0.
    With zeta = 1 the strict `<` must drop every pair at d = 1 (and A = 1)."""
    eye = torch.eye(3, dtype=dtype)
    labels = torch.tensor([0, 1, 2])
    class_dist = torch.tensor([[0.0, 0.25, 1.0], [0.25, 0.0, 0.5], [1.0, 0.5, 0.0]], dtype=dtype)
    image = eye.clone().requires_grad_(True)
    text = eye.clone().requires_grad_(True)
    # AND at zeta = 1: only self pairs (d = 0 = A) survive -> exactly zero, zero gradient
    loss = graph_loss(image, text, labels, class_dist, 1.0, "and", "cross")
    assert loss.item() == 0.0
    assert all(g.abs().max().item() == 0.0 for g in torch.autograd.grad(loss, [image, text]))
    # just above the margin the off-diagonal pairs with A < zeta come in: (1 - A)^2 each
    above = math.nextafter(1.0, 2.0) if dtype == torch.float64 else 1.0 + 2.0**-20
    expected = (2 * 0.75**2 + 2 * 0.5**2 + 2 * 0.0**2) / 9  # A = 1 < zeta too, but (1 - 1)^2 = 0
    assert graph_loss(eye, eye, labels, class_dist, above, "and", "cross").item() == pytest.approx(expected)
    # OR at zeta = 1: pairs with A < 1 are kept (their d = 1 is not < 1, A is); the (0, 2) pair has
    # A = 1 and d = 1 and is dropped; self pairs kept with residual 0
    assert graph_loss(eye, eye, labels, class_dist, 1.0, "or", "cross").item() == pytest.approx(
        (2 * 0.75**2 + 2 * 0.5**2) / 9)
    assert matches_reference_graph(graph_loss, dtype, 1.0, "or", "cross")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_class_distance_exactly_at_the_margin_is_excluded_by_and(dtype):
    """Two items of classes 0 and 2 (A = 1 = zeta) at the same point (d = 0): AND drops the pair
    (A is not < zeta), OR keeps it and pays (0 - 1)^2 = 1 for both orders of the pair."""
    class_dist = torch.tensor([[0.0, 0.25, 1.0], [0.25, 0.0, 0.5], [1.0, 0.5, 0.0]], dtype=dtype)
    same = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=dtype)
    labels = torch.tensor([0, 2])
    assert graph_loss(same, same, labels, class_dist, 1.0, "and", "cross").item() == 0.0
    assert graph_loss(same, same, labels, class_dist, 1.0, "or", "cross").item() == 0.5


def test_bad_rule_or_pool_is_a_clear_error():
    image, text, labels, class_dist = make_batch(torch.float64)
    with pytest.raises(HuseError, match="margin rule"):
        graph_loss(image, text, labels, class_dist, 0.5, "xor")
    with pytest.raises(HuseError, match="pair pool"):
        graph_loss(image, text, labels, class_dist, 0.5, "and", "some")


# -------------------------------------------------------------- one definition of each default

# keyword of the library losses -> the TrainConfig field `huse train` passes to it
LOSS_FIELDS = {"alpha": "alpha", "beta": "beta", "gamma": "gamma", "margin": "zeta", "margin_rule": "margin_rule",
               "pairs": "graph_pairs", "delta": "delta", "temperature": "temperature",
               "instance_kind": "instance_loss", "instance_margin": "instance_margin"}
NOT_SETTINGS = {"groups"}  # a keyword with a default that is data, not a training setting


def test_library_loss_defaults_are_the_training_defaults():
    train_defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    instance_kw = {"temperature": "temperature", "kind": "instance_loss", "margin": "instance_margin"}
    for fn, names in ((huse_loss, LOSS_FIELDS), (graph_loss, LOSS_FIELDS), (instance_loss, instance_kw)):
        params = inspect.signature(fn).parameters
        for kw, field in names.items():
            if kw in params and params[kw].default is not inspect.Parameter.empty:
                assert params[kw].default == train_defaults[field], (fn.__name__, kw)
    defaulted = {k for k, p in inspect.signature(huse_loss).parameters.items() if p.default is not p.empty}
    assert defaulted == set(LOSS_FIELDS) | NOT_SETTINGS  # every keyword is checked
    # and in effect: the defaults give the loss of the default training run
    image, text, labels, class_dist = make_batch(torch.float64)
    w = torch.randn(image.shape[1], 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    args = (image, text, image @ w, text @ w, labels, class_dist)
    cfg = TrainConfig()
    total, parts = huse_loss(*args)
    explicit, explicit_parts = huse_loss(*args, **{kw: getattr(cfg, f) for kw, f in LOSS_FIELDS.items()})
    assert total.item() == explicit.item() and parts.keys() == explicit_parts.keys()
    assert total.item() != huse_loss(*args, gamma=1.0, pairs="all")[0].item()  # the old defaults: a different loss


def test_one_gap_function_serves_the_loss_and_the_metric(monkeypatch):
    """Eq. 12 has one implementation, measures.metrics.cross_modal_gap: the training loss and the
    evaluation's modality gap both call it (and agree with the loop reference)."""
    image, text, _, _ = make_batch(torch.float64)
    ref = ref_gap(image, text)
    assert gap_loss(image, text).item() == pytest.approx(ref.item(), rel=1e-12)
    assert metrics.modality_gap(3 * image, 0.5 * text) == pytest.approx(ref.item(), rel=1e-12)  # any norm
    calls = []
    real = metrics.cross_modal_gap

    def spy(i, t):
        calls.append((i.shape, t.shape))
        return real(i, t)

    monkeypatch.setattr(metrics, "cross_modal_gap", spy)
    gap_loss(image, text)
    metrics.modality_gap(image, text)
    assert calls == [(image.shape, text.shape)] * 2
    monkeypatch.setattr(metrics, "cross_modal_gap", lambda i, t: torch.zeros((), dtype=i.dtype))
    assert gap_loss(image, text).item() == 0.0 and metrics.modality_gap(image, text) == 0.0


# ---------------------------------------------------------- the reference comparison can fail


def test_similarity_for_distance_mutant_is_caught(monkeypatch):
    """Public implementations used cosine SIMILARITY where the paper means distance."""
    assert matches_reference_graph(graph_loss, torch.float64, 0.8, "and", "all")
    monkeypatch.setattr(losses, "cosine_distance", lambda u, v: u @ v.T)
    for rule in ("and", "or"):
        for pairs in ("all", "cross", "within"):
            assert not matches_reference_graph(losses.graph_loss, torch.float64, 0.8, rule, pairs)


def test_detached_graph_loss_mutant_is_caught():
    def detached(i, t, *args):
        return graph_loss(i.detach(), t.detach(), *args).requires_grad_(True)

    assert not matches_reference_graph(detached, torch.float64, 0.8, "and", "all")


def test_wrong_sign_gap_mutant_is_caught():
    image, text, _, _ = make_batch(torch.float64)
    ref_val, ref_grads = value_and_grads(ref_gap, image, text)
    val, grads = value_and_grads(gap_loss, image, text)
    assert torch.allclose(val, ref_val) and all(torch.allclose(g, r) for g, r in zip(grads, ref_grads))
    mutant_val, mutant_grads = value_and_grads(lambda i, t: -gap_loss(i, t), image, text)
    assert not torch.allclose(mutant_val, ref_val)
    assert not any(torch.allclose(g, r) for g, r in zip(mutant_grads, ref_grads))


# ------------------------------------------------------------------- no (B^2, D) intermediates


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def pairwise_graph_loss(image, text, labels, class_dist, margin, rule="and", pairs="all"):
    """The formulation of public implementations: every pair materialised as (P, D) rows."""
    u = torch.cat([image, text])  # (2B, D)
    y = torch.cat([labels, labels])
    n = len(u)
    left, right = u.repeat_interleave(n, 0), u.repeat(n, 1)  # (4B^2, D) each
    d = 1 - (left * right).sum(-1)
    a = class_dist[y.repeat_interleave(n), y.repeat(n)]
    keep = (a < margin) & (d < margin) if rule == "and" else (a < margin) | (d < margin)
    return torch.where(keep, d - a, 0.0).square().mean()


def largest_intermediate(fn, b, d):
    g = torch.Generator().manual_seed(4)
    image = F.normalize(torch.randn(b, d, generator=g), dim=1).requires_grad_(True)
    text = F.normalize(torch.randn(b, d, generator=g), dim=1).requires_grad_(True)
    labels = torch.randint(0, 8, (b,), generator=g)
    class_dist = torch.rand(8, 8, generator=g).fill_diagonal_(0)
    with LargestTensor() as probe:
        fn(image, text, labels, class_dist, 1.0, "or", "all").backward()
    return probe.largest


@pytest.mark.parametrize("pairs", ["all", "cross", "within"])
def test_graph_loss_never_materialises_pairs_times_dim(pairs):
    b, d = 48, 64

    def ours(*args):
        return graph_loss(*args[:6], pairs=pairs)

    assert largest_intermediate(ours, b, d) <= max(b * b, b * d)  # (B, B) matrices and (B, D) rows only
    # the probe does see a pairwise implementation: it would fail this test
    assert largest_intermediate(pairwise_graph_loss, b, d) >= (2 * b) ** 2 * d
    # and the pairwise formulation is a correct reference for the "all" pool
    assert matches_reference_graph(pairwise_graph_loss, torch.float64, 0.8, "or", "all")


def test_graph_loss_stays_float32_under_autocast():
    image, text, labels, class_dist = make_batch(torch.float32)
    plain = graph_loss(image, text, labels, class_dist, 0.8, "or", "all")
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        assert torch.addmm(image.new_ones(()), image, text.T).dtype == torch.bfloat16  # autocast is on
        auto = graph_loss(image, text, labels, class_dist, 0.8, "or", "all")
    assert auto.dtype == torch.float32 and auto.item() == plain.item()
