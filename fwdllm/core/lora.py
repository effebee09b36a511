"""Fresh LoRA adapters matched to a base GGUF, and checks that an adapter fits.

A fresh adapter starts as PEFT does: A small random, B zero, so the adapted
model equals the base model at step 0 while perturbations of B still move the
output.  Stored as F32 (by :func:`fwdllm.core.adapter_io.write_adapter`) so that
+-eps perturbations are not rounded away.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from fwdllm.core.adapter_io import header_shapes, read_adapter, write_adapter
from fwdllm.core.errors import UserError
from fwdllm.core.gguf_file import read_header
from fwdllm.core.layout import OUTPUT, LoraLayout
from fwdllm.core.seeds import stream


@dataclass(frozen=True)
class BaseModel:
    """What an adapter needs to know about its base GGUF."""

    path: Path
    shapes: dict[str, tuple[int, int]]  # base weight name -> (n_out, n_in)
    n_head: int
    n_head_kv: int
    #: (n_vocab, n_embd) of an untied output projection; None when it is tied to token_embd
    output: tuple[int, int] | None = None


def open_base(base_path: str | os.PathLike) -> BaseModel:
    """Read a LLaMA model GGUF's weight shapes and head counts (header only)."""
    header = read_header(base_path)
    arch = header.field("general.architecture")
    if header.field("general.type", "model") == "adapter":
        raise UserError(f"{base_path}: is a LoRA adapter, expected a base model")
    if arch != "llama":
        raise UserError(f"{base_path}: architecture {arch!r}, fwdllm supports 'llama'")
    n_head = int(header.field("llama.attention.head_count"))
    output = next(((int(t.shape[1]), int(t.shape[0])) for t in header.tensors if t.name == OUTPUT), None)
    return BaseModel(Path(base_path), header_shapes(header), n_head,
                     int(header.field("llama.attention.head_count_kv", n_head)), output)


def untied_hint(base: BaseModel) -> str:
    """What to do when a classifier head meets a model without ``output.weight``."""
    return (f"{base.path.name} ties its output projection to its token embeddings, so a classifier head "
            "cannot be a llama.cpp LoRA of it; use an untied copy (`fwdllm convert untie IN OUT`; the "
            "store's smollm2-135m is untied)")


def layout_for_base(
    base_path: str | os.PathLike,
    rank: int,
    alpha: float,
    targets: Iterable[str],
    layers: Iterable[int] | None = None,
) -> LoraLayout:
    """The LoRA layout for ``base_path``; bad targets/layers -> UserError."""
    try:
        return LoraLayout.for_base(open_base(base_path).shapes, rank, alpha, targets, layers)
    except ValueError as e:
        raise UserError(str(e)) from None


def check_fits(layout: LoraLayout, base: BaseModel, what: str) -> None:
    """Raise a UserError unless every adapted weight exists in the base with
    the adapter's shape (adapters for another model load but compute garbage
    or crash in llama.cpp)."""
    for t in layout.targets:
        have = base.shapes.get(t.base_name)
        if have != (t.n_out, t.n_in):
            raise UserError(
                f"{what} does not fit {base.path}: {t.base_name} is {have}, adapter expects {(t.n_out, t.n_in)}"
            )
    if layout.head is not None:
        if base.output is None:
            raise UserError(f"{what} has a classifier head: {untied_hint(base)}")
        if base.output != (layout.n_vocab, layout.head[1]):
            raise UserError(f"{what} does not fit {base.path}: {OUTPUT} is {base.output}, its head expects "
                            f"{(layout.n_vocab, layout.head[1])}")


def read_lora_for(path: str | os.PathLike, base: BaseModel, what: str) -> tuple[LoraLayout, dict[str, np.ndarray]]:
    """A LoRA GGUF that must fit ``base``; any problem is a UserError
    starting with ``what`` (the option or argument that named the file)."""
    try:
        layout, tensors = read_adapter(path)
    except (OSError, ValueError) as e:
        raise UserError(f"{what}: {e}") from None
    check_fits(layout, base, f"{what} {path}")
    return layout, tensors


def init_lora(
    base_path: str | os.PathLike,
    rank: int,
    alpha: float,
    targets: Iterable[str],
    seed: int,
    layers: Iterable[int] | None = None,
) -> tuple[LoraLayout, dict[str, np.ndarray]]:
    """A fresh adapter for ``base_path`` (:func:`initial_tensors` of its layout)."""
    layout = layout_for_base(base_path, rank, alpha, targets, layers)
    return layout, initial_tensors(layout, seed)


def initial_tensors(layout: LoraLayout, seed: int) -> dict[str, np.ndarray]:
    """The round-0 adapter of ``layout`` for ``seed``, bit-identical everywhere:
    A ~ U(-1/sqrt(n_in), 1/sqrt(n_in)) (PEFT's kaiming-uniform default), B = 0,
    the head (if any) 0; float32.

    Protocol v2 sends a joining device this seed instead of the tensors, so
    the draw uses only the contract's raw streams (:func:`~fwdllm.core.seeds.stream`
    keyed ``"init:<tensor name>"``) and correctly rounded IEEE operations: the
    top 24 bits ``u`` of each raw word give ``(2u + 1) / 2^24 - 1`` exactly in
    float64 (the midpoints of 2^24 equal cells of (-1, 1)), times the float64
    ``1 / sqrt(n_in)`` (sqrt and division are correctly rounded), rounded once
    to float32.  Golden vectors in tests/runtime/test_v2_init.py pin it.
    """
    tensors = layout.zeros()
    for t in layout.targets:
        words = stream(seed, f"init:{t.a_name}").random_raw(layout.rank * t.n_in)
        unit = ((words >> np.uint64(40)).astype(np.float64) * 2.0 + 1.0) * 2.0**-24 - 1.0
        bound = 1.0 / math.sqrt(t.n_in)
        tensors[t.a_name] = (unit * bound).astype(np.float32).reshape(layout.rank, t.n_in)
    return tensors


def write_lora(out: str | os.PathLike, layout: LoraLayout, tensors: Mapping[str, np.ndarray], base: str | os.PathLike) -> Path:
    """Write an adapter GGUF, recording which base file it was made for."""
    return write_adapter(out, layout, tensors, metadata={"fwdllm.base_model": Path(base).name})
