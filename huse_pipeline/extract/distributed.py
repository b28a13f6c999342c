"""Stage one on many processes: who this process is (a torchrun rank, a job-array worker, or the
only process), its device, the claims through which processes share the shards, and the progress
bar of the whole job.

Shards are the fixed row ranges of `plan.plan_parts`: their boundaries never depend on the number
of processes, so any number of processes, at any time, compute the same shard files. A process
takes a shard by locking its claim file (`plan.claim_path`); it computes first the
shards whose index i has i % count == its index (its own share), then, from the end, any other
shard that nobody has finished or holds: stragglers and lost processes are covered, and who
computed a shard never changes what is in it.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import ErrorHandler
from tqdm.auto import tqdm

from huse_pipeline.errors import HuseError
from huse_pipeline.extract.locks import FileLock, describe_holder, holder_info
from huse_pipeline.extract.plan import claim_path, part_path
from huse_pipeline.utils import resolve_device

log = logging.getLogger(__name__)

# the ranks exchange one small message at the start; gloo needs no GPU and has no watchdog to trip
BACKEND = "gloo"
START_TIMEOUT = datetime.timedelta(minutes=30)  # rank 0 reads the catalogue and checks the output meanwhile
FAILED = ".failed.json"  # in the parts folder: a rank of a torchrun job failed; its fellow ranks stop


class JobStopped(HuseError):
    """Another rank of this torchrun job failed and said why; this one stops without a message."""


def torchrun_env() -> dict[str, int] | None:
    """RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE as torchrun sets them (None outside torchrun)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    env = {key: int(os.environ.get(key, default)) for key, default in
           (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0), ("LOCAL_WORLD_SIZE", 1))}
    return env


@dataclass(frozen=True)
class Worker:
    """This process's place in the job: a torchrun rank (rank of world), optionally inside one
    worker of a job array (array_index of array_count)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    array_index: int | None = None
    array_count: int | None = None

    @classmethod
    def from_env(cls, worker_index: int | None = None, worker_count: int | None = None) -> Worker:
        """The torchrun environment (if any) and the job-array options."""
        if (worker_index is None) != (worker_count is None):
            raise HuseError("--worker-index and --worker-count go together")
        if worker_count is not None and not 0 <= worker_index < worker_count:
            raise HuseError(f"--worker-index must be in 0..{worker_count - 1} (--worker-count {worker_count}); "
                            "SLURM arrays: --worker-index $SLURM_ARRAY_TASK_ID with --array=0-(N-1)")
        env = torchrun_env() or {}
        return cls(env.get("RANK", 0), env.get("WORLD_SIZE", 1), env.get("LOCAL_RANK", 0),
                   env.get("LOCAL_WORLD_SIZE", 1), worker_index, worker_count)

    @property
    def in_array(self) -> bool:
        return self.array_count is not None

    @property
    def leads(self) -> bool:
        """Rank 0: takes the locks, prepares the parts folder, shows progress, merges."""
        return self.rank == 0

    @property
    def index(self) -> int:
        """Global index among all processes of the job (array workers x ranks)."""
        return (self.array_index or 0) * self.world + self.rank

    @property
    def count(self) -> int:
        return (self.array_count or 1) * self.world

    @property
    def label(self) -> str:
        parts = []
        if self.in_array:
            parts.append(f"worker {self.array_index} of {self.array_count}")
        if self.world > 1:
            parts.append(f"rank {self.rank} of {self.world}")
        return ", ".join(parts) or "one process"

    def device(self, requested: str) -> torch.device:
        """`--device` for this process: under torchrun, auto/cuda mean cuda:LOCAL_RANK."""
        if self.world > 1 and requested in ("auto", "cuda"):
            if not torch.cuda.is_available():
                if requested == "cuda":
                    resolve_device(requested)  # raises the usual message
                return torch.device("cpu")
            if self.local_rank >= torch.cuda.device_count():
                raise HuseError(f"local rank {self.local_rank} has no GPU: this node shows "
                                f"{torch.cuda.device_count()}; start at most that many processes per node")
            device = torch.device("cuda", self.local_rank)
        else:
            device = resolve_device(requested)
        if device.type == "cuda" and device.index is not None:
            if device.index >= torch.cuda.device_count():
                raise HuseError(f"--device {requested}: this machine shows {torch.cuda.device_count()} GPU(s)")
            torch.cuda.set_device(device)  # pinned memory and autocast follow the current device
        return device

    def default_num_workers(self) -> int:
        """DataLoader workers per process: the CPUs this node gives each local process, less one for
        the process itself (at least 1, at most 8); one process alone keeps at least 2 (measured
        best on 2 cores, BENCHMARKS.md)."""
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cpus = os.cpu_count() or 1
        per_process = cpus // max(1, self.local_world)
        floor = 2 if self.local_world == 1 else 1
        return max(floor, min(8, per_process - 1))


@contextlib.contextmanager
def process_group(worker: Worker) -> Iterator[None]:
    """The gloo process group of a torchrun job (nothing for one process)."""
    if worker.world == 1 or dist.is_initialized():
        yield
        return
    dist.init_process_group(BACKEND, timeout=START_TIMEOUT)
    yield
    dist.destroy_process_group()  # not after a failure: a failing rank leaves at once, without waiting for others


def broadcast(worker: Worker, obj: Any) -> Any:
    """Rank 0's `obj` on every rank (the decision of its set-up)."""
    if worker.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------------------------- shard claims


