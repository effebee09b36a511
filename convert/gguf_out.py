"""Streaming, atomic GGUF output.

A 7B model does not fit in memory as float32, so tensors are described up
front (name, shape, type) and produced one at a time while the file is
written.  Every output goes to a temporary file next to the destination and is
renamed into place only when complete, so a failure never leaves a partial
file that a later step could mistake for a model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Callable, Sequence

import gguf
import numpy as np
from tqdm import tqdm

from fwdllm.core.errors import UserError
from fwdllm.core.files import atomic_output

QType = gguf.GGMLQuantizationType
_NP_DTYPES = {QType.F32: np.float32, QType.F16: np.float16}


@dataclass(frozen=True)
class TensorOut:
    """One tensor to write: ``make()`` is called only when its turn comes.

    ``shape`` is the numpy (row-major) shape in *elements*; ``make`` returns
    either a float array of that shape (F32/F16) or the raw uint8 blocks of a
    quantized type.
    """

    name: str
    shape: tuple[int, ...]
    qtype: QType
    make: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        if self.shape[-1] % block:
            raise ValueError(f"{self.name}: row length {self.shape[-1]} is not a multiple of {block} ({self.qtype.name})")
        return prod(self.shape[:-1]) * (self.shape[-1] // block) * size


def write_gguf(
    path: str | os.PathLike,
    setup: Callable[[gguf.GGUFWriter], None],
    tensors: Sequence[TensorOut],
    *,
    arch: str = "llama",
    desc: str = "writing",
) -> Path:
    """Write a GGUF file: ``setup`` adds the metadata, then each tensor is
    produced and written in turn (peak memory = the largest single tensor)."""
    path = Path(path)
    with atomic_output(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        try:
            setup(writer)
            for t in tensors:
                np_dtype = _NP_DTYPES.get(t.qtype, np.uint8)
                shape = t.shape if np_dtype is not np.uint8 else (*t.shape[:-1], t.nbytes // prod(t.shape[:-1]))
                writer.add_tensor_info(t.name, shape, np.dtype(np_dtype), t.nbytes, raw_dtype=t.qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            total = sum(t.nbytes for t in tensors)
            with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=None) as bar:
                for t in tensors:
                    data = np.ascontiguousarray(t.make(), dtype=_NP_DTYPES.get(t.qtype, np.uint8))
                    if data.nbytes != t.nbytes:
                        raise UserError(f"{t.name}: produced {data.nbytes} bytes, expected {t.nbytes}")
                    writer.write_tensor_data(data)
                    bar.update(data.nbytes)
        finally:
            writer.close()
    return path
