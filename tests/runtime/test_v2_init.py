"""Protocol v2: the round-0 adapter is a pure function of (layout, seed).

A joining device builds it from the seed in ``Welcome`` instead of
downloading it, so it must be bit-identical on every platform and numpy
version: golden values pin it like the directions in test_contract.py.  A
change here is a protocol bump.
"""

from __future__ import annotations

import numpy as np
import pytest

from fwdllm.core.layout import LoraLayout, adapter_sha256
from fwdllm.core.lora import init_lora, initial_tensors


def _layout() -> LoraLayout:
    shapes = {f"blk.{i}.attn_{t}.weight": (576 if t == "q" else 192, 576) for i in range(2) for t in "qv"}
    return LoraLayout.for_base(shapes, 8, 16, ["q", "v"])


GOLDEN = [
    # seed, first four of blk.0 q's A, last two of blk.1 v's A, adapter_sha256 of the whole adapter
    (0, [-0.02399151772260666, -0.020623279735445976, 0.003883379278704524, -0.022524701431393623],
     [-0.031419139355421066, 0.017942406237125397],
     "babdb0127dd90954f4f717fc32d51842051b9b018569d10466ada52fe00a3075"),
    (2**32 - 1, [0.01921645551919937, -0.0004348779621068388, -0.024272479116916656, 0.039728619158267975],
     [-0.028250254690647125, 0.04146620258688927],
     "efe8f46c75028240358f9a12d004e5c2e88103b116e83e75c1c722220cf36bfc"),
]


@pytest.mark.parametrize("seed,first,last,digest", GOLDEN)
def test_golden_initial_adapter(seed, first, last, digest):
    lay = _layout()
    t = initial_tensors(lay, seed)
    assert t["blk.0.attn_q.weight.lora_a"].ravel()[:4].tolist() == first
    assert t["blk.1.attn_v.weight.lora_a"].ravel()[-2:].tolist() == last
    assert adapter_sha256(lay, t) == digest


def test_initial_adapter_is_kaiming_uniform_with_zero_b():
    lay = _layout()
    t = initial_tensors(lay, 5)
    bound = 1 / np.sqrt(576)
    for tgt in lay.targets:
        a = t[tgt.a_name]
        assert a.dtype == np.float32 and np.abs(a).max() < bound
        assert abs(float(a.mean())) < 0.05 * bound and abs(float(a.var()) * 3 / bound**2 - 1) < 0.1
        assert not t[tgt.b_name].any()
    other = initial_tensors(lay, 6)
    assert not np.array_equal(t["blk.0.attn_q.weight.lora_a"], other["blk.0.attn_q.weight.lora_a"])


def test_init_lora_of_a_model_is_the_seed_function(tiny_model):
    layout, tensors = init_lora(tiny_model, 4, 8.0, ["q", "v"], seed=3)
    assert adapter_sha256(layout, tensors) == adapter_sha256(layout, initial_tensors(layout, 3))
