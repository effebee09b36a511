"""What is in a GGUF file: model shapes and tokenizer, or adapter layout.

Answers "which model is this, and will this adapter fit it?" without loading
anything into llama.cpp.
"""

from __future__ import annotations

import collections
import os
from pathlib import Path
from typing import Any

from fwdllm.core.adapter_io import read_adapter
from fwdllm.core.errors import UserError
from fwdllm.core.gguf_file import field, open_gguf

#: Output keys -> ``<arch>.`` metadata suffixes.
_HPARAMS = {
    "n_layer": "block_count",
    "n_embd": "embedding_length",
    "n_ff": "feed_forward_length",
    "n_head": "attention.head_count",
    "n_head_kv": "attention.head_count_kv",
    "n_ctx_train": "context_length",
    "rope_theta": "rope.freq_base",
    "rms_eps": "attention.layer_norm_rms_epsilon",
}


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON-able summary of a GGUF model or LoRA adapter."""
    path = Path(path)
    reader = open_gguf(path)
    arch = field(reader, "general.architecture")
    kind = field(reader, "general.type", "model")
    info: dict[str, Any] = {
        "file": str(path),
        "size_bytes": path.stat().st_size,
        "type": kind,
        "architecture": arch,
        "name": field(reader, "general.name"),
        "tensor_types": dict(collections.Counter(t.tensor_type.name for t in reader.tensors)),
        "n_params": int(sum(int(t.n_elements) for t in reader.tensors)),
    }
    if kind == "adapter":
        try:
            layout, _ = read_adapter(path)
        except ValueError as e:
            raise UserError(str(e)) from None
        info.update(
            adapter=field(reader, "adapter.type"),
            rank=layout.rank,
            alpha=layout.alpha,
            targets=list(layout.target_names),
            layers=list(layout.layers),
        )
        return info
    for key, suffix in _HPARAMS.items():
        value = field(reader, f"{arch}.{suffix}")
        info[key] = float(f"{value:.6g}") if isinstance(value, float) else value  # float32 noise off
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    info.update(
        tokenizer=field(reader, "tokenizer.ggml.model"),
        tokenizer_pre=field(reader, "tokenizer.ggml.pre"),
        n_vocab=len(tokens.data) if tokens is not None else None,
        tied_embeddings=not any(t.name == "output.weight" for t in reader.tensors),
        synthetic=bool(field(reader, "fwdllm.synthetic", False)),
    )
    return info


def format_description(info: dict[str, Any]) -> str:
    """Human-readable ``key: value`` lines."""
    lines = []
    for key, value in info.items():
        if value is None:
            continue
        if key == "size_bytes":
            value = f"{value} ({value / 2**20:.1f} MiB)"
        elif key == "tensor_types":
            value = ", ".join(f"{k} x{v}" for k, v in sorted(value.items(), key=lambda kv: -kv[1]))
        elif isinstance(value, list):
            value = ",".join(str(v) for v in value)
        lines.append(f"{key:>16}: {value}")
    return "\n".join(lines)
