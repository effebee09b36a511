"""``fwdllm bench load``: the aggregator's own cost per round with many clients.

Why this shape: on a real deployment a round's wall time is dominated by the
devices' forward passes, which says nothing about whether the aggregator
scales.  Here the clients are a *swarm* of protocol-speaking DEALER sockets in
a child process that answer every Task at once with synthetic scalars (no
model, no replica), and the aggregator runs the real loop, strategy, replica
update, checkpoint and broadcast on the model-free synthetic run of
:mod:`fwdllm.testing.fake`.  Reported per round (first round skipped as warm-up):

* ``server CPU``: CPU time of the aggregator's thread from the round's start
  to its commit - every frame decoded, every Task, the step, the checkpoint,
  the Update broadcast, heartbeats; no client compute is in it;
* ``round wall``: the same span in wall-clock time, which adds the swarm's
  latency and the checkpoint's fsync.

Everything is on 127.0.0.1 and bounded (``--rounds``, ``--timeout``).
"""

from __future__ import annotations

import multiprocessing as mp
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import click
import numpy as np
import zmq

from fwdllm.bench.common import RESULTS, number_list, write_result
from fwdllm.options import Command, option

HEARTBEAT_S = 1.0


def swarm(url: str, n: int, stop: Any) -> None:
    """``n`` fake clients on one Poller: Join, answer Tasks and heartbeats, leave on Bye."""
    from fwdllm.core.protocol import Bye, Heartbeat, Join, Message, ProtocolError, Result, Task
    from fwdllm.testing.fake import FAKE_MODEL_SHA

    ctx = zmq.Context()
    socks, poller = [], zmq.Poller()
    for i in range(n):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(url)
        s.send_multipart(Join(client_id=f"fake-{i:05d}", model_sha256=FAKE_MODEL_SHA, tokens_per_s=100.0,
                              mem_bytes=0, max_batch=8, n_examples=100).to_frames())
        poller.register(s, zmq.POLLIN)
        socks.append(s)
    hb = Heartbeat().to_frames()
    rng = np.random.default_rng(0)
    live = set(socks)
    while live and not stop.is_set():
        for s, _ in poller.poll(100):
            frames = s.recv_multipart()
            if b'"type":"update"' in frames[0][:40]:  # a real device replays it; the swarm has no replica
                continue
            try:
                msg = Message.from_frames(frames)
            except ProtocolError:
                continue
            if isinstance(msg, Task):
                k = len(msg.seeds)
                base = rng.normal(1.0, 0.01)
                s.send_multipart(Result(round=msg.round, seeds=msg.seeds, loss_plus=base + rng.normal(0, 0.01, k),
                                        loss_minus=np.full(k, base), n_tokens=k).to_frames())
            elif isinstance(msg, Heartbeat):
                s.send_multipart(hb)
            elif isinstance(msg, Bye):
                live.discard(s)
    for s in socks:
        s.close(0)
    ctx.term()


