"""The batch source contract (train/batches.py): every train item exactly once per epoch, the same
epoch for the same generator state, val items in file order with their deterministic view, the
train split's input statistics; and a second, minimal source (plain numpy arrays) that trains
through `fit` unchanged, bit for bit like the resident one."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from huse_pipeline.store import features
from huse_pipeline.train.batches import Batch, BatchSource, ResidentSource
from huse_pipeline.train.loop import fit
from test_train import make_features, small, states_equal

N, K, DI, DT = 23, 3, 4, 2  # items, augmented views per train item, feature sizes


def numbered_source(views: bool = True) -> ResidentSource:
    """Hand-built items whose features name them: text[i] = (i, -i); image[i] = 1000 i + 0 (the
    deterministic view) and augmented view k of item i = 1000 i + k. Items 0, 5, 10, ... are val,
    item 3 is test, the rest train; train item 7 has no augmented views."""
    item = torch.arange(N, dtype=torch.float32)
    text = torch.stack([item, -item], dim=1)  # (N, DT)
    image = (1000 * item)[:, None].repeat(1, DI)  # (N, DI)
    val_idx = torch.arange(0, N, 5)
    train_idx = torch.tensor([i for i in range(N) if i % 5 and i != 3])
    with_views = train_idx[train_idx != 7]
    view_emb = (1000 * with_views[:, None, None] + torch.arange(1, K + 1)[None, :, None]).float().repeat(1, 1, DI)
    view_row = torch.full((N,), -1)
    view_row[with_views] = torch.arange(len(with_views))
    labels = torch.arange(N) % 4
    return ResidentSource(image, text, labels, train_idx, val_idx, None,
                          view_emb if views else None, view_row if views else None)


def item_ids(batch: Batch) -> list[int]:
    return batch.text[:, 0].long().tolist()


def epochs(source: BatchSource, seed: int, n: int, batch_size: int) -> list[list[Batch]]:
    gen = torch.Generator().manual_seed(seed)
    return [list(source.train_batches(batch_size, gen)) for _ in range(n)]


def same_batches(a: list[Batch], b: list[Batch]) -> bool:
    return len(a) == len(b) and all(torch.equal(x.image, y.image) and torch.equal(x.text, y.text)
                                    and torch.equal(x.labels, y.labels) for x, y in zip(a, b))


# ------------------------------------------------------------------------------ the contract


@pytest.mark.parametrize("batch_size", [1, 4, 7, 40])
def test_every_train_item_exactly_once_per_epoch(batch_size):
    source = numbered_source()
    assert isinstance(source, BatchSource) and source.n_train == 17 and (source.image_dim, source.text_dim) == (DI, DT)
    train = sorted(source.train_idx.tolist())
    for epoch in epochs(source, seed=0, n=4, batch_size=batch_size):
        ids = [i for b in epoch for i in item_ids(b)]
        assert sorted(ids) == train  # each train item once: no val, no test, no repeats
        sizes = [len(b) for b in epoch]
        full, rest = divmod(len(train), batch_size)
        assert sizes == [batch_size] * full + ([rest] if rest else [])
        for b in epoch:
            assert b.image.shape == (len(b), DI) and b.text.shape == (len(b), DT) and b.labels.dtype == torch.int64
            assert b.labels.tolist() == [i % 4 for i in item_ids(b)]  # rows stay aligned
            view = b.image[:, 0] - 1000 * b.text[:, 0]  # (b,) which view of its own item each image is
            assert ((view >= 0) & (view <= K)).all() and (view[b.text[:, 0] == 7] == 0).all()


def test_views_are_drawn_afresh_per_item_per_epoch():
    source = numbered_source()
    choice = {}  # epoch -> {item: view}
    for e, epoch in enumerate(epochs(source, seed=1, n=6, batch_size=5)):
        choice[e] = {i: int(v) for b in epoch for i, v in zip(item_ids(b), b.image[:, 0] - 1000 * b.text[:, 0])}
    drawn = {v for c in choice.values() for v in c.values()}
    assert drawn == set(range(K + 1))  # the deterministic view and every augmented view occur
    assert any(choice[0][i] != choice[1][i] for i in choice[0])  # a fresh choice each epoch
    assert len({tuple(sorted(c.items())) for c in choice.values()}) > 1
    # without views every image is the deterministic one
    for epoch in epochs(numbered_source(views=False), seed=1, n=2, batch_size=5):
        assert all(torch.equal(b.image[:, 0], 1000 * b.text[:, 0]) for b in epoch)


def test_deterministic_under_the_generator():
    source = numbered_source()
    a, b, c = epochs(source, 0, 3, 4), epochs(source, 0, 3, 4), epochs(source, 1, 3, 4)
    assert all(same_batches(x, y) for x, y in zip(a, b))
    assert not same_batches(a[0], c[0])  # the comparison can fail
    assert not same_batches(a[0], a[1])  # a fresh order each epoch
    # the state after an epoch is all that matters (what --resume restores)
    gen = torch.Generator().manual_seed(0)
    list(source.train_batches(4, gen))
    resumed = torch.Generator()
    resumed.set_state(gen.get_state())
    assert same_batches(list(source.train_batches(4, resumed)), a[1])


def test_resident_stream_is_the_same_random_calls_as_before():
    """The order and views of an epoch come from one randperm, then one randint, on the generator
    (as before the batch source existed): old runs resume onto the same stream, and a run that
    stops reading early leaves the generator where a full epoch does."""
    source = numbered_source()
    gen = torch.Generator().manual_seed(5)
    perm = source.train_idx[torch.randperm(source.n_train, generator=gen)]
    choice = torch.randint(0, K + 1, (source.n_train,), generator=gen)
    after = gen.get_state()
    gen = torch.Generator().manual_seed(5)
    batches = source.train_batches(4, gen)
    first = next(batches)  # read one batch only
    assert torch.equal(gen.get_state(), after)
    got = [first, *batches]
    assert [i for b in got for i in item_ids(b)] == perm.tolist()
    assert torch.cat([b.image[:, 0] for b in got]).tolist() == source.image_batch(perm, choice)[:, 0].tolist()


def test_val_batches_in_file_order_with_the_deterministic_view():
    source = numbered_source()
    for batch_size in (2, 3, 100):
        batches = list(source.val_batches(batch_size))
        assert [i for b in batches for i in item_ids(b)] == list(range(0, N, 5))
        assert all(torch.equal(b.image[:, 0], 1000 * b.text[:, 0]) for b in batches)
        assert max(len(b) for b in batches) <= batch_size


def test_input_stats_are_the_train_split_mean_and_std():
    source = numbered_source()
    train = source.train_idx.numpy()
    stats = source.input_stats()
    for name, feats in (("image", source.image.numpy()), ("text", source.text.numpy())):
        mean, std = stats[name]
        x = feats[train].astype(np.float64)  # the deterministic view of the train items only
        assert mean.dtype == torch.float32 and mean.shape == (x.shape[1],)
        np.testing.assert_allclose(mean.numpy(), x.mean(0), rtol=1e-6)
        np.testing.assert_allclose(std.numpy(), x.std(0, ddof=1), rtol=1e-6)
    assert not np.allclose(stats["text"][0].numpy(), source.text.numpy().astype(np.float64).mean(0))  # not all items


def test_resident_source_from_a_feature_file(tmp_path):
    fs = features.read_features(make_features(tmp_path / "f.h5", n=50, views=2), views=True)
    source = ResidentSource.from_features(fs, small(), torch.device("cpu"))
    text = torch.as_tensor(fs.text_emb)
    ids = [int((text == row).all(1).nonzero()) for b in epochs(source, 0, 1, 8)[0] for row in b.text]
    assert sorted(ids) == fs.indices("train").tolist()
    val = torch.cat([b.text for b in source.val_batches(8)])
    assert torch.equal(val, text[fs.indices("val")])
    assert torch.equal(source.class_dist, torch.as_tensor(fs.class_dist))
    assert ResidentSource.from_features(fs, small(use_views=False), torch.device("cpu")).view_emb is None


# ---------------------------------------------------------------- a second source through fit


class ArraySource:
    """A minimal BatchSource over plain numpy arrays, sharing no code with ResidentSource: it only
    has the interface's members, so the loop can reach nothing else. No augmented views."""

    def __init__(self, fs: features.FeatureSet, device: torch.device) -> None:
        self._fs, self._device = fs, device
        self._train, self._val = fs.indices("train"), fs.indices("val")
        self.epochs_read = 0

    def _batch(self, rows: np.ndarray) -> Batch:
        fs, dev = self._fs, self._device
        return Batch(torch.from_numpy(fs.image_emb[rows]).to(dev), torch.from_numpy(fs.text_emb[rows]).to(dev),
                     torch.from_numpy(fs.labels[rows]).to(dev))

    @property
    def n_train(self) -> int:
        return len(self._train)

    @property
    def image_dim(self) -> int:
        return self._fs.image_emb.shape[1]

    @property
    def text_dim(self) -> int:
        return self._fs.text_emb.shape[1]

    @property
    def class_dist(self) -> torch.Tensor | None:
        return torch.from_numpy(self._fs.class_dist).to(self._device)

    def train_batches(self, batch_size, gen):
        self.epochs_read += 1
        order = self._train[torch.randperm(len(self._train), generator=gen, device=gen.device).cpu().numpy()]
        for start in range(0, len(order), batch_size):
            yield self._batch(order[start:start + batch_size])

    def val_batches(self, batch_size):
        for start in range(0, len(self._val), batch_size):
            yield self._batch(self._val[start:start + batch_size])

    def input_stats(self):
        return {name: (torch.from_numpy(x[self._train].astype(np.float64).mean(0)).float().to(self._device),
                       torch.from_numpy(x[self._train].astype(np.float64).std(0, ddof=1)).float().to(self._device))
                for name, x in (("image", self._fs.image_emb), ("text", self._fs.text_emb))}


def test_a_second_source_trains_through_fit_unchanged(tmp_path):
    fs = features.read_features(make_features(tmp_path / "f.h5", views=2), views=True)
    made = []

    def make_array_source(fs_, cfg, device):
        made.append(ArraySource(fs_, device))
        return made[-1]

    cfg = small(epochs=3, use_views=False)
    model, history = fit(fs, cfg, tmp_path / "run", make_source=make_array_source)
    assert isinstance(made[0], BatchSource) and made[0].epochs_read == 3
    assert [r["epoch"] for r in history] == [1, 2, 3] and (tmp_path / "run" / "best.pt").is_file()
    assert history[-1]["train/loss"] < history[0]["train/loss"] and history[-1]["val/acc/fused"] > 3 / 6
    # the same items in the same order as the resident source: the very same run, bit for bit
    resident, resident_history = fit(fs, cfg)
    assert states_equal(model.state_dict(), resident.state_dict())
    strip = [[{k: v for k, v in r.items() if k != "time_s"} for r in h] for h in (history, resident_history)]
    assert strip[0] == strip[1]
    # and it is really the source that was read: with views the resident run differs
    assert not states_equal(model.state_dict(), fit(fs, small(epochs=3))[0].state_dict())
