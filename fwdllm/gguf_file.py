"""Opening GGUF files with user-facing errors.

gguf-py reports a truncated or foreign file with a numpy reshape error deep in
its reader; the model store, convert and the engine all go through
:func:`open_gguf` so the user sees one line naming the file instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import gguf

from fwdllm.errors import UserError


def open_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
    """A memory-mapped reader for ``path``, or a UserError saying what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise UserError(f"{path}: not a GGUF file")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # gguf-py raises ValueError/IndexError/struct errors on damaged files
        raise UserError(f"{path}: damaged or truncated GGUF ({e})") from None
    size = path.stat().st_size
    end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    if end > size:
        raise UserError(f"{path}: truncated GGUF ({size} bytes, tensors need {end})")
    return reader


def field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    """A metadata value as a Python scalar/str/list, or ``default``."""
    f = reader.fields.get(key)
    return default if f is None else f.contents()
