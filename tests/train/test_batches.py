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

    # the paper's loss: this synthetic data has no instance signal shared by an item's image and text (their
    # noise is independent), so the instance term would only slow the classes down in three epochs
    cfg = small(epochs=3, use_views=False, delta=0.0)
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
    assert not states_equal(model.state_dict(), fit(fs, small(epochs=3, delta=0.0))[0].state_dict())


# ------------------------------------------------------------------ the streaming source (issue 18)

from huse_pipeline.errors import HuseError  # noqa: E402
from huse_pipeline.train import batches as batches_module  # noqa: E402
from huse_pipeline.train.batches import StreamingSource, choose_data_mode, make_source  # noqa: E402

SN, SK = 103, 2  # items and augmented views of the numbered file


@pytest.fixture(scope="module")
def numbered_file(tmp_path_factory):
    """A feature file whose features name their items, like numbered_source: text[i] = (i, -i),
    image[i] = 1000 i (deterministic view), augmented view k = 1000 i + k. Items 0, 5, 10, ... are
    val, item 3 test, the rest train; class i % 4."""
    item = np.arange(SN, dtype=np.float32)
    image = np.repeat((1000 * item)[:, None], DI, axis=1)
    text = np.stack([item, -item], axis=1)
    views = (image[:, None, :] + np.arange(1, SK + 1, dtype=np.float32)[None, :, None]).astype(np.float32)
    split = ["val" if i % 5 == 0 else "test" if i == 3 else "train" for i in range(SN)]
    path = tmp_path_factory.mktemp("numbered") / "numbered.h5"
    features.write_synthetic(path, image, text, [f"c<{i % 4}" for i in range(SN)], split, image_views=views)
    return path


def _cfg(**kw):
    return small(**kw)


def streaming(path, **kw) -> StreamingSource:
    cfg = small(**{"stream_block_rows": 8, "stream_buffer_mb": 1, **kw})
    return StreamingSource(features.open_features(path), cfg, torch.device("cpu"))


@pytest.mark.parametrize("block_rows, window_blocks, batch_size", [(8, 1, 5), (8, 3, 7), (1, 2, 4), (50, 1, 64),
                                                                   (200, 1, 3), (8, 100, 1)])
def test_streaming_yields_every_train_item_exactly_once_per_epoch(numbered_file, block_rows, window_blocks,
                                                                 batch_size):
    source = streaming(numbered_file, stream_block_rows=block_rows)
    source.window_blocks = window_blocks  # windows smaller and larger than a batch
    assert isinstance(source, BatchSource) and source.data_mode == "stream"
    train = [i for i in range(SN) if i % 5 and i != 3]
    assert source.n_train == len(train) and (source.image_dim, source.text_dim) == (DI, 2)
    for epoch in epochs(source, seed=0, n=3, batch_size=batch_size):
        ids = [i for b in epoch for i in item_ids(b)]
        assert sorted(ids) == train  # each train item once: no val, no test, no repeats
        full, rest = divmod(len(train), batch_size)
        assert [len(b) for b in epoch] == [batch_size] * full + ([rest] if rest else [])
        for b in epoch:
            assert b.image.dtype == torch.float32 and b.labels.dtype == torch.int64
            assert b.labels.tolist() == [i % 4 for i in item_ids(b)]  # rows stay aligned
            view = b.image[:, 0] - 1000 * b.text[:, 0]
            assert ((view >= 0) & (view <= SK)).all() and torch.equal(b.image[:, 0], b.image[:, -1])


