"""Byzantine clients: 20 % of the devices send garbage scalars.

The honest devices score a real objective (the quadratic of
:mod:`aggregator.fake`, evaluated exactly at the perturbed adapters) over the
real sockets; robust aggregation (``--strategy-opt robust=clip``) must keep the
final loss near the clean run's, plain averaging must not.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from harness import garbage_scorer, quadratic_loss, serving, start_worker

from fwdllm.aggregator import checkpoint
from fwdllm.aggregator.registry import make_strategy
from fwdllm.aggregator.robust import Robust, RobustOptions
from fwdllm.aggregator.strategy import ClientView, Scored, StrategySpec
from fwdllm.testing.fake import QuadraticScorer

N, BAD, ROUNDS, K = 10, 2, 8, 20


def train(run_dir: Path, n_bad: int, extra: dict) -> tuple[float, float, list[dict]]:
    """(loss before, loss after, metrics) of one run with ``n_bad`` garbage clients."""
    with serving(run_dir, rounds=ROUNDS, k=K, min_clients=N, extra=extra, lr=4.0, liveness=10) as agg:
        before = quadratic_loss(agg)
        workers = [start_worker(agg.opts.bind, f"c{i:02d}", garbage_scorer() if i < n_bad else QuadraticScorer(noise=1e-4))
                   for i in range(N)]
        for _, t in workers:
            t.join(90)
            assert not t.is_alive()
        after = quadratic_loss(agg)
    return before, after, checkpoint.read_metrics(run_dir)


def test_robust_aggregation_survives_20_percent_garbage(tmp_path: Path) -> None:
    before, clean, _ = train(tmp_path / "clean", 0, {"robust": "clip"})
    _, robust, recs = train(tmp_path / "robust", BAD, {"robust": "clip"})
    _, plain, _ = train(tmp_path / "plain", BAD, {})
    gain = before - clean
    assert gain > 0.2 * before  # the clean run did learn
    assert robust < clean + 0.1 * gain, (before, clean, robust, plain)  # robust keeps >= 90 % of the progress
    assert plain > before or not np.isfinite(plain), (before, clean, robust, plain)  # plain averaging is wrecked
    assert recs[-1]["quarantined"] == ["c00", "c01"]
    assert all(r["clients"] == N - BAD for r in recs[3:])  # quarantined after 3 strikes: no more work


def _scored(seeds: list[int], proj: list[float]) -> Scored:
    return Scored(np.array(seeds, np.uint32), np.array(proj, np.float64), 0.0, 1, 0.0, 2)


def _round(strategy, round: int, values: dict[str, float], order: list[str]):  # noqa: ANN001, ANN202
    views = [ClientView(c, i, 1.0, 10, 8) for i, c in enumerate(sorted(values))]
    strategy.begin(round, views)
    works = {v.client_id: strategy.next_work(v) for v in views}
    by_id = {v.client_id: v for v in views}
    for c in order:
        w = works[c]
        if w is not None:
            strategy.add(by_id[c], w, _scored(list(w.seeds), [values[c]] * len(w.seeds)))
    return strategy.step()


def test_robust_is_order_free_resumable_and_quarantines() -> None:
    spec = StrategySpec(k=8, extra={"robust": "clip", "robust_strikes": 2, "robust_min_history": 4})
    values = {"a": 1.0, "b": -1.5, "c": 0.5, "evil": 1e6}
    a, b = make_strategy(spec), make_strategy(spec)
    assert isinstance(a, Robust)
    for r in (1, 2):
        sa, sb = _round(a, r, values, sorted(values)), _round(b, r, values, sorted(values, reverse=True))
        assert np.array_equal(sa.coeffs, sb.coeffs) and np.all(np.abs(sa.coeffs) < 10)
    assert a.quarantined == {"evil"} and sa.info["newly_quarantined"] == ["evil"]
    c = make_strategy(spec)
    c.load_state_dict(a.state_dict())
    s3a, s3c = _round(a, 3, values, sorted(values)), _round(c, 3, values, sorted(values))
    assert np.array_equal(s3a.coeffs, s3c.coeffs) and s3a.info["robust_outliers"] == 0


def test_robust_options_are_validated_and_mom_scale_is_robust() -> None:
    assert RobustOptions.split({"k2": 1}) == (None, {"k2": 1})
    with pytest.raises(ValueError, match="without robust"):
        RobustOptions.split({"robust_mult": 3})
    with pytest.raises(ValueError, match="unknown robust"):
        RobustOptions.split({"robust": "clip", "robust_nope": 1})
    with pytest.raises(ValueError, match="choose clip"):
        RobustOptions.split({"robust": "median"})
    opts, rest = RobustOptions.split({"robust": "mom", "robust_groups": 5, "layout": {}})
    assert opts is not None and opts.scale == "mom" and rest == {"layout": {}}
    from fwdllm.aggregator.robust import robust_scale

    honest = np.abs(np.random.default_rng(0).standard_normal(400))
    assert robust_scale(honest, opts) == pytest.approx(np.mean(honest), rel=0.2)
    poisoned_groups = honest.copy()
    poisoned_groups[0::5] = 1e9  # one group of five hit
    assert robust_scale(poisoned_groups, opts) < 2
