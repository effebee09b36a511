"""Hugging Face tokenizers -> llama.cpp vocabularies.

LLaMA-style models come with one of three tokenizer layouts:

* SentencePiece (``tokenizer.model``; LLaMA 1/2, TinyLlama): pieces, scores
  and piece types are copied from the model proto; llama.cpp's ``llama``
  tokenizer reproduces SentencePiece's merges from the scores.
* The same SentencePiece tokenizer exported as a BPE ``tokenizer.json`` (what
  transformers 5 saves): scores are rebuilt from the merge ranks.
* Byte-level BPE (``tokenizer.json``; LLaMA 3, SmolLM): tokens and merges are
  copied, and the pre-tokenizer is recognised structurally and mapped to the
  llama.cpp pre-tokenizer with the same regex.  An unrecognised pre-tokenizer
  is an error: a silently different split would tokenize differently.

Special-token ids and whether BOS/EOS are added come from the HF tokenizer
itself (by tokenizing a probe), which is what users of the checkpoint get.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from fwdllm.convert.inputs import read_json
from fwdllm.convert.llama_meta import (
    TOKEN_BYTE,
    TOKEN_CONTROL,
    TOKEN_NORMAL,
    TOKEN_UNKNOWN,
    TOKEN_UNUSED,
    TOKEN_USER_DEFINED,
    Vocab,
)
from fwdllm.core.errors import UserError

#: LLaMA 3's pre-tokenizer split regex (llama.cpp ``llama-bpe``).
LLAMA3_REGEX = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)


def read_vocab(src: Path, n_vocab: int) -> Vocab:
    """The vocabulary of HF directory ``src``, padded to the embedding's
    ``n_vocab`` rows (unused slots get ``[PADn]`` tokens)."""
    if (src / "tokenizer.model").is_file():
        vocab = _spm_vocab(src)
    elif (src / "tokenizer.json").is_file():
        vocab = _bpe_vocab(src)
    else:
        raise UserError(f"{src}: no tokenizer.model (SentencePiece) or tokenizer.json (BPE) found")
    if len(vocab.tokens) > n_vocab:
        raise UserError(f"{src}: tokenizer has {len(vocab.tokens)} tokens but the model only {n_vocab} embeddings")
    for i in range(len(vocab.tokens), n_vocab):
        vocab.tokens.append(f"[PAD{i}]")
        vocab.types.append(TOKEN_UNUSED)
        if vocab.scores is not None:
            vocab.scores.append(-1e9)
    _set_special_tokens(src, vocab)
    return vocab


def _added_tokens(src: Path) -> list[dict[str, Any]]:
    path = src / "tokenizer.json"
    return read_json(path).get("added_tokens", []) if path.is_file() else []


def _spm_vocab(src: Path) -> Vocab:
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString((src / "tokenizer.model").read_bytes())
    except Exception as e:  # protobuf's DecodeError
        raise UserError(f"{src / 'tokenizer.model'}: not a SentencePiece model ({e})") from None
    tokens = [p.piece for p in proto.pieces]
    scores = [float(p.score) for p in proto.pieces]
    types = [int(p.type) for p in proto.pieces]  # SentencePiece's enum is llama.cpp's
    for added in sorted(_added_tokens(src), key=lambda t: t["id"]):
        if added["id"] < len(tokens):
            continue
        if added["id"] != len(tokens):
            raise UserError(f"{src}: added token ids are not contiguous at {added['id']}")
        tokens.append(added["content"])
        scores.append(-1000.0)
        types.append(TOKEN_CONTROL if added["special"] else TOKEN_USER_DEFINED)
    return Vocab("llama", "default", tokens, types, bos=None, eos=None, scores=scores,
                 add_space_prefix=proto.normalizer_spec.add_dummy_prefix)


def _bpe_pre(pre: dict[str, Any] | None) -> str:
    """llama.cpp pre-tokenizer name for a tokenizer.json pre_tokenizer."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    kinds = [s.get("type") for s in steps]
    byte_level = steps[-1] if kinds and kinds[-1] == "ByteLevel" else None
    if byte_level is not None and not byte_level.get("add_prefix_space", False):
        regex = byte_level.get("use_regex", True)
        if kinds == ["ByteLevel"] and regex:
            return "gpt-2"
        if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and regex:
            return "smollm"
        if kinds == ["Split", "ByteLevel"] and not regex and steps[0].get("pattern", {}).get("Regex") == LLAMA3_REGEX:
            return "llama-bpe"
    raise UserError(f"unsupported BPE pre-tokenizer {json.dumps(pre)[:200]}; "
                    "supported: GPT-2 ByteLevel, SmolLM digits+ByteLevel, LLaMA-3 split+ByteLevel")


