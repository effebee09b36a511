"""LLaMA hyperparameters, tensor names and tokenizer metadata as llama.cpp
expects them in a GGUF file.  Shared by ``synth`` (made-up weights) and ``hf``
(real weights) so that both produce files llama.cpp reads the same way."""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import gguf
import numpy as np

#: llama.cpp token types (``llama_token_type``).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


@dataclass(frozen=True)
class LlamaHParams:
    """The numbers that fix every tensor shape of a LLaMA model."""

    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int
    n_ctx: int = 4096
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    tied: bool = False

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """GGUF tensor name -> numpy shape (n_out, n_in), in llama.cpp's order."""
        hd, kv = self.head_dim, self.n_head_kv * self.head_dim
        shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (self.n_vocab, self.n_embd)}
        for i in range(self.n_layer):
            p = f"blk.{i}."
            shapes[p + "attn_norm.weight"] = (self.n_embd,)
            shapes[p + "attn_q.weight"] = (self.n_head * hd, self.n_embd)
            shapes[p + "attn_k.weight"] = (kv, self.n_embd)
            shapes[p + "attn_v.weight"] = (kv, self.n_embd)
            shapes[p + "attn_output.weight"] = (self.n_embd, self.n_head * hd)
            shapes[p + "ffn_norm.weight"] = (self.n_embd,)
            shapes[p + "ffn_gate.weight"] = (self.n_ff, self.n_embd)
            shapes[p + "ffn_up.weight"] = (self.n_ff, self.n_embd)
            shapes[p + "ffn_down.weight"] = (self.n_embd, self.n_ff)
        shapes["output_norm.weight"] = (self.n_embd,)
        if not self.tied:
            shapes["output.weight"] = (self.n_vocab, self.n_embd)
        return shapes

    def n_params(self) -> int:
        return sum(prod(s) for s in self.tensor_shapes().values())

    def write(self, writer: gguf.GGUFWriter) -> None:
        """Add the ``llama.*`` hyperparameter keys."""
        writer.add_context_length(self.n_ctx)
        writer.add_embedding_length(self.n_embd)
        writer.add_block_count(self.n_layer)
        writer.add_feed_forward_length(self.n_ff)
        writer.add_head_count(self.n_head)
        writer.add_head_count_kv(self.n_head_kv)
        writer.add_rope_dimension_count(self.head_dim)
        writer.add_rope_freq_base(float(self.rope_theta))
        writer.add_layer_norm_rms_eps(float(self.rms_eps))
        writer.add_vocab_size(self.n_vocab)


def rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF q/k rows -> llama.cpp's RoPE row order.

    HF rotates the two halves of each head (rotate_half); llama.cpp's kernel
    rotates adjacent pairs, so the rows of each head are interleaved.  Works on
    any array whose first axis is the output rows (weights, LoRA B).
    """
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of :func:`rope_permute`."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass
class Vocab:
    """A tokenizer as ``tokenizer.ggml.*`` keys: ``llama`` (SentencePiece,
    with scores) or ``gpt2`` (byte-level BPE, with merges)."""

    model: str
    pre: str
    tokens: list[str]
    types: list[int]
    bos: int | None
    eos: int | None
    unk: int | None = None
    pad: int | None = None
    scores: list[float] | None = None
    merges: list[str] | None = None
    add_bos: bool = True
    add_eos: bool = False
    add_space_prefix: bool | None = None

    def write(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.merges is not None:
            writer.add_token_merges(self.merges)
        # llama.cpp falls back to hard-coded ids for absent special tokens,
        # which can point past a small vocabulary; always write them.
        for add, value in ((writer.add_bos_token_id, self.bos), (writer.add_eos_token_id, self.eos),
                           (writer.add_unk_token_id, self.unk), (writer.add_pad_token_id, self.pad)):
            if value is not None:
                add(value)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
