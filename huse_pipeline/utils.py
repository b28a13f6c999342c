"""Small helpers shared by the stages: atomic file writes, device resolution, fields added to a config
after artefacts were first saved. Importing this module does not import torch (user mistakes are
reported before the heavy imports)."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from huse_pipeline.errors import HuseError

if TYPE_CHECKING:
    import torch

# dataclass field metadata key: the value every artefact saved before the field existed was made with
ADDED_LATER = "before"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path` atomically.

    Whoever writes to the yielded path either finishes and the result appears under `path` in one
    `os.replace`, or fails and the temporary file is removed: no reader ever sees a half-written
    file under the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


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
