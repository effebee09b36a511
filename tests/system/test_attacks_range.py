"""Issue #31, item 7: a client that sends -3x its true projections stays in
range; the audit on shared seeds (``robust_audit``) catches it when the batch
noise is small (docs/security.md says how small).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fwdllm.aggregator.registry import make_strategy
from fwdllm.aggregator.strategy import ClientView, Scored, StrategySpec
from fwdllm.testing.attacks import check

pytestmark = pytest.mark.timeout(60)


def _truth(seed: int) -> float:
    return float(np.random.default_rng(seed).standard_normal())


def play(rounds: int, noise: float, extra: dict) -> tuple[set[str], dict]:
    """Rounds of the strategy API with 4 clients, "liar" sending -3x; every
    client's projection of a seed is the seed's truth plus batch noise."""
    s = make_strategy(StrategySpec(k=16, extra={"robust": "clip", **extra}))
    views = [ClientView(c, i, 1.0, 10, 8) for i, c in enumerate(["a", "b", "c", "liar"])]
    rng = np.random.default_rng(1)
    for r in range(1, rounds + 1):
        s.begin(r, views)
        for _ in range(3):  # own work first, then audits, as the loop hands them out
            for v in views:
                w = s.next_work(v)
                if w is None:
                    continue
                p = np.array([_truth(x) for x in w.seeds]) + noise * rng.standard_normal(len(w.seeds))
                p = -3 * p if v.client_id == "liar" else p
                s.add(v, w, Scored(np.array(w.seeds, np.uint32), p, 0.5, 1, 0.1, 2))
        s.step()
    return s.quarantined, s.state_dict()


def test_audit_quarantines_a_sign_liar_and_nobody_else() -> None:
    quarantined, state = play(8, 0.1, {"robust_audit": 1.0})
    assert quarantined == {"liar"}
    assert state["robust"]["audit"]  # the pair tallies survive a restart
    assert play(8, 0.1, {})[0] == set()  # clipping alone does not see it


@pytest.mark.slow  # three multi-process runs, ~30 s
def test_attack_range_lie_is_caught_by_the_audit(tmp_path: Path, tiny_model: Path) -> None:
    check("range-lie", tmp_path, tiny_model)
