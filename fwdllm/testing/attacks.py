"""Attacks on a live ``fwdllm aggregator serve`` process (issue #31), test-only.

Every attack starts an aggregator *process* from a given ``fwdllm`` command
(this checkout's, or an older install's: the wire protocol is the same), on
127.0.0.1, then attacks it with model-free peers that speak the real
message format: raw DEALER sockets that send JSON header frames and blobs,
and real :class:`~fwdllm.edge_client.worker.Worker` s on the quadratic
objective of :mod:`fwdllm.testing.fake`.  It returns an :class:`Outcome`:
the numbers it measured (RSS, rounds completed, seeds handed out, adapter
finiteness...) and whether the aggregator held.

The same functions back ``tests/test_attacks_*.py`` (each asserts
``outcome.held``) and ``fwdllm bench attacks`` (which runs them against two
aggregators side by side and prints before/after rows), so a number in the
docs is reproducible with one command.  Everything is bounded: a few
connections, a few thousand frames, seconds of wall time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import zmq

from fwdllm.core.protocol import (
    Error,
    Heartbeat,
    Join,
    Message,
    ProtocolError,
    Refuse,
    Result,
    SnapshotRequest,
    Task,
    Welcome,
)
from fwdllm.edge_client.worker import EventLog, Worker
from fwdllm.runtime.transport import ClientKeys, client_keys, generate_keypair, secure_client
from fwdllm.testing.fake import QuadraticScorer

HEARTBEAT = 0.2
#: every aggregator the attacks start: fast heartbeats, no dev evaluation (the task has no dev split)
BASE_ARGS = ("--heartbeat", str(HEARTBEAT), "--threads", "1", "--no-head", "--targets", "v", "--lr", "0.05")


def own_fwdllm() -> list[str]:
    """This checkout's ``fwdllm`` command."""
    return [sys.executable, "-m", "fwdllm"]


def under_attack() -> list[str]:
    """The ``fwdllm`` command the attack tests target: ``$FWDLLM_ATTACK_TARGET``
    (e.g. an older checkout's ``.venv/bin/fwdllm``, to watch the tests fail
    there), else this checkout."""
    import shlex

    target = os.environ.get("FWDLLM_ATTACK_TARGET")
    return shlex.split(target) if target else own_fwdllm()


# --------------------------------------------------------------------------- #
# the lab: processes, keys, peers
# --------------------------------------------------------------------------- #


@dataclass
class Outcome:
    """What one attack measured, and whether the aggregator held."""

    held: bool
    numbers: dict[str, Any]
    headline: str  # the one number that tells before from after

    def to_dict(self) -> dict[str, Any]:
        return {"held": self.held, "headline": self.headline, **self.numbers}


