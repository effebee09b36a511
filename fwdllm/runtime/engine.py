"""A thin, fast wrapper over llama.cpp's low-level API for *scoring*.

Why not ``llama_cpp.Llama``: it owns one sequence, evaluates logits for every
position and hides adapters.  Scoring wants the opposite: many short
sequences in ONE ``llama_decode`` (one weight pass serves the whole batch),
logits only at the positions a loss needs, and direct control of LoRA adapters
and their scales.

Memory: by default llama.cpp mmaps the GGUF and, on CPUs with a repacked
kernel (Q4_0 on AVX2/NEON), copies the weights into a CPU_REPACK buffer.
Both stay resident, so peak RSS is about twice the file.  ``repack=False``
(``use_extra_bufts=False``) keeps only the mmap; ``mmap=False`` reads the file
into anonymous memory, which llama.cpp frees after repacking.  See
``fwdllm bench throughput --mem`` for the RSS and speed of each mode.
"""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import llama_cpp as ll
import numpy as np

from fwdllm.core.errors import UserError
from fwdllm.runtime.log import quiet_llama

_backend_ready = False
log = logging.getLogger("fwdllm.engine")

#: A prefix all sequences of a decode share is decoded once from this many
#: tokens on: a few-shot prompt's demonstrations, not the two or three tokens
#: every prompt of a task starts with.
MIN_SHARED_PREFIX = 16


#: glibc's ``M_MMAP_THRESHOLD``: blocks above it come from mmap and go back to
#: the system when freed.  Left to itself glibc raises the threshold to the
#: largest block freed (up to 32 MiB), so llama.cpp's compute buffer, rebuilt
#: on every adapter change, then comes from the heap and the old one's pages
#: stay resident (+8 MiB at an sft client's peak on SmolLM2).  Pinned above
#: any per-pass array and below the compute buffers.
MMAP_THRESHOLD = 4 << 20
M_MMAP_THRESHOLD = -3


def _pin_mmap_threshold() -> None:
    """Pin glibc's mmap threshold (:data:`MMAP_THRESHOLD`); other C libraries have no ``mallopt`` and keep theirs."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # the process's own symbols: its C library's
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def _init_backend() -> None:
    global _backend_ready
    if not _backend_ready:
        quiet_llama()
        _pin_mmap_threshold()
        ll.llama_backend_init()
        if b"AMX_INT8 = 1" in ll.llama_print_system_info():
            # A segfault says nothing; this line, just before one, does.
            log.warning("this llama.cpp build has AMX kernels, which crashed (SIGSEGV) on the first decode "
                        "of llama-cpp-python 0.3.36 on a Sapphire Rapids machine; if this process dies with "
                        "signal 11, rebuild without them (`make install` does; README, Quick start)")
        _backend_ready = True


def default_threads() -> int:
    """All cores this process may use (scoring is compute bound)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class Seq:
    """One sequence to decode: its tokens and the positions whose logits the
    caller needs (position p predicts token p+1)."""

    tokens: tuple[int, ...]
    outputs: tuple[int, ...]


def tokenize(vocab: ll.llama_vocab_p, add_bos: bool, text: str) -> list[int]:
    """llama.cpp's tokens of ``text`` (``add_bos``: the model wants a BOS and the caller asked for it)."""
    raw = text.encode("utf-8")
    buf = (ll.llama_token * (len(raw) + 8))()
    n = ll.llama_tokenize(vocab, raw, len(raw), buf, len(buf), add_bos, False)
    if n < 0:  # pragma: no cover - buffer is always large enough
        raise RuntimeError("tokenizer buffer too small")
    return list(buf[:n])


class Vocab:
    """A model's tokenizer alone (``vocab_only``: no weights are read)."""

    def __init__(self, model_path: str | os.PathLike) -> None:
        _init_backend()
        mp = ll.llama_model_default_params()
        mp.vocab_only = True
        self.model = ll.llama_model_load_from_file(str(model_path).encode(), mp)
        if not self.model:
            raise UserError(f"llama.cpp could not read the vocabulary of {model_path}")
        self.vocab = ll.llama_model_get_vocab(self.model)
        self.add_bos = bool(ll.llama_vocab_get_add_bos(self.vocab))

    def tokenize(self, text: str, *, bos: bool) -> list[int]:
        return tokenize(self.vocab, bos and self.add_bos, text)

    def close(self) -> None:
        if self.model:
            ll.llama_model_free(self.model)
            self.model = None


