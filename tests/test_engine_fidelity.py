"""Fidelity: llama.cpp's projected gradients (L+ - L-)/(2 eps) on the INT4
model vs torch's exact directional derivative grad.v on the same GGUF
dequantized (bench/torch_ref.py), along 32 seeds.

The LoRA has a NON-zero B (bench.torch_ref.random_lora) so that A matters.
Thresholds are the issue's: sign agreement >= 90 %, Pearson >= 0.9.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fwdllm.core.adapter_io import base_shapes
from fwdllm.core.layout import LoraLayout, PerturbMask
from fwdllm.runtime.session import EdgeSession
from fwdllm.runtime.tasks import default_data, load_task, read_examples

pytest.importorskip("torch")
pytest.importorskip("transformers")

SEEDS = list(range(32))


def _check(model: Path, task_overrides: dict, n: int, rank: int, targets: list[str], parts: str, eps: float,
           b_std: float) -> dict:
    from fwdllm.reference.torch_ref import TorchRef, fidelity, random_lora

    task = load_task("sst2", **task_overrides)
    ex = read_examples(task, default_data("sst2", "dev"), limit=n)
    with EdgeSession(model, task, n_threads=2) as s:
        layout = LoraLayout.for_base(base_shapes(model), rank, 2 * rank, targets)
        s.set_lora(layout, random_lora(layout, 0, b_std=b_std))
        res = fidelity(s, TorchRef(model, n_threads=2), ex, SEEDS, [eps], PerturbMask(parts))
    r = res[f"eps={eps:g}"]
    print(f"{model.name} parts={parts} eps={eps}: sign {r['sign_agreement']:.3f} pearson {r['pearson']:.3f}")
    assert abs(res["torch_loss"] - res["llama_loss"]) < 0.05  # same model, same loss definition
    return r


@pytest.mark.torch
@pytest.mark.parametrize("parts", ["b", "both"])
def test_fidelity_tiny(tiny_model: Path, parts: str):
    r = _check(tiny_model, {"label_words": ("negative", "positive")}, 16, 4, ["q", "k", "v"], parts, 1e-2, 0.05)
    assert r["sign_agreement"] >= 0.9 and r["pearson"] >= 0.9


@pytest.mark.slow
@pytest.mark.torch
def test_fidelity_smollm2(smollm2: Path):
    r = _check(smollm2, {}, 32, 8, ["q", "v"], "b", 3e-2, 0.02)
    assert r["sign_agreement"] >= 0.9 and r["pearson"] >= 0.9
