"""Issue #31, item 3: deadlines cost the silent, not the honest.

``test_attack_*`` run :mod:`fwdllm.testing.attacks` against a live
``aggregator serve`` process (``$FWDLLM_ATTACK_TARGET`` aims them at another
install); the others check deadlines and the log throttle in process.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from harness import serving, start_worker

from fwdllm.aggregator import checkpoint
from fwdllm.runtime.log import Throttle
from fwdllm.testing.attacks import check
from fwdllm.testing.fake import QuadraticScorer

pytestmark = pytest.mark.timeout(60)


@pytest.mark.slow  # a multi-process attack of 10-30 s
@pytest.mark.timeout(120)
def test_attack_eight_silent_connections_of_one_key_do_not_stop_training(tmp_path: Path, tiny_model: Path) -> None:
    check("silent", tmp_path, tiny_model)


def test_attack_junk_frames_with_a_stalled_log_pipe(tmp_path: Path, tiny_model: Path) -> None:
    check("log-flood", tmp_path, tiny_model)


def test_a_slow_honest_client_loses_one_task_and_is_never_evicted(tmp_path: Path) -> None:
    """Its first task is judged by the fast client's speed and taken back, and it
    gets no other work until it answers; its late answer measures it, and from
    then on its deadline fits it.  No round goes short of seeds meanwhile."""
    with serving(tmp_path, rounds=10, k=8, min_clients=2, deadline_floor_s=0.5, deadline_slack=4.0,
                 liveness=25) as agg:  # liveness: only deadlines may judge the slow client here
        fast, t0 = start_worker(agg.opts.bind, "fast", QuadraticScorer(delay_s=0.0))
        slow, t1 = start_worker(agg.opts.bind, "slow", QuadraticScorer(delay_s=1.2))
        t0.join(60)
        t1.join(60)
        assert not t0.is_alive() and not t1.is_alive()
    recs = checkpoint.read_metrics(tmp_path)
    assert [r["round"] for r in recs] == list(range(1, 11))
    assert all(r["evicted"] == [] and r["perturbations"] == 8 for r in recs)
    assert sum("slow" in r["expired"] for r in recs) <= 1
    assert sum(r["clients"] == 2 for r in recs) >= 3  # the slow client's results count once it is measured
    assert slow.replica is not None and slow.replica.sha == recs[-1]["adapter_sha256"]


def test_throttle_keeps_a_few_lines_and_counts_the_rest(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("fwdllm.test.throttle")
    throttle = Throttle(log, per_key=2, total=3, interval_s=60)
    with caplog.at_level(logging.WARNING, logger="fwdllm.test.throttle"):
        for i in range(1000):
            throttle.warning(("frame", i % 10), "bad frame %d", i)
        throttle.flush()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:3] == ["bad frame 0", "bad frame 1", "bad frame 2"]
    assert lines[3] == "... and 997 more such warnings from 10 peer(s) in the last 60 s" and len(lines) == 4
