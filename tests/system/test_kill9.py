"""Crashes: kill -9 of the aggregator at random points, and of 30 % of the clients.

The aggregator runs as a child process (``tests/harness.py
server``) so it can really be SIGKILLed: mid-round, mid-checkpoint, between
rounds.  ``--resume`` must then reach an adapter bit-identical to the
uninterrupted run, with no round applied twice; the clients (real Workers on
the quadratic objective) reconnect by themselves.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from harness import free_url, serving, start_worker, stop, wait_until

from fwdllm.aggregator import checkpoint
from fwdllm.core.adapter_io import read_adapter
from fwdllm.testing.fake import QuadraticScorer

HELPER = Path(__file__).parents[1] / "harness.py"
ROUNDS, N_CLIENTS, TRIALS = 6, 3, 5


def spawn(tmp: Path, *args: str) -> subprocess.Popen:
    with open(tmp / "children.log", "ab") as log:
        return subprocess.Popen([sys.executable, str(HELPER), *args], stdout=log, stderr=subprocess.STDOUT)


def workers(url: str) -> list:
    return [start_worker(url, f"c{i}", QuadraticScorer(delay_s=0.05, noise=0.01), give_up_s=60) for i in range(N_CLIENTS)]


def final(run_dir: Path) -> tuple[list[int], dict[str, np.ndarray]]:
    return [r["round"] for r in checkpoint.read_metrics(run_dir)], read_adapter(run_dir / "adapter.gguf")[1]


@pytest.mark.timeout(90)
def test_kill9_aggregator_at_random_points_then_resume_is_bit_identical(tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    ref.mkdir()
    url = free_url()
    server = spawn(tmp_path, "server", str(ref), url, str(ROUNDS))
    ws = workers(url)
    assert server.wait(120) == 0, (tmp_path / "children.log").read_text()[-3000:]
    ref_rounds, ref_tensors = final(ref)
    assert ref_rounds == list(range(1, ROUNDS + 1))
    for _, t in ws:
        t.join(10)
    rng = random.Random(9)
    for trial in range(TRIALS):
        run_dir, url = tmp_path / f"trial{trial}", free_url()
        run_dir.mkdir()
        after_round, delay = rng.randint(0, ROUNDS - 3), rng.uniform(0, 0.2)
        server = spawn(tmp_path, "server", str(run_dir), url, str(ROUNDS))
        ws = workers(url)
        try:
            wait_until(lambda: len(checkpoint.read_metrics(run_dir)) >= after_round
                       and (run_dir / checkpoint.STATE).exists(), 60, f"round {after_round}")
            time.sleep(delay)
            assert server.poll() is None, "the run finished before the kill"
            server.send_signal(signal.SIGKILL)
            server.wait(10)
            resume = ["--resume"] if (run_dir / checkpoint.STATE).exists() else []
            server = spawn(tmp_path, "server", str(run_dir), url, str(ROUNDS), *resume)
            assert server.wait(120) == 0, (tmp_path / "children.log").read_text()[-3000:]
        finally:
            if server.poll() is None:
                server.kill()
        rounds, tensors = final(run_dir)
        assert rounds == ref_rounds, (trial, after_round, delay)  # each round exactly once
        assert all(np.array_equal(tensors[n], ref_tensors[n]) for n in ref_tensors), (trial, after_round, delay)
        for _, t in ws:
            t.join(10)


@pytest.mark.timeout(60)
def test_kill9_of_30_percent_of_clients_mid_round(tmp_path: Path) -> None:
    """Three of ten clients are processes, SIGKILLed while round 2 is in flight;
    the seven that live on are workers in this process."""
    n, dead = 10, 3
    with serving(tmp_path / "run", rounds=4, k=20, min_clients=n, liveness=10) as agg:
        procs = [spawn(tmp_path, "client", agg.opts.bind, f"c{i}", "0.5") for i in range(dead)]
        live = [start_worker(agg.opts.bind, f"c{i}", QuadraticScorer(delay_s=0.5, noise=0.01), give_up_s=60)
                for i in range(dead, n)]
        try:
            wait_until(lambda: agg.round is not None and agg.round.number == 2
                       and sum(p.work is not None for p in agg.peers.values()) == n, 120, "round 2 in flight")
            for p in procs:
                p.send_signal(signal.SIGKILL)
            wait_until(lambda: agg.replica.version >= 4 and agg.pending is None, 60, "the last round")
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait(10)
    stop(live)
    recs = checkpoint.read_metrics(tmp_path / "run")
    assert [r["round"] for r in recs] == [1, 2, 3, 4]
    assert sorted(recs[1]["dropped"]) == ["c0", "c1", "c2"] and recs[1]["clients"] == n - dead
    assert recs[1]["perturbations"] == 20  # the dead clients' seeds went to the others in the same round
    assert all(r["participants"] == n - dead and r["clients"] == n - dead for r in recs[2:])