class Engine:
    """One model + one context, sized for batches of up to ``n_seq_max``
    sequences of at most ``n_ctx_seq`` tokens, ``n_batch`` tokens per decode,
    computed ``n_ubatch`` tokens at a time.  llama.cpp sizes its compute buffer
    for ``n_ubatch`` tokens that all want logits (n_ubatch x n_vocab floats:
    98 MiB for SmolLM2 at 512), so a caller that scores many positions of a
    short row asks for a smaller one."""

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        n_threads: int | None = None,
        n_seq_max: int = 16,
        n_ctx_seq: int = 256,
        n_batch: int | None = None,
        n_ubatch: int = 512,
        mmap: bool = True,
        repack: bool = True,
    ) -> None:
        _init_backend()
        self.path = Path(model_path)
        mp = ll.llama_model_default_params()
        mp.n_gpu_layers = 0
        mp.load_mode = 1 if mmap else 0  # LLAMA_LOAD_MODE_MMAP / _NONE
        mp.use_extra_bufts = repack
        self.model = ll.llama_model_load_from_file(str(self.path).encode(), mp)
        if not self.model:
            raise UserError(f"llama.cpp could not load {self.path} (run with --verbose for details)")
        self.vocab = ll.llama_model_get_vocab(self.model)
        self.n_vocab = ll.llama_vocab_n_tokens(self.vocab)
        self.add_bos = bool(ll.llama_vocab_get_add_bos(self.vocab))
        self.n_seq_max = n_seq_max
        self.max_seq_tokens = n_ctx_seq
        self.n_batch = n_batch or n_seq_max * n_ctx_seq
        self.n_threads = n_threads or default_threads()
        cp = ll.llama_context_default_params()
        cp.n_seq_max = n_seq_max
        # One KV stream per sequence (kv_unified=False): measured exact - the
        # logits equal those of decoding each sequence alone - while the
        # unified cache moved SmolLM2's logits by up to 0.9 and was not faster.
        cp.kv_unified = False
        cp.n_ctx = n_ctx_seq * n_seq_max
        cp.n_batch = self.n_batch
        cp.n_ubatch = min(self.n_batch, n_ubatch)
        cp.n_threads = cp.n_threads_batch = self.n_threads
        cp.no_perf = True
        self.ctx = ll.llama_init_from_model(self.model, cp)
        if not self.ctx:
            ll.llama_model_free(self.model)
            raise UserError(f"llama.cpp could not create a context for {self.path} (n_ctx={cp.n_ctx})")
        self.memory = ll.llama_get_memory(self.ctx)
        self.batch = ll.llama_batch_init(self.n_batch, 0, 1)
        self.n_embd = ll.llama_model_n_embd(self.model)
        self._adapters: list[ll.llama_adapter_lora_p] = []
        self._active: tuple = ()
        self.switches = 0

    # ------------------------------------------------------------------ text
    def tokenize(self, text: str, *, bos: bool) -> list[int]:
        return tokenize(self.vocab, bos and self.add_bos, text)

    def piece(self, token: int) -> bytes:
        """The bytes of one token as text (special tokens render as nothing);
        a multi-byte character may span several tokens."""
        buf = ctypes.create_string_buffer(64)
        n = ll.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        if n < 0:  # pragma: no cover - no vocabulary has 64-byte pieces, but the API allows them
            buf = ctypes.create_string_buffer(-n)
            n = ll.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def is_eog(self, token: int) -> bool:
        """Whether ``token`` ends generation (EOS, EOT, ...)."""
        return bool(ll.llama_vocab_is_eog(self.vocab, token))

    # -------------------------------------------------------------- adapters
    def load_adapter(self, path: str | os.PathLike) -> ll.llama_adapter_lora_p:
        """Load a LoRA GGUF; the engine frees it on :meth:`free_adapter`/close."""
        ad = ll.llama_adapter_lora_init(self.model, str(path).encode())
        if not ad:
            raise UserError(f"llama.cpp could not load adapter {path} (wrong base model?)")
        self._adapters.append(ad)
        return ad

    def free_adapter(self, ad: ll.llama_adapter_lora_p) -> None:
        if any(a == ad for a, _ in self._active):
            self.set_adapters([])
        self._adapters.remove(ad)
        ll.llama_adapter_lora_free(ad)

    def set_adapters(self, adapters: Sequence[tuple[ll.llama_adapter_lora_p, float]]) -> None:
        """Make exactly these (adapter, user scale) pairs active.

        Each change makes llama.cpp re-reserve its scheduler on the next
        decode, so callers order work to change adapters rarely; unchanged
        sets are skipped here.
        """
        key = tuple((a, float(s)) for a, s in adapters)
        if key == self._active:
            return
        n = len(key)
        arr = (ll.llama_adapter_lora_p_ctypes * max(n, 1))(*[a for a, _ in key])
        scales = (ctypes.c_float * max(n, 1))(*[s for _, s in key])
        rc = ll.llama_set_adapters_lora(self.ctx, arr if n else None, n, scales if n else None)
        if rc != 0:
            raise RuntimeError(f"llama_set_adapters_lora failed ({rc})")
        self._active = key
        self.switches += 1

    # ---------------------------------------------------------------- decode
    def pack(self, seqs: Sequence[Seq]) -> list[list[int]]:
        """Greedy chunks of sequence indices, each fitting one decode."""
        chunks: list[list[int]] = []
        cur: list[int] = []
        used = 0
        for i, s in enumerate(seqs):
            if len(s.tokens) > self.max_seq_tokens:
                raise ValueError(f"sequence of {len(s.tokens)} tokens exceeds context {self.max_seq_tokens}")
            if cur and (used + len(s.tokens) > self.n_batch or len(cur) == self.n_seq_max):
                chunks.append(cur)
                cur, used = [], 0
            cur.append(i)
            used += len(s.tokens)
        if cur:
            chunks.append(cur)
        return chunks

    def shared_prefix(self, seqs: Sequence[Seq]) -> int:
        """Tokens every sequence starts with, before its first output, when
        there are enough of them to decode once (:meth:`decode`); else 0."""
        if len(seqs) < 2:
            return 0
        n = min(min(s.outputs) for s in seqs)
        first = seqs[0].tokens
        for s in seqs[1:]:
            n = next((i for i in range(n) if s.tokens[i] != first[i]), n)
        return n if n >= MIN_SHARED_PREFIX else 0

    def decode(self, seqs: Sequence[Seq]) -> list[np.ndarray]:
        """Decode up to n_seq_max sequences; return, per sequence, a
        (len(outputs), n_vocab) float32 copy of its logits.

        One ``llama_decode`` takes them all.  When they share a long prefix (a
        few-shot prompt's demonstrations), that prefix is decoded once for
        the first sequence, its KV copied to the others, and only the rest
        decoded per sequence, instead of the prefix once per row of the batch
        (1.85x faster on SmolLM2 with SST-2's two-shot prompt and 8 rows, and
        bit-identical logits there; on some models a batch's size moves the
        last bits of llama.cpp's kernels, and a separate prefix decode can too)."""
        ll.llama_memory_clear(self.memory, True)
        start = self.shared_prefix(seqs)
        if start:
            self._fill([(0, seqs[0].tokens[:start], 0, ())])
            self._run(start, 1)
            for sid in range(1, len(seqs)):
                ll.llama_memory_seq_cp(self.memory, 0, sid, -1, -1)
        where = self._fill([(sid, s.tokens[start:], start, s.outputs) for sid, s in enumerate(seqs)])
        self._run(self.batch.n_tokens, len(seqs))
        out = []
        for rows in where:
            arr = np.empty((len(rows), self.n_vocab), dtype=np.float32)
            for j, r in enumerate(rows):
                ptr = ll.llama_get_logits_ith(self.ctx, r)
                arr[j] = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
            out.append(arr)
        return out

    def _fill(self, parts: Sequence[tuple[int, Sequence[int], int, Sequence[int]]]) -> list[list[int]]:
        """Put (sequence id, tokens, first position, output positions) into the
        batch; returns each part's batch rows that carry logits."""
        b = self.batch
        k = 0
        where: list[list[int]] = []
        for sid, toks, p0, outputs in parts:
            outs = set(outputs)
            rows = []
            for pos, tok in enumerate(toks, start=p0):
                b.token[k] = tok
                b.pos[k] = pos
                b.n_seq_id[k] = 1
                b.seq_id[k][0] = sid
                b.logits[k] = pos in outs
                if pos in outs:
                    rows.append(k)
                k += 1
            where.append(rows)
        b.n_tokens = k
        return where

    def _run(self, n_tokens: int, n_seqs: int) -> None:
        rc = ll.llama_decode(self.ctx, self.batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc}) for {n_tokens} tokens in {n_seqs} sequences")

    def generate(self, prompt: Sequence[int], choose: Callable[[np.ndarray], int | None]) -> None:
        """Continue one prompt through the KV cache: ``choose(logits)`` gets the
        next-token logits (n_vocab,) and returns the token to append, or None
        to stop; generation also stops when the context is full.

        One sequence per ``llama_decode``, as ``llama_cpp.Llama`` decodes:
        llama.cpp's CPU matmuls round differently for different numbers of
        rows, so decoding several prompts' new tokens together flipped greedy
        near-ties (1 of 16 AG News headlines), while one at a time gives
        Llama's text exactly, for about 15 % more CPU.
        """
        logits = self.decode([Seq(tuple(prompt), (len(prompt) - 1,))])[0][0]
        b = self.batch
        for pos in range(len(prompt), self.max_seq_tokens):
            tok = choose(logits)
            if tok is None:
                return
            b.token[0], b.pos[0], b.n_seq_id[0], b.logits[0] = tok, pos, 1, True
            b.seq_id[0][0] = 0
            b.n_tokens = 1
            rc = ll.llama_decode(self.ctx, b)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed ({rc}) at generated position {pos}")
            logits = np.ctypeslib.as_array(ll.llama_get_logits_ith(self.ctx, 0), shape=(self.n_vocab,)).copy()

    def close(self) -> None:
        """Free context, adapters, batch and model (idempotent)."""
        if getattr(self, "ctx", None):
            ll.llama_batch_free(self.batch)
            ll.llama_free(self.ctx)
            self.ctx = None
        for ad in getattr(self, "_adapters", []):
            ll.llama_adapter_lora_free(ad)
        self._adapters = []
        if getattr(self, "model", None):
            ll.llama_model_free(self.model)
            self.model = None

    def __del__(self) -> None:  # safety net; callers should close()
        self.close()

