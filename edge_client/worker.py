"""The edge worker (``fwdllm client run``): join an aggregator and score seeds.

Seeds down, scalars up.  The aggregator sends a ``Task`` (round, seeds, eps,
mask, batch seed); the worker evaluates its local batch at ``adapter +- eps *
direction(seed)`` and sends back two losses per seed.  After each round the
aggregator broadcasts the step as ``Update`` (seeds + coefficients + lr); the
worker replays it through :class:`Replica` and must land on the announced
adapter hash.  A worker that is behind, diverged or new asks for a
``Snapshot`` instead.

Liveness is Paranoid-Pirate style: both sides send ``Heartbeat`` every
``heartbeat_s``; scoring runs in a background thread so heartbeats keep
flowing during a long forward pass.  When the aggregator is silent for
``liveness`` intervals the worker closes its socket, waits (exponential
backoff) and reconnects with a fresh socket and a new ``Join``.  The
aggregator admits one connection per identity: while it still counts the
old one alive it answers ``busy``, and the worker joins again a heartbeat
later.

The aggregator drops rather than queues what a slow reader does not take
(and sends one snapshot per version): a worker that misses a snapshot asks
again as soon as it sees a newer version, and one that misses an update
notices the gap at the next one.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import zmq

from fwdllm.core.errors import UserError
from fwdllm.core.layout import LoraLayout, PerturbMask
from fwdllm.core.optim import OptimizerSpec
from fwdllm.core.protocol import (
    Bye,
    Error,
    Heartbeat,
    Join,
    Message,
    ProtocolError,
    Refuse,
    Result,
    Snapshot,
    SnapshotRequest,
    Task,
    Update,
    Welcome,
)
from fwdllm.core.replica import Replica
from fwdllm.runtime.transport import ClientKeys, client_keys, secure_client, warn_if_plaintext

log = logging.getLogger("fwdllm.client")

#: Snapshots carry the whole adapter and optimizer state; the aggregator is
#: trusted, so the worker accepts large frames (the server side is strict).
CLIENT_MAX_MSG = 1 << 30
LIVENESS = 5  # missed heartbeats before the peer counts as gone


# --------------------------------------------------------------------------- #
# The worker
# --------------------------------------------------------------------------- #


@dataclass
class Scorer:
    """The worker's compute side: a task-bound session over local examples.

    ``score(replica, task)`` returns the Result for ``task``; it runs in a
    background thread.
    """

    session: Any  # fwdllm.runtime.session.EdgeSession
    examples: list
    task_name: str

    def score(self, layout: LoraLayout, tensors: dict[str, np.ndarray], task: Task) -> Result:
        from fwdllm.core.batches import sample_batch

        batch = sample_batch(self.examples, task.batch_size, task.batch_seed, stratify=task.stratify)
        self.session.set_lora(layout, tensors)
        r = self.session.perturbed(
            batch,
            [int(s) for s in task.seeds],
            task.eps,
            PerturbMask.from_dict(task.mask),
            task.dist,
            task.one_sided,
        )
        return Result(
            round=task.round,
            seeds=np.asarray(r.seeds, dtype=np.uint32),
            loss_plus=np.asarray(r.loss_plus, dtype=np.float64),
            loss_minus=np.asarray(r.loss_minus, dtype=np.float64),
            n_tokens=int(r.n_tokens),
            seconds=float(r.seconds),
            head_grad=b"" if r.head_grad is None else np.ascontiguousarray(r.head_grad, dtype="<f4").tobytes(),
            head_rows=r.head_rows,
            base_loss=float(r.base_loss) if not len(r.seeds) else 0.0,
        )


class EventLog:
    """Machine-readable JSONL trace of what the worker did (hashes per round)."""

    def __init__(self, path: Path | None) -> None:
        try:
            self._f = open(path, "a", buffering=1) if path else None
        except OSError as e:
            raise UserError(f"--events {path}: cannot write there ({e.strerror or e})") from None

    def __call__(self, event: str, **fields: Any) -> None:
        if self._f:
            self._f.write(json.dumps({"event": event, "t": round(time.time(), 3), **fields}) + "\n")


def _same_task(a: Task, b: Task | None) -> bool:
    return b is not None and a.round == b.round and np.array_equal(a.seeds, b.seeds)


class Worker:
    """One DEALER connection at a time; reconnects with backoff until ``Bye``."""

    def __init__(
        self,
        connect: str,
        client_id: str,
        make_join: Callable[[Scorer], Join],
        scorer: Scorer,
        events: EventLog,
        give_up_s: float = 600.0,
        curve: ClientKeys | None = None,
    ) -> None:
        self.connect = connect
        self.client_id = client_id
        self.make_join = make_join
        self.scorer = scorer
        self.events = events
        self.give_up_s = give_up_s
        self.curve = curve  # CURVE keys; None = plaintext
        self.ctx = zmq.Context.instance()
        self.replica: Replica | None = None
        self.spec: OptimizerSpec | None = None
        self.heartbeat_s = 1.0
        self.pending: Task | None = None  # waiting for a snapshot or for the thread
        self.busy: threading.Thread | None = None
        self.running: Task | None = None
        self.results: "queue.Queue[Result | BaseException]" = queue.Queue()
        self.snap_asked: int | None = None  # the server's version when we asked for a snapshot
        self.rejoin_at: float | None = None  # told "busy": join again at this time
        self.done: str | None = None

    # -- connection management ------------------------------------------- #

    def run(self) -> None:
        """Serve until the aggregator says Bye; raise UserError if refused or lost."""
        backoff = 0.5
        last_contact = time.monotonic()
        while self.done is None:
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, CLIENT_MAX_MSG)
            secure_client(sock, self.curve)
            try:
                sock.connect(self.connect)
            except zmq.ZMQError as e:
                sock.close(0)
                raise UserError(f"--connect {self.connect}: {e}; expected tcp://HOST:PORT") from None
            try:
                if self._session(sock):
                    backoff = 0.5
                    last_contact = time.monotonic()
            finally:
                sock.close(0)
            if self.done is not None:
                break
            if time.monotonic() - last_contact > self.give_up_s:
                raise UserError(f"no aggregator at {self.connect} for {self.give_up_s:.0f} s; giving up")
            log.warning("aggregator silent; reconnecting in %.1f s", backoff)
            self.events("reconnect", backoff=backoff)
            time.sleep(backoff)
            backoff = min(backoff * 2, 8.0)
        log.info("done: %s", self.done)

    def _session(self, sock: zmq.Socket) -> bool:
        """One connection's life; returns True if the server ever answered."""
        self._join(sock)
        answered = False
        now = time.monotonic()
        alive_until = now + self.heartbeat_s * LIVENESS
        next_hb = now + self.heartbeat_s
        while self.done is None:
            wait = 0.05 if self.busy else max(0.0, min(next_hb, alive_until) - time.monotonic())
            if sock.poll(int(wait * 1000) + 1):
                frames = sock.recv_multipart()
                alive_until = time.monotonic() + self.heartbeat_s * LIVENESS
                answered = True
                self._handle(sock, frames)
            self._collect(sock)
            now = time.monotonic()
            if self.rejoin_at is not None and now >= self.rejoin_at:
                self._join(sock)
            if now >= next_hb:
                self._send(sock, Heartbeat())
                next_hb = now + self.heartbeat_s
            if now >= alive_until:
                return answered
        return answered

    def _join(self, sock: zmq.Socket) -> None:
        """Start over with an aggregator that does not know us (a new socket,
        or a restarted aggregator): a SnapshotRequest sent before is void, so
        it may be asked again, or the worker heartbeats forever unscored."""
        self.snap_asked, self.rejoin_at = None, None
        self._send(sock, self.make_join(self.scorer))

    def _send(self, sock: zmq.Socket, msg: Message) -> None:
        sock.send_multipart(msg.to_frames())

    # -- messages -------------------------------------------------------- #

    def _handle(self, sock: zmq.Socket, frames: list[bytes]) -> None:
        try:
            msg = Message.from_frames(frames)
        except ProtocolError as e:
            log.warning("bad frame from aggregator: %s", e)
            return
        if isinstance(msg, Welcome):
            self._welcome(sock, msg)
        elif isinstance(msg, Refuse):
            self.events("refused", reason=msg.reason)
            raise UserError(f"aggregator refused this client: {msg.reason}")
        elif isinstance(msg, Snapshot):
            self._snapshot(sock, msg)
        elif isinstance(msg, Task):
            if not _same_task(msg, self.running):  # a re-sent task we are already scoring
                self.pending = msg
                self._start(sock)
        elif isinstance(msg, Update):
            self._update(sock, msg)
        elif isinstance(msg, Bye):
            self.done = msg.reason or "bye"
        elif isinstance(msg, Error) and msg.code == "join":
            self._join(sock)  # a restarted aggregator that our socket silently reconnected to
        elif isinstance(msg, Error) and msg.code == "busy":
            self.rejoin_at = time.monotonic() + self.heartbeat_s  # our previous connection still counts as alive
        elif isinstance(msg, Error):
            log.warning("aggregator rejected our last message: %s", msg.reason)
            self.events("error", reason=msg.reason)

    def _welcome(self, sock: zmq.Socket, msg: Welcome) -> None:
        cfg = msg.config
        self.heartbeat_s = msg.heartbeat_s
        self.spec = OptimizerSpec.from_dict(cfg["optimizer"])
        if self.scorer.task_name != cfg["task"]:
            raise UserError(f"this client trains task {self.scorer.task_name!r} but the aggregator runs {cfg['task']!r}")
        self.events("welcome", run_id=msg.run_id, version=cfg.get("version"))
        r = self.replica
        if r is None or r.version != cfg.get("version") or r.sha != cfg.get("adapter_sha256"):
            self._ask_snapshot(sock, int(cfg.get("version", 0)))

    def _ask_snapshot(self, sock: zmq.Socket, version: int) -> None:
        """Ask once per version the server is known to be at: a request whose
        snapshot never came (dropped, or refused as a repeat) is asked again
        when a newer version shows up in a Task or an Update."""
        if self.snap_asked is None or version > self.snap_asked:
            self.snap_asked = version
            self._send(sock, SnapshotRequest())

    def _snapshot(self, sock: zmq.Socket, msg: Snapshot) -> None:
        self.snap_asked = None
        assert self.spec is not None
        try:
            replica = Replica.from_bytes(msg.state, self.spec)
        except ValueError as e:
            log.warning("%s", e)
            return
        if replica.sha != msg.adapter_sha256 or replica.version != msg.version:
            log.warning("snapshot does not match its own hash/version; ignored")
            return
        self.replica = replica
        self.events("snapshot", version=replica.version, sha=replica.sha, bytes=len(msg.state))
        self._start(sock)

    def _update(self, sock: zmq.Socket, msg: Update) -> None:
        r = self.replica
        if r is None:
            self._ask_snapshot(sock, msg.version)
            return
        if msg.version <= r.version:
            return
        if msg.version != r.version + 1:
            self._ask_snapshot(sock, msg.version)
            return
        sha = r.apply(msg)
        match = sha == msg.adapter_sha256
        self.events("update", round=msg.round, version=r.version, sha=sha, match=match)
        if not match:
            log.warning("adapter hash mismatch after round %d; pulling a snapshot", msg.round)
            self.replica = None
            self._ask_snapshot(sock, msg.version)

    # -- scoring in the background -------------------------------------- #

    def _start(self, sock: zmq.Socket) -> None:
        """Start the pending task if the replica is at its version."""
        task, r = self.pending, self.replica
        if task is None or self.busy is not None:
            return
        if r is None or r.version != task.version or r.sha != task.adapter_sha256:
            if r is None or r.version <= task.version:
                self._ask_snapshot(sock, task.version)
            else:
                self.pending = None  # a stale task; the server has moved on
            return
        self.pending, self.running = None, task
        tensors = {n: a.copy() for n, a in r.tensors.items()}
        scorer, layout = self.scorer, r.layout

        def work() -> None:
            try:
                self.results.put(scorer.score(layout, tensors, task))
            except BaseException as e:  # reported by the main thread
                self.results.put(e)

        self.busy = threading.Thread(target=work, name=f"score-r{task.round}", daemon=True)
        self.busy.start()

    def _collect(self, sock: zmq.Socket) -> None:
        try:
            out = self.results.get_nowait()
        except queue.Empty:
            return
        self.busy, self.running = None, None
        if isinstance(out, BaseException):
            raise out
        self._send(sock, out)
        self.events("result", round=out.round, seeds=len(out.seeds), seconds=round(out.seconds, 3))
        self._start(sock)


