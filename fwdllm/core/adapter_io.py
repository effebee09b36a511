"""LoRA adapters as GGUF files, in the exact form llama.cpp loads.

One writer and one reader, used by convert (PEFT bridge, lora-init), the edge
engine (perturbation adapters in /dev/shm) and the aggregator (checkpoints).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Mapping

import gguf
import numpy as np

from fwdllm.core.files import atomic_output
from fwdllm.core.gguf_file import GGUFHeader, field, open_gguf, read_header
from fwdllm.core.layout import HEAD, OUTPUT, TARGETS, LoraLayout, LoraTarget


def base_shapes(model_path: str | os.PathLike) -> dict[str, tuple[int, int]]:
    """Base weight name -> (n_out, n_in) for every 2-D ``blk.*`` weight.

    Reads only the GGUF header's tensor table (:func:`read_header`), so it is
    cheap in time and memory even for a 7B file.
    """
    return header_shapes(read_header(model_path))


def header_shapes(header: GGUFHeader) -> dict[str, tuple[int, int]]:
    """:func:`base_shapes` of an already-read header."""
    out: dict[str, tuple[int, int]] = {}
    for t in header.tensors:
        if t.name.startswith("blk.") and len(t.shape) == 2:
            n_in, n_out = (int(x) for x in t.shape)  # ggml order: ne0 = n_in
            out[t.name] = (n_out, n_in)
    return out


def write_adapter(
    path: str | os.PathLike,
    layout: LoraLayout,
    tensors: Mapping[str, np.ndarray],
    *,
    alpha: float | None = None,
    arch: str = "llama",
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a llama.cpp LoRA GGUF atomically (temp file + rename).

    ``tensors`` may hold any subset of the layout's names (a perturbation only
    touches some); all are stored as float32 so that +-eps steps are not rounded
    away.  A :data:`HEAD` is written as the output projection's LoRA pair
    (:meth:`LoraLayout.head_lora`).  ``alpha`` defaults to the layout's; pass 0
    to make llama.cpp use the user scale verbatim.
    """
    path = Path(path)
    with atomic_output(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_string("general.type", "adapter")
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", float(layout.alpha if alpha is None else alpha))
        for k, v in (metadata or {}).items():
            writer.add_string(k, v)
        for name, arr in file_tensors(layout, tensors).items():
            writer.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def file_tensors(layout: LoraLayout, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The tensors of ``tensors`` as llama.cpp's adapter file names them: the
    blocks' LoRA pairs in layout order, then the head's pair."""
    out = {name: tensors[name] for name in layout.lora_shapes() if name in tensors}
    if layout.head is not None and HEAD in tensors:
        out.update(layout.head_lora(tensors[HEAD]))
    return out


class AdapterImage:
    """The bytes of an adapter GGUF for one fixed layout, with each tensor's
    data offset.

    The edge engine writes two adapters per seed that differ from each other
    only in tensor values; gguf-py's writer spends ~2.3 ms per SmolLM2 q,v
    adapter on per-tensor bookkeeping, this one memcpy per tensor and a single
    ``write``.  The bytes come from :func:`write_adapter`, so the format has
    one definition.
    """

    def __init__(self, layout: LoraLayout, alpha: float | None = None) -> None:
        fd, tmp = tempfile.mkstemp(prefix="fwdllm-image-", suffix=".gguf")
        os.close(fd)
        try:
            write_adapter(tmp, layout, layout.zeros(), alpha=alpha)
            self._bytes = Path(tmp).read_bytes()
            reader = open_gguf(tmp)
            # the head's lora_b is a fixed selector: its bytes stay as written here
            names = {**{n: n for n in layout.lora_shapes()}, OUTPUT + ".lora_a": HEAD}
            self._slots = {names[t.name]: (int(t.data_offset), int(t.n_elements))
                           for t in reader.tensors if t.name in names}
            del reader  # drop the memmap before the unlink
        finally:
            Path(tmp).unlink(missing_ok=True)

    def write(self, path: str | os.PathLike, tensors: Mapping[str, np.ndarray]) -> None:
        """Write ``tensors`` (every layout tensor) to ``path`` (not atomic: for temp files)."""
        buf = bytearray(self._bytes)
        for name, (offset, n) in self._slots.items():
            np.frombuffer(buf, dtype="<f4", count=n, offset=offset)[:] = np.ravel(tensors[name])
        with open(path, "wb") as f:
            f.write(buf)


def read_adapter(path: str | os.PathLike) -> tuple[LoraLayout, dict[str, np.ndarray]]:
    """Read a LoRA GGUF into (layout, float32 tensors); an output-projection
    pair that selects single rows (a head :func:`write_adapter` wrote) comes
    back as the layout's :data:`HEAD`.

    Raises ``ValueError`` for files that are not LoRA adapters.
    """
    reader = open_gguf(path)
    if field(reader, "general.type") != "adapter" or field(reader, "adapter.type") != "lora":
        raise ValueError(f"{path}: not a LoRA adapter GGUF (general.type/adapter.type)")
    alpha = float(field(reader, "adapter.lora.alpha", 0.0))
    tensors: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        if t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            raise ValueError(f"{path}: tensor {t.name} is {t.tensor_type.name}; fwdllm adapters are F32/F16")
        shape = tuple(int(x) for x in reversed(t.shape))
        tensors[t.name] = np.array(t.data, dtype=np.float32).reshape(shape)
    try:
        head = read_head(tensors, alpha)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    n_vocab = tensors.pop(OUTPUT + ".lora_b").shape[0] if head is not None else 0
    tensors.pop(OUTPUT + ".lora_a", None)
    stems = {v: k for k, v in TARGETS.items()}
    targets: list[LoraTarget] = []
    rank = 0
    for name, a in tensors.items():
        if not name.endswith(".lora_a"):
            continue
        base = name[: -len(".lora_a")]
        parts = base.split(".")
        b = tensors.get(base + ".lora_b")
        if len(parts) != 4 or parts[0] != "blk" or parts[2] not in stems or b is None:
            raise ValueError(f"{path}: unexpected LoRA tensor {name}")
        rank = a.shape[0]
        targets.append(LoraTarget(int(parts[1]), stems[parts[2]], a.shape[1], b.shape[0]))
    if not targets:
        raise ValueError(f"{path}: adapter has no lora_a/lora_b tensors")
    order = list(TARGETS)
    targets.sort(key=lambda t: (t.layer, order.index(t.target)))
    layout = LoraLayout(rank=rank, alpha=alpha, targets=tuple(targets))
    if head is not None:
        ids, rows = head
        layout = replace(layout, head=rows.shape, head_ids=ids, n_vocab=n_vocab)
        tensors[HEAD] = rows
    return layout, tensors


def read_head(tensors: Mapping[str, np.ndarray], alpha: float) -> tuple[tuple[int, ...], np.ndarray] | None:
    """(row ids, head) of an output-projection LoRA pair in ``tensors`` whose B
    has one non-zero per column (the rows it corrects), or None when there is
    none.  The head is A itself when B holds the value
    :meth:`LoraLayout.head_lora` writes, else A rescaled so that llama.cpp's
    product is unchanged."""
    a, b = tensors.get(OUTPUT + ".lora_a"), tensors.get(OUTPUT + ".lora_b")
    if a is None and b is None:
        return None
    if a is None or b is None or a.shape[0] != b.shape[1]:
        raise ValueError(f"the {OUTPUT} LoRA pair is incomplete or mis-shaped")
    ids = tuple(int(i) for i in np.argmax(b != 0, axis=0))
    vals = b[list(ids), np.arange(b.shape[1])]
    if np.count_nonzero(b) != b.shape[1] or len(set(ids)) != len(ids) or not np.all(vals):
        raise ValueError(f"its {OUTPUT} LoRA is not a classifier head (lora_b must select one distinct row "
                         "per column); fwdllm reads label-row heads only")
    scale = alpha / b.shape[1] if alpha else 1.0
    rows = np.where((vals == np.float32(1.0 / scale))[:, None], a, a * (vals.astype(np.float64) * scale)[:, None])
    return ids, rows.astype(np.float32)
