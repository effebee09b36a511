"""``fwdllm bench secagg``: what secure aggregation costs a round, in time and bytes.

One round of the real state machines (:mod:`fwdllm.core.secagg`) for n fake
clients in this process - keys, shares, masking, a dropout, reveal, unmask -
with each party's compute timed separately, in CPU time (this process's, so
other load on the machine does not count).  The clients' work would run in
parallel on their own devices, so the table gives the mean per client and the
aggregator's own time; the bytes are the payloads each client sends and
receives (the ``SecAgg`` messages add a ~60-byte JSON header each).
"""

from __future__ import annotations

import time
from pathlib import Path

import click
import numpy as np

from fwdllm.bench.common import RESULTS, number_list, out_help, write_result
from fwdllm.options import Command, option


def one_round(n: int, length: int, drop: int = 1) -> dict[str, float]:
    """Client ms (mean), server ms and bytes per client of one round with
    ``drop`` clients dropping after their shares."""
    from fwdllm.core.secagg import SecAggClient, SecAggParams, SecAggServer

    params = SecAggParams(n=n, threshold=SecAggParams.default_threshold(n), length=length, round=1)
    rng = np.random.default_rng(0)
    client_s = 0.0
    server_s = 0.0

    def timed(fn, *a):
        t0 = time.process_time()  # CPU seconds: wall time on a shared machine measures the neighbours
        out = fn(*a)
        return out, time.process_time() - t0

    clients = {u: SecAggClient(params, u) for u in range(1, n + 1)}
    server = SecAggServer(params)
    for u, c in clients.items():
        keys, dt = timed(c.keys)
        client_s += dt
        server_s += timed(server.add_keys, u, keys)[1]
    for u, c in clients.items():
        roster, dt = timed(server.roster, u)
        server_s += dt
        shares, dt = timed(c.shares, roster)
        client_s += dt
        server_s += timed(server.add_shares, u, shares)[1]
    dropped = set(range(2, 2 + drop))
    for u, c in clients.items():
        inbox, dt = timed(server.inbox, u)
        server_s += dt
        masked, dt = timed(c.mask, rng.normal(size=length), inbox)
        client_s += dt
        if u not in dropped:
            server_s += timed(server.add_masked, u, masked)[1]
    request, dt = timed(server.unmask_request)
    server_s += dt
    for u in sorted(server.vectors):
        reveal, dt = timed(clients[u].reveal, request)
        client_s += dt
        server_s += timed(server.add_reveal, u, reveal)[1]
    server_s += timed(server.total)[1]
    return {"clients": n, "degree": params.degree, "threshold": params.threshold, "length": length,
            "client_ms": 1e3 * client_s / n, "server_ms": 1e3 * server_s, "bytes_per_client": server.bytes_per_client()}


@click.command("secagg", cls=Command)
@click.option("--counts", default="4,16,100", show_default=True, callback=number_list(int, 3, 1001),
              help="Clients per round (comma-separated).")
@click.option("--lengths", default="17,1171", show_default=True, callback=number_list(int, 1, 1 << 20),
              help="Vector lengths: K=16 scalars + loss; plus an SST-2 head on SmolLM2 (2 x 576 + rows).")
@option("out", default=RESULTS, help=out_help("secagg"))
def secagg(counts: list[int], lengths: list[int], out: Path) -> None:
    """Secure aggregation's cost per round: client and server compute, bytes per client.

    \b
    Example:
      fwdllm bench secagg --counts 4,16,100
    """
    rows = [one_round(n, length) for length in lengths for n in counts]
    write_result(out, "secagg", {"rounds": rows}, {
        "Secure aggregation per round, one client dropping after its shares": (
            ["clients", "degree", "threshold", "vector", "client ms (each)", "server ms", "bytes per client"],
            [[r["clients"], r["degree"], r["threshold"], r["length"], round(r["client_ms"], 1),
              round(r["server_ms"], 1), r["bytes_per_client"]] for r in rows]),
    })
