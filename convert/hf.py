"""Hugging Face ``LlamaForCausalLM`` directory -> GGUF.

Tensors are streamed one at a time from the safetensors shards (memory
mapped), renamed to llama.cpp's names, RoPE-permuted for q/k, and written as
F16 (norms F32); any other quant type is then made by llama.cpp's quantizer
from that F16 file.  At no point is more than one tensor held in float32, so
a 7B conversion fits in a few GB of RAM.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any, Callable

import gguf
import numpy as np

from fwdllm.convert.gguf_out import QType, TensorOut, write_gguf
from fwdllm.convert.hf_tokenizer import read_vocab
from fwdllm.convert.inputs import read_json
from fwdllm.convert.llama_meta import LlamaHParams, Vocab, rope_permute
from fwdllm.core.errors import UserError
from fwdllm.runtime.quantize import ftype_of, write_via_f16

#: HF per-layer module -> (llama.cpp stem, which head count permutes its rows).
_LAYER_TENSORS: dict[str, tuple[str, str | None]] = {
    "input_layernorm": ("attn_norm", None),
    "self_attn.q_proj": ("attn_q", "n_head"),
    "self_attn.k_proj": ("attn_k", "n_head_kv"),
    "self_attn.v_proj": ("attn_v", None),
    "self_attn.o_proj": ("attn_output", None),
    "post_attention_layernorm": ("ffn_norm", None),
    "mlp.gate_proj": ("ffn_gate", None),
    "mlp.up_proj": ("ffn_up", None),
    "mlp.down_proj": ("ffn_down", None),
}
_GLOBAL_TENSORS = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                   "lm_head.weight": "output.weight"}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")


def read_config(src: Path) -> tuple[LlamaHParams, dict[str, Any]]:
    """LLaMA hyperparameters from ``config.json``; anything llama.cpp's
    ``llama`` architecture would compute differently is refused."""
    path = src / "config.json"
    if not path.is_file():
        raise UserError(f"{src}: no config.json (expected a Hugging Face save_pretrained directory)")
    cfg = read_json(path)
    archs = cfg.get("architectures") or []
    if cfg.get("model_type") != "llama" or (archs and "LlamaForCausalLM" not in archs):
        raise UserError(f"{src}: not a LLaMA model (model_type={cfg.get('model_type')!r}, architectures={archs})")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    problems = {
        f"rope scaling {rope_type!r}": rope_type != "default",
        "attention/MLP biases": bool(cfg.get("attention_bias") or cfg.get("mlp_bias")),
        f"activation {cfg.get('hidden_act')!r}": cfg.get("hidden_act", "silu") != "silu",
        "a head_dim other than hidden_size/num_attention_heads": cfg.get("head_dim") not in (
            None, cfg["hidden_size"] // cfg["num_attention_heads"]),
    }
    bad = [k for k, v in problems.items() if v]
    if bad:
        raise UserError(f"{src}: unsupported LLaMA variant: {', '.join(bad)}")
    hp = LlamaHParams(
        n_layer=cfg["num_hidden_layers"],
        n_embd=cfg["hidden_size"],
        n_head=cfg["num_attention_heads"],
        n_head_kv=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        n_ff=cfg["intermediate_size"],
        n_vocab=cfg["vocab_size"],
        n_ctx=cfg.get("max_position_embeddings", 4096),
        rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tied=bool(cfg.get("tie_word_embeddings", False)),
    )
    return hp, cfg


def _gguf_name(hf_name: str) -> tuple[str, str | None] | None:
    """(GGUF name, permute-by) for an HF tensor name; None if it carries no
    weights llama.cpp needs (rotary caches)."""
    if hf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[hf_name], None
    m = _LAYER_RE.fullmatch(hf_name)
    if m and m.group(2) in _LAYER_TENSORS:
        stem, permute = _LAYER_TENSORS[m.group(2)]
        return f"blk.{m.group(1)}.{stem}.weight", permute
    if hf_name.endswith("rotary_emb.inv_freq"):
        return None
    raise UserError(f"unexpected tensor {hf_name!r} in a LlamaForCausalLM checkpoint")


def _shards(src: Path) -> dict[str, Path]:
    """HF tensor name -> safetensors file holding it."""
    index = src / "model.safetensors.index.json"
    if index.is_file():
        return {k: src / v for k, v in read_json(index)["weight_map"].items()}
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise UserError(f"{src}: no *.safetensors weights (re-save with safe_serialization=True)")
    from safetensors import safe_open

    out: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            out.update((k, f) for k in h.keys())
    return out


def _plan(src: Path, hp: LlamaHParams, stack: contextlib.ExitStack) -> list[TensorOut]:
    """One deferred TensorOut per GGUF tensor, in llama.cpp's order."""
    from safetensors import safe_open

    handles: dict[Path, Any] = {}
    found: dict[str, tuple[Any, str, str | None, tuple[int, ...]]] = {}
    for hf_name, file in _shards(src).items():
        mapped = _gguf_name(hf_name)
        if mapped is None or (hp.tied and mapped[0] == "output.weight"):
            continue
        if file not in handles:
            handles[file] = stack.enter_context(safe_open(str(file), framework="pt"))
        shape = tuple(handles[file].get_slice(hf_name).get_shape())
        found[mapped[0]] = (handles[file], hf_name, mapped[1], shape)
    expected = hp.tensor_shapes()
    missing = [n for n in expected if n not in found]
    if missing:
        raise UserError(f"{src}: checkpoint lacks {len(missing)} tensors llama needs, e.g. {missing[0]}")
    for name, (_, hf_name, _, shape) in found.items():
        if shape != expected[name]:
            raise UserError(f"{src}: {hf_name} has shape {shape}, config implies {expected[name]}")

    def loader(handle: Any, hf_name: str, permute: str | None) -> Callable[[], np.ndarray]:
        def make() -> np.ndarray:
            import torch

            w = handle.get_tensor(hf_name).to(torch.float32).numpy()
            return rope_permute(w, getattr(hp, permute)) if permute else w

        return make

    return [
        TensorOut(name, shape, QType.F32 if len(shape) == 1 else QType.F16, loader(h, hf_name, permute))
        for name, shape in expected.items()
        for h, hf_name, permute, _ in [found[name]]
    ]


def _write_f16(src: Path, out: Path, hp: LlamaHParams, cfg: dict[str, Any], vocab: Vocab) -> Path:
    with contextlib.ExitStack() as stack:
        tensors = _plan(src, hp, stack)

        def setup(w: gguf.GGUFWriter) -> None:
            w.add_type("model")
            w.add_name(str(cfg.get("_name_or_path") or src.resolve().name))
            hp.write(w)
            w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
            vocab.write(w)

        return write_gguf(out, setup, tensors, desc=f"convert {src.name}")


def convert_hf(src: str | Path, out: str | Path, quant: str = "Q4_0") -> Path:
    """Convert HF directory ``src`` to a GGUF ``out`` of type ``quant``.

    Config, tokenizer, tensor names and shapes are all validated before any
    tensor is written; ``out`` only appears when complete.
    """
    src = Path(src)
    ftype_of(quant)
    if not src.is_dir():
        raise UserError(f"{src}: not a directory")
    hp, cfg = read_config(src)
    vocab = read_vocab(src, hp.n_vocab)
    return write_via_f16(out, quant, lambda path: _write_f16(src, path, hp, cfg, vocab))
