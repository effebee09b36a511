"""Issue #31, item 4: no number a client sends can make the run non-finite.

``test_attack_*`` run :mod:`fwdllm.testing.attacks` against a live
``aggregator serve`` process (``$FWDLLM_ATTACK_TARGET`` aims them at another
install); the others check the last line of defence in process.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fwdllm.aggregator.registry import make_strategy
from fwdllm.aggregator.strategy import ClientView, Scored, StrategySpec
from fwdllm.core.layout import PerturbMask
from fwdllm.core.optim import Optimizer, OptimizerSpec
from fwdllm.core.protocol import Update
from fwdllm.core.replica import Replica
from fwdllm.testing.attacks import check
from fwdllm.testing.fake import synthetic_layout

pytestmark = pytest.mark.timeout(60)


def test_attack_losses_near_the_float64_limit(tmp_path: Path, tiny_model: Path) -> None:
    check("overflow", tmp_path, tiny_model)


def test_attack_head_gradient_of_1e30(tmp_path: Path, tiny_model: Path) -> None:
    check("head-overflow", tmp_path, tiny_model)


def test_attack_head_rows_of_2_to_the_62(tmp_path: Path, tiny_model: Path) -> None:
    check("head-rows", tmp_path, tiny_model)


def test_attack_counters_near_the_int64_limit(tmp_path: Path, tiny_model: Path) -> None:
    check("counters", tmp_path, tiny_model)


def test_a_step_that_would_not_be_finite_is_refused_and_changes_nothing() -> None:
    layout = synthetic_layout()
    rng = np.random.default_rng(0)
    tensors = {n: rng.standard_normal(s).astype(np.float32) for n, s in layout.shapes().items()}
    replica = Replica(layout, tensors, Optimizer(OptimizerSpec(name="adam", lr=0.1)), version=3)
    before = (replica.sha, replica.version, {k: v.copy() for k, v in replica.optimizer.state_arrays().items()})

    def update(coeff: float) -> Update:
        return Update(round=4, version=4, lr=0.1, adapter_sha256="", seeds=np.array([7], np.uint32),
                      coeffs=np.array([coeff]), mask=PerturbMask(parts="b").to_dict())

    assert replica.apply_if_finite(update(1e300)) is None  # float32 inf in the gradient, then in Adam's moments
    assert (replica.sha, replica.version) == before[:2]
    assert all(np.array_equal(v, before[2][k]) for k, v in replica.optimizer.state_arrays().items())
    sha = replica.apply_if_finite(update(0.5))
    assert sha is not None and replica.version == 4 and sha == replica.sha


def test_robust_head_aggregation_leaves_out_and_strikes_a_huge_head_gradient() -> None:
    spec = StrategySpec(k=4, extra={"robust": "clip", "robust_strikes": 1})
    s = make_strategy(spec)
    views = [ClientView(c, i, 1.0, 10, 8) for i, c in enumerate(["a", "b", "c", "evil"])]
    s.begin(1, views)
    heads = {}
    for v in views:
        w = s.next_work(v)
        s.add(v, w, Scored(np.array(w.seeds, np.uint32), np.full(len(w.seeds), 0.1), 0.5, 1, 0.1, 2))
        g = np.full((2, 4), 1e5 if v.client_id == "evil" else 0.01, np.float32)
        heads[(v.client_id, w.batch_seed, w.seeds)] = (8, g)
    head = s.head_step(heads)
    step = s.step()
    assert head is not None and np.allclose(head, 0.01)
    assert step.info["newly_quarantined"] == ["evil"]