@dataclass
class Served:
    """One aggregator process and where it writes."""

    proc: subprocess.Popen
    url: str
    run_dir: Path
    log: Path

    def status(self) -> dict[str, float]:
        """VmRSS and VmHWM (peak) of the process, MiB."""
        out = {}
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0]) / 1024
        return out

    def metrics(self) -> list[dict[str, Any]]:
        path = self.run_dir / "metrics.jsonl"
        out = []
        for line in path.read_text().splitlines() if path.exists() else []:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return [r for r in out if r.get("round", 0) > 0]

    def adapter(self) -> dict[str, np.ndarray]:
        """The last checkpoint's tensors and optimizer state (``t/``, ``o/m/``, ``o/v/`` ...)."""
        import io

        with np.load(self.run_dir / "state.npz", allow_pickle=False) as z:
            blob = z["replica"].tobytes()
        with np.load(io.BytesIO(blob), allow_pickle=False) as r:
            return {k: r[k] for k in r.files if k.startswith(("t/", "o/m/", "o/v/", "o/a/"))}

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class Lab:
    """Starts and always reaps one attack's aggregator, peers and workers."""

    def __init__(self, fwdllm: Sequence[str], workdir: Path, model: Path) -> None:
        from fwdllm.runtime.models import model_sha256

        self.fwdllm = list(fwdllm)
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.model = model
        self.model_sha = model_sha256(model)
        self.task = self.dir / "tiny-sst2.json"
        # one-token label words on any vocabulary; no dev split, so no evaluation (and no model load)
        self.task.write_text(json.dumps({
            "name": "tiny-sst2", "kind": "classify", "template": "Review: {text}\nSentiment:",
            "label_words": ["bad", "good"], "labels": ["0", "1"], "text_columns": ["sentence"], "format": "tsv",
        }))
        self.procs: list[subprocess.Popen] = []
        self.sockets: list[zmq.Socket] = []
        self.workers: list[tuple[Worker, threading.Thread]] = []
        self.keys: dict[str, ClientKeys] = {}
        self.keydir = self.dir / "keys"

    # -- keys ----------------------------------------------------------- #

    def make_keys(self, *clients: str) -> list[str]:
        """The server key, plus one allowed key per client name; CURVE flags for serve."""
        if not (self.keydir / "server.key_secret").exists():
            generate_keypair("server", self.keydir, None)
        for name in clients:
            if name not in self.keys:
                _, secret = generate_keypair(name, self.keydir, self.dir / "allowed")
                self.keys[name] = client_keys(secret, self.keydir / "server.key")
        return ["--curve-secret", str(self.keydir / "server.key_secret"), "--allow", str(self.dir / "allowed")]

    # -- the aggregator ------------------------------------------------- #

    def serve(self, args: Sequence[str], name: str = "run", url: str | None = None,
              stderr_unread: bool = False, new: bool = True) -> Served:
        """Start ``fwdllm aggregator serve`` and wait until it listens.

        ``stderr_unread``: its log goes to a pipe nobody reads (a stalled log
        collector); otherwise to ``<name>.log``."""
        from fwdllm.aggregator.simulate import free_port

        url = url or f"tcp://127.0.0.1:{free_port()}"
        run_dir = self.dir / name
        log = self.dir / f"{name}.log"
        cmd = [*self.fwdllm, "aggregator", "serve", "--bind", url, "--model", str(self.model)]
        if new:
            cmd += ["--out", str(run_dir), "--task", str(self.task), *BASE_ARGS]
        cmd += args  # after BASE_ARGS: an attack's own flags win
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if stderr_unread:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                    stdin=subprocess.DEVNULL)
        else:
            with open(log, "ab") as f:
                proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)
        self.procs.append(proc)
        served = Served(proc, url, run_dir, log)
        end = time.monotonic() + 60
        while not (run_dir / "state.npz").exists() or not self._listening(url):
            if proc.poll() is not None:
                raise RuntimeError(f"aggregator exited with {proc.returncode}: {served.log_text()[-2000:]}")
            if time.monotonic() > end:
                raise RuntimeError(f"aggregator did not start: {served.log_text()[-2000:]}")
            time.sleep(0.1)
        return served

    @staticmethod
    def _listening(url: str) -> bool:
        import socket

        host, port = url.rsplit("/", 1)[1].rsplit(":", 1)
        with socket.socket() as s:
            s.settimeout(0.2)
            return s.connect_ex((host, int(port))) == 0

    # -- peers ---------------------------------------------------------- #

    def peer(self, url: str, key: str | None = None, read: bool = True) -> "Peer":
        """A raw DEALER (CURVE with ``key``); ``read=False`` makes it a reader
        that stops taking data at once (RCVHWM 1, a 4 KiB TCP buffer)."""
        s = zmq.Context.instance().socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        if not read:
            s.setsockopt(zmq.RCVHWM, 1)
            s.setsockopt(zmq.RCVBUF, 4096)
        secure_client(s, self.keys[key] if key else None)
        s.connect(url)
        self.sockets.append(s)
        return Peer(s, self.model_sha)

    def worker(self, url: str, cid: str, key: str | None = None, scorer: Any = None,
               delay_s: float = 0.0) -> tuple[Worker, "Recorder", Path]:
        """A real Worker on the quadratic objective, in a thread; its tasks are recorded."""
        rec = Recorder(scorer or QuadraticScorer(task_name="tiny-sst2", delay_s=delay_s, noise=1e-3))
        events = self.dir / f"{cid}.jsonl"

        def join(s: Any) -> Join:
            return join_msg(cid, self.model_sha)

        w = Worker(url, cid, join, rec, EventLog(events), 30.0, self.keys[key] if key else None)
        t = threading.Thread(target=self._run_worker, args=(w,), daemon=True)
        t.start()
        self.workers.append((w, t))
        return w, rec, events

    @staticmethod
    def _run_worker(w: Worker) -> None:
        try:
            w.run()
        except Exception as e:  # an aggregator that refuses or vanishes ends the worker; the attack measures it
            w.done = f"error: {e}"

    def close(self) -> None:
        for w, _ in self.workers:
            w.done = w.done or "lab closed"
        for _, t in self.workers:
            t.join(10)
        for s in self.sockets:
            s.close(0)
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
            p.wait(10)


@contextmanager
def lab(fwdllm: Sequence[str], workdir: Path, model: Path) -> Iterator[Lab]:
    the_lab = Lab(fwdllm, workdir, model)
    try:
        yield the_lab
    finally:
        the_lab.close()


def join_msg(cid: str, sha: str) -> Join:
    return Join(client_id=cid, model_sha256=sha, tokens_per_s=100.0, mem_bytes=0, max_batch=8, n_examples=10)


class Peer:
    """A raw protocol-speaking DEALER: sends anything, never blocks."""

    def __init__(self, sock: zmq.Socket, model_sha: str) -> None:
        self.sock = sock
        self.model_sha = model_sha
        self.tasks: list[Task] = []
        self.errors: list[Error] = []
        self.welcomed = 0
        self.refused = 0

    def send(self, msg: Message | list[bytes]) -> bool:
        frames = msg.to_frames() if isinstance(msg, Message) else msg
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            return False

    def join(self, cid: str) -> None:
        self.send(join_msg(cid, self.model_sha))

    def pump(self, wait_s: float = 0.0) -> list[Message]:
        """Everything that arrives within ``wait_s`` (tasks, errors and welcomes are also kept)."""
        out: list[Message] = []
        end = time.monotonic() + wait_s
        while True:
            timeout = max(0.0, end - time.monotonic())
            if not self.sock.poll(int(timeout * 1000)):
                return out
            try:
                msg = Message.from_frames(self.sock.recv_multipart())
            except ProtocolError:
                continue
            out.append(msg)
            if isinstance(msg, Task):
                self.tasks.append(msg)
            elif isinstance(msg, Error):
                self.errors.append(msg)
            elif isinstance(msg, Welcome):
                self.welcomed += 1
            elif isinstance(msg, Refuse):
                self.refused += 1


