"""Every device slower than the first round's deadline (a loaded machine: the
first forward passes of SmolLM2 took ~30 s against the 20 s default while
another run shared the cores).  Each loses its first task; the round has no
result and starts again, and it must then hand the work out again, once the
late answers have measured the devices, instead of retrying an empty round in
a loop."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from harness import serving, start_worker

from fwdllm.aggregator import checkpoint
from fwdllm.testing.fake import QuadraticScorer

pytestmark = pytest.mark.timeout(60)


def test_a_round_every_device_missed_is_dealt_again(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="fwdllm"):
        with serving(tmp_path, rounds=3, k=4, min_clients=2, deadline_floor_s=0.3, deadline_slack=1.0,
                     liveness=25) as agg:  # liveness: only deadlines judge the devices here
            workers = [start_worker(agg.opts.bind, f"d{i}", QuadraticScorer(delay_s=0.8)) for i in range(2)]
            for _, thread in workers:
                thread.join(45)
            assert not any(t.is_alive() for _, t in workers), "the run did not finish"
    recs = checkpoint.read_metrics(tmp_path)
    assert [r["round"] for r in recs] == [1, 2, 3]
    assert all(r["evicted"] == [] for r in recs)
    empty = [r for r in caplog.records if "got no results" in r.getMessage()]
    assert len(empty) <= 3, f"{len(empty)} empty rounds retried"