def measure(n: int, rounds: int, k: int, timeout_s: float) -> dict[str, Any]:
    """Serve ``rounds`` rounds to a swarm of ``n``; per-round server CPU and wall times."""
    from fwdllm.aggregator import checkpoint, setup
    from fwdllm.aggregator.server import Aggregator, ServerOptions
    from fwdllm.aggregator.simulate import free_port
    from fwdllm.aggregator.strategy import StrategySpec
    from fwdllm.core.optim import OptimizerSpec
    from fwdllm.testing.fake import synthetic_run

    class Timed(Aggregator):
        """Stamps thread CPU and wall time at each round's start and commit."""

        samples: list[tuple[float, float]]

        def _begin_round(self, now: float) -> None:
            self._t0 = (time.thread_time(), time.perf_counter())
            super()._begin_round(now)

        def _commit(self) -> None:
            super()._commit()
            cpu0, wall0 = self._t0
            self.samples.append((time.thread_time() - cpu0, time.perf_counter() - wall0))

    url = f"tcp://127.0.0.1:{free_port()}"
    spawn = mp.get_context("spawn")
    stop = spawn.Event()
    child = spawn.Process(target=swarm, args=(url, n, stop), daemon=True)
    with tempfile.TemporaryDirectory(prefix="fwdllm-load-") as tmp:
        run_dir = Path(tmp)
        cfg, replica = synthetic_run(rounds, OptimizerSpec(lr=0.01, total_rounds=rounds), StrategySpec(k=k))
        checkpoint.write_config(run_dir, cfg)
        opts = ServerOptions(bind=url, heartbeat_s=HEARTBEAT_S, liveness=10, round_timeout_s=timeout_s, min_clients=n)
        agg = Timed(run_dir, cfg, replica, setup.strategy_for(cfg, {}), opts)
        agg.samples = []
        server = threading.Thread(target=agg.serve, daemon=True)
        server.start()
        child.start()
        try:
            end = time.monotonic() + timeout_s
            while server.is_alive() and time.monotonic() < end:
                server.join(0.5)
                if not child.is_alive():
                    # A finished run's Byes make the swarm leave while the server still
                    # lingers on its socket (serve() sleeps 0.2 s): let it end first.
                    server.join(HEARTBEAT_S * 5)
                    break
            if server.is_alive():
                agg.stop.set()
                server.join(10)
                why = "the swarm died" if not child.is_alive() else f"timed out after {timeout_s:.0f} s"
                raise click.ClickException(f"{n} clients: {len(agg.samples)}/{rounds} rounds; {why}")
            recs = checkpoint.read_metrics(run_dir)
        finally:
            stop.set()
            child.join(10)
            if child.is_alive():
                child.kill()
    cpu = np.array([c for c, _ in agg.samples[1:]]) * 1e3
    wall = np.array([w for _, w in agg.samples[1:]]) * 1e3
    return {
        "clients": n, "k": k, "rounds": len(agg.samples),
        "server_cpu_ms": {"median": float(np.median(cpu)), "max": float(cpu.max())},
        "round_wall_ms": {"median": float(np.median(wall)), "max": float(wall.max())},
        "participants": recs[-1]["participants"], "bytes_update": recs[-1]["bytes_update"],
    }


@click.command("load", cls=Command)
@click.option("--sizes", default="10,100,1000", show_default=True, callback=number_list(int, 1), metavar="N,...",
              help="Swarm sizes to measure, comma-separated: the number of fake clients in each run.")
@option("rounds", default=6, help="Rounds per swarm size, at least 2 (the first is warm-up).")
@option("k")
@click.option("--k-per-client", is_flag=True,
              help="Use K = the swarm size (every client works every round) instead of --k.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0, min_open=True), default=300.0, show_default=True,
              help="Give up on a swarm size after this many seconds.")
@option("out", default=RESULTS, help="Directory for load.json.")
def load(sizes: list[int], rounds: int, k: int, k_per_client: bool, timeout_s: float, out: Path) -> None:
    """Aggregator overhead per round with 10 / 100 / 1,000 fake clients.

    The clients are lightweight protocol-speaking sockets (one child process)
    answering instantly with synthetic scalars, so the numbers are the
    server's own: decoding, strategy, replica step, checkpoint, broadcast.
    ZO-SGD gives the --k seeds of a round to min(K, clients) clients; the
    rest only heartbeat.

    \b
    Examples:
      fwdllm bench load                         # 10, 100, 1000 clients, K=16
      fwdllm bench load --sizes 1000 --k-per-client
    """
    from fwdllm.core.errors import UserError

    if rounds < 2:
        raise UserError("--rounds: bench load needs at least 2 (the first is warm-up)")
    if k < 1 and not k_per_client:
        raise UserError("--k: a round needs at least one seed")
    results = []
    for n in sizes:
        r = measure(n, rounds, n if k_per_client else k, timeout_s)
        click.echo(f"{n} clients: server CPU {r['server_cpu_ms']['median']:.1f} ms/round, "
                   f"wall {r['round_wall_ms']['median']:.1f} ms/round", err=True)
        results.append(r)
    rows = [[r["clients"], r["k"], r["participants"], f"{r['server_cpu_ms']['median']:.1f}",
             f"{r['server_cpu_ms']['max']:.1f}", f"{r['round_wall_ms']['median']:.1f}", r["bytes_update"]]
            for r in results]
    write_result(out, "load", {"results": results, "heartbeat_s": HEARTBEAT_S},
                 {"Aggregator overhead per round (fake clients on 127.0.0.1; goal < 100 ms at 1,000)": (
                     ["clients", "K", "participants", "server CPU ms (median)", "server CPU ms (max)",
                      "round wall ms (median)", "Update bytes"], rows)})