class Recorder:
    """Wraps a worker's scorer and keeps (round, seeds) of every task it scores."""

    def __init__(self, scorer: Any) -> None:
        self.scorer = scorer
        self.tasks: list[tuple[int, tuple[int, ...]]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.scorer, name)

    def score(self, layout: Any, tensors: dict[str, np.ndarray], task: Task) -> Result:
        self.tasks.append((task.round, tuple(int(s) for s in task.seeds)))
        return self.scorer.score(layout, tensors, task)


def answer(task: Task, plus: float = 1.0, minus: float = 1.0, **kw: Any) -> Result:
    """A well-formed Result for ``task`` with constant losses (plus any field override)."""
    n = len(task.seeds)
    return Result(round=task.round, seeds=task.seeds, loss_plus=np.full(n, plus), loss_minus=np.full(n, minus),
                  n_tokens=kw.pop("n_tokens", n), seconds=kw.pop("seconds", 0.01), **kw)


def events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def wait_for(cond: Callable[[], bool], timeout: float, pump: Sequence[Peer] = ()) -> bool:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            return False
        for p in pump:
            p.pump()
        time.sleep(0.05)
    return True


def quadratic(tensors: dict[str, np.ndarray]) -> float:
    """The quadratic objective at a checkpoint's LoRA B tensors (what the honest workers train)."""
    b = [a.astype(np.float64) for k, a in tensors.items() if k.startswith("t/") and k.endswith("lora_b")]
    return float(sum(np.sum((x - 1.0) ** 2) for x in b) / sum(x.size for x in b))


def finite(arrays: dict[str, np.ndarray]) -> bool:
    return all(np.all(np.isfinite(a)) for a in arrays.values())


def honest_updates(path: Path) -> tuple[int, int]:
    """(updates the worker applied and matched, updates that did not match) from its event log."""
    ups = [e for e in events(path) if e["event"] == "update"]
    return sum(e["match"] for e in ups), sum(not e["match"] for e in ups)


# --------------------------------------------------------------------------- #
# 1. identity
# --------------------------------------------------------------------------- #


def impostor(lab: Lab) -> Outcome:
    """An allowed key joins as another device's ``client_id`` every 0.15 s and
    answers whatever task it gets; does it take the device's slot and tasks?"""
    curve = lab.make_keys("device-1", "intruder")
    agg = lab.serve(["--rounds", "1000", "--k", "8", *curve])
    _, rec, ev = lab.worker(agg.url, "device-1", key="device-1", delay_s=0.3)
    wait_for(lambda: len(agg.metrics()) >= 2, 30)
    imp = lab.peer(agg.url, key="intruder")
    forged = rejected = 0
    next_join, end = 0.0, time.monotonic() + 4.0
    while time.monotonic() < end:
        if time.monotonic() >= next_join:
            imp.join("device-1")
            next_join = time.monotonic() + 0.15
        for msg in imp.pump(0.02):
            if isinstance(msg, Task):
                imp.send(answer(msg, plus=2.0, minus=1.0))  # a forged, well-formed result
                forged += 1
            elif isinstance(msg, Error) and msg.code == "result":
                rejected += 1
    time.sleep(0.5)
    honest = set(rec.tasks)
    stolen = sum((t.round, tuple(int(s) for s in t.seeds)) in honest for t in imp.tasks)
    welcomes = sum(e["event"] == "welcome" for e in events(ev))
    numbers = {"tasks_stolen": stolen, "device_rejoins": welcomes - 1, "impostor_tasks": len(imp.tasks),
               "impostor_results": forged, "impostor_results_rejected": rejected, "rounds": len(agg.metrics())}
    return Outcome(stolen == 0 and welcomes == 1, numbers,
                   f"{stolen} of the device's tasks taken, device displaced {welcomes - 1}x")


def _sybils(lab: Lab, url: str, key: str, n: int, prefix: str = "!sybil") -> list[Peer]:
    """``n`` connections from one key, with made-up ids that sort before every real one."""
    peers = [lab.peer(url, key=key) for _ in range(n)]
    for i, p in enumerate(peers):
        p.join(f"{prefix}-{i}")
    return peers


def _pump_answering(peers: Sequence[Peer], wait_s: float, lie: Callable[[Task], Result] | None,
                    rejoin_s: float = 0.5, prefix: str = "!sybil") -> None:
    """Keep ``peers`` alive for ``wait_s``: heartbeat, re-join when told to (or
    every ``rejoin_s``), answer every task with ``lie(task)`` (never when None)."""
    end = time.monotonic() + wait_s
    next_hb = next_join = 0.0
    while time.monotonic() < end:
        now = time.monotonic()
        for i, p in enumerate(peers):
            if now >= next_hb:
                p.send(Heartbeat())
            if now >= next_join:
                p.join(f"{prefix}-{i}")
            for msg in p.pump():
                if isinstance(msg, Task) and lie is not None:
                    p.send(lie(msg))
        if now >= next_hb:
            next_hb = now + HEARTBEAT
        if now >= next_join:
            next_join = now + rejoin_s
        time.sleep(0.01)


def _first_of_rounds(tasks: list[tuple[int, tuple[int, ...]]], rounds: range) -> list[int]:
    """The seeds of the first task of each of ``rounds`` in ``tasks`` ((round, seeds) in arrival order)."""
    firsts: dict[int, tuple[int, ...]] = {}
    for r, seeds in tasks:
        if r in rounds:
            firsts.setdefault(r, seeds)
    return [s for seeds in firsts.values() for s in seeds]


