"""Architecture-exact LLaMA GGUFs with random weights, for timing only.

A timing model needs the exact tensor shapes and quant types of the real
model (that is what llama.cpp's speed depends on) but not its weights, and
downloading or converting a 7B checkpoint just to time it is wasteful.  For
Q4_0 the random blocks are written directly (fp16 scale + nibbles), tensor by
tensor, so a LLaMA-2-7B-shaped file takes minutes and a few hundred MB of RAM
instead of a 13 GB F16 intermediate.  The tensor types follow what
``llama_model_quantize`` would pick (output matrix Q6_K, or Q8_0 when its rows
are not a multiple of 256), so a synthetic file runs like a quantized real one.

The vocabulary is a real SentencePiece-style one (specials, 256 byte-fallback
tokens, common English words and letter n-grams with scores), so any text
tokenizes, just not the way the original model would.
"""

from __future__ import annotations

import itertools
import string
from pathlib import Path
from typing import Callable

import gguf
import numpy as np

from fwdllm.convert.gguf_out import QType, TensorOut, write_gguf
from fwdllm.convert.llama_meta import TOKEN_BYTE, TOKEN_CONTROL, TOKEN_NORMAL, TOKEN_UNKNOWN, LlamaHParams, Vocab
from fwdllm.core.errors import UserError
from fwdllm.runtime.quantize import ftype_of, write_via_f16

#: Shapes of well-known LLaMA-family models (plus ``tiny`` for tests).
PRESETS: dict[str, LlamaHParams] = {
    "tiny": LlamaHParams(n_layer=4, n_embd=256, n_head=4, n_head_kv=2, n_ff=704, n_vocab=1024, n_ctx=2048),
    "smollm2-135m": LlamaHParams(30, 576, 9, 3, 1536, 49152, n_ctx=8192, rope_theta=100000.0, tied=True),
    "tinyllama-1.1b": LlamaHParams(22, 2048, 32, 4, 5632, 32000, n_ctx=2048),
    "llama3.2-1b": LlamaHParams(16, 2048, 32, 8, 8192, 128256, n_ctx=131072, rope_theta=500000.0, tied=True),
    "llama2-7b": LlamaHParams(32, 4096, 32, 32, 11008, 32000, n_ctx=4096),
    "llama3-8b": LlamaHParams(32, 4096, 32, 8, 14336, 128256, n_ctx=8192, rope_theta=500000.0),
    "llama2-13b": LlamaHParams(40, 5120, 40, 40, 13824, 32000, n_ctx=4096),
}

#: Standard deviation of every random weight matrix: small enough that
#: activations stay in a sane range through all layers, like a trained model's.
WEIGHT_STD = 0.02

_WORDS = (
    "the of and to a in is it you that he was for on are with as I his they be at one have this from or "
    "had by not word but what some we can out other were all there when up use your how said an each she "
    "which do their time if will way about many then them write would like so these her long make thing see "
    "him two has look more day could go come did number sound no most people my over know water than call "
    "first who may down side been now find any new work part take get place made live where after back "
    "little only round man year came show every good me give our under name very through just form sentence "
    "great think say help low line differ turn cause much mean before move right boy old too same tell does "
    "set three want air well also play small end put home read hand large even land here must big high such "
    "follow act why ask men change went light kind off need house picture try us again animal point mother "
    "world near build self earth father movie film story bad best worst love hate boring fun funny review "
    "sentiment positive negative news sports business science technology company market game team win"
).split()


def synth_vocab(n_vocab: int) -> Vocab:
    """A valid SentencePiece vocabulary of exactly ``n_vocab`` pieces.

    Every multi-character piece is reachable by llama.cpp's pairwise merges
    (all its prefixes are pieces too), and byte fallback covers everything
    else, so arbitrary UTF-8 text tokenizes.
    """
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_CONTROL] + [TOKEN_BYTE] * 256

    def pieces():
        yield "\u2581"
        yield from (c for c in string.printable[:94])  # digits, letters, punctuation
        for w in _WORDS:
            for word in (w, w.capitalize()):
                s = "\u2581" + word
                yield from (s[:i] for i in range(2, len(s) + 1))
        for n in itertools.count(1):
            for combo in itertools.product(string.ascii_lowercase, repeat=n):
                yield "\u2581" + "".join(combo)
                yield "".join(combo)

    n_normal = n_vocab - len(tokens)
    if n_normal < 100:
        raise UserError(f"vocabulary size {n_vocab} too small for a synthetic vocab (need >= {len(tokens) + 100})")
    seen: dict[str, None] = {}
    for p in pieces():
        seen.setdefault(p)
        if len(seen) == n_normal:
            break
    tokens += list(seen)
    types += [TOKEN_NORMAL] * n_normal
    scores = [0.0] * (n_vocab - n_normal) + [-float(i) for i in range(n_normal)]
    return Vocab("llama", "default", tokens, types, bos=1, eos=2, unk=0, scores=scores, add_space_prefix=True)


# --------------------------------------------------------------------------- #
# Random quantized blocks (valid encodings of roughly N(0, std) weights)
# --------------------------------------------------------------------------- #


def _fp16_scales(rng: np.random.Generator, n: int, scale: float) -> np.ndarray:
    """Per-block fp16 scales around ``scale`` with random sign; the sign makes
    the block values symmetric (the raw codes have mean -1/2)."""
    d = scale * rng.uniform(0.75, 1.25, n) * rng.choice(np.array([-1.0, 1.0]), n)
    return d.astype("<f2").view(np.uint8).reshape(n, 2)


