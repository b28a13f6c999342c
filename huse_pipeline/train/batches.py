"""Where stage two's batches come from: `BatchSource`, the one interface through which the training
loop reads its data; `ResidentSource`, which holds the feature file's arrays on the device; and
`StreamingSource`, which reads shuffled blocks of a feature file larger than memory in the background.
`make_source` picks one (`TrainConfig.data`: auto | resident | stream) and says which.

The loop indexes no data tensor itself, so any source plugs into `loop.fit(..., make_source=...)`.
The contract of a source:

* `n_train`, `image_dim`, `text_dim`: the number of train items (Ntr) and the feature sizes (Di, Dt).
* `train_batches(batch_size, gen)`: one epoch. Every train item exactly once, in batches of
  `batch_size` (the last one may be smaller), each item's image either its deterministic view or
  one of its augmented views (a fresh choice per item per epoch). The order and the views depend
  only on the state of `gen`, a torch.Generator on the training device that the loop uses for
  nothing else: the same state gives the same epoch, so `--resume`, which restores it, continues
  the same run. The loop calls it once per epoch and may stop reading early (the last epoch of a
  `--steps` run).
* `val_batches(batch_size, items=None)`: every val item exactly once, in a fixed order (file order),
  deterministic view; with `items` (ascending item indices, a subset of the val split: the sample of
  `--val-sample`) those items only. The loop passes `items` only when sampling, so a source without
  the argument still works without `--val-sample`.
* `class_dist`: the semantic graph A, (C, C) float32 on the device, or None if the file has none.
* `input_stats()`: {"image": (mean, std), "text": (mean, std)}, (Di,) and (Dt,) float32 on the
  device: the train split's per-feature mean and (unbiased) standard deviation, computed in
  float64, of the deterministic image view; the towers standardise their inputs with them.

A `Batch` holds image (b, Di) float32, text (b, Dt) float32, labels (b,) int64 and groups (b,) int64
(`item_groups`: items of one group are never negatives of each other in the instance loss; None
means every item is its own group), on the training device; row i of each is item i. A source may
store its items in another dtype (ResidentSource on CUDA: float16) and upcast each batch. Both
sources here compute the groups once, when they are made (from the items' keys; a FeatureFile's come
from its one streaming pass), and deliver them with every train and val batch.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol, runtime_checkable

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from huse_pipeline.errors import HuseError
from huse_pipeline.store.features import SCAN_ROWS, FeatureFile, FeatureSet, item_keys, open_features
from huse_pipeline.train.config import TrainConfig

log = logging.getLogger(__name__)

RESIDENT_SHARE = 0.25  # --data auto holds the items when they take less than this share of the free memory
STATS_EXACT_BYTES = 1 << 28  # input statistics of up to this many float64 bytes in one piece, larger by columns


@dataclass(frozen=True)
class Batch:
    """One batch of items, on the training device."""

    image: torch.Tensor  # (b, Di) float32, the view drawn for each item
    text: torch.Tensor  # (b, Dt) float32
    labels: torch.Tensor  # (b,) int64
    groups: torch.Tensor | None = None  # (b,) int64 item groups (`item_groups`); None: every item its own

    def __len__(self) -> int:
        return self.labels.shape[0]


@runtime_checkable
class BatchSource(Protocol):
    """Everything the training loop reads from the data (the contract is in the module docstring)."""

    @property
    def n_train(self) -> int: ...

    @property
    def image_dim(self) -> int: ...

    @property
    def text_dim(self) -> int: ...

    @property
    def class_dist(self) -> torch.Tensor | None: ...

    def train_batches(self, batch_size: int, gen: torch.Generator) -> Iterator[Batch]: ...

    def val_batches(self, batch_size: int) -> Iterator[Batch]: ...

    def input_stats(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]: ...


# how `loop.fit` gets its source: (feature set or open feature file, config, training device) -> source
SourceFactory = Callable[[FeatureSet | FeatureFile, TrainConfig, torch.device], BatchSource]


def groups_from_keys(*keys: np.ndarray) -> np.ndarray:
    """(N,) int64 group of each item: items that share a value of any of the (N,) `keys` are joined,
    transitively (connected components of the graph item - key value), numbered 0.. in order of each
    group's first item."""
    n = len(keys[0])
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    nodes, offset = [], n  # item nodes 0..N-1, then one node per distinct value of each key
    for key in keys:
        _, value = np.unique(key, return_inverse=True)  # (N,) value index of each item
        nodes.append(offset + value.reshape(-1))
        offset += int(value.max()) + 1
    rows = np.tile(np.arange(n), len(keys))
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, np.concatenate(nodes))), shape=(offset, offset))
    _, component = connected_components(graph, directed=False)  # (offset,)
    _, first, groups = np.unique(component[:n], return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))  # renumber groups by their first item
    return order[groups.reshape(-1)].astype(np.int64)


