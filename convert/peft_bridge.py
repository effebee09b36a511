"""LoRA adapters between PEFT directories and llama.cpp GGUF files.

The two formats store the same matrices (``lora_A`` (r, in), ``lora_B``
(out, r)) under different names, with one real difference: llama.cpp's q/k
weights have their rows RoPE-permuted (see :func:`rope_permute`), and B's rows
are output rows, so B of q and k must be permuted the same way going to GGUF
and un-permuted coming back.  The permutation is a pure reindexing, so
PEFT -> GGUF -> PEFT is bit-exact.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from fwdllm.convert.inputs import read_json
from fwdllm.convert.llama_meta import rope_permute, rope_unpermute
from fwdllm.core.errors import UserError
from fwdllm.core.files import atomic_output
from fwdllm.core.layout import PEFT_MODULES, LoraLayout
from fwdllm.core.lora import BaseModel, open_base, read_lora_for, write_lora

_MODULE_TARGET = {module: target for target, module in PEFT_MODULES.items()}
_KEY_RE = re.compile(r"(?:.*\.)?layers\.(\d+)\.(\w+\.\w+)\.lora_([AB])(?:\.\w+)?\.weight")


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
    unsupported = {
        "DoRA": cfg.get("use_dora"),
        "per-module ranks/alphas": cfg.get("rank_pattern") or cfg.get("alpha_pattern"),
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
    """(layer, target, "A"/"B") -> float32 matrix."""
    from safetensors import safe_open

    path = peft_dir / "adapter_model.safetensors"
    if not path.is_file():
        raise UserError(f"{peft_dir}: no adapter_model.safetensors")
    out: dict[tuple[int, str, str], np.ndarray] = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            m = _KEY_RE.fullmatch(key)
            if not m or m.group(2) not in _MODULE_TARGET:
                raise UserError(f"{path}: unsupported PEFT tensor {key!r}")
            out[(int(m.group(1)), _MODULE_TARGET[m.group(2)], m.group(3))] = f.get_tensor(key).float().numpy()
    return out


def peft_to_gguf(peft_dir: str | os.PathLike, base_path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Convert a PEFT LoRA directory to a llama.cpp LoRA GGUF for ``base_path``."""
    peft_dir = Path(peft_dir)
    rank, alpha, _ = _read_peft_config(peft_dir)
    mats = _read_peft_tensors(peft_dir)
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
    return write_lora(out, layout, tensors, base.path)


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
    n_layer = 1 + max(int(n.split(".")[1]) for n in base.shapes)
    # llama.cpp reads alpha 0 as "scale 1"; PEFT needs lora_alpha = r for that
    alpha = layout.alpha or float(layout.rank)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": layout.rank,
        "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
        "target_modules": sorted(PEFT_MODULES[t].split(".")[1] for t in layout.target_names),
        "layers_to_transform": None if list(layout.layers) == list(range(n_layer)) else list(layout.layers),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "inference_mode": True,
    }
    out_dir = Path(out_dir)
    with atomic_output(out_dir / "adapter_model.safetensors") as tmp:
        save_file(out, str(tmp))
    with atomic_output(out_dir / "adapter_config.json") as tmp:
        tmp.write_text(json.dumps(config, indent=2) + "\n")
    return out_dir