def _random_bytes(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    return np.frombuffer(rng.bytes(shape[0] * shape[1]), dtype=np.uint8).reshape(shape)


def _q4_0(rng: np.random.Generator, n_blocks: int, std: float) -> np.ndarray:
    # block_q4_0: fp16 d, 16 bytes of nibbles; w = d * (q - 8), q uniform 0..15 (sd 4.61)
    out = np.empty((n_blocks, 18), np.uint8)
    out[:, :2] = _fp16_scales(rng, n_blocks, std / 4.61)
    out[:, 2:] = _random_bytes(rng, (n_blocks, 16))
    return out


def _q8_0(rng: np.random.Generator, n_blocks: int, std: float) -> np.ndarray:
    # block_q8_0: fp16 d, 32 int8; w = d * q, q uniform -128..127 (sd 73.9)
    out = np.empty((n_blocks, 34), np.uint8)
    out[:, :2] = _fp16_scales(rng, n_blocks, std / 73.9)
    out[:, 2:] = _random_bytes(rng, (n_blocks, 32))
    return out


def _q6_k(rng: np.random.Generator, n_blocks: int, std: float) -> np.ndarray:
    # block_q6_K: ql[128], qh[64], int8 scales[16], fp16 d;
    # w = d * scale * (q - 32), q uniform 0..63 (sd 18.5), scales 8..23 (rms 16.2)
    out = np.empty((n_blocks, 210), np.uint8)
    out[:, :192] = _random_bytes(rng, (n_blocks, 192))
    out[:, 192:208] = rng.integers(8, 24, (n_blocks, 16), dtype=np.uint8)
    out[:, 208:] = _fp16_scales(rng, n_blocks, std / (18.5 * 16.2))
    return out


_RANDOM_BLOCKS: dict[QType, Callable[[np.random.Generator, int, float], np.ndarray]] = {
    QType.Q4_0: _q4_0,
    QType.Q8_0: _q8_0,
    QType.Q6_K: _q6_k,
}


def _random_tensor(seed: int, index: int, shape: tuple[int, ...], qtype: QType) -> Callable[[], np.ndarray]:
    """A deferred random tensor; each tensor has its own stream, so the file
    depends only on (seed, preset), never on write order."""

    def make() -> np.ndarray:
        rng = np.random.default_rng([seed, index])
        if len(shape) == 1:
            return np.ones(shape, np.float32)  # RMS-norm gains
        if qtype == QType.F16:
            return (rng.standard_normal(shape, dtype=np.float32) * WEIGHT_STD).astype(np.float16)
        block, _ = gguf.GGML_QUANT_SIZES[qtype]
        return _RANDOM_BLOCKS[qtype](rng, shape[0] * shape[1] // block, WEIGHT_STD)

    return make


def _tensor_types(hp: LlamaHParams, quant: str) -> dict[str, QType]:
    """Quant type per tensor, mirroring llama_model_quantize's default mix."""
    base = QType.F16 if quant == "F16" else QType.Q4_0
    out_type = QType.F16 if quant == "F16" else (QType.Q6_K if hp.n_embd % 256 == 0 else QType.Q8_0)
    out_name = "token_embd.weight" if hp.tied else "output.weight"
    types: dict[str, QType] = {}
    for name, shape in hp.tensor_shapes().items():
        types[name] = QType.F32 if len(shape) == 1 else (out_type if name == out_name else base)
    return types


def _write_direct(out: Path, preset: str, hp: LlamaHParams, quant: str, seed: int) -> Path:
    """Write F16 or Q4_0 directly (no quantizer involved)."""
    types = _tensor_types(hp, quant)
    tensors = [
        TensorOut(name, shape, types[name], _random_tensor(seed, i, shape, types[name]))
        for i, (name, shape) in enumerate(hp.tensor_shapes().items())
    ]
    vocab = synth_vocab(hp.n_vocab)

    def setup(w: gguf.GGUFWriter) -> None:
        w.add_type("model")
        w.add_name(f"fwdllm-synth-{preset}")
        w.add_description("Synthetic timing model: random weights, architecture-exact, never trained.")
        w.add_bool("fwdllm.synthetic", True)
        w.add_string("fwdllm.synth.preset", preset)
        w.add_uint32("fwdllm.synth.seed", seed)
        hp.write(w)
        w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if quant == "F16" else gguf.LlamaFileType.MOSTLY_Q4_0)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        vocab.write(w)

    return write_gguf(out, setup, tensors, desc=f"synth {preset} {quant}")


def write_synth(out: Path, preset: str = "tiny", quant: str = "Q4_0", seed: int = 0) -> Path:
    """Write a synthetic ``preset``-shaped LLaMA GGUF to ``out`` and return it.

    Q4_0 and F16 are written directly; any other quant type (Q8_0, Q4_1,
    Q4_K_M) is written as F16 next to ``out`` and then quantized by llama.cpp.
    """
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    hp = PRESETS[preset]
    ftype_of(quant)  # a bad quant name fails before any work
    if quant.upper() == "Q4_0":
        return _write_direct(Path(out), preset, hp, "Q4_0", seed)
    return write_via_f16(out, quant, lambda path: _write_direct(path, preset, hp, "F16", seed))