def item_groups(fs: FeatureSet | FeatureFile) -> np.ndarray:
    """(N,) int64 group of each item for the instance loss: items with the same title (as the text
    encoder saw it) or bit-identical image features (an exact duplicate image) are one group, joined
    transitively. Same-title items of different classes are joined too: their text features are the
    same, so each one's text could not be told from the other's. Keys from `store.features.item_keys`."""
    return groups_from_keys(*item_keys(fs))


def _check_splits(fs: FeatureSet | FeatureFile) -> tuple[np.ndarray, np.ndarray]:
    """The train and val item indices; refuses a file without either."""
    train_idx, val_idx = fs.indices("train"), fs.indices("val")
    if len(train_idx) == 0:
        raise HuseError(f"{fs.path} has no train items; stage two needs a train split")
    if len(val_idx) == 0:
        raise HuseError(f"{fs.path} has no val items; stage two selects the best epoch on the val split")
    return train_idx, val_idx


def _refuse_non_finite(path: object, bad: dict[str, int]) -> None:
    for name, count in bad.items():
        if count:
            raise HuseError(f"{path} holds {count} non-finite {name} feature values; re-run `huse extract-features`")


def _count_non_finite(arr: np.ndarray) -> int:
    """Non-finite values of an (N, ...) array, a block of rows at a time (no N-sized temporary)."""
    return sum(int((~np.isfinite(arr[a:a + SCAN_ROWS])).sum()) for a in range(0, len(arr), SCAN_ROWS))


def available_memory(device: torch.device) -> int:
    """Bytes free for holding the items: on CUDA the device's free memory (`torch.cuda.mem_get_info`),
    on CPU `MemAvailable` of /proc/meminfo (else the available physical pages, `os.sysconf`)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def choose_data_mode(fs: FeatureSet | FeatureFile, cfg: TrainConfig, device: torch.device) -> str:
    """`resident` or `stream`: cfg.data, or for `auto` resident when the arrays (float16 on CUDA,
    float32 on CPU; the views too when they are used) take under RESIDENT_SHARE of the free memory of
    the device, and always for a FeatureSet (it is in memory already). Logs the choice."""
    if cfg.data != "auto":
        return cfg.data
    if isinstance(fs, FeatureSet):
        return "resident"
    scale = 0.5 if device.type == "cuda" else 1.0  # float16 on the GPU
    need = scale * fs.nbytes(views=cfg.use_views) * 4 / fs.image_emb.dtype.itemsize
    free = available_memory(device)
    mode = "resident" if need < RESIDENT_SHARE * free else "stream"
    log.info("--data auto: %s (the items take %.2f GB on %s, %.2f GB free; resident below %d%%)",
             mode, need / 1e9, device.type, free / 1e9, round(100 * RESIDENT_SHARE))
    return mode


def make_source(fs: FeatureSet | FeatureFile, cfg: TrainConfig, device: torch.device) -> BatchSource:
    """`loop.fit`'s default source: ResidentSource or StreamingSource, by `choose_data_mode`."""
    if choose_data_mode(fs, cfg, device) == "stream":
        return StreamingSource.from_features(fs, cfg, device)
    return ResidentSource.from_features(fs, cfg, device)


