"""Protocol v2 over real sockets: summed rounds (``--secagg``, ``--dp-epsilon``)
between the real aggregator loop and real workers (model-free scorers, in
threads on 127.0.0.1).

The recording test keeps every frame the aggregator receives and every
result the devices computed, and checks that no frame carries a device's
unmasked vector while the step the aggregator broadcast is the plain mean.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from harness import HB, free_url, join_msg, wait_until

from fwdllm.aggregator import checkpoint, setup
from fwdllm.aggregator.privacy import DPSpec
from fwdllm.aggregator.secure import SecAggOptions
from fwdllm.aggregator.server import Aggregator, ServerOptions
from fwdllm.aggregator.strategy import StrategySpec
from fwdllm.core import contribution
from fwdllm.core.optim import OptimizerSpec
from fwdllm.core.protocol import Message, Result, SecAgg
from fwdllm.core.secagg import SecAggParams, encode_fixed
from fwdllm.edge_client.worker import EventLog, Scorer, Worker
from fwdllm.testing.fake import QuadraticScorer, synthetic_run

K = 6


class Recording(Aggregator):
    """The real aggregator, keeping every frame it receives."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.received: list[list[bytes]] = []

    def _on_frames(self, raw) -> None:
        self.received.append([f.bytes for f in raw[1:]])
        super()._on_frames(raw)


@dataclasses.dataclass
class Keeping:
    """A device's scorer that keeps its true results (the test's ground truth)
    and can die mid-round, after its keys and shares went out."""

    inner: QuadraticScorer
    results: dict[int, Result] = dataclasses.field(default_factory=dict)
    die_in_round: int = 0

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def score(self, layout, tensors, task):
        if task.round == self.die_in_round:
            time.sleep(0.3)  # keys and shares travel meanwhile
            raise SystemExit("device lost")
        r = self.inner.score(layout, tensors, task)
        self.results[task.round] = r
        return r


def _serve(tmp: Path, rounds: int, **cfg_changes) -> tuple[Recording, threading.Thread]:
    cfg, replica = synthetic_run(rounds, OptimizerSpec(lr=0.05, total_rounds=rounds), StrategySpec(k=K))
    cfg = dataclasses.replace(cfg, **cfg_changes)
    checkpoint.write_config(tmp, cfg)
    checkpoint.save(tmp, replica, {}, 0.0)
    opts = ServerOptions(bind=free_url(), heartbeat_s=HB, liveness=5, round_timeout_s=30.0, min_clients=4)
    agg = Recording(tmp, cfg, replica, setup.strategy_for(cfg, {}), opts, None, 0.0)
    t = threading.Thread(target=agg.serve, daemon=True)
    t.start()
    return agg, t


def _workers(url: str, scorers: list[Keeping]) -> list[tuple[Worker, threading.Thread]]:
    out = []
    for i, s in enumerate(scorers):
        n = len(getattr(s.inner, "examples", range(10)))
        join = lambda _s, cid=f"c{i}", n=n: dataclasses.replace(join_msg(cid), n_examples=n)  # noqa: E731
        w = Worker(url, f"c{i}", join, s, EventLog(None), 30.0)
        t = threading.Thread(target=w.run, daemon=True)
        t.start()
        out.append((w, t))
    return out


def _proj(r: Result) -> np.ndarray:
    return (r.loss_plus - r.loss_minus) / 2e-2  # central differences at the wire's default eps


def _plain(r: Result) -> np.ndarray:
    """A device's contribution vector as it was before masking."""
    return contribution.vector(contribution.Shape(K, None, False), _proj(r), float(np.mean((r.loss_plus + r.loss_minus) / 2)))


def _stop(agg: Aggregator, t: threading.Thread, workers) -> None:
    agg.stop.set()
    t.join(15)
    for w, wt in workers:
        w.done = "test over"
        wt.join(10)


