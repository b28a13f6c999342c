"""Small helpers shared by the stages: atomic file writes, device resolution, fields added to a config
after artefacts were first saved. Importing this module does not import torch (user mistakes are
reported before the heavy imports)."""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import re
import socket
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from huse_pipeline.errors import HuseError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# dataclass field metadata key: the value every artefact saved before the field existed was made with
ADDED_LATER = "before"
# the owner of a temporary file, in its name: `.last.pt.<host>-<pid>.<random>.tmp`
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"
_OWNED_TEMP = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9-]+)-(?P<pid>\d+)\.[^.]+\.tmp$")


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{_HOST}-{os.getpid()}."


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path` atomically.

    Whoever writes to the yielded path either finishes and the result appears under `path` in one
    `os.replace`, or fails and the temporary file is removed: no reader ever sees a half-written
    file under the final name. The temporary file's name carries this host and process id
    (`.NAME.<host>-<pid>.<random>.tmp`), so `remove_stale_temps` can tell one left by a killed
    process from one still being written. A write error that names no file (a full disk fails
    `write`, not `open`) is given `path` as its file name, so the message says which file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions of a new file
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:  # flush the data to disk before the rename makes it visible
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except OSError as exc:
        if exc.errno is not None and (exc.filename is None or str(exc.filename) == str(tmp_path)):
            exc.filename = str(path)  # the temporary name means nothing to the user
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def is_disk_full(exc: BaseException) -> bool:
    """Whether an OSError says the disk (or the user's quota) is full."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files `atomic_path` left in `folder` when its process was killed
    (`kill -9`, a power cut): those named for this host whose process no longer exists. A live
    writer's file (this process, a concurrent run) and files of other hosts or of other programs
    are left alone. Returns what was removed."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for tmp in folder.glob(".*.tmp"):
        owner = _OWNED_TEMP.match(tmp.name)
        if owner is None or owner["host"] != _HOST or _pid_alive(int(owner["pid"])):
            continue
        try:
            tmp.unlink()
        except FileNotFoundError:  # another run cleaning the same folder
            continue
        log.info("removed %s, left by a killed run (process %s)", tmp, owner["pid"])
        removed.append(tmp)
    return removed


def resolve_device(device: str) -> "torch.device":
    """Map `auto|cpu|cuda[:N]` to a torch device; `auto` picks CUDA when it is available."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise HuseError(f"--device {device} was asked for but no CUDA GPU is visible; use --device cpu or auto.")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise HuseError(f"unknown device {device!r}: use auto, cpu or cuda") from exc


def added_later(field_default: Any, before: Any) -> Any:
    """A dataclass field added after artefacts were first saved: `before` is the value they were all
    made with (`image_pool: str = added_later("avg+mid", before="avg")`)."""
    return dataclasses.field(default=field_default, metadata={ADDED_LATER: before})


def fields_added_later(cls: type) -> dict[str, Any]:
    """{field name: the value artefacts saved before it existed were made with} of a config dataclass."""
    return {f.name: f.metadata[ADDED_LATER] for f in dataclasses.fields(cls) if ADDED_LATER in f.metadata}
