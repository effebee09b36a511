"""Aggregator protocol over real ZeroMQ sockets on 127.0.0.1, no model needed.

Clients are the real :class:`fwdllm.edge_client.worker.Worker` with a synthetic
quadratic objective (:mod:`aggregator.fake`) or raw DEALER sockets that send
hostile frames.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import zmq
from harness import HB, free_url, join_msg, serving, start_worker, wait_until

from fwdllm.aggregator import checkpoint
from fwdllm.aggregator.registry import make_strategy
from fwdllm.aggregator.strategy import StrategySpec
from fwdllm.core.protocol import Error, Heartbeat, Message, Refuse, Result, Task, Welcome
from fwdllm.testing.fake import QuadraticScorer


@contextmanager
def raw_socket(url: str) -> Iterator[zmq.Socket]:
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(url)
    try:
        yield s
    finally:
        s.close(0)


def recv_msg(sock: zmq.Socket, timeout: float = 5.0, skip: tuple[type, ...] = (Heartbeat,)) -> Message:
    """Next message that is not one of ``skip`` (heartbeats by default)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if sock.poll(int((end - time.monotonic()) * 1000) + 1):
            msg = Message.from_frames(sock.recv_multipart())
            if not isinstance(msg, skip):
                return msg
    raise AssertionError("no reply from the aggregator")


# --------------------------------------------------------------------------- #


def test_hostile_frames_get_errors_and_server_keeps_serving(tmp_path: Path) -> None:
    with serving(tmp_path) as agg, raw_socket(agg.opts.bind) as s:
        join = json.loads(join_msg("x").to_frames()[0])
        bad = [
            [b"not json at all"],
            [b"[1, 2, 3]"],
            [json.dumps({**join, "v": 99}).encode()],  # unknown version
            [json.dumps({**join, "type": "nope"}).encode()],
            [json.dumps({"v": 2, "type": "join"}).encode()],  # missing fields
            [json.dumps({**join, "tokens_per_s": "fast"}).encode()],  # wrong type
            [b"{" + b" " * (100 * 1024) + b"}"],  # header over the 64 KiB limit
            [b"{}"] * 20,  # too many frames
        ]
        for frames in bad:
            s.send_multipart(frames)
            reply = recv_msg(s)
            assert isinstance(reply, Error) and reply.code == "frame", (frames[0][:40], reply)
        s.send_multipart(Heartbeat().to_frames())  # not joined yet
        reply = recv_msg(s)
        assert isinstance(reply, Error) and reply.code == "join"
    # over zmq.MAXMSGSIZE: the transport drops the connection; the server lives on
    with serving(tmp_path / "b") as agg:
        with raw_socket(agg.opts.bind) as s:
            s.send_multipart([b"x" * (2 << 20)])
            time.sleep(0.3)
        with raw_socket(agg.opts.bind) as s:
            s.send_multipart(join_msg("honest").to_frames())
            assert isinstance(recv_msg(s), Welcome)


def test_wrong_base_model_is_refused(tmp_path: Path) -> None:
    with serving(tmp_path) as agg, raw_socket(agg.opts.bind) as s:
        s.send_multipart(join_msg("c", sha="0" * 64).to_frames())
        reply = recv_msg(s)
        assert isinstance(reply, Refuse) and "sha256" in reply.reason and "differs" in reply.reason