def sybil_seeds(lab: Lab) -> Outcome:
    """One key opens 8 connections with ids that sort first; who gets the seeds?"""
    curve = lab.make_keys("device-1", "sybil")
    agg = lab.serve(["--rounds", "1000", "--k", "8", "--min-clients", "2", *curve])
    sybils = _sybils(lab, agg.url, "sybil", 8)
    _pump_answering(sybils, 1.0, lambda t: answer(t))
    _, rec, _ = lab.worker(agg.url, "device-1", key="device-1")
    _pump_answering(sybils, 0.5, lambda t: answer(t))
    first = len(agg.metrics()) + 1  # the device is connected from this round on
    end = time.monotonic() + 20
    while len(agg.metrics()) < first + 3 and time.monotonic() < end:
        _pump_answering(sybils, 0.2, lambda t: answer(t))
    rounds = range(first, first + 3)
    # each connection's first task of a round: its share of the fresh seeds (the seeds of
    # a slow device's expired task go to whoever is free, which is fair and not the attack)
    to_sybils = sum(len(_first_of_rounds([(t.round, tuple(t.seeds)) for t in p.tasks], rounds)) for p in sybils)
    to_device = len(_first_of_rounds(rec.tasks, rounds))
    share = to_sybils / max(1, to_sybils + to_device)
    joined = sum(p.welcomed > 0 for p in sybils)
    numbers = {"seeds_to_attacker": to_sybils, "seeds_to_device": to_device, "attacker_share": round(share, 3),
               "attacker_connections_joined": joined, "rounds_measured": len(rounds)}
    return Outcome(to_device > 0 and share <= 0.5 and joined <= 1, numbers,
                   f"attacker got {share:.0%} of the seeds with {joined} joined connections")


def _big_lie(task: Task) -> Result:
    """A consistent, finite lie: every projection (one-sided) is +1e3/eps."""
    return answer(task, plus=1e3 + 1.0, minus=1.0)


def sybil_poison(lab: Lab) -> Outcome:
    """Six Sybil ids (one key) lie consistently next to two honest devices,
    under ``robust=clip``: does the median follow the lying majority?"""
    curve = lab.make_keys("device-1", "device-2", "sybil")
    agg = lab.serve(["--rounds", "8", "--k", "16", "--min-clients", "3", "--lr", "4", "--strategy-opt", "robust=clip",
                     *curve])
    loss0 = quadratic(agg.adapter())
    sybils = _sybils(lab, agg.url, "sybil", 6)  # first: the window of past values fills with lies
    _pump_answering(sybils, 1.0, _big_lie)
    for name in ("device-1", "device-2"):
        lab.worker(agg.url, name, key=name)
    end = time.monotonic() + 40
    while agg.proc.poll() is None and time.monotonic() < end:
        _pump_answering(sybils, 0.3, _big_lie)
    tensors = agg.adapter()
    params = {k: v for k, v in tensors.items() if k.startswith("t/")}
    biggest = float(max(np.max(np.abs(a)) for a in params.values()))
    loss = quadratic(tensors)
    ok = finite(params) and biggest < 10 and loss < loss0
    numbers = {"rounds": len(agg.metrics()), "adapter_max_abs": biggest, "finite": finite(params),
               "objective_before": round(loss0, 4), "objective_after": loss}
    return Outcome(ok, numbers, f"max abs(adapter) {biggest:.3g}, objective {loss0:.3f} -> {loss:.3g}")


def _garbage(task: Task) -> Result:
    rng = np.random.default_rng(int(task.round))
    n = len(task.seeds)
    return replace(answer(task), loss_plus=rng.normal(0, 1e3, n), loss_minus=rng.normal(0, 1e3, n))


def requarantine(lab: Lab) -> Outcome:
    """A client quarantined for garbage comes back under a new id: does it get work again?"""
    curve = lab.make_keys("device-1", "device-2", "evil")
    agg = lab.serve(["--rounds", "1000", "--k", "12", "--min-clients", "3", "--strategy-opt", "robust=clip",
                     "--strategy-opt", "robust_strikes=2", "--strategy-opt", "robust_min_history=4", *curve])
    for name in ("device-1", "device-2"):
        lab.worker(agg.url, name, key=name)
    evil = _sybils(lab, agg.url, "evil", 1, prefix="evil-a")
    end = time.monotonic() + 30
    while not any(r.get("quarantined") for r in agg.metrics()) and time.monotonic() < end:
        _pump_answering(evil, 0.2, _garbage, prefix="evil-a")
    quarantined_at = len(agg.metrics())
    evil[0].sock.close(0)
    again = _sybils(lab, agg.url, "evil", 1, prefix="evil-b")
    start = len(agg.metrics())
    end = time.monotonic() + 20
    while len(agg.metrics()) < start + 4 and time.monotonic() < end:
        _pump_answering(again, 0.2, _garbage, prefix="evil-b")
    after = again[0].tasks
    numbers = {"quarantined_after_rounds": quarantined_at, "tasks_under_new_id": len(after),
               "rounds_watched": len(agg.metrics()) - start}
    return Outcome(quarantined_at > 0 and not after, numbers,
                   f"{len(after)} tasks under a new id after quarantine")


