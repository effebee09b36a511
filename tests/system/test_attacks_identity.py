"""Issue #31, item 1: identity is the CURVE key, not the id a device sends.

The ``test_attack_*`` tests run an attack of :mod:`fwdllm.testing.attacks`
against a live ``aggregator serve`` process (``$FWDLLM_ATTACK_TARGET`` to
aim them at another install) and assert that it held; the others check the
pieces in process.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fwdllm.aggregator.registry import make_strategy
from fwdllm.aggregator.robust import RobustOptions, client_scale
from fwdllm.aggregator.strategy import ClientView, Scored, StrategySpec
from fwdllm.testing.attacks import check

pytestmark = pytest.mark.timeout(60)


def test_attack_impostor_cannot_take_another_devices_slot(tmp_path: Path, tiny_model: Path) -> None:
    check("impostor", tmp_path, tiny_model)


def test_attack_one_key_with_eight_ids_gets_one_share(tmp_path: Path, tiny_model: Path) -> None:
    check("sybil-seeds", tmp_path, tiny_model)


def test_attack_sybil_majority_of_one_key_cannot_move_the_clip_scale(tmp_path: Path, tiny_model: Path) -> None:
    check("sybil-poison", tmp_path, tiny_model)


def test_attack_quarantine_survives_a_new_id(tmp_path: Path, tiny_model: Path) -> None:
    check("requarantine", tmp_path, tiny_model)


def test_clip_scale_counts_each_client_once() -> None:
    """Six in eight values from one client do not move the median over clients."""
    opts = RobustOptions()
    honest = [("a", 1.0), ("a", 1.2), ("b", 0.9), ("b", 1.1)]
    flood = [("sybil", 1e4)] * 12
    assert client_scale(honest + flood, opts) == pytest.approx(1.05, rel=0.2)
    assert client_scale([], opts) == 0.0


def test_robust_state_from_before_per_client_scales_still_loads() -> None:
    spec = StrategySpec(k=4, extra={"robust": "clip"})
    s = make_strategy(spec)
    s.load_state_dict({"inner": {}, "robust": {"history": [0.5, 1.5], "strikes": {}, "quarantined": []}})
    assert s.history == [("", 0.5), ("", 1.5)]
    views = [ClientView(c, i, 1.0, 10, 8) for i, c in enumerate("ab")]
    s.begin(1, views)
    w = s.next_work(views[0])
    s.add(views[0], w, Scored(np.array(w.seeds, np.uint32), np.ones(len(w.seeds)), 0.0, 1, 0.0, 2))
    s.step()
    assert s.state_dict()["robust"]["history"][-1][0] == "a"
