"""Opening GGUF files with user-facing errors.

gguf-py reports a truncated or foreign file with a numpy reshape error deep in
its reader; the model store, convert and the engine all go through
:func:`open_gguf` so the user sees one line naming the file instead.

gguf-py's reader also turns every metadata array into Python objects: for a
49k-token vocabulary that is a ~140 MB transient, more than the whole
SmolLM2 INT4 file.  Code that needs only scalars and tensor shapes (every
device-side caller) uses :func:`read_header`, which walks the header with
``struct`` and skips arrays.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import gguf

from fwdllm.core.errors import UserError


def _require_gguf(path: Path) -> None:
    """UserError unless ``path`` is a file starting with the GGUF magic."""
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise UserError(f"{path}: not a GGUF file")


def _check_extent(path: Path, end: int) -> None:
    """UserError if the tensor data should run past the end of the file."""
    size = path.stat().st_size
    if end > size:
        raise UserError(f"{path}: truncated GGUF ({size} bytes, tensors need {end})")


def open_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
    """A memory-mapped reader for ``path``, or a UserError saying what is wrong."""
    path = Path(path)
    _require_gguf(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # gguf-py raises ValueError/IndexError/struct errors on damaged files
        raise UserError(f"{path}: damaged or truncated GGUF ({e})") from None
    _check_extent(path, max((t.data_offset + t.n_bytes for t in reader.tensors), default=0))
    return reader


def field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    """A metadata value as a Python scalar/str/list, or ``default``."""
    f = reader.fields.get(key)
    return default if f is None else f.contents()


#: GGUF metadata value types with a fixed size: type id -> struct format.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's header entry; ``shape`` is in ggml order (ne0 first)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # from the start of the data section


@dataclass(frozen=True)
class GGUFHeader:
    """Scalar and string metadata (arrays are skipped) and the tensor table."""

    fields: dict[str, Any]
    tensors: list[TensorInfo]

    def field(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)


def _unpack(f: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize("<" + fmt)
    raw = f.read(size)
    if len(raw) != size:
        raise EOFError("header ends early")
    return struct.unpack("<" + fmt, raw)[0]


def _string(f: BinaryIO, size: int) -> str:
    n = _unpack(f, "Q")
    if n > size - f.tell():  # a corrupt length would otherwise ask for exabytes
        raise ValueError(f"a string of {n} bytes in a {size}-byte file")
    raw = f.read(n)
    if len(raw) != n:
        raise EOFError("header ends early")
    return raw.decode("utf-8", errors="replace")


def _skip_value(f: BinaryIO, vtype: int) -> None:
    if vtype in _SCALARS:
        f.seek(struct.calcsize("<" + _SCALARS[vtype]), os.SEEK_CUR)
    elif vtype == _STRING:
        f.seek(_unpack(f, "Q"), os.SEEK_CUR)
    elif vtype == _ARRAY:
        itype, n = _unpack(f, "I"), _unpack(f, "Q")
        if itype in _SCALARS:
            f.seek(n * struct.calcsize("<" + _SCALARS[itype]), os.SEEK_CUR)
        else:
            for _ in range(n):
                _skip_value(f, itype)
    else:
        raise ValueError(f"unknown metadata type {vtype}")


def read_header(path: str | os.PathLike) -> GGUFHeader:
    """The header of ``path`` without its metadata arrays, or a UserError
    saying what is wrong (missing, foreign, damaged or truncated file)."""
    path = Path(path)
    _require_gguf(path)
    size = path.stat().st_size
    try:
        with open(path, "rb", buffering=1 << 16) as f:
            f.seek(4)  # the magic
            version, n_tensors, n_kv = _unpack(f, "I"), _unpack(f, "Q"), _unpack(f, "Q")
            if version < 2:
                raise ValueError(f"GGUF version {version} is not supported")
            # every entry takes at least 8 bytes: larger counts are corruption, not a big model
            if n_tensors > size // 8 or n_kv > size // 8:
                raise ValueError(f"{n_tensors} tensors and {n_kv} metadata keys cannot fit in {size} bytes")
            fields: dict[str, Any] = {}
            for _ in range(n_kv):
                key, vtype = _string(f, size), _unpack(f, "I")
                if vtype in _SCALARS:
                    fields[key] = _unpack(f, _SCALARS[vtype])
                elif vtype == _STRING:
                    fields[key] = _string(f, size)
                else:
                    _skip_value(f, vtype)
            tensors = []
            for _ in range(n_tensors):
                name, n_dims = _string(f, size), _unpack(f, "I")
                if n_dims > 8:
                    raise ValueError(f"tensor {name!r} has {n_dims} dimensions")
                shape = tuple(_unpack(f, "Q") for _ in range(n_dims))
                tensors.append(TensorInfo(name, shape, _unpack(f, "I"), _unpack(f, "Q")))
            align = int(fields.get("general.alignment", 32))
            data_start = -(-f.tell() // align) * align
    except (EOFError, ValueError, struct.error, MemoryError, OverflowError) as e:
        raise UserError(f"{path}: damaged or truncated GGUF ({type(e).__name__}: {e})") from None
    try:
        end = max((data_start + t.offset + _n_bytes(t) for t in tensors), default=0)
    except (KeyError, ValueError) as e:  # an unknown ggml type id
        raise UserError(f"{path}: damaged GGUF (tensor type: {e})") from None
    _check_extent(path, end)
    return GGUFHeader(fields, tensors)


def _n_bytes(t: TensorInfo) -> int:
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t.ggml_type)]
    return math.prod(t.shape) // block * size
