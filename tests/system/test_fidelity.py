"""Fidelity: llama.cpp's projected gradients (L+ - L-)/(2 eps) on the INT4
model vs torch's exact directional derivative grad.v on the same GGUF
dequantized (fwdllm.reference.torch_ref), along seeded directions.

The LoRA has a NON-zero B (torch_ref.random_lora) so that A matters.
The bar is the issue's: 32 seeds, sign agreement >= 90 % and Pearson >= 0.9
(on SmolLM2 at the default eps, 3e-2).

Torch's side is one backward pass per test (g.v for every direction from the
one g); the cost is llama.cpp's two passes per seed over the rows.  So the
batch is a few dev rows: adding rows shrinks the exact g.v about as much as
the finite-difference error (llama.cpp's 8-bit activations, over 2 eps), so
more rows cost time without sharpening the comparison.  The rows are the
first of SST-2's phrase-level split: whole sentences carry more tokens per
row and so a smaller g.v next to the same 8-bit noise.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from harness import THREADS

from fwdllm.core.adapter_io import base_shapes
from fwdllm.core.layout import LoraLayout, PerturbMask
from fwdllm.runtime.session import EdgeSession
from fwdllm.runtime.tasks import default_data, read_examples

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytestmark = pytest.mark.torch
SEEDS = list(range(32))


def _check(session: EdgeSession, ref, rows: int, rank: int, targets: list[str], parts: str,  # noqa: ANN001
           eps: float, b_std: float) -> dict:
    from fwdllm.reference.torch_ref import fidelity, random_lora

    model = session.model_path
    ex = read_examples(session.task, default_data("sst2", "dev-phrases"), limit=rows)  # short rows: see above
    layout = LoraLayout.for_base(base_shapes(model), rank, 2 * rank, targets)
    session.set_lora(layout, random_lora(layout, 0, b_std=b_std))
    res = fidelity(session, ref, ex, SEEDS, [eps], PerturbMask(parts))
    r = res[f"eps={eps:g}"]
    print(f"{model.name} parts={parts} eps={eps}: sign {r['sign_agreement']:.3f} pearson {r['pearson']:.3f}")
    assert abs(res["torch_loss"] - res["llama_loss"]) < 0.05  # same model, same loss definition
    return r


@pytest.mark.timeout(60)
@pytest.mark.parametrize("parts", ["b", "both"])
def test_fidelity_tiny(tiny_model: Path, torch_ref, parts: str) -> None:  # noqa: ANN001
    from fwdllm.runtime.tasks import load_task

    task = load_task("sst2", label_words=("negative", "positive"))
    with EdgeSession(tiny_model, task, n_threads=THREADS) as s:
        r = _check(s, torch_ref(tiny_model), 4, 4, ["q", "k", "v"], parts, 1e-2, 0.05)
    assert r["sign_agreement"] >= 0.9 and r["pearson"] >= 0.9


@pytest.mark.timeout(420)
def test_fidelity_smollm2(smollm2_session: EdgeSession, torch_ref) -> None:  # noqa: ANN001
    r = _check(smollm2_session, torch_ref(smollm2_session.model_path), 8, 8, ["q", "v"], "b", 3e-2, 0.02)
    assert r["sign_agreement"] >= 0.9 and r["pearson"] >= 0.9