def claim_order(planned: Sequence[tuple[int, int]], worker: Worker) -> list[tuple[int, int]]:
    """Shards in the order this process tries them: its own share first, then the others from the
    end (where their own processes will arrive last)."""
    own = [p for i, p in enumerate(planned) if i % worker.count == worker.index]
    others = [p for i, p in enumerate(planned) if i % worker.count != worker.index]
    return own + others[::-1]


class ShardClaims:
    """An iterable of shards this process has claimed and that nobody has finished, taken lazily
    (the DataLoader asks for the next one only as its workers run ahead). `release` a shard once
    its file is written; `close` drops every claim still held (the process stops)."""

    def __init__(self, folder: Path, order: Sequence[tuple[int, int]], worker: Worker) -> None:
        self.folder, self.order, self.worker = folder, list(order), worker
        self.held: dict[tuple[int, int], FileLock] = {}  # in claim order: the first is in progress

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for start, end in self.order:
            if self.worker.world > 1:
                check_failed(self.folder)
            if part_path(self.folder, start, end).exists():
                continue
            lock = FileLock(claim_path(self.folder, start, end))
            if not lock.acquire(info=holder_info(self.worker.label)):
                continue  # another process is computing it
            if part_path(self.folder, start, end).exists():  # finished between our look and our claim
                lock.release()
                continue
            self.held[(start, end)] = lock
            yield start, end

    def release(self, start: int, end: int) -> None:
        lock = self.held.pop((start, end), None)
        if lock is not None:
            lock.release()

    def in_progress(self) -> tuple[int, int] | None:
        return next(iter(self.held), None)

    def close(self) -> None:
        for lock in self.held.values():
            lock.close()
        self.held.clear()


def mark_failed(folder: Path, worker: Worker, message: str) -> None:
    """Tell the job's other ranks to stop (a torchrun job only: array workers stay independent)."""
    if worker.world > 1:
        try:
            (folder / FAILED).write_text(json.dumps({"by": worker.label, "message": message}))
        except OSError:
            pass


def check_failed(folder: Path) -> None:
    """JobStopped if a rank of this job has failed (`mark_failed`)."""
    if (folder / FAILED).exists():
        raise JobStopped(f"stopped: {(folder / FAILED).read_text()}")


def clear_failed(folder: Path) -> None:
    """A new job starts (under the exclusive job lock): forget a previous job's failure."""
    (folder / FAILED).unlink(missing_ok=True)


class ConciseErrors(ErrorHandler):
    """torchrun's error file of a rank: our one-line message when the cause is a user's problem
    (a HuseError), the traceback of anything else."""

    def record_exception(self, e: BaseException) -> None:
        cause = e.__cause__ or e
        if not isinstance(cause, HuseError) and not isinstance(e, HuseError):
            return super().record_exception(e)
        file = self._get_error_file_path()
        if file:
            with open(file, "w") as fh:
                json.dump({"message": {"message": f"{type(e).__name__}: {e}",
                                       "extraInfo": {"py_callstack": str(e), "timestamp": str(int(time.time()))}}}, fh)


def free_missing(folder: Path, planned: Sequence[tuple[int, int]]) -> tuple[list[tuple[int, int]], int]:
    """(missing shards nobody holds, number of missing shards held by a live process)."""
    free, held = [], 0
    for start, end in planned:
        if part_path(folder, start, end).exists():
            continue
        if FileLock(claim_path(folder, start, end)).is_held_by_another():
            held += 1
        else:
            free.append((start, end))
    return free, held


# -------------------------------------------------------------------------------------- progress


def finished_rows(folder: Path) -> dict[tuple[int, int], int]:
    """{(start, end): rows} of the shard files in `folder`, from their names (no file is opened)."""
    out = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            name = entry.name
            if name.startswith("part-") and name.endswith(".h5"):
                try:
                    start, end = (int(x) for x in name[5:-3].split("-"))
                except ValueError:
                    continue
                out[(start, end)] = end - start
    return out