# --------------------------------------------------------------------------- #
# CLI
# --------------------------------------------------------------------------- #


def _mem_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 0


def run_device(
    connect: str,
    model: str,
    data: Path,
    task: str,
    threads: int,
    client_id: str | None,
    max_batch: int,
    events: Path | None,
    give_up_s: float,
    curve_secret: Path | None,
    server_key: Path | None,
    wrap: Callable[[Scorer], Scorer] | None = None,
) -> None:
    """``fwdllm client run``: load the model, join, train until the run ends.

    ``wrap`` replaces the scorer (the test-only attackers of
    :mod:`fwdllm.testing.attackers` lie through it; a device passes None).
    """
    from fwdllm.runtime.log import quiet_llama
    from fwdllm.runtime.models import model_sha256, resolve_model
    from fwdllm.runtime.session import EdgeSession
    from fwdllm.runtime.tasks import load_task, read_examples

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s client %(message)s")
    logging.getLogger("fwdllm").setLevel(logging.INFO)
    quiet_llama()
    curve = client_keys(curve_secret, server_key)  # bad key files fail before the model loads
    warn_if_plaintext(curve, connect)
    model_path = resolve_model(model)
    sha = model_sha256(model_path)
    cid = client_id or f"{socket.gethostname()}-{os.getpid()}"
    spec = load_task(task)
    scorer = Scorer(EdgeSession(model_path, spec, n_threads=threads, max_batch=max_batch),
                    read_examples(spec, data), spec.name)
    scorer = wrap(scorer) if wrap else scorer

    def make_join(s: Scorer) -> Join:
        return Join(
            client_id=cid,
            model_sha256=sha,
            tokens_per_s=float(s.session.tokens_per_second()),
            mem_bytes=_mem_bytes(),
            max_batch=max_batch,
            n_examples=len(s.examples),
        )

    worker = Worker(connect, cid, make_join, scorer, EventLog(events), give_up_s, curve)
    try:
        worker.run()
    finally:
        scorer.session.close()
