"""LoRA adapters between PEFT directories and llama.cpp GGUF files.

The two formats store the same matrices (``lora_A`` (r, in), ``lora_B``
(out, r)) under different names, with one real difference: llama.cpp's q/k
weights have their rows RoPE-permuted (see :func:`rope_permute`), and B's rows
are output rows, so B of q and k must be permuted the same way going to GGUF
and un-permuted coming back.  The permutation is a pure reindexing, so
PEFT -> GGUF -> PEFT is bit-exact.

A ``--head`` run's classifier head is a LoRA of the output projection
(``output.weight`` in GGUF, ``lm_head`` in PEFT) of rank n_labels, its own
rank in ``rank_pattern``; both sides scale it by alpha over that rank.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from fwdllm.convert.inputs import read_json
from fwdllm.convert.llama_meta import rope_permute, rope_unpermute
from fwdllm.core.adapter_io import read_head
from fwdllm.core.errors import UserError
from fwdllm.core.files import atomic_output
from fwdllm.core.layout import HEAD, OUTPUT, PEFT_MODULES, LoraLayout
from fwdllm.core.lora import BaseModel, open_base, read_lora_for, untied_hint, write_lora

_MODULE_TARGET = {module: target for target, module in PEFT_MODULES.items()}
_KEY_RE = re.compile(r"(?:.*\.)?layers\.(\d+)\.(\w+\.\w+)\.lora_([AB])(?:\.\w+)?\.weight")
_HEAD_RE = re.compile(r"(?:.*\.)?lm_head\.lora_([AB])(?:\.\w+)?\.weight")
LM_HEAD = "lm_head"


def _b_rows(target: str, b: np.ndarray, base: BaseModel, to_gguf: bool) -> np.ndarray:
    """B with q/k rows moved into (or out of) llama.cpp's RoPE order."""
    heads = {"q": base.n_head, "k": base.n_head_kv}.get(target)
    if heads is None:
        return b
    return rope_permute(b, heads) if to_gguf else rope_unpermute(b, heads)