# --------------------------------------------------------------------------- #
# 2. memory
# --------------------------------------------------------------------------- #

#: a snapshot of about 1 MB on the tiny model (Adam keeps two moments)
FLOOD_ADAPTER = ("--rank", "32", "--targets", "q,v", "--optimizer", "adam")


def snapshot_flood(lab: Lab, connections: int = 1, requests: int = 1000, curve_keys: bool = False) -> Outcome:
    """``connections`` joined peers (one CURVE key when ``curve_keys``) each
    send ``requests`` snapshot requests and never read a reply."""
    curve = lab.make_keys("flooder") if curve_keys else []
    agg = lab.serve(["--rounds", "1000", "--k", "8", "--min-clients", "1000", *FLOOD_ADAPTER, *curve])
    snapshot_mb = (agg.run_dir / "state.npz").stat().st_size / 2**20
    time.sleep(1.0)
    before = agg.status()["VmRSS"]
    peers = [lab.peer(agg.url, key="flooder" if curve_keys else None, read=False) for _ in range(connections)]
    for i, p in enumerate(peers):
        p.join(f"flood-{i}")
    time.sleep(0.5)
    for p in peers:
        for _ in range(requests):
            p.send(SnapshotRequest())
    for _ in range(12):  # keep them alive (they send heartbeats, they only never read)
        for p in peers:
            p.send(Heartbeat())
        time.sleep(0.25)
    during = agg.status()
    for p in peers:
        p.sock.close(0)
    time.sleep(2.0)
    after = agg.status()["VmRSS"]
    growth = during["VmHWM"] - before
    numbers = {"snapshot_mb": round(snapshot_mb, 2), "rss_before_mb": round(before), "rss_during_mb":
               round(during["VmRSS"]), "peak_mb": round(during["VmHWM"]), "rss_after_close_mb": round(after),
               "connections": connections, "requests_each": requests}
    return Outcome(growth < 4 * connections * snapshot_mb + 32, numbers,
                   f"RSS {before:.0f} -> peak {during['VmHWM']:.0f} MB, {after:.0f} MB after close")


def snapshot_flood_curve(lab: Lab) -> Outcome:
    """Three CURVE connections from one allowed key, 1,000 unread snapshot requests each."""
    return snapshot_flood(lab, connections=3, curve_keys=True)


def oversized(lab: Lab) -> Outcome:
    """One message of a header and four 1 MiB frames (each frame under the
    per-frame limit): is it refused as a whole?"""
    agg = lab.serve(["--rounds", "1000", "--k", "8", "--min-clients", "1000"])
    p = lab.peer(agg.url)
    p.join("big")
    p.pump(1.0)
    blob = b"\0" * ((1 << 20) - 64)
    p.send([Heartbeat().to_frames()[0], blob, blob, blob, blob])
    p.pump(1.0)
    refused = [e for e in p.errors if e.code == "frame"]
    numbers = {"message_bytes": 4 * len(blob), "refused": bool(refused)}
    return Outcome(bool(refused), numbers, "refused" if refused else "accepted (4 MiB in one message)")


# --------------------------------------------------------------------------- #
# 3. silence
# --------------------------------------------------------------------------- #


def silent(lab: Lab, window_s: float = 20.0) -> Outcome:
    """Eight connections from one key join and heartbeat but never answer; an
    honest device joins too.  Do rounds complete, does the device get work?"""
    curve = lab.make_keys("device-1", "silent")
    agg = lab.serve(["--rounds", "1000", "--k", "8", "--min-clients", "2", *curve])
    quiet = _sybils(lab, agg.url, "silent", 8, prefix="!silent")
    _pump_answering(quiet, 1.0, None, prefix="!silent")
    _, rec, _ = lab.worker(agg.url, "device-1", key="device-1")
    _pump_answering(quiet, window_s, None, prefix="!silent")
    rounds = len(agg.metrics())
    numbers = {"window_s": window_s, "rounds": rounds, "device_tasks": len(rec.tasks),
               "silent_tasks": sum(len(p.tasks) for p in quiet)}
    return Outcome(rounds >= 3 and len(rec.tasks) >= 3, numbers, f"{rounds} rounds in {window_s:.0f} s")


def log_flood(lab: Lab, frames: int = 5000) -> Outcome:
    """Junk frames while the aggregator's log goes to a pipe nobody reads:
    does the loop stall behind its own warnings?"""
    agg = lab.serve(["--rounds", "1000", "--k", "8"], stderr_unread=True)
    lab.worker(agg.url, "device-1")
    wait_for(lambda: len(agg.metrics()) >= 2, 30)
    junk = lab.peer(agg.url)
    for i in range(frames):
        junk.send([b"junk %d" % i])
        if i % 100 == 0:
            junk.pump()
    time.sleep(1.0)
    start = len(agg.metrics())
    time.sleep(5.0)
    rounds = len(agg.metrics()) - start
    # what the pipe got: read it now (the aggregator has stalled or not, it does not matter any more)
    os.set_blocking(agg.proc.stdout.fileno(), False)
    data = b""
    while True:
        try:
            chunk = os.read(agg.proc.stdout.fileno(), 1 << 20)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    lines = data.count(b"rejected frame") + data.count(b"bad frame")
    numbers = {"junk_frames": frames, "rounds_in_5s_after": rounds, "bad_frame_log_lines": lines}
    return Outcome(rounds >= 3 and lines <= 100, numbers,
                   f"{rounds} rounds in 5 s after the flood, {lines} log lines for {frames} junk frames")


