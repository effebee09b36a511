"""Derived model files: quantization through llama.cpp's own
``llama_model_quantize``, and untying the output projection.

Using the engine's quantizer (not a reimplementation) guarantees the blocks
are exactly what llama.cpp's kernels expect, and that the per-tensor type mix
(e.g. Q6_K for the output matrix) is the one real GGUF releases use.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

from fwdllm.core.errors import UserError
from fwdllm.core.files import atomic_output
from fwdllm.core.gguf_file import open_gguf

#: User-facing quant names -> llama_ftype values (llama.h).
QUANTS: dict[str, int] = {"F16": 1, "Q8_0": 7, "Q4_0": 2, "Q4_1": 3, "Q4_K_M": 15}


def ftype_of(quant: str) -> int:
    """The llama_ftype for a quant name; a one-line UserError if unknown."""
    try:
        return QUANTS[quant.upper()]
    except KeyError:
        raise UserError(f"unknown quant type {quant!r}; choose from {', '.join(QUANTS)}") from None


def quantize(src: str | os.PathLike, dst: str | os.PathLike, quant: str, nthread: int | None = None) -> Path:
    """Quantize GGUF ``src`` into ``dst`` with llama.cpp and return ``dst``.

    Already-quantized sources are allowed (``allow_requantize``): the model
    store makes its Q4_0 variant from a published Q4_1 file, which loses a
    little accuracy versus quantizing from F16 but needs no F16 download.
    ``dst`` appears only if quantization succeeded.
    """
    import llama_cpp

    from fwdllm.runtime.log import quiet_llama

    ftype = ftype_of(quant)
    src, dst = Path(src), Path(dst)
    open_gguf(src)  # clear errors for missing, foreign or truncated files
    quiet_llama()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True
    params.nthread = nthread or len(os.sched_getaffinity(0))
    with atomic_output(dst) as tmp:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise UserError(f"llama.cpp could not quantize {src} to {quant} (truncated or unsupported GGUF?)")
    return dst


def write_via_f16(out: str | os.PathLike, quant: str, write_f16: Callable[[Path], Path]) -> Path:
    """Make ``out`` in ``quant`` from a writer that can only produce F16.

    For F16 the writer targets ``out`` directly; otherwise it writes a
    temporary F16 file beside ``out`` (same filesystem, so no surprise /tmp
    exhaustion) that llama.cpp then quantizes and that is always removed.
    """
    ftype_of(quant)
    out = Path(out)
    if quant.upper() == "F16":
        return write_f16(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".f16.part", dir=out.parent)
    os.close(fd)
    try:
        write_f16(Path(tmp))
        return quantize(tmp, out, quant)
    finally:
        Path(tmp).unlink(missing_ok=True)


def untie(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy a model whose output projection is tied to ``token_embd.weight``
    into ``dst`` with an explicit ``output.weight``: the same bytes and type,
    so every logit is unchanged, but a LoRA (the ``--head``) can now adapt the
    output projection alone.  (llama.cpp reads a ``token_embd.weight`` LoRA as
    one of the *input* embeddings, so a tied model has no LoRA slot for it.)
    """
    import gguf

    src, dst = Path(src), Path(dst)
    reader = open_gguf(src)
    names = [t.name for t in reader.tensors]
    if "output.weight" in names:
        raise UserError(f"{src} already has an output.weight (it is not tied)")
    if "token_embd.weight" not in names:
        raise UserError(f"{src} has no token_embd.weight to untie")
    arch = str(reader.fields["general.architecture"].contents())
    tensors = [*reader.tensors, next(t for t in reader.tensors if t.name == "token_embd.weight")]
    with atomic_output(dst) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        for f in reader.fields.values():  # as gguf-py's gguf_new_metadata copies them
            if f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith("GGUF."):
                continue
            sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(f.name, f.contents(), f.types[0], sub_type=sub)
        for i, t in enumerate(tensors):
            name = "output.weight" if i == len(reader.tensors) else t.name
            writer.add_tensor_info(name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in tensors:
            writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
        writer.close()
    return dst