def _input_stats(feats: torch.Tensor, train_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(D,) float32 mean and unbiased std of feats[train_idx] (N, D), computed in float64. A large
    split goes a block of columns at a time (the same values: each column is reduced alone), so the
    float64 copy is bounded by STATS_EXACT_BYTES."""
    n, dim = len(train_idx), feats.shape[1]
    if n * dim * 8 <= STATS_EXACT_BYTES:
        x = feats[train_idx].double()  # (Ntr, D)
        return x.mean(0).float(), x.std(0).float()
    cols = max(64, STATS_EXACT_BYTES // (8 * n))
    means, stds, c0 = [], [], 0
    while c0 < dim:
        c1 = dim if dim - (c0 + cols) < 64 else c0 + cols  # no narrow last block
        x = feats[train_idx, c0:c1].double()  # (Ntr, c)
        means.append(x.mean(0))
        stds.append(x.std(0))
        c0 = c1
    return torch.cat(means).float(), torch.cat(stds).float()


@dataclass
class ResidentSource:
    """A BatchSource over the feature file's arrays, held whole on the training device; a batch is a
    gather from them (upcast to float32 when they are stored in float16, as on CUDA)."""

    image: torch.Tensor  # (N, Di) float32 (float16 on CUDA), deterministic view
    text: torch.Tensor  # (N, Dt) float32 (float16 on CUDA)
    labels: torch.Tensor  # (N,) int64
    train_idx: torch.Tensor  # (Ntr,) int64
    val_idx: torch.Tensor  # (Nva,) int64
    class_dist: torch.Tensor | None  # (C, C) float32
    view_emb: torch.Tensor | None  # (M, K, Di) float32 (float16 on CUDA) augmented views of train items
    view_row: torch.Tensor | None  # (N,) int64 row of view_emb per item, -1 if none
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None  # input_stats, when computed before storing
    groups: torch.Tensor | None = None  # (N,) int64 `item_groups`; None: every item its own group

    data_mode = "resident"

    @classmethod
    def from_features(cls, fs: FeatureSet | FeatureFile, cfg: TrainConfig, device: torch.device) -> ResidentSource:
        """The items of `fs` (and, with cfg.use_views, the train items' augmented views) on `device`;
        refuses a file without train or val items or with non-finite features.

        On CPU the arrays are float32 (a FeatureSet's own arrays, no copy; a FeatureFile's read whole).
        On CUDA they are stored in float16, half the memory, and each batch is upcast to float32; the
        input statistics then come from the float32 values (a FeatureFile's streaming pass)."""
        train_idx, val_idx = _check_splits(fs)
        lazy = isinstance(fs, FeatureFile)
        if lazy:
            _refuse_non_finite(fs.path, fs.summary().non_finite)
        else:
            _refuse_non_finite(fs.path, {"image": _count_non_finite(fs.image_emb), "text": _count_non_finite(fs.text_emb)})
        store = torch.float16 if device.type == "cuda" else torch.float32
        use_views = cfg.use_views and fs.view_emb is not None and fs.view_emb.shape[1] > 0
        as_long = dict(dtype=torch.int64, device=device)

        def hold(name: str) -> torch.Tensor:
            """The whole array `name` on the device, in `store` dtype, copied a block at a time."""
            arr = getattr(fs, name)
            if not lazy and store == torch.float32:
                return torch.as_tensor(arr, dtype=torch.float32, device=device)  # no copy on CPU
            out = torch.empty(arr.shape, dtype=store, device=device)
            if lazy and out.device.type == "cpu" and arr.dtype == np.float32:
                for a in range(0, len(arr), SCAN_ROWS):  # straight from the file into the tensor
                    fs.read_rows(name, a, a + SCAN_ROWS, out=out.numpy()[a:a + SCAN_ROWS])
                return out
            for a in range(0, len(arr), SCAN_ROWS):
                block = fs.read_rows(name, a, a + SCAN_ROWS) if lazy else arr[a:a + SCAN_ROWS]
                out[a:a + len(block)] = torch.from_numpy(np.ascontiguousarray(block)).to(device=device, dtype=store)
            return out

        stats = None
        if store != torch.float32:  # from the float32 values, not the float16 copy
            train_t = torch.as_tensor(train_idx)
            stats = ({k: (torch.as_tensor(m).float().to(device), torch.as_tensor(sd).float().to(device))
                      for k, (m, sd) in fs.summary().stats.items()} if lazy else
                     {k: tuple(t.to(device) for t in _input_stats(torch.as_tensor(getattr(fs, f"{k}_emb")), train_t))
                      for k in ("image", "text")})
        view_emb = view_row = None
        if use_views:
            view_emb = hold("view_emb")
            row = np.full(len(fs.labels), -1, dtype=np.int64)
            row[fs.view_item] = np.arange(len(fs.view_item))
            view_row = torch.as_tensor(row, device=device)
        return cls(
            image=hold("image_emb"),
            text=hold("text_emb"),
            labels=torch.as_tensor(fs.labels, **as_long),
            train_idx=torch.as_tensor(train_idx, **as_long),
            val_idx=torch.as_tensor(val_idx, **as_long),
            class_dist=None if fs.class_dist is None else torch.as_tensor(fs.class_dist, dtype=torch.float32,
                                                                          device=device),
            view_emb=view_emb,
            view_row=view_row,
            stats=stats,
            groups=torch.as_tensor(item_groups(fs), **as_long),
        )

    @property
    def n_train(self) -> int:
        return len(self.train_idx)

    @property
    def image_dim(self) -> int:
        return self.image.shape[1]

    @property
    def text_dim(self) -> int:
        return self.text.shape[1]

    def train_batches(self, batch_size: int, gen: torch.Generator) -> Iterator[Batch]:
        n_train = self.n_train
        # the whole epoch's order and views are drawn now, before any batch is read
        perm = self.train_idx[torch.randperm(n_train, generator=gen, device=gen.device)]  # (Ntr,) item indices
        choice = (None if self.view_emb is None else  # (Ntr,) 0 = deterministic view, k = augmented view k
                  torch.randint(0, self.view_emb.shape[1] + 1, (n_train,), generator=gen, device=gen.device))
        return (self.batch(perm[start:start + batch_size], None if choice is None else choice[start:start + batch_size])
                for start in range(0, n_train, batch_size))

    def val_batches(self, batch_size: int, items: np.ndarray | None = None) -> Iterator[Batch]:
        idx = self.val_idx if items is None else torch.as_tensor(items, dtype=torch.int64, device=self.val_idx.device)
        return (self.batch(idx[start:start + batch_size]) for start in range(0, len(idx), batch_size))

    def input_stats(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if self.stats is not None:
            return self.stats
        return {name: _input_stats(feats, self.train_idx) for name, feats in (("image", self.image), ("text", self.text))}

    def batch(self, idx: torch.Tensor, choice: torch.Tensor | None = None) -> Batch:
        """(b,) item indices and their view choices (None: deterministic view) -> their Batch (float32:
        `.float()` is a no-op for float32 storage and the upcast for float16)."""
        return Batch(self.image_batch(idx, choice).float(), self.text[idx].float(), self.labels[idx],
                     None if self.groups is None else self.groups[idx])

    def image_batch(self, idx: torch.Tensor, choice: torch.Tensor | None) -> torch.Tensor:
        """(b,) item indices and (b,) view choices (0 = deterministic view, k = augmented view k)
        -> (b, Di) image features."""
        feats = self.image[idx]  # (b, Di)
        if self.view_emb is None or choice is None:
            return feats
        row = self.view_row[idx]  # (b,)
        use = (choice > 0) & (row >= 0)
        augmented = self.view_emb[row.clamp_min(0), (choice - 1).clamp_min(0)]  # (b, Di)
        return torch.where(use[:, None], augmented, feats)


# ------------------------------------------------------------------------------ streaming


class StreamingSource:
    """A BatchSource that reads the train split from the feature file while the towers train, with
    memory set by `cfg.stream_buffer_mb`, not by the number of items.

    The file's rows are cut into blocks of `cfg.stream_block_rows` contiguous rows (one read each; the
    block's val and test rows are dropped). An epoch takes one number from the loop's generator, the
    epoch seed; a numpy Generator seeded with it permutes the blocks, and the permuted blocks are
    grouped into windows of as many blocks as half the buffer holds. A background thread fills the
    window after the current one (a bounded hand-off: two window buffers in all), and the rows of
    each window are shuffled (seed [epoch seed, 1, window]) and cut into batches; a batch may span two
    windows. With augmented views each train item's view is drawn per epoch (seed [epoch seed, 2,
    block]), uniformly over its deterministic and its augmented views, like ResidentSource. So every
    train item comes exactly once per epoch, and the epoch follows from the generator's state alone
    (`--resume` restores it at epoch boundaries), whatever the thread's timing. Validation reads the
    val items (or the sample) in file order, a few thousand at a time. The input statistics, the
    non-finite check and the digest come from the file's one streaming pass (`FeatureFile.summary`).
    """

    data_mode = "stream"

    def __init__(self, ff: FeatureFile, cfg: TrainConfig, device: torch.device) -> None:
        self._ff, self._device = ff, device
        self._train, self._val = _check_splits(ff)
        summary = ff.summary()
        _refuse_non_finite(ff.path, summary.non_finite)
        self._stats = {k: (torch.as_tensor(m).float().to(device), torch.as_tensor(sd).float().to(device))
                       for k, (m, sd) in summary.stats.items()}
        self.class_dist = (None if ff.class_dist is None else
                           torch.as_tensor(ff.class_dist, dtype=torch.float32, device=device))
        self._labels = ff.labels
        self._groups = item_groups(ff)  # (N,) int64, from the summary's keys
        self._n_views = (int(ff.view_emb.shape[1]) if cfg.use_views and ff.view_emb is not None else 0)
        self.block_rows = cfg.stream_block_rows
        n_blocks = -(-ff.n_items // self.block_rows)
        self._block_train = np.searchsorted(self._train, np.arange(n_blocks + 1) * self.block_rows)  # (blocks + 1,)
        self._blocks = np.flatnonzero(np.diff(self._block_train) > 0)  # blocks holding train items
        row_bytes = 4 * (self.image_dim + self.text_dim)
        self.window_blocks = max(1, (cfg.stream_buffer_mb * 2**20 // 2) // (row_bytes * self.block_rows))
        log.info("streaming %d train items from %s: %d blocks of %d rows, windows of %d blocks (%.0f MB each, "
                 "one filled ahead)", len(self._train), ff.path, len(self._blocks), self.block_rows,
                 self.window_blocks, self.window_blocks * self.block_rows * row_bytes / 2**20)

    @classmethod
    def from_features(cls, fs: FeatureSet | FeatureFile, cfg: TrainConfig, device: torch.device) -> StreamingSource:
        """Stream from `fs`'s file (a FeatureSet's file is opened again, for reading in blocks)."""
        return cls(fs if isinstance(fs, FeatureFile) else open_features(fs.path), cfg, device)

    @property
    def n_train(self) -> int:
        return len(self._train)

    @property
    def image_dim(self) -> int:
        return int(self._ff.image_emb.shape[1])

    @property
    def text_dim(self) -> int:
        return int(self._ff.text_emb.shape[1])

    def input_stats(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return self._stats

    def _to_batch(self, image: np.ndarray, text: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> Batch:
        dev = self._device
        return Batch(torch.from_numpy(image).to(dev, torch.float32), torch.from_numpy(text).to(dev, torch.float32),
                     torch.from_numpy(labels).to(dev), torch.from_numpy(groups).to(dev))

    # -- one epoch
    def train_batches(self, batch_size: int, gen: torch.Generator) -> Iterator[Batch]:
        seed = int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device))  # drawn now: the epoch's only draw
        return self._epoch(batch_size, seed)

    def epoch_windows(self, seed: int) -> list[np.ndarray]:
        """The epoch's windows: each an array of block numbers, in reading order."""
        order = self._blocks[np.random.default_rng(seed).permutation(len(self._blocks))]
        return [order[i:i + self.window_blocks] for i in range(0, len(order), self.window_blocks)]

    def _fill(self, buf: dict[str, np.ndarray], blocks: np.ndarray, seed: int) -> int:
        """Read the train rows of `blocks` into the window buffer `buf`; returns how many."""
        ff, pos = self._ff, 0
        for b in blocks.tolist():
            lo, hi = b * self.block_rows, min((b + 1) * self.block_rows, ff.n_items)
            items = self._train[self._block_train[b]:self._block_train[b + 1]]  # (n,) ascending, within [lo, hi)
            rel, n = items - lo, len(items)
            image = ff.read_rows("image_emb", lo, hi, out=buf["block_image"])
            text = ff.read_rows("text_emb", lo, hi, out=buf["block_text"])
            for dest, src in ((buf["image"], image), (buf["text"], text)):
                if src.dtype == dest.dtype:
                    np.take(src, rel, axis=0, out=dest[pos:pos + n])
                else:  # a file stored in another dtype: converted here
                    dest[pos:pos + n] = src[rel]
            buf["labels"][pos:pos + n] = self._labels[items]
            buf["groups"][pos:pos + n] = self._groups[items]
            if self._n_views:
                view_item = ff.view_item
                v0, v1 = np.searchsorted(view_item, [lo, hi])
                choice = np.random.default_rng([seed, 2, b]).integers(0, self._n_views + 1, size=n)  # 0: deterministic
                at = np.searchsorted(view_item[v0:v1], items)  # (n,) where each item's views would be
                has = at < v1 - v0
                has[has] = view_item[v0:v1][at[has]] == items[has]
                use = np.flatnonzero(has & (choice > 0))
                if len(use):
                    views = ff.read_rows("view_emb", int(v0), int(v1))  # (nv, K, Di)
                    buf["image"][pos + use] = views[at[use], choice[use] - 1]
            pos += n
        return pos

    def _epoch(self, batch_size: int, seed: int) -> Iterator[Batch]:
        windows = self.epoch_windows(seed)
        rows = self.window_blocks * self.block_rows
        free: queue.Queue = queue.Queue()
        full: queue.Queue = queue.Queue()
        for _ in range(2):  # the window being read from and the one being filled
            free.put({"image": np.empty((rows, self.image_dim), np.float32),
                      "text": np.empty((rows, self.text_dim), np.float32),
                      "labels": np.empty(rows, np.int64),
                      "groups": np.empty(rows, np.int64),
                      "block_image": np.empty((self.block_rows, self.image_dim), self._ff.image_emb.dtype),
                      "block_text": np.empty((self.block_rows, self.text_dim), self._ff.text_emb.dtype)})
        stop = threading.Event()

        def produce() -> None:
            try:
                for blocks in windows:
                    buf = None
                    while buf is None:
                        if stop.is_set():
                            return
                        try:
                            buf = free.get(timeout=0.1)
                        except queue.Empty:
                            pass
                    full.put((buf, self._fill(buf, blocks, seed)))
                full.put(None)
            except BaseException as exc:  # handed to the consumer, which raises it
                full.put(exc)

        reader = threading.Thread(target=produce, name="huse-stream-reader", daemon=True)
        reader.start()
        try:
            fields = ("image", "text", "labels", "groups")
            carry: tuple[np.ndarray, ...] | None = None  # rows short of a batch, copied out
            for j in range(len(windows) + 1):
                got = full.get()
                if isinstance(got, BaseException):
                    raise got
                if got is None:
                    break
                buf, n = got
                perm = np.random.default_rng([seed, 1, j]).permutation(n)  # (n,) rows of the window, shuffled
                start = 0
                if carry is not None:
                    take = perm[:batch_size - len(carry[2])]
                    parts = [np.concatenate([c, buf[k][take]]) for c, k in zip(carry, fields)]
                    start = len(take)
                    carry = None
                    if len(parts[2]) == batch_size:
                        yield self._to_batch(*parts)
                    else:
                        carry = tuple(parts)  # a window smaller than the rest of a batch
                end = start + (n - start) // batch_size * batch_size
                for s in range(start, end, batch_size):
                    idx = perm[s:s + batch_size]
                    yield self._to_batch(*(buf[k][idx] for k in fields))
                if end < n:
                    idx = perm[end:]
                    rest = tuple(buf[k][idx] for k in fields)  # copies
                    carry = rest if carry is None else tuple(np.concatenate([c, r]) for c, r in zip(carry, rest))
                free.put(buf)
            if carry is not None:
                yield self._to_batch(*carry)
        finally:
            stop.set()
            reader.join()

    # -- validation
    def val_batches(self, batch_size: int, items: np.ndarray | None = None) -> Iterator[Batch]:
        items = self._val if items is None else np.asarray(items, dtype=np.int64)
        chunk = batch_size * max(1, 8192 // batch_size)  # items read at a time (whole batches)
        for c0 in range(0, len(items), chunk):
            part = items[c0:c0 + chunk]
            image = self._ff.read_items("image_emb", part).astype(np.float32, copy=False)
            text = self._ff.read_items("text_emb", part).astype(np.float32, copy=False)
            labels, groups = self._labels[part], self._groups[part]
            for s in range(0, len(part), batch_size):
                sl = slice(s, s + batch_size)
                yield self._to_batch(image[sl], text[sl], labels[sl], groups[sl])