# --------------------------------------------------------------------------- #
# 4. numbers
# --------------------------------------------------------------------------- #


def _one_liar(lab: Lab, args: Sequence[str], lie: Callable[[Task], Result],
              rounds: int = 4) -> tuple[Served, Path, Peer]:
    """An honest worker and one lying raw peer, until ``rounds`` rounds are in (or 20 s)."""
    agg = lab.serve(["--rounds", "1000", "--k", "8", "--min-clients", "2", *args])
    _, _, ev = lab.worker(agg.url, "device-1")
    liar = lab.peer(agg.url)
    liar.join("liar-0")
    end = time.monotonic() + 20
    while len(agg.metrics()) < rounds and time.monotonic() < end:
        _pump_answering([liar], 0.2, lie, rejoin_s=1e9, prefix="liar")
    time.sleep(0.5)
    return agg, ev, liar


def overflow(lab: Lab) -> Outcome:
    """Losses of +-1e308 (the server's difference overflows) and 1e300
    (finite scalars, a non-finite float32 step)."""
    def lie(task: Task) -> Result:
        return answer(task, plus=1e308, minus=-1e308) if task.round % 2 else answer(task, plus=1e300, minus=0.0)

    agg, ev, _ = _one_liar(lab, [], lie)
    state = agg.adapter()
    ok_updates, bad_updates = honest_updates(ev)
    rounds = len(agg.metrics())
    nonfinite = int(sum(np.sum(~np.isfinite(a)) for a in state.values()))
    numbers = {"rounds": rounds, "nonfinite_values": nonfinite, "device_updates_matched": ok_updates,
               "device_updates_refused": bad_updates}
    held = nonfinite == 0 and rounds > 0 and bad_updates == 0 and ok_updates >= rounds - 1
    return Outcome(held, numbers, f"{nonfinite} non-finite adapter values, device matched {ok_updates}/{rounds}")


def head_overflow(lab: Lab) -> Outcome:
    """A finite float32 head gradient of 1e30: does Adam's second moment overflow?"""
    def lie(task: Task) -> Result:
        return answer(task, head_grad=np.full(HEAD_SHAPE, 1e30, "<f4").tobytes(), head_rows=task.batch_size)

    agg, _, _ = _one_liar(lab, ["--head"], lie)
    state = agg.adapter()
    nonfinite = int(sum(np.sum(~np.isfinite(a)) for a in state.values()))
    head = [k for k in state if k.startswith("t/") and "head" in k]
    moved = bool(head) and float(np.max(np.abs(state[head[0]]))) > 0
    numbers = {"rounds": len(agg.metrics()), "nonfinite_state_values": nonfinite, "head_moved": moved}
    return Outcome(nonfinite == 0 and moved and len(agg.metrics()) > 0, numbers,
                   f"{nonfinite} non-finite optimizer/adapter values")


#: the tiny model's head: 2 label words x n_embd 256
HEAD_SHAPE = (2, 256)


def head_rows(lab: Lab) -> Outcome:
    """``head_rows = 2**62`` with a head gradient of +1: does the row-weighted
    mean become the attacker's?  (The honest quadratic pulls the head up.)"""
    def lie(task: Task) -> Result:
        return answer(task, head_grad=np.ones(HEAD_SHAPE, "<f4").tobytes(), head_rows=2**62)

    agg, _, _ = _one_liar(lab, ["--head"], lie, rounds=2)
    state = agg.adapter()
    head = next(v for k, v in state.items() if k.startswith("t/") and "head" in k)
    attacker_way = float(np.mean(head < 0))
    numbers = {"rounds": len(agg.metrics()), "head_entries_moved_the_attackers_way": attacker_way}
    return Outcome(attacker_way < 0.5 and len(agg.metrics()) > 0, numbers,
                   f"{attacker_way:.0%} of the head moved the attacker's way")


def counters(lab: Lab) -> Outcome:
    """``n_tokens = 2**63 - 1`` and ``seconds = 1e300`` in otherwise honest results."""
    agg, _, _ = _one_liar(lab, [], lambda t: answer(t, n_tokens=2**63 - 1, seconds=1e300))
    tokens = max((r.get("tokens", 0) for r in agg.metrics()), default=0)
    numbers = {"rounds": len(agg.metrics()), "max_tokens_in_metrics": tokens}
    return Outcome(tokens < 2**40 and len(agg.metrics()) > 0, numbers, f"max tokens in metrics {tokens:.3g}")


# --------------------------------------------------------------------------- #
# 5. resume
# --------------------------------------------------------------------------- #


