"""Field links: rounds complete when every device sits behind a 300 ms RTT, 2 % loss, 1 Mbit/s link.

The link is :class:`fwdllm.testing.relay.Relay` on 127.0.0.1 (this kernel has no netem); the
federation is the real aggregator loop and real Workers on the model-free quadratic objective.
"""

from __future__ import annotations

import random
import socket
import statistics
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
from harness import free_url, quadratic_loss, serving, start_worker, wait_until

from fwdllm.aggregator import checkpoint
from fwdllm.testing.fake import QuadraticScorer
from fwdllm.testing.relay import Direction, LinkSpec, Relay

pytestmark = pytest.mark.timeout(60)

FIELD = LinkSpec(rtt_s=0.3, loss=0.02, rate_bps=1e6, seed=1)


@contextmanager
def echo_server() -> Iterator[int]:
    """A TCP echo server on 127.0.0.1; yields its port."""
    srv = socket.create_server(("127.0.0.1", 0))

    def handle(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(1 << 16):
                    conn.sendall(data)
            except OSError:
                pass

    def accept() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield srv.getsockname()[1]
    finally:
        srv.close()


def recv_exactly(conn: socket.socket, n: int) -> None:
    got = 0
    while got < n:
        chunk = conn.recv(1 << 16)
        assert chunk, "connection closed"
        got += len(chunk)


def test_loss_costs_a_retransmission_timeout_in_order() -> None:
    d = Direction(FIELD, random.Random(0))
    arrivals = [d.schedule(1, 0.0) for _ in range(20_000)]  # rate: 8 us/byte, negligible next to the delays
    assert 0.015 < d.lost / d.segments < 0.025
    assert arrivals == sorted(arrivals)  # nothing overtakes a retransmitted segment
    late = [b - a for a, b in zip(arrivals, arrivals[1:]) if b - a > 0.1]
    assert min(late) == pytest.approx(FIELD.rto_s, abs=1e-3)  # one lost try: SRTT + 200 ms
    assert arrivals[0] == pytest.approx(FIELD.rtt_s / 2 + 8e-6)


def test_relay_adds_the_rtt_and_caps_the_rate() -> None:
    with echo_server() as port, Relay(("127.0.0.1", port), FIELD) as relay:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=20) as conn:
            rtts = []
            for _ in range(10):
                t0 = time.perf_counter()
                conn.sendall(b"x")
                recv_exactly(conn, 1)
                rtts.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            conn.sendall(b"y" * 62_500)  # 0.5 Mbit each way; the two directions overlap
            recv_exactly(conn, 62_500)
            bulk = time.perf_counter() - t0
    assert FIELD.rtt_s <= statistics.median(rtts) < FIELD.rtt_s + 0.1
    assert 0.5 + FIELD.rtt_s <= bulk < 5
    stats = relay.stats()
    assert stats.up["bytes"] == stats.down["bytes"] == 62_510


def test_relay_resets_connections() -> None:
    with echo_server() as port, Relay(("127.0.0.1", port), LinkSpec(reset_every_s=0.3)) as relay:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as conn:
            with pytest.raises((ConnectionResetError, AssertionError)):  # RST, or EOF when the RST raced a read
                for _ in range(1000):
                    conn.sendall(b"x")
                    recv_exactly(conn, 1)
                    time.sleep(0.01)
        wait_until(lambda: relay.stats().resets >= 1, 5, "a reset")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("resets", [0.0, 2.0], ids=["lossy", "lossy+resets"])
def test_rounds_complete_over_field_links(tmp_path: Path, resets: float) -> None:
    rounds = 4
    with serving(tmp_path / "run", rounds=rounds, k=4, min_clients=2, heartbeat_s=1.0) as agg:
        target = ("127.0.0.1", int(agg.opts.bind.rsplit(":", 1)[1]))
        before = quadratic_loss(agg)
        relays = [Relay(target, LinkSpec(rtt_s=0.3, loss=0.02, rate_bps=1e6, reset_every_s=resets, seed=i)).start()
                  for i in range(2)]
        try:
            workers = [start_worker(r.url, f"phone{i}", QuadraticScorer(delay_s=0.05), give_up_s=30)
                       for i, r in enumerate(relays)]
            wait_until(lambda: agg.replica.version >= rounds, 45, f"{rounds} rounds over field links")
            for _, t in workers:
                t.join(10)
        finally:
            for r in relays:
                r.close()
        recs = [r for r in checkpoint.read_metrics(tmp_path / "run") if r["round"] > 0]
        assert [r["round"] for r in recs] == list(range(1, rounds + 1))
        assert all(r["perturbations"] > 0 for r in recs)
        assert quadratic_loss(agg) < before  # the Updates were applied, not just counted
        if resets:
            assert sum(r.stats().resets for r in relays) >= 1


@pytest.mark.timeout(60)
def test_a_device_joins_a_big_adapter_over_a_slow_link_without_its_snapshot(tmp_path: Path) -> None:
    """A ~0.5 MiB adapter on a 0.5 Mbit/s link would need ~9 s as a snapshot,
    longer than the liveness window (5 x 1 s), so under protocol v1 the device
    gave up on it and asked again forever.  Under v2 a fresh device builds
    version 0 from the run's init seed: what crosses the link is a few KB."""
    from fwdllm.aggregator.server import ServerOptions
    from fwdllm.aggregator.strategy import StrategySpec
    from fwdllm.core.optim import OptimizerSpec
    from fwdllm.testing.fake import synthetic_layout, synthetic_run
    from fwdllm.testing.harness import aggregator_thread, port_of

    cfg, replica = synthetic_run(1, OptimizerSpec(lr=0.05, total_rounds=1), StrategySpec(k=2),
                                 layout=synthetic_layout(n_layers=4, dim=1024, rank=8))
    checkpoint.write_config(tmp_path, cfg)
    with aggregator_thread(tmp_path, cfg, replica, ServerOptions(free_url(), heartbeat_s=1.0)) as agg:
        with Relay(("127.0.0.1", port_of(agg)), LinkSpec(rtt_s=0.3, rate_bps=5e5)) as relay:
            start_worker(relay.url, "phone", QuadraticScorer(), give_up_s=30)
            wait_until(lambda: agg.replica.version >= 1, 20, "one round behind a 0.5 Mbit/s link")
            assert relay.stats().down["bytes"] < 64 * 1024, relay.stats()