def _read_peft_config(peft_dir: Path) -> tuple[int, float, dict[str, Any]]:
    """(rank, llama.cpp alpha, raw config); refuses PEFT features llama.cpp
    LoRA cannot express."""
    path = peft_dir / "adapter_config.json"
    if not path.is_file():
        raise UserError(f"{peft_dir}: no adapter_config.json (expected a PEFT save_pretrained directory)")
    cfg = read_json(path)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{peft_dir}: PEFT type {cfg.get('peft_type')!r}, only LORA is supported")
    patterns = {**(cfg.get("rank_pattern") or {}), **(cfg.get("alpha_pattern") or {})}
    unsupported = {
        "DoRA": cfg.get("use_dora"),
        "per-module ranks/alphas (except lm_head's)": set(patterns) - {LM_HEAD},
        "LoRA biases": cfg.get("bias", "none") != "none",
        "modules_to_save": cfg.get("modules_to_save"),
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise UserError(f"{peft_dir}: unsupported PEFT LoRA features: {', '.join(bad)}")
    rank = int(cfg["r"])
    alpha = float(cfg.get("lora_alpha", 8))
    # rsLoRA scales by alpha/sqrt(r); llama.cpp by alpha/r: same product with alpha*sqrt(r)
    return rank, alpha * math.sqrt(rank) if cfg.get("use_rslora") else alpha, cfg


def _read_peft_tensors(peft_dir: Path) -> dict[tuple[int, str, str], np.ndarray]:
    """(layer, target, "A"/"B") -> float32 matrix; the lm_head pair under (-1, "lm_head", ...)."""
    from safetensors import safe_open

    path = peft_dir / "adapter_model.safetensors"
    if not path.is_file():
        raise UserError(f"{peft_dir}: no adapter_model.safetensors")
    out: dict[tuple[int, str, str], np.ndarray] = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            if (h := _HEAD_RE.fullmatch(key)) is not None:
                out[(-1, LM_HEAD, h.group(1))] = f.get_tensor(key).float().numpy()
                continue
            m = _KEY_RE.fullmatch(key)
            if not m or m.group(2) not in _MODULE_TARGET:
                raise UserError(f"{path}: unsupported PEFT tensor {key!r}")
            out[(int(m.group(1)), _MODULE_TARGET[m.group(2)], m.group(3))] = f.get_tensor(key).float().numpy()
    return out


def peft_to_gguf(peft_dir: str | os.PathLike, base_path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Convert a PEFT LoRA directory to a llama.cpp LoRA GGUF for ``base_path``."""
    peft_dir = Path(peft_dir)
    rank, alpha, cfg = _read_peft_config(peft_dir)
    mats = _read_peft_tensors(peft_dir)
    head = {part: mats.pop((-1, LM_HEAD, part)) for part in "AB" if (-1, LM_HEAD, part) in mats}
    base = open_base(base_path)
    layers = sorted({layer for layer, _, _ in mats})
    targets = sorted({t for _, t, _ in mats}, key=list(PEFT_MODULES).index)
    try:
        layout = LoraLayout.for_base(base.shapes, rank, alpha, targets, layers)
    except ValueError as e:
        raise UserError(f"{peft_dir} does not fit {base.path}: {e}") from None
    tensors: dict[str, np.ndarray] = {}
    for t in layout.targets:
        a, b = mats.get((t.layer, t.target, "A")), mats.get((t.layer, t.target, "B"))
        if a is None or b is None:
            raise UserError(f"{peft_dir}: layer {t.layer} {t.target} lacks lora_A or lora_B "
                            "(fwdllm needs the same targets in every adapted layer)")
        if a.shape != (rank, t.n_in) or b.shape != (t.n_out, rank):
            raise UserError(f"{peft_dir} does not fit {base.path}: {t.base_name} is {(t.n_out, t.n_in)}, "
                            f"adapter has A {a.shape}, B {b.shape} at rank {rank}")
        tensors[t.a_name] = a
        tensors[t.b_name] = _b_rows(t.target, b, base, to_gguf=True)
    if head:
        layout, tensors = _head_from_peft(peft_dir, head, cfg, layout, tensors, base)
    return write_lora(out, layout, tensors, base.path)


def _head_from_peft(peft_dir: Path, head: dict[str, np.ndarray], cfg: dict[str, Any], layout: LoraLayout,
                    tensors: dict[str, np.ndarray], base: BaseModel) -> tuple[LoraLayout, dict[str, np.ndarray]]:
    """The layout and tensors plus the lm_head pair as a classifier head: B
    rescaled from PEFT's alpha/rank of lm_head to llama.cpp's (the file's
    one alpha over the same rank), then read as :func:`read_adapter` reads it."""
    if set(head) != {"A", "B"} or head["A"].shape[0] != head["B"].shape[1]:
        raise UserError(f"{peft_dir}: the lm_head LoRA lacks lora_A or lora_B, or their ranks differ")
    if base.output is None:
        raise UserError(f"{peft_dir} adapts lm_head: {untied_hint(base)}")
    r = head["A"].shape[0]
    peft_scale = float((cfg.get("alpha_pattern") or {}).get(LM_HEAD, cfg.get("lora_alpha", 8))) / r
    gguf_scale = layout.alpha / r if layout.alpha else 1.0
    pair = {OUTPUT + ".lora_a": head["A"], OUTPUT + ".lora_b": head["B"] * np.float32(peft_scale / gguf_scale)}
    try:
        ids, rows = read_head(pair, layout.alpha)
        layout = replace(layout, head=rows.shape, head_ids=ids, n_vocab=pair[OUTPUT + ".lora_b"].shape[0])
    except ValueError as e:
        raise UserError(f"{peft_dir}: {e}") from None
    return layout, {**tensors, HEAD: rows}


def gguf_to_peft(lora_path: str | os.PathLike, base_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write a llama.cpp LoRA GGUF as a PEFT directory (adapter_model.safetensors
    + adapter_config.json) for the HF model that ``base_path`` was made from."""
    from safetensors.numpy import save_file

    from fwdllm.core.gguf_file import open_gguf

    open_gguf(lora_path)  # clear errors for missing/truncated files
    base = open_base(base_path)
    layout, tensors = read_lora_for(lora_path, base, "LORA")
    out: dict[str, np.ndarray] = {}
    for t in layout.targets:
        key = f"base_model.model.model.layers.{t.layer}.{PEFT_MODULES[t.target]}"
        out[f"{key}.lora_A.weight"] = np.ascontiguousarray(tensors[t.a_name])
        out[f"{key}.lora_B.weight"] = np.ascontiguousarray(_b_rows(t.target, tensors[t.b_name], base, to_gguf=False))
    modules = sorted(PEFT_MODULES[t].split(".")[1] for t in layout.target_names)
    patterns: dict[str, dict[str, float]] = {}
    if layout.head is not None:  # lm_head at its own rank; alpha/rank is llama.cpp's head_scale
        pair = layout.head_lora(tensors[HEAD])
        out[f"base_model.model.{LM_HEAD}.lora_A.weight"] = pair[OUTPUT + ".lora_a"]
        out[f"base_model.model.{LM_HEAD}.lora_B.weight"] = pair[OUTPUT + ".lora_b"]
        modules.append(LM_HEAD)
        patterns = {"rank_pattern": {LM_HEAD: layout.head[0]},
                    "alpha_pattern": {LM_HEAD: layout.head_scale * layout.head[0]}}
    n_layer = 1 + max(int(n.split(".")[1]) for n in base.shapes)
    # llama.cpp reads alpha 0 as "scale 1"; PEFT needs lora_alpha = r for that
    alpha = layout.alpha or float(layout.rank)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": layout.rank,
        "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
        "target_modules": modules,
        "layers_to_transform": None if list(layout.layers) == list(range(n_layer)) else list(layout.layers),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "inference_mode": True,
        **patterns,
    }
    out_dir = Path(out_dir)
    with atomic_output(out_dir / "adapter_model.safetensors") as tmp:
        save_file(out, str(tmp))
    with atomic_output(out_dir / "adapter_config.json") as tmp:
        tmp.write_text(json.dumps(config, indent=2) + "\n")
    return out_dir
