"""10,000 hostile frames against a live aggregator while an honest client trains.

Frames come from hypothesis strategies: random bytes, mutated JSON headers of
every message type (wrong types, NaN/inf, missing fields, unknown versions),
truncations, oversized headers and arrays, and protocol-level lies from
*joined* peers: replayed rounds, foreign seeds, results for tasks that were
never theirs, non-finite losses.  Sent in batches of 100 from three sockets
(one anonymous, two joined), with replies drained as they come.

Pass: no exception escapes into the loop's "internal error" handler, the
server handles every frame (a probe sent last on each socket is answered),
still answers a Join and heartbeats afterwards, and the honest worker
completes rounds during the storm, landing on the server's adapter hash in
each.  The run is long enough that it never ends during the storm.

In the system tier for its cost alone: hypothesis drawing 10,000 frames takes
~20 s (the aggregator handles them in a fraction of that).  The fast tiers
keep hand-written hostile frames (federation/test_aggregator_protocol.py).
"""

from __future__ import annotations

import base64
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import zmq
from harness import join_msg, serving, start_worker, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fwdllm.aggregator import checkpoint
from fwdllm.core.protocol import Heartbeat, Message, ProtocolError, Result, Task, Welcome
from fwdllm.testing.fake import QuadraticScorer

BATCH, BATCHES, ROUNDS = 100, 100, 6

Ctx = dict[str, Any]  # the fuzzer's knowledge: current task of each joined socket
Make = Callable[[Ctx], tuple[int, list[bytes]]]  # -> (socket index, frames)

json_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20), st.sampled_from(["", "x" * 5000, "task", "result", "join"]),
)
json_value = st.recursive(json_scalar, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                          max_leaves=6)
float_arr = st.lists(st.sampled_from([0.0, 1.0, -1e308, math.nan, math.inf, -math.inf, 1e-300]), max_size=6)


def b64(values: list[float], dtype: str = "<f8") -> str:
    return base64.b64encode(np.array(values, dtype=dtype).tobytes()).decode()


def valid_headers() -> list[dict[str, Any]]:
    """One valid header per client->server type, plus a few server->client ones."""
    samples: list[Message] = [
        join_msg("fuzz-anon"), Heartbeat(),
        Result(round=1, seeds=np.array([1, 2], np.uint32), loss_plus=np.zeros(2), loss_minus=np.zeros(2)),
        Task(round=1, version=0, adapter_sha256="0" * 64, seeds=np.array([1], np.uint32)),
        Welcome(run_id="r", heartbeat_s=1.0, config={}),
    ]
    return [json.loads(m.to_frames()[0]) for m in samples] + [
        {"v": 2, "type": t} for t in ("snapreq", "bye", "refuse", "error", "update", "snapshot")]


HEADERS = valid_headers()


@st.composite
def mutated_header(draw: st.DrawFn) -> Make:
    h = dict(draw(st.sampled_from(HEADERS)))
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from(sorted(h) + ["extra"]))
        if draw(st.booleans()):
            h[key] = draw(json_value)
        else:
            h.pop(key, None)
    data = json.dumps(h, allow_nan=True).encode()
    blobs = draw(st.lists(st.binary(max_size=64), max_size=2))
    sock = draw(st.integers(0, 2))
    return lambda ctx: (sock, [data, *blobs])


@st.composite
def lying_result(draw: st.DrawFn) -> Make:
    """Results that decode but lie: stale/future rounds, foreign or other peers' seeds, bad values."""
    sock = draw(st.integers(0, 2))
    round_shift = draw(st.sampled_from([0, -1, 1, -(10**6), 2**40]))
    seeds_kind = draw(st.sampled_from(["own", "foreign", "other", "empty", "longer"]))
    plus, minus = draw(float_arr), draw(float_arr)
    foreign = draw(st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=4))

    def make(ctx: Ctx) -> tuple[int, list[bytes]]:
        own: Task | None = ctx.get(sock)
        other: Task | None = ctx.get(3 - sock if sock else 1)
        base = own or other
        seeds = {"own": list(own.seeds) if own else foreign, "foreign": foreign,
                 "other": list(other.seeds) if other else foreign, "empty": [],
                 "longer": (list(base.seeds) if base else foreign) + foreign}[seeds_kind]
        n = len(seeds)
        h = {"v": 2, "type": "result", "round": (base.round if base else 1) + round_shift, "seeds": b64(seeds, "<u4"),
             "loss_plus": b64((plus + [0.0] * n)[:n]), "loss_minus": b64((minus + [0.0] * n)[:n])}
        return sock, [json.dumps(h).encode()]

    return make


@st.composite
def raw_frames(draw: st.DrawFn) -> Make:
    kind = draw(st.sampled_from(["bytes", "truncated", "big_header", "big_array", "many_frames"]))
    sock = draw(st.integers(0, 2))
    if kind == "bytes":
        frames = draw(st.lists(st.binary(max_size=100), min_size=1, max_size=4))
    elif kind == "truncated":
        data = json.dumps(draw(st.sampled_from(HEADERS))).encode()
        frames = [data[: draw(st.integers(0, len(data) - 1))]]
    elif kind == "big_header":
        frames = [b'{"v":2,"type":"hb","pad":"' + b"x" * draw(st.integers(60_000, 200_000)) + b'"}']
    elif kind == "big_array":
        frames = [json.dumps({"v": 2, "type": "result", "round": 1, "seeds": b64([1] * 70_000, "<u4"),
                              "loss_plus": "", "loss_minus": ""}).encode()]
    else:
        frames = [b"{}"] * draw(st.integers(9, 40))
    return lambda ctx: (sock, frames)