def _is_sentencepiece_style(spec: dict[str, Any]) -> bool:
    """A SentencePiece tokenizer exported to tokenizer.json (what transformers
    5 saves for LLaMA-2 instead of tokenizer.model): "▁" for spaces and
    byte fallback instead of byte-level pieces."""
    pre, norm = spec.get("pre_tokenizer") or {}, spec.get("normalizer") or {}
    steps = norm.get("normalizers", [norm]) if norm else []
    return spec["model"].get("byte_fallback", False) and (
        pre.get("type") == "Metaspace" or any(step.get("type") == "Prepend" for step in steps))


def _json_tokens(spec: dict[str, Any]) -> tuple[list[str], dict[int, bool], set[int]]:
    """Tokens by id, {id: special} for added tokens, and ids nobody uses."""
    by_id = {i: tok for tok, i in spec["model"]["vocab"].items()}
    added = {}
    for t in spec.get("added_tokens", []):
        by_id[t["id"]] = t["content"]
        added[t["id"]] = bool(t["special"])
    holes = set(range(max(by_id) + 1)) - set(by_id)
    return [by_id.get(i, f"[PAD{i}]") for i in range(max(by_id) + 1)], added, holes


def _merges(spec: dict[str, Any]) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]


def _bpe_vocab(src: Path) -> Vocab:
    spec = read_json(src / "tokenizer.json")
    if spec.get("model", {}).get("type") != "BPE":
        raise UserError(f"{src}/tokenizer.json: model type {spec.get('model', {}).get('type')!r}; "
                        "only BPE is supported without tokenizer.model")
    tokens, added, holes = _json_tokens(spec)
    merges = _merges(spec)
    if _is_sentencepiece_style(spec):
        return _spm_vocab_from_json(spec, tokens, added, holes, merges)
    pre = _bpe_pre(spec.get("pre_tokenizer"))
    if spec.get("normalizer") is not None:
        raise UserError(f"{src}/tokenizer.json: byte-level BPE with a normalizer is not supported")
    types = [TOKEN_NORMAL] * len(tokens)
    for i, special in added.items():
        types[i] = TOKEN_CONTROL if special else TOKEN_USER_DEFINED
    for i in holes:
        types[i] = TOKEN_UNUSED
    return Vocab("gpt2", pre, tokens, types, bos=None, eos=None, merges=merges)


def _spm_vocab_from_json(
    spec: dict[str, Any], tokens: list[str], added: dict[int, bool], holes: set[int], merges: list[str]
) -> Vocab:
    """llama.cpp's SentencePiece tokenizer merges the adjacent pair whose
    concatenation has the highest score; HF BPE merges the lowest-ranked pair.
    Scoring each token by minus the rank of the merge that makes it gives
    llama.cpp the same order."""
    rank = {m.replace(" ", ""): -float(r) for r, m in reversed(list(enumerate(merges)))}
    types, scores = [], []
    for i, tok in enumerate(tokens):
        if i in holes:
            kind = TOKEN_UNUSED
        elif i in added:
            kind = TOKEN_UNKNOWN if tok == spec["model"].get("unk_token", "<unk>") else (
                TOKEN_CONTROL if added[i] else TOKEN_USER_DEFINED)
        elif re.fullmatch(r"<0x[0-9A-F]{2}>", tok):
            kind = TOKEN_BYTE
        else:
            kind = TOKEN_NORMAL
        types.append(kind)
        scores.append(rank.get(tok, 0.0))
    pre = spec.get("pre_tokenizer") or {}
    prefix = pre.get("prepend_scheme", "always") != "never" if pre.get("type") == "Metaspace" else True
    return Vocab("llama", "default", tokens, types, bos=None, eos=None, scores=scores, add_space_prefix=prefix)


def _set_special_tokens(src: Path, vocab: Vocab) -> None:
    """Special ids and BOS/EOS insertion as the HF tokenizer does them."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(src))
    except Exception as e:  # transformers raises many types for broken dirs
        raise UserError(f"{src}: Hugging Face cannot load this tokenizer ({(str(e).splitlines() or [type(e).__name__])[0]})") from None
    bos, eos = tok.bos_token_id, tok.eos_token_id
    if bos is None and eos is None:
        raise UserError(f"{src}: tokenizer defines neither a BOS nor an EOS token")
    vocab.bos = bos if bos is not None else eos
    vocab.eos = eos if eos is not None else bos
    vocab.unk, vocab.pad = tok.unk_token_id, tok.pad_token_id
    probe = tok("a").input_ids
    vocab.add_bos = bool(probe) and bos is not None and probe[0] == bos
    vocab.add_eos = bool(probe) and eos is not None and probe[-1] == eos
