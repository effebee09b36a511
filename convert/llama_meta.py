"""LLaMA hyperparameters, tensor names and tokenizer metadata as llama.cpp
expects them in a GGUF file.  Shared by ``synth`` (made-up weights) and ``hf``
(real weights) so that both produce files llama.cpp reads the same way."""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Sequence

import gguf

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


def write_spm_vocab(
    writer: gguf.GGUFWriter,
    tokens: Sequence[str],
    scores: Sequence[float],
    types: Sequence[int],
    *,
    bos: int,
    eos: int,
    unk: int,
    add_bos: bool = True,
    add_space_prefix: bool = True,
) -> None:
    """SentencePiece (``tokenizer.ggml.model = llama``) vocabulary keys."""
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(list(tokens))
    writer.add_token_scores([float(s) for s in scores])
    writer.add_token_types([int(t) for t in types])
    writer.add_bos_token_id(bos)
    writer.add_eos_token_id(eos)
    writer.add_unk_token_id(unk)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(add_space_prefix)
