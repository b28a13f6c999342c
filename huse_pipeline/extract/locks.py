"""File locks for stage one's concurrent writers: the job lock next to `--out` (one extraction per
output), the per-worker locks of a job array and the claim of each shard. They are flock(2) locks
on small files that name their holder; the kernel drops a lock when its process dies, even by
kill -9, so a lock that can be taken is never held by a live process. Imports no torch.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from huse_pipeline.errors import HuseError

# descriptors of the locks this process holds: a forked child (a DataLoader worker) closes its
# copies, so that a lock dies with the process that took it, not with its last child
_HELD: set[int] = set()


def _close_in_child() -> None:
    for fd in list(_HELD):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


def holder_info(role: str, **extra: Any) -> dict[str, Any]:
    """Who takes a lock: host, pid, start time and what it is (`role`, e.g. "rank 0 of 8")."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "role": role, **extra}


def describe_holder(info: dict[str, Any] | None) -> str:
    if not info:
        return "a process that has not yet said who it is"
    return f"pid {info.get('pid')} on host {info.get('host')} since {info.get('since')} ({info.get('role')})"


class FileLock:
    """An exclusive or shared flock on `path`, created on demand and removed by its last holder.

    A holder that unlinks the file leaves a window in which another process has opened the old
    file and then locks it: every acquisition therefore checks that the path still names the file
    it locked, and tries again if not.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.fd: int | None = None
        self.shared = False

    @property
    def held(self) -> bool:
        return self.fd is not None

    def acquire(self, shared: bool = False, blocking: bool = False, info: dict[str, Any] | None = None) -> bool:
        """Take the lock; False if another process holds it (non-blocking). An exclusive holder
        writes `info` into the file, where `holder()` reads it."""
        if self.fd is not None:
            raise RuntimeError(f"{self.path} is already held by this object")
        mode = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if blocking else fcntl.LOCK_NB)
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except FileNotFoundError:  # its folder does not exist yet
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, mode)
            except BlockingIOError:
                os.close(fd)
                return False
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise HuseError(f"cannot lock {self.path}: the file system does not support flock ({exc}); "
                                    "put --out on a local disk or a shared file system with locking (NFSv4, Lustre "
                                    "mounted with -o flock, GPFS, CephFS)") from exc
                raise
            if _same_file(fd, self.path):
                break
            os.close(fd)  # its last holder removed it after we opened it: lock the new one
        self.fd, self.shared = fd, shared
        _HELD.add(fd)
        if info is not None and not shared:
            data = json.dumps(info, sort_keys=True).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
        return True

    def holder(self) -> dict[str, Any] | None:
        """What the exclusive holder wrote (None if nothing readable)."""
        try:
            info = json.loads(self.path.read_text() or "null")
        except (OSError, ValueError):
            return None
        return info if isinstance(info, dict) else None

    def is_held_by_another(self) -> bool:
        """Whether a live process holds this lock (tested by taking it shared for a moment)."""
        probe = FileLock(self.path)
        if not self.path.exists():
            return False
        if probe.acquire(shared=True):
            probe.release()  # removes the file a dead holder left, unless someone else holds it now
            return False
        return True

    def release(self) -> None:
        """Drop the lock; the file is removed when no other process holds it."""
        if self.fd is None:
            return
        try:
            if self.shared:
                try:  # only the last holder may remove the file (not atomic, but a failed try just leaves it)
                    fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return
            if _same_file(self.fd, self.path):
                self.path.unlink(missing_ok=True)
        finally:
            self.close()

    def close(self) -> None:
        """Drop the lock and leave the file (closing the descriptor releases the flock)."""
        if self.fd is not None:
            _HELD.discard(self.fd)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> FileLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