def resume_options(lab: Lab) -> Outcome:
    """``serve --min-clients 2``, killed after two rounds, then a plain
    ``serve --resume RUN_DIR``: does the next round wait for both clients?"""
    agg = lab.serve(["--rounds", "1000", "--k", "8", "--min-clients", "2"])
    lab.worker(agg.url, "c0")
    w1, _, _ = lab.worker(agg.url, "c1")
    wait_for(lambda: len(agg.metrics()) >= 2, 30)
    w1.done = "stopped by the attack"
    agg.proc.send_signal(signal.SIGKILL)
    agg.proc.wait(10)
    done = len(agg.metrics())
    # --bind and --heartbeat are given again: an old aggregator forgets them too, and this attack is about
    # --min-clients; they are restored from run.json on this checkout (docs/security.md)
    again = lab.serve(["--resume", str(agg.run_dir), "--heartbeat", str(HEARTBEAT), "--threads", "1"],
                      name=agg.run_dir.name, url=agg.url, new=False)
    time.sleep(2.0)  # only c0 is back
    lab.worker(again.url, "c1-again")
    wait_for(lambda: len(again.metrics()) >= done + 2, 30)
    first = next((r for r in again.metrics() if r["round"] == done + 1), {})
    numbers = {"rounds_before_kill": done, "participants_first_resumed_round": first.get("participants"),
               "participants_before_kill": agg.metrics()[-1]["participants"]}
    held = first.get("participants") == 2
    return Outcome(held, numbers, f"first resumed round had {first.get('participants')} participant(s), wanted 2")


# --------------------------------------------------------------------------- #
# 6. bad input
# --------------------------------------------------------------------------- #