def test_streaming_is_deterministic_under_the_generator_and_shuffles_across_blocks(numbered_file):
    source = streaming(numbered_file)
    a, b, c = epochs(source, 0, 3, 6), epochs(source, 0, 3, 6), epochs(source, 1, 3, 6)
    assert all(same_batches(x, y) for x, y in zip(a, b))
    assert not same_batches(a[0], c[0])  # the comparison can fail
    assert not same_batches(a[0], a[1])  # a fresh order each epoch
    blocks = {i // 8 for i in item_ids(a[0][0])}
    assert len(blocks) > 1  # a batch mixes blocks (rows shuffled within the window)
    # the state after an epoch is all that matters (what --resume restores), and an epoch takes its one
    # number from the generator when it is asked for, before any batch is read
    gen = torch.Generator().manual_seed(0)
    batches = source.train_batches(6, gen)
    after = gen.get_state()
    next(batches)
    batches.close()  # stopping early ends the reader thread
    assert torch.equal(gen.get_state(), after)
    resumed = torch.Generator()
    resumed.set_state(after)
    assert same_batches(list(source.train_batches(6, resumed)), a[1])
    # another buffer (window) size is another order, still every item once
    other = streaming(numbered_file)
    other.window_blocks = 1
    assert not same_batches(epochs(other, 0, 1, 6)[0], a[0])


def test_streaming_draws_a_fresh_view_per_item_per_epoch(numbered_file):
    source = streaming(numbered_file)
    choice = [{i: int(v) for b in epoch for i, v in zip(item_ids(b), b.image[:, 0] - 1000 * b.text[:, 0])}
              for epoch in epochs(source, 2, 6, 9)]
    assert {v for c in choice for v in c.values()} == set(range(SK + 1))  # deterministic and every augmented view
    assert any(choice[0][i] != choice[1][i] for i in choice[0])
    for epoch in epochs(streaming(numbered_file, use_views=False), 2, 2, 9):
        assert all(torch.equal(b.image[:, 0], 1000 * b.text[:, 0]) for b in epoch)


def test_streaming_validation_statistics_and_graph(numbered_file):
    source = streaming(numbered_file)
    for batch_size in (2, 7, 500):
        batches = list(source.val_batches(batch_size))
        assert [i for b in batches for i in item_ids(b)] == list(range(0, SN, 5))  # file order
        assert all(torch.equal(b.image[:, 0], 1000 * b.text[:, 0]) for b in batches)  # deterministic view
    sample = np.array([5, 35, 100])
    assert [i for b in source.val_batches(2, sample) for i in item_ids(b)] == sample.tolist()
    fs = features.read_features(numbered_file, views=True)
    resident = ResidentSource.from_features(fs, _cfg(), torch.device("cpu"))
    for name in ("image", "text"):
        for got, want in zip(source.input_stats()[name], resident.input_stats()[name]):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert source.class_dist is None  # the numbered file has no graph


def test_streaming_refuses_what_the_resident_source_refuses(tmp_path):
    rng = np.random.default_rng(0)
    image, text = rng.normal(size=(6, 3)).astype(np.float32), rng.normal(size=(6, 2)).astype(np.float32)
    path = tmp_path / "noval.h5"
    features.write_synthetic(path, image, text, ["a", "b"] * 3, ["train"] * 6)
    with pytest.raises(HuseError, match="no val items"):
        streaming(path)
    image[2, 1] = np.nan
    path = tmp_path / "nan.h5"
    features.write_synthetic(path, image, text, ["a", "b"] * 3, ["train"] * 4 + ["val"] * 2)
    with pytest.raises(HuseError, match="1 non-finite image feature"):
        streaming(path)


def test_auto_picks_by_size_and_says_which(numbered_file, monkeypatch, caplog):
    ff = features.open_features(numbered_file)
    cpu = torch.device("cpu")
    with caplog.at_level("INFO"):
        assert choose_data_mode(ff, _cfg(), cpu) == "resident"
    assert "--data auto: resident" in caplog.text
    monkeypatch.setattr(batches_module, "available_memory", lambda device: 4 * ff.nbytes(views=True) - 1)
    assert choose_data_mode(ff, _cfg(), cpu) == "stream"  # the items would take over a quarter
    assert choose_data_mode(ff, _cfg(use_views=False), cpu) == "resident"  # without the views they fit
    assert isinstance(make_source(ff, _cfg(), cpu), StreamingSource)
    assert choose_data_mode(ff, _cfg(data="resident"), cpu) == "resident"
    assert choose_data_mode(features.read_features(numbered_file), _cfg(), cpu) == "resident"  # already in memory
    assert isinstance(make_source(ff, _cfg(data="resident"), cpu), ResidentSource)
    assert batches_module.available_memory(cpu) > 0


def test_resident_source_from_an_open_file_is_the_in_memory_one(numbered_file):
    fs = features.read_features(numbered_file, views=True)
    ff = features.open_features(numbered_file)
    a = ResidentSource.from_features(fs, _cfg(), torch.device("cpu"))
    b = ResidentSource.from_features(ff, _cfg(), torch.device("cpu"))
    for name in ("image", "text", "labels", "train_idx", "val_idx", "view_emb", "view_row"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert all(same_batches(x, y) for x, y in zip(epochs(a, 4, 2, 10), epochs(b, 4, 2, 10)))


def test_float16_storage_upcasts_each_batch():
    """On CUDA the resident items are stored in float16 (half the memory) and every batch is float32."""
    source = numbered_source()
    half = ResidentSource(source.image.half(), source.text.half(), source.labels, source.train_idx, source.val_idx,
                          None, source.view_emb.half(), source.view_row, stats=source.input_stats())
    for x, y in zip(epochs(source, 0, 1, 4)[0], epochs(half, 0, 1, 4)[0]):
        assert y.image.dtype == torch.float32 and y.text.dtype == torch.float32
        assert torch.equal(x.image.half().float(), y.image) and torch.equal(x.text.half().float(), y.text)
    assert half.input_stats() is half.stats  # computed from the float32 values, before storing


def test_input_stats_of_a_large_split_go_by_columns_with_the_same_values(monkeypatch):
    g = torch.Generator().manual_seed(0)
    feats = 5 + 3 * torch.randn(500, 300, generator=g)
    idx = torch.randperm(500, generator=g)[:400]
    want = batches_module._input_stats(feats, idx)
    monkeypatch.setattr(batches_module, "STATS_EXACT_BYTES", 400 * 70 * 8)  # blocks of 70 columns, last wider
    got = batches_module._input_stats(feats, idx)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ------------------------------------------------------------- item groups (the instance loss's negatives)

from huse_pipeline.train.batches import groups_from_keys, item_groups  # noqa: E402
from huse_pipeline.train.loop import _loss  # noqa: E402


def test_groups_join_items_sharing_any_key_transitively():
    title = np.array([5, 5, 7, 8, 9, 9, 3], dtype=np.uint64)  # 0-1 and 4-5 share a title
    image = np.array([1, 2, 2, 4, 6, 7, 8], dtype=np.uint64)  # 1-2 share an image: 0, 1, 2 are one group
    groups = groups_from_keys(title, image)
    assert groups.tolist() == [0, 0, 0, 1, 2, 2, 3]  # numbered by first item
    assert groups.dtype == np.int64
    assert groups_from_keys(np.arange(4, dtype=np.uint64), np.arange(4, dtype=np.uint64)).tolist() == [0, 1, 2, 3]
    assert groups_from_keys(np.zeros(0, np.uint64)).tolist() == []


def write_duplicates(path):
    """17 items: item 4's title is item 1's (another class: still one group), item 9's image features
    are item 2's bit for bit, item 12's differ from item 2's by one ulp; item 13 repeats item 4's
    title, so 1, 4 and 13 are one group; every other item its own."""
    rng = np.random.default_rng(3)
    n = 17
    image = rng.normal(size=(n, DI)).astype(np.float32)
    text = rng.normal(size=(n, DT)).astype(np.float32)
    titles = [f"title {i}" for i in range(n)]
    titles[4] = titles[13] = titles[1]
    image[9] = image[2]
    image[12] = np.nextafter(image[2], np.float32(np.inf))
    split = ["val" if i % 4 == 0 else "train" for i in range(n)]
    features.write_synthetic(path, image, text, [f"c<{i % 3}" for i in range(n)], split, text=titles)
    return path


def test_item_groups_of_a_file_same_title_and_duplicate_images(tmp_path):
    path = write_duplicates(tmp_path / "dup.h5")
    fs = features.read_features(path)
    groups = item_groups(fs)
    assert groups[1] == groups[4] == groups[13] and groups[2] == groups[9]
    assert len(set(groups.tolist())) == 17 - 3
    assert groups[12] != groups[2]  # one ulp apart is not a duplicate
    with features.open_features(path) as ff:  # the streaming pass gives the same keys and groups
        keys, file_keys = features.item_keys(fs), features.item_keys(ff)
        assert all(np.array_equal(a, b) for a, b in zip(keys, file_keys))
        assert np.array_equal(item_groups(ff), groups)


@pytest.mark.parametrize("mode", ["resident", "stream"])
def test_both_sources_deliver_each_items_group_with_every_batch(tmp_path, mode):
    path = write_duplicates(tmp_path / "dup.h5")
    fs = features.read_features(path)
    groups = item_groups(fs)
    with features.open_features(path) as ff:
        cfg = small(stream_block_rows=4, stream_buffer_mb=1)
        source = (ResidentSource.from_features(fs, cfg, torch.device("cpu")) if mode == "resident"
                  else StreamingSource(ff, cfg, torch.device("cpu")))
        # the text features name no item here: find each batch row's item by its text row
        item_of = {tuple(fs.text_emb[i].tolist()): i for i in range(len(fs.labels))}
        gen = torch.Generator().manual_seed(0)
        batches = [*source.train_batches(5, gen), *source.val_batches(3)]
        seen = []
        for batch in batches:
            items = [item_of[tuple(row)] for row in batch.text.tolist()]
            assert batch.groups is not None and batch.groups.dtype == torch.int64
            assert batch.groups.tolist() == groups[items].tolist()
            seen += items
        assert sorted(seen) == sorted(fs.indices("train").tolist() + fs.indices("val").tolist())


def test_the_loss_reads_the_batch_groups():
    """A batch whose items are all one group has no negatives: its instance part is exactly 0; the
    same batch with every item its own group is not."""
    source = numbered_source(views=False)
    batch = source.batch(source.train_idx[:6])
    g = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(6, 4, generator=g), dim=1)
    out = {"image_emb": emb, "text_emb": emb.flip(0), "image_logits": torch.randn(6, 4, generator=g),
           "text_logits": torch.randn(6, 4, generator=g)}
    _, parts = _loss(out, batch.labels, None, small(delta=1.0, beta=0.0), torch.zeros(6, dtype=torch.int64))
    assert float(parts["inst"]) == 0.0
    _, parts = _loss(out, batch.labels, None, small(delta=1.0, beta=0.0), torch.arange(6))
    assert float(parts["inst"]) > 0.0