any_frame = st.one_of(mutated_header(), lying_result(), raw_frames())


class Fuzzer:
    """Three DEALERs: 0 never joins, 1 and 2 join as fuzz-1 / fuzz-2 and learn their tasks."""

    def __init__(self, url: str) -> None:
        ctx = zmq.Context.instance()
        self.socks = []
        for i in range(3):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDHWM, 0)
            s.connect(url)
            if i:
                s.send_multipart(join_msg(f"fuzz-{i}").to_frames())
            self.socks.append(s)
        self.ctx: Ctx = {}
        self.sent = self.replies = 0

    def drain(self, wait_s: float = 0.0) -> None:
        end = time.monotonic() + wait_s
        while True:
            got = False
            for i, s in enumerate(self.socks):
                while s.poll(0):
                    frames = s.recv_multipart()
                    self.replies += 1
                    got = True
                    try:
                        msg = Message.from_frames(frames)
                    except ProtocolError:
                        continue
                    if isinstance(msg, Task):
                        self.ctx[i] = msg
            if not got and time.monotonic() >= end:
                return
            if not got:
                time.sleep(0.01)

    def send(self, batch: list[Make]) -> None:
        for make in batch:
            i, frames = make(self.ctx)
            self.socks[i].send_multipart(frames)
            self.sent += 1
        self.drain(0.02)

    def flush(self, timeout_s: float = 60.0) -> None:
        """Wait until the server has handled everything sent: a frame it must
        answer goes last on every socket, and per-connection order holds."""
        for i, s in enumerate(self.socks):
            s.send_multipart([json.dumps({"v": 2, "type": f"probe-{i}"}).encode()])
        pending = set(range(len(self.socks)))
        end = time.monotonic() + timeout_s
        while pending:
            assert time.monotonic() < end, f"sockets {pending} got no answer to the probe"
            for i in list(pending):
                while self.socks[i].poll(10):
                    frames = self.socks[i].recv_multipart()
                    self.replies += 1
                    if f"probe-{i}".encode() in frames[0]:
                        pending.discard(i)

    def close(self) -> None:
        for s in self.socks:
            s.close(0)


def applied(events: Path) -> dict[int, str]:
    """round -> adapter hash, for every Update the worker applied and matched."""
    lines = [json.loads(x) for x in events.read_text().splitlines()] if events.exists() else []
    return {e["round"]: e["sha"] for e in lines if e["event"] == "update" and e["match"]}


class Crashes(logging.Handler):
    """Counts records logged with a traceback (the loop's 'internal error')."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.timeout(180)
def test_ten_thousand_hostile_frames(tmp_path: Path) -> None:
    crashes = Crashes()
    logging.getLogger("fwdllm").addHandler(crashes)
    quiet = logging.getLogger("fwdllm.aggregator")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # 10,000 "rejected frame" warnings would only slow the test
    try:
        with serving(tmp_path, rounds=100_000, k=8, quorum=0.3, round_timeout_s=3.0) as agg:
            fuzzer = Fuzzer(agg.opts.bind)
            honest: list = []

            @settings(max_examples=BATCHES, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(st.lists(any_frame, min_size=BATCH, max_size=BATCH))
            def fuzz(batch: list[Make]) -> None:
                fuzzer.send(batch)
                if not honest and fuzzer.sent >= 10 * BATCH:  # joins while the storm is on
                    honest.append(start_worker(agg.opts.bind, "honest", QuadraticScorer(delay_s=0.05),
                                               events=tmp_path / "honest.jsonl"))

            fuzz()
            fuzzer.flush()
            assert fuzzer.sent >= BATCH * BATCHES
            fuzzer.close()
            worker, thread = honest[0]
            wait_until(lambda: len(applied(tmp_path / "honest.jsonl")) >= ROUNDS, 60, "the honest client's rounds")
            worker.done = "test over"
            thread.join(10)
            sha = {r["round"]: r["adapter_sha256"] for r in checkpoint.read_metrics(tmp_path)}
            mine = applied(tmp_path / "honest.jsonl")
            assert all(sha[r] == s for r, s in mine.items())
            assert all(np.all(np.isfinite(t)) for t in agg.replica.tensors.values())
    finally:
        logging.getLogger("fwdllm").removeHandler(crashes)
        quiet.setLevel(level)
    assert not crashes.records, [r.getMessage() for r in crashes.records[:5]]


@pytest.mark.timeout(60)
def test_server_answers_after_the_storm(tmp_path: Path) -> None:
    """A short storm, then a fresh client still gets Welcome and heartbeats."""
    with serving(tmp_path, rounds=1) as agg:
        fuzzer = Fuzzer(agg.opts.bind)

        @settings(max_examples=5, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
        @given(st.lists(any_frame, min_size=BATCH, max_size=BATCH))
        def fuzz(batch: list[Make]) -> None:
            fuzzer.send(batch)

        fuzz()
        fuzzer.close()
        s = zmq.Context.instance().socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(agg.opts.bind)
        try:
            s.send_multipart(join_msg("late").to_frames())
            seen: set[type] = set()
            end = time.monotonic() + 10
            while time.monotonic() < end and not {Welcome, Heartbeat} <= seen:
                if s.poll(100):
                    seen.add(type(Message.from_frames(s.recv_multipart())))
            assert {Welcome, Heartbeat} <= seen
        finally:
            s.close(0)