def test_fake_clients_train_agree_and_stay_small(tmp_path: Path) -> None:
    with serving(tmp_path, rounds=6, k=16, min_clients=3) as agg:
        workers = [start_worker(agg.opts.bind, f"c{i}", events=tmp_path / f"c{i}.jsonl") for i in range(3)]
        for _, t in workers:
            t.join(30)
            assert not t.is_alive()
    recs = checkpoint.read_metrics(tmp_path)
    assert [r["round"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert recs[-1]["loss"] < recs[0]["loss"]
    for r in recs:
        assert r["clients"] == 3 and r["perturbations"] == 16
        assert r["bytes_down_per_client"] <= 1024 and r["bytes_up_per_client"] <= 1024
    sha_by_round = {r["round"]: r["adapter_sha256"] for r in recs}
    for w, _ in workers:
        assert w.replica is not None and w.replica.sha == recs[-1]["adapter_sha256"]
        events = [json.loads(x) for x in (tmp_path / f"{w.client_id}.jsonl").read_text().splitlines()]
        updates = {e["round"]: e["sha"] for e in events if e["event"] == "update"}
        assert updates == sha_by_round


def test_silent_client_is_dropped_and_round_completes(tmp_path: Path) -> None:
    with serving(tmp_path, rounds=3, min_clients=3) as agg, raw_socket(agg.opts.bind) as s:
        workers = [start_worker(agg.opts.bind, f"c{i}") for i in range(2)]
        s.send_multipart(join_msg("silent").to_frames())
        task = recv_msg(s, skip=(Heartbeat, Welcome))
        assert isinstance(task, Task) and task.round == 1  # ... and it never answers nor heartbeats
        for _, t in workers:
            t.join(30)
            assert not t.is_alive()
    recs = checkpoint.read_metrics(tmp_path)
    assert [r["round"] for r in recs] == [1, 2, 3]
    assert "silent" in recs[0]["dropped"] and recs[0]["clients"] == 2
    assert recs[0]["perturbations"] == 16  # the silent client's seeds went to the others in the same round


@pytest.mark.parametrize("stratify", [False, True])
def test_tasks_carry_the_runs_batch_draw(tmp_path: Path, stratify: bool) -> None:
    """The client draws the batch, so every Task must say how (``--batches``);
    a run.json from before the option resumes with the uniform draw it had."""
    with serving(tmp_path, rounds=1, min_clients=1, stratify=stratify) as agg, raw_socket(agg.opts.bind) as s:
        s.send_multipart(join_msg("c").to_frames())
        task = recv_msg(s, skip=(Heartbeat, Welcome))
        assert isinstance(task, Task) and task.stratify is stratify
    old = checkpoint.read_config(tmp_path).strategy
    old.pop("stratify")
    assert StrategySpec.from_dict(old).stratify is False


def test_stalled_client_hits_deadline_and_late_result_is_ignored(tmp_path: Path) -> None:
    with serving(tmp_path, rounds=2, min_clients=2, round_timeout_s=1.0) as agg, raw_socket(agg.opts.bind) as s:
        worker, t = start_worker(agg.opts.bind, "c0")
        s.send_multipart(join_msg("stalled").to_frames())
        task = recv_msg(s, skip=(Heartbeat, Welcome))
        assert isinstance(task, Task)
        end = time.monotonic() + 20
        while not checkpoint.read_metrics(tmp_path) and time.monotonic() < end:  # heartbeat, never answer
            s.send_multipart(Heartbeat().to_frames())
            time.sleep(HB)
        late = Result(round=task.round, seeds=task.seeds, loss_plus=np.zeros(len(task.seeds)),
                      loss_minus=np.zeros(len(task.seeds)))
        s.send_multipart(late.to_frames())
        t.join(30)
    recs = checkpoint.read_metrics(tmp_path)
    assert [r["round"] for r in recs] == [1, 2]
    assert recs[0]["clients"] == 1 and recs[0]["round_s"] >= 1.0


def test_quorum_ends_rounds_without_the_straggler(tmp_path: Path) -> None:
    with serving(tmp_path, rounds=3, min_clients=3, quorum=0.6) as agg:
        ws = [start_worker(agg.opts.bind, f"fast{i}") for i in range(2)]
        slow, ts = start_worker(agg.opts.bind, "slow", QuadraticScorer(delay_s=3.0))
        for _, t in ws:
            t.join(30)
    recs = checkpoint.read_metrics(tmp_path)
    assert [r["round"] for r in recs] == [1, 2, 3]
    assert all(r["clients"] == 2 and r["participants"] == 3 for r in recs)
    assert all(r["round_s"] < 3.0 for r in recs)


def test_late_joiner_catches_up_by_replay_and_matches(tmp_path: Path) -> None:
    """Protocol v2: the late device builds version 0 from the init seed and
    replays the history to the server's hash; no snapshot crosses the wire."""
    with serving(tmp_path, rounds=12, min_clients=1) as agg:
        first, t1 = start_worker(agg.opts.bind, "early", QuadraticScorer(delay_s=0.1))
        wait_until(lambda: len(checkpoint.read_metrics(tmp_path)) >= 2)
        late, t2 = start_worker(agg.opts.bind, "late", QuadraticScorer(delay_s=0.1), events=tmp_path / "late.jsonl")
        t1.join(30)
        t2.join(30)
    final = checkpoint.read_metrics(tmp_path)[-1]["adapter_sha256"]
    assert first.replica.sha == late.replica.sha == final
    events = [json.loads(x) for x in (tmp_path / "late.jsonl").read_text().splitlines()]
    assert [e["ok"] for e in events if e["event"] == "replay"] == [True]
    assert "snapshot" not in [e["event"] for e in events]
    assert agg.traffic["snapshot"] == 0 and agg.traffic["replay"] > 0


def test_resume_is_bit_identical(tmp_path: Path) -> None:
    def run(run_dir: Path, stop_after: int | None) -> str:
        url = free_url()
        with serving(run_dir, rounds=6, min_clients=2, url=url) as agg:
            ws = [start_worker(agg.opts.bind, f"c{i}", QuadraticScorer(noise=0.01)) for i in range(2)]
            if stop_after is None:
                for _, t in ws:
                    t.join(30)
            else:
                wait_until(lambda: agg.replica.version >= stop_after)
        if stop_after is not None:
            with serving(run_dir, resume=True, min_clients=2, url=url) as agg:
                for _, t in ws:  # the same workers reconnect on their own
                    t.join(60)
                    assert not t.is_alive()
        return checkpoint.read_metrics(run_dir)[-1]["adapter_sha256"]

    a = run(tmp_path / "straight", None)
    b = run(tmp_path / "resumed", 3)
    assert a == b
    assert [r["round"] for r in checkpoint.read_metrics(tmp_path / "resumed")] == [1, 2, 3, 4, 5, 6]


def test_zo_sgd_plan_is_deterministic_and_averages_shared_seeds() -> None:
    from fwdllm.aggregator.strategy import ClientView, Scored

    spec = StrategySpec(k=6, run_seed=7)
    views = [ClientView(f"c{i}", i, 1.0, 10, 8) for i in range(3)]
    a, b = make_strategy(spec), make_strategy(spec)
    a.begin(4, views)
    b.begin(4, views)
    works = [a.next_work(v) for v in views]
    assert works == [b.next_work(v) for v in views]
    assert sorted(s for w in works for s in w.seeds) == sorted({s for w in works for s in w.seeds})
    assert a.next_work(views[0]) is None  # fixed K: one work per client
    seed = works[0].seeds[0]
    for v, p in ((views[0], 2.0), (views[1], 4.0)):
        a.add(v, works[0], Scored(np.array([seed], np.uint32), np.array([p]), 0.5, 1, 0.1, 2))
    step = a.step()
    assert list(step.seeds) == [seed] and step.coeffs[0] == pytest.approx(3.0)
