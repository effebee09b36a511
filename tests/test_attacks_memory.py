"""Issue #31, item 2: what one peer can make the aggregator hold is bounded.

``test_attack_*`` run :mod:`fwdllm.testing.attacks` against a live
``aggregator serve`` process (``$FWDLLM_ATTACK_TARGET`` aims them at another
install); the last test checks in process that a worker which missed a
snapshot gets one at the next version.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pytest
import zmq
from reliability_helpers import join_msg, serving, start_worker

from fwdllm.core.protocol import Heartbeat, Message, Snapshot, SnapshotRequest
from fwdllm.testing.attacks import run_attack, under_attack


def attack(name: str, tmp_path: Path, model: Path) -> None:
    outcome = run_attack(name, under_attack(), tmp_path, model)
    assert outcome.held, outcome.to_dict()


@pytest.mark.slow  # a multi-process attack of 10-30 s
def test_attack_thousand_unread_snapshot_requests(tmp_path: Path, tiny_model: Path) -> None:
    attack("snapshot-flood", tmp_path, tiny_model)


@pytest.mark.slow  # a multi-process attack of 10-30 s
def test_attack_three_curve_connections_of_one_key_flooding_snapshots(tmp_path: Path, tiny_model: Path) -> None:
    attack("snapshot-flood-curve", tmp_path, tiny_model)


def test_attack_message_over_the_total_limit_is_refused(tmp_path: Path, tiny_model: Path) -> None:
    attack("oversized", tmp_path, tiny_model)


def test_one_snapshot_per_identity_and_version(tmp_path: Path) -> None:
    """Repeated requests get one snapshot; the next version gets one more."""
    with serving(tmp_path, rounds=1000, min_clients=2, quorum=0.5) as agg, raw_socket(agg.opts.bind) as s:
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
    end = time.monotonic() + wait_s
    while time.monotonic() < end and not until():
        s.send_multipart(Heartbeat().to_frames())
        while s.poll(100):
            out.append(Message.from_frames(s.recv_multipart()))
    return out


@contextmanager
def raw_socket(url: str) -> Iterator[zmq.Socket]:
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(url)
    try:
        yield s
    finally:
        s.close(0)
