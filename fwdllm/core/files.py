"""Files that appear whole or not at all.

Every output of fwdllm (models, adapters, checkpoints, run files) is written
to a temporary name beside its destination and renamed into place only when
complete, so a crash or Ctrl-C never leaves a partial file that a later step
could mistake for a finished one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from fwdllm.core.errors import UserError


@contextlib.contextmanager
def atomic_output(dst: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``dst``; rename it to ``dst`` on success,
    delete it on any failure (including Ctrl-C)."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".part", dir=dst.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would surprise users sharing models and runs
    try:
        yield Path(tmp)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, synced to disk before the rename
    (a checkpoint must survive a power cut, not just a crash)."""
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def output_dir(path: Path, flag: str = "--out") -> Path:
    """Create ``path`` (and its parents) as a writable directory, or raise a
    one-line :class:`UserError` naming ``flag``: called before any work, so a
    bad ``--out`` (under a regular file, in /proc, read-only) costs nothing."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write there ({e.strerror or e})") from None
    return path