class ShardProgress:
    """The job's bar on rank 0: shards finished by every process / total, their rows per second
    (the whole job's images/s: one deterministic view per row) and the ETA. Other processes show
    nothing. Has `update`/`set_postfix` like a tqdm bar, so the part loop can drive it."""

    def __init__(self, folder: Path, total: int, reused: set[tuple[int, int]], enabled: bool,
                 every_s: float = 1.0) -> None:
        self.folder, self.reused, self.enabled, self.every_s = folder, set(reused), enabled, every_s
        self.t0 = time.perf_counter()
        self.last = 0.0
        self.bar = tqdm(total=total, initial=len(reused), unit="shard", desc="extract-features", disable=not enabled,
                        dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self.poll()

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def poll(self, force: bool = False) -> int:
        """Count the finished shards (at most every `every_s` seconds unless `force`); returns the count."""
        if not self.enabled:
            return 0
        now = time.perf_counter()
        if not force and now - self.last < self.every_s:
            return self.bar.n
        self.last = now
        done = finished_rows(self.folder)
        new_rows = sum(n for part, n in done.items() if part not in self.reused)
        self.bar.n = len(done)
        self.bar.set_postfix(img_per_s=f"{new_rows / max(now - self.t0, 1e-9):.1f}", refresh=False)
        self.bar.refresh()
        return len(done)

    def close(self) -> None:
        if self.enabled:
            self.poll(force=True)
        self.bar.close()


# ------------------------------------------------------------------------------------ job locks


class JobLocks:
    """One extraction per `--out`: the job lock `.<out>.lock` beside it, held for the whole run.

    One process, or rank 0 of a torchrun job, holds it exclusively (its other ranks are part of its
    job). Workers of a job array share it and each holds its own `.<out>.worker-<index>.lock`, so
    that the array's workers run together while any other job, or a second worker with the same
    index, is refused with a message naming the running one.
    """

    def __init__(self, out: Path, worker: Worker, wait_s: float = 60.0) -> None:
        self.out, self.worker, self.wait_s = out, worker, wait_s
        self.job = FileLock(out.with_name(f".{out.name}.lock"))
        self.mine = FileLock(self._worker_path(worker.array_index)) if worker.in_array else None

    def _worker_path(self, index: int | None) -> Path:
        return self.out.with_name(f".{self.out.name}.worker-{index}.lock")

    def acquire(self) -> None:
        """Take the locks of this process's role; HuseError naming the running job if it cannot."""
        label = self.worker.label
        if self.mine is None:
            if not self.job.acquire(info=holder_info(label)):
                raise HuseError(self.refusal())
            return
        if not self.mine.acquire(info=holder_info(label)):
            raise HuseError(f"{label} of a job array is already running on {self.out}: "
                            f"{describe_holder(self.mine.holder())}. Wait for it, or stop it; its finished shards "
                            "are kept.")
        deadline = time.monotonic() + self.wait_s
        while not self.job.acquire(shared=True):
            holder = self.job.holder()  # another array worker may hold it for a moment, to set the folder up
            if not (holder or {}).get("setting_up") or time.monotonic() > deadline:
                self.mine.release()
                raise HuseError(self.refusal())
            time.sleep(0.2)

    def exclusive(self) -> bool:
        """An array worker swaps its shared lock for an exclusive one (to discard another run's
        unfinished shards); False when other processes still hold it (then call `shared`)."""
        self.job.close()
        return self.job.acquire(info=holder_info(self.worker.label, setting_up=True))

    def shared(self) -> None:
        """Back to the shared lock of an array worker."""
        self.job.close()
        if not self.job.acquire(shared=True):
            raise HuseError(self.refusal())

    def others_running(self) -> list[str]:
        """Who else holds a worker lock of this output (array workers alive now)."""
        mine = None if self.mine is None else self.mine.path
        found = []
        for path in sorted(self.out.parent.glob(f".{self.out.name}.worker-*.lock")):
            lock = FileLock(path)
            if path != mine and lock.is_held_by_another():
                found.append(describe_holder(lock.holder()))
        return found

    def refusal(self) -> str:
        workers = self.others_running()
        if workers:
            who = f"job-array workers are writing {self.out}: " + "; ".join(workers)
        else:
            who = f"another extraction is writing {self.out}: {describe_holder(self.job.holder())}"
        return (f"{who}. Wait for it to finish or stop it (its finished shards are kept), or choose another --out; "
                "two jobs never write one output.")

    def release(self) -> None:
        self.job.release()
        if self.mine is not None:
            self.mine.release()