def bad_inputs(lab: Lab) -> Outcome:
    """Bad input a new user can give; each must be one ``Error:`` line and a non-zero exit."""
    d = lab.dir
    (d / "a-file").write_text("not a directory")
    serve = ["aggregator", "serve", "--model", str(lab.model), "--task", str(lab.task), "--rounds", "1",
             "--bind", "tcp://127.0.0.1:*"]
    simulate = ["simulate", "--model", str(lab.model), "--task", "sst2", "--clients", "1", "--rounds", "1"]
    (d / "shard.tsv").write_text("sentence\tlabel\nfine\t1\n")
    client = ["client", "run", "--model", str(lab.model), "--task", str(lab.task), "--data", str(d / "shard.tsv"),
              "--give-up", "1"]

    def run_dir(name: str, config: bytes | None, state: bytes | None) -> str:
        path = d / name
        path.mkdir(exist_ok=True)
        if config is not None:
            (path / "run.json").write_bytes(config)
        if state is not None:
            (path / "state.npz").write_bytes(state)
        return str(path)

    good = lab.serve(["--rounds", "1", "--min-clients", "1000"], name="good")
    good.proc.send_signal(signal.SIGKILL)
    good.proc.wait(10)
    config, state = (good.run_dir / "run.json").read_bytes(), (good.run_dir / "state.npz").read_bytes()
    rng = np.random.default_rng(0)
    gguf = bytearray(lab.model.read_bytes()[:1 << 16])
    gguf[8:16] = (2**62).to_bytes(8, "little")  # the header's tensor count
    (d / "bad-count.gguf").write_bytes(bytes(gguf))
    cases = {
        "serve --out under a regular file": [*serve, "--out", str(d / "a-file" / "run")],
        "serve --out in /proc": [*serve, "--out", "/proc/fwdllm-run"],
        "serve --out on a read-only file system": [*serve, "--out", "/sys/fwdllm-run"],
        "simulate --out under a regular file": [*simulate, "--out", str(d / "a-file" / "sim")],
        "simulate --out in /proc": [*simulate, "--out", "/proc/fwdllm-sim"],
        "serve --resume, corrupt run.json": ["aggregator", "serve", "--resume",
                                             run_dir("bad-json", b"{not json", state)],
        "serve --resume, run.json of another shape": ["aggregator", "serve", "--resume",
                                                      run_dir("bad-shape", b'{"rounds": 3}', state)],
        "serve --resume, random state.npz": ["aggregator", "serve", "--resume",
                                             run_dir("bad-state", config, rng.bytes(4096))],
        "serve --resume, truncated state.npz": ["aggregator", "serve", "--resume",
                                                run_dir("cut-state", config, state[: len(state) // 2])],
        "serve, GGUF with a corrupt tensor count": ["aggregator", "serve", "--model", str(d / "bad-count.gguf"),
                                                    "--task", str(lab.task), "--out", str(d / "gguf-run")],
        "convert inspect, GGUF with a corrupt tensor count": ["convert", "inspect", str(d / "bad-count.gguf")],
        "serve --bind that is no address": [*serve[:-2], "--bind", "nonsense", "--out", str(d / "bind-run")],
        "client run --connect that is no address": [*client, "--connect", "nonsense"],
        "client run --events in /proc": [*client, "--connect", "tcp://127.0.0.1:1", "--events", "/proc/x.jsonl"],
        "keys generate --allow in /proc": ["keys", "generate", "k", "--out", str(d / "keys-out"), "--allow",
                                           "/proc/allowed"],
    }
    failures = {}
    for what, args in cases.items():
        try:
            res = subprocess.run([*lab.fwdllm, *args], capture_output=True, text=True, timeout=60,
                                 stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            failures[what] = (None, "still running after 60 s")
            continue
        out = (res.stdout + res.stderr).strip()
        lines = [ln for ln in out.splitlines() if ln.strip() and "PLAINTEXT" not in ln]
        if res.returncode == 0 or "Traceback" in out or not lines or not lines[-1].startswith("Error:"):
            failures[what] = (res.returncode, lines[-1][:160] if lines else "")
    numbers = {"cases": len(cases), "tracebacks_or_bad_exits": len(failures), "failed": failures}
    return Outcome(not failures, numbers, f"{len(failures)} of {len(cases)} bad inputs gave no one-line error")


# --------------------------------------------------------------------------- #
# 7. range lies
# --------------------------------------------------------------------------- #


class RangeLiar:
    """Wraps a worker's scorer and reports ``factor`` times its true
    projections: every value stays in the honest range, only the sign lies."""

    def __init__(self, scorer: Any, factor: float = -3.0) -> None:
        self.scorer, self.factor = scorer, factor

    def __getattr__(self, name: str) -> Any:
        return getattr(self.scorer, name)

    def score(self, layout: Any, tensors: dict[str, np.ndarray], task: Task) -> Result:
        r = self.scorer.score(layout, tensors, task)
        return replace(r, loss_plus=r.loss_minus + self.factor * (r.loss_plus - r.loss_minus))


def _lie_run(lab: Lab, name: str, robust: Sequence[str], liar: bool, rounds: int = 40) -> dict[str, Any]:
    agg = lab.serve(["--rounds", str(rounds), "--k", "16", "--min-clients", "4", "--lr", "4", *robust], name=name)
    loss0 = quadratic(agg.adapter())
    for i in range(4):
        cid = f"{name}-{'liar' if liar and i == 0 else 'c'}{i}"
        lab.worker(agg.url, cid, scorer=RangeLiar(QuadraticScorer(task_name="tiny-sst2")) if liar and i == 0 else None)
    wait_for(lambda: agg.proc.poll() is not None, 60)
    recs = agg.metrics()
    flagged = next((r["round"] for r in recs if any("liar" in c for c in r.get("quarantined", []))), None)
    return {"objective_before": loss0, "objective_after": quadratic(agg.adapter()), "rounds": len(recs),
            "liar_quarantined_in_round": flagged}


def range_lie(lab: Lab) -> Outcome:
    """One of four clients sends -3x its true projections (in range), under
    ``robust=clip``; then the same with the audit on shared seeds
    (``robust_audit=1``, this checkout only)."""
    clip = ["--strategy-opt", "robust=clip"]
    clean = _lie_run(lab, "clean", clip, liar=False)
    lied = _lie_run(lab, "clip", clip, liar=True)
    try:
        audited = _lie_run(lab, "audit", [*clip, "--strategy-opt", "robust_audit=1"], liar=True)
    except RuntimeError as e:  # an aggregator without the audit refuses the option
        audited = {"error": str(e).splitlines()[-1][:120] if str(e) else "did not start"}
    numbers = {"clean": clean, "clip_only": lied, "clip_and_audit": audited}
    caught = audited.get("liar_quarantined_in_round")
    gain = clean["objective_before"] - clean["objective_after"]
    kept = lambda r: (r["objective_before"] - r["objective_after"]) / gain if gain > 0 else float("nan")  # noqa: E731
    headline = (f"progress kept: clip only {kept(lied):.0%}" + (f", with audit {kept(audited):.0%} (liar quarantined "
                f"in round {caught})" if "error" not in audited else ", audit unavailable"))
    return Outcome(caught is not None, numbers, headline)


# --------------------------------------------------------------------------- #
# the list
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Attack:
    """One entry of :data:`ATTACKS`: the issue item it reproduces and how."""

    item: str
    run: Callable[[Lab], Outcome]
    about: str


ATTACKS: dict[str, Attack] = {
    "impostor": Attack("1", impostor, "an allowed key joins as another device's client_id every 0.15 s"),
    "sybil-seeds": Attack("1", sybil_seeds, "8 connections from one key with ids that sort first"),
    "sybil-poison": Attack("1", sybil_poison, "6 Sybil ids from one key lie next to 2 devices, robust=clip"),
    "requarantine": Attack("1", requarantine, "a quarantined client returns under a new id"),
    "snapshot-flood": Attack("2", snapshot_flood, "1,000 snapshot requests, replies never read"),
    "snapshot-flood-curve": Attack("2", snapshot_flood_curve, "3 CURVE connections from one key, 1,000 each"),
    "oversized": Attack("2", oversized, "one message of 4 frames of 1 MiB (each under the frame limit)"),
    "silent": Attack("3", silent, "8 connections from one key join, heartbeat, never answer"),
    "log-flood": Attack("3", log_flood, "5,000 junk frames while nobody reads the aggregator's log pipe"),
    "overflow": Attack("4", overflow, "losses of +-1e308 and 1e300"),
    "head-overflow": Attack("4", head_overflow, "a head gradient of 1e30 (finite in float32)"),
    "head-rows": Attack("4", head_rows, "head_rows = 2**62"),
    "counters": Attack("4", counters, "n_tokens = 2**63 - 1, seconds = 1e300"),
    "resume": Attack("5", resume_options, "serve --min-clients 2, kill -9, serve --resume RUN_DIR"),
    "bad-input": Attack("6", bad_inputs, "bad --out, corrupt run.json/state.npz, a GGUF with a corrupt tensor count"),
    "range-lie": Attack("7", range_lie, "1 of 4 clients sends -3x its true projections, robust=clip (+ audit)"),
}


def run_attack(name: str, fwdllm: Sequence[str], workdir: Path, model: Path) -> Outcome:
    """Run one attack against a fresh aggregator started from ``fwdllm``."""
    with lab(fwdllm, workdir, model) as the_lab:
        return ATTACKS[name].run(the_lab)


def check(name: str, workdir: Path, model: Path) -> Outcome:
    """A test's assertion: attack :func:`under_attack`'s aggregator; it must hold."""
    outcome = run_attack(name, under_attack(), workdir, model)
    assert outcome.held, outcome.to_dict()
    return outcome
