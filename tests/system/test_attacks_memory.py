"""Issue #31, item 2: what one peer can make the aggregator hold is bounded.

``test_attack_*`` run :mod:`fwdllm.testing.attacks` against a live
``aggregator serve`` process (``$FWDLLM_ATTACK_TARGET`` aims them at another
install); the last two check in process that repeated requests get one
snapshot per version, and that a worker which missed one asks again at the next.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import zmq
from harness import join_msg, serving, start_worker

from fwdllm.aggregator.server import Aggregator
from fwdllm.core.protocol import Heartbeat, Message, Snapshot, SnapshotRequest
from fwdllm.testing.attacks import check

pytestmark = pytest.mark.timeout(60)


@pytest.mark.slow  # a multi-process attack of 10-30 s
def test_attack_thousand_unread_snapshot_requests(tmp_path: Path, tiny_model: Path) -> None:
    check("snapshot-flood", tmp_path, tiny_model)


@pytest.mark.slow  # a multi-process attack of 10-30 s
def test_attack_three_curve_connections_of_one_key_flooding_snapshots(tmp_path: Path, tiny_model: Path) -> None:
    check("snapshot-flood-curve", tmp_path, tiny_model)


def test_attack_message_over_the_total_limit_is_refused(tmp_path: Path, tiny_model: Path) -> None:
    check("oversized", tmp_path, tiny_model)


def test_one_snapshot_per_identity_and_version(tmp_path: Path) -> None:
    """Repeated requests get one snapshot; the next version gets one more."""
    with serving(tmp_path, rounds=1000, min_clients=2, quorum=0.5) as agg:
        s = zmq.Context.instance().socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(agg.opts.bind)
        try:
            asks(s, agg)
        finally:
            s.close(0)


def asks(s: zmq.Socket, agg: Aggregator) -> None:
    """Five requests at version 0, one round, five more: one snapshot each time."""
    s.send_multipart(join_msg("asker").to_frames())
    for _ in range(5):
        s.send_multipart(SnapshotRequest().to_frames())
    snaps = [m for m in pump(s, 1.0) if isinstance(m, Snapshot)]
    assert [m.version for m in snaps] == [0]
    start_worker(agg.opts.bind, "c0")  # with quorum 0.5 its result alone ends round 1
    pump(s, 30.0, until=lambda: agg.replica.version >= 1)
    assert agg.replica.version >= 1
    for _ in range(5):
        s.send_multipart(SnapshotRequest().to_frames())
    snaps = [m for m in pump(s, 1.0) if isinstance(m, Snapshot)]
    assert len(snaps) == 1 and snaps[0].version >= 1


def pump(s: zmq.Socket, wait_s: float, until: Callable[[], bool] = lambda: False) -> list[Message]:
    """Heartbeat and collect for ``wait_s`` (or until ``until()``)."""
    out: list[Message] = []
    end = next_hb = time.monotonic()
    end += wait_s
    while time.monotonic() < end and not until():
        if time.monotonic() >= next_hb:  # by the clock: a busy round must not starve our heartbeats
            s.send_multipart(Heartbeat().to_frames())
            next_hb = time.monotonic() + 0.1
        if s.poll(50):
            out.append(Message.from_frames(s.recv_multipart()))
    return out


def test_worker_asks_again_once_a_newer_version_shows_up() -> None:
    """The aggregator sends one snapshot per version and drops what a full queue
    cannot take: a worker whose snapshot never came must ask again, once."""
    from fwdllm.core.optim import OptimizerSpec
    from fwdllm.core.protocol import Update, Welcome
    from fwdllm.edge_client.worker import EventLog, Worker
    from fwdllm.testing.fake import QuadraticScorer

    ctx = zmq.Context.instance()
    server, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    server.bind("inproc://resync")
    dealer.connect("inproc://resync")
    try:
        w = Worker("inproc://resync", "c", lambda s: join_msg("c"), QuadraticScorer(), EventLog(None))
        config = {"task": "synthetic", "optimizer": OptimizerSpec().to_dict(), "version": 3, "adapter_sha256": "x"}
        for msg in (Welcome(run_id="r", heartbeat_s=1.0, config=config),  # asks for version 3
                    Welcome(run_id="r", heartbeat_s=1.0, config=config),  # still 3: no second request
                    Update(round=4, version=4, lr=0.1, adapter_sha256="y", seeds=np.zeros(0, np.uint32),
                           coeffs=np.zeros(0))):  # version 4 shows up: asks again
            w._handle(dealer, msg.to_frames())
        asked = []
        while server.poll(200):
            asked.append(Message.from_frames(server.recv_multipart()[1:]))
        assert [type(m) for m in asked] == [SnapshotRequest, SnapshotRequest]
    finally:
        dealer.close(0)
        server.close(0)
