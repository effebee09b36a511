"""A worker reconnects to a restarted aggregator and gets what the dead one owed it.

(kill -9 of real aggregator and client processes: tests/system/test_kill9.py.)
"""

from __future__ import annotations

from pathlib import Path

from harness import free_url, serving, start_worker, wait_until


def test_worker_asks_a_restarted_aggregator_again_for_the_snapshot_the_old_one_never_sent(tmp_path: Path) -> None:
    """The aggregator dies between its Welcome and the Snapshot the worker asked
    for; the worker's socket silently reconnects to the restarted one, which
    answers "join". The lost request must be asked again, or the worker
    heartbeats forever without ever scoring (CI once hung on exactly this)."""
    import dataclasses

    import zmq

    from fwdllm.aggregator.server import welcome
    from fwdllm.aggregator.strategy import StrategySpec
    from fwdllm.core.optim import OptimizerSpec
    from fwdllm.core.protocol import Message, SnapshotRequest
    from fwdllm.testing.fake import synthetic_run

    url = free_url()
    cfg, replica = synthetic_run(2, OptimizerSpec(lr=0.05, total_rounds=2), StrategySpec(k=4))
    dead = zmq.Context.instance().socket(zmq.ROUTER)
    dead.setsockopt(zmq.LINGER, 0)
    dead.bind(url)
    worker, thread = start_worker(url, "c0", give_up_s=30)
    try:
        assert dead.poll(10_000), "no Join"
        ident, *_ = dead.recv_multipart()
        # no init seed: the worker cannot build version 0 itself and must ask for the snapshot
        no_seed = dataclasses.replace(cfg, init_seed=None)
        dead.send_multipart([ident, *welcome(no_seed, replica, heartbeat_s=0.2).to_frames()])
        wait_until(lambda: dead.poll(0) and isinstance(Message.from_frames(dead.recv_multipart()[1:]),
                                                       SnapshotRequest), 10, "the SnapshotRequest")
    finally:
        dead.close(0)  # dies without answering
    with serving(tmp_path / "run", rounds=2, k=4, min_clients=1, url=url) as agg:
        wait_until(lambda: agg.replica.version >= 2, 20, "two rounds scored by the reconnected worker")
    worker.done = "test over"
    thread.join(10)