@pytest.mark.timeout(90)
def test_secagg_server_never_holds_an_unmasked_vector_and_steps_on_the_plain_mean(tmp_path: Path) -> None:
    agg, t = _serve(tmp_path, 3, secagg=SecAggOptions().to_dict())
    scorers = [Keeping(QuadraticScorer(noise=0.05)) for _ in range(4)]
    ws = _workers(agg.opts.bind, scorers)
    try:
        wait_until(lambda: agg.replica.version >= 3, 60, "three secure rounds")
    finally:
        _stop(agg, t, ws)
    msgs = [Message.from_frames(f) for f in agg.received]
    assert not [m for m in msgs if isinstance(m, Result)]  # every contribution came masked
    assert {m.stage for m in msgs if isinstance(m, SecAgg)} == {"keys", "shares", "masked", "reveal"}
    params = SecAggParams(n=4, threshold=3, length=K + 1, round=1)
    for s in scorers:
        for r in s.results.values():
            plain = encode_fixed(_plain(r), params).astype("<u8").tobytes()
            assert not any(plain[:16] in frame for f in agg.received for frame in f)
    recs = checkpoint.read_metrics(tmp_path)
    hist = agg.history
    for rnd in (1, 2, 3):
        mean = np.mean([_proj(s.results[rnd]) for s in scorers], axis=0)
        np.testing.assert_allclose(hist.updates[rnd - 1].coeffs, mean / K, rtol=0, atol=1e-6)
        assert recs[rnd - 1]["secagg_bytes_per_client"] > 0 and recs[rnd - 1]["clients"] == 4


@pytest.mark.timeout(90)
def test_secagg_round_completes_with_the_survivors_sum_when_one_of_four_drops_after_sharing(tmp_path: Path) -> None:
    agg, t = _serve(tmp_path, 1, secagg=SecAggOptions().to_dict())
    scorers = [Keeping(QuadraticScorer(noise=0.05), die_in_round=1 if i == 2 else 0) for i in range(4)]
    ws = _workers(agg.opts.bind, scorers)
    try:
        wait_until(lambda: agg.replica.version >= 1, 60, "the secure round with a dropout")
    finally:
        _stop(agg, t, ws)
    rec = checkpoint.read_metrics(tmp_path)[0]
    assert rec["dropped"] == ["c2"] and rec["clients"] == 3
    alive = [s for i, s in enumerate(scorers) if i != 2]
    mean = np.mean([_proj(s.results[1]) for s in alive], axis=0)
    np.testing.assert_allclose(agg.history.updates[0].coeffs, mean / K, rtol=0, atol=1e-6)


@pytest.mark.timeout(120)
def test_dp_rounds_write_epsilon_spent_and_stop_at_the_budget(tmp_path: Path) -> None:
    """Central DP on model-free devices that hold per-example losses: the run
    stops before a round that would pass the budget, and every metrics line
    says how much was spent (the ledger's, i.e. dp-accounting's, epsilon)."""
    dp = DPSpec(epsilon=2.0, delta=1e-5, clip=1.0, rounds=2, on_spent="stop").to_dict()
    agg, t = _serve(tmp_path, 4, dp=dp)  # 4 rounds asked, a budget calibrated for 2
    ws = _workers(agg.opts.bind, [Keeping(Scorer(PerExample(), list(range(400)), "synthetic")) for _ in range(4)])
    try:
        wait_until(lambda: not t.is_alive(), 60, "the run to stop at its budget")
    finally:
        _stop(agg, t, ws)
    recs = checkpoint.read_metrics(tmp_path)
    assert [r["round"] for r in recs] == [1, 2]
    spent = [r["dp_epsilon_spent"] for r in recs]
    assert 0 < spent[0] < spent[1] <= 2.0 * (1 + 1e-6)
    assert all(r["loss"] is None for r in recs)  # no loss leaves a DP device


class PerExample(QuadraticScorer):
    """A model-free session with per-example losses, under the worker's real
    DP scorer: the quadratic objective plus a fixed offset per example."""

    def set_lora(self, layout, tensors) -> None:
        self._layout, self._tensors = layout, tensors

    def perturbed(self, batch, seeds, eps, mask, dist, one_sided, per_example=False):
        from fwdllm.core.directions import direction

        names = mask.names(self._layout)
        base = self.loss(self._tensors, names, 0)
        plus = np.array([self.loss({n: self._tensors[n] + eps * direction(s, self._layout, mask, dist)[n]
                                    for n in names}, names, 0) for s in seeds])
        offs = np.array([0.01 * i for i in batch], dtype=np.float64)
        ones = np.ones((len(seeds), 1))
        return dataclasses.make_dataclass("R", ["example_plus", "example_minus", "n_tokens", "seconds"])(
            plus[:, None] + offs[None] * ones, base + offs[None] * ones, len(batch), 0.0)
