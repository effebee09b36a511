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

from fwdllm.core import compress, contribution, dp
from fwdllm.core.errors import UserError
from fwdllm.core.history import History
from fwdllm.core.layout import LoraLayout, PerturbMask
from fwdllm.core.lora import initial_tensors
from fwdllm.core.optim import Optimizer, OptimizerSpec
from fwdllm.core.protocol import (
    Bye,
    CatchUp,
    Error,
    Heartbeat,
    Join,
    Message,
    ProtocolError,
    Refuse,
    Replay,
    Result,
    SecAgg,
    Snapshot,
    SnapshotRequest,
    Task,
    Update,
    Welcome,
)
from fwdllm.core.replica import Replica
from fwdllm.core.secagg import SecAggClient, SecAggError, SecAggParams
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
    #: the head codec's carried rounding error (error feedback, per device)
    head_residual: np.ndarray | None = None

    def score(self, layout: LoraLayout, tensors: dict[str, np.ndarray], task: Task) -> Result:
        from fwdllm.core.batches import sample_batch

        if task.dp:
            return self._score_private(layout, tensors, task)
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
            head_grad=self._head_bytes(r.head_grad, task),
            head_rows=r.head_rows,
            head_codec=task.head_codec if r.head_grad is not None and not task.secagg else "f32",
            base_loss=float(r.base_loss) if not len(r.seeds) else 0.0,
        )

    def _head_bytes(self, grad: np.ndarray | None, task: Task) -> bytes:
        """The head gradient in the task's codec (raw float32 under --secagg,
        where it travels inside the masked vector)."""
        if grad is None:
            return b""
        if task.secagg:
            return np.ascontiguousarray(grad, dtype="<f4").tobytes()
        raw, self.head_residual = compress.encode(grad, task.head_codec, self.head_residual)
        return raw

    def _score_private(self, layout: LoraLayout, tensors: dict[str, np.ndarray], task: Task) -> Result:
        """DP (:mod:`fwdllm.core.dp`): a Poisson batch from this device's own
        randomness, each example's per-seed differences clipped, summed, plus
        this device's share of the noise; no loss leaves the device."""
        rng = np.random.default_rng()  # OS entropy: the server must not know the batch
        rate = min(1.0, task.batch_size / max(1, len(self.examples)))
        picked = [self.examples[i] for i in dp.poisson_sample(len(self.examples), rate, rng)]
        k = len(task.seeds)
        sums, n_tokens, seconds = np.zeros(k), 0, 0.0
        if picked:
            self.session.set_lora(layout, tensors)
            r = self.session.perturbed(picked, [int(s) for s in task.seeds], task.eps,
                                       PerturbMask.from_dict(task.mask), task.dist, task.one_sided, per_example=True)
            scale = task.eps if task.one_sided else 2 * task.eps
            sums = dp.clipped_sum(((r.example_plus - r.example_minus) / scale).T, float(task.dp["clip"]))
            n_tokens, seconds = int(r.n_tokens), float(r.seconds)
        sums = sums + dp.gaussian_noise(k, float(task.dp.get("noise_std", 0.0)), rng)
        log.info("round %d: %d examples sampled, %d tokens, %.1f s (kept on the device)", task.round, len(picked),
                 n_tokens, seconds)
        # token count and time would tell the server how big the secret batch was: they stay home
        return Result(round=task.round, seeds=np.asarray(task.seeds, dtype=np.uint32), loss_plus=np.zeros(k),
                      loss_minus=np.zeros(k), sums=sums)


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
        self.snap_asked: int | None = None  # the server's version when we last asked to catch up
        self.rejoin_at: float | None = None  # told "busy": join again at this time
        self.done: str | None = None
        self.init_seed: int | None = None  # the run's, from Welcome (protocol v2)
        # --secagg: the round's state machine, its inbox, and the finished result waiting for it
        self.secagg: SecAggClient | None = None
        self.sa_inbox: bytes | None = None
        self.sa_result: Result | None = None
        self.sa_task: Task | None = None

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
        elif isinstance(msg, Replay):
            self._replay(sock, msg)
        elif isinstance(msg, SecAgg):
            self._secagg(sock, msg)
        elif isinstance(msg, Task):
            if not _same_task(msg, self.running):  # a re-sent task we are already scoring
                self.pending = msg
                if msg.secagg and (self.secagg is None or self.secagg.params.round != msg.round):
                    self._secagg_begin(sock, msg)  # once a round: a task re-sent after a reconnect keeps its keys
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
        seed = cfg.get("init_seed")
        self.init_seed = seed if isinstance(seed, int) else None
        if self.replica is None and self.init_seed is not None:
            # protocol v2: version 0 is a function of the init seed; no download
            layout = LoraLayout.from_dict(cfg["layout"])
            self.replica = Replica(layout, initial_tensors(layout, self.init_seed), Optimizer(self.spec), 0)
        r = self.replica
        if r is None or r.version != cfg.get("version") or r.sha != cfg.get("adapter_sha256"):
            self._catch_up(sock, int(cfg.get("version", 0)))

    def _catch_up(self, sock: zmq.Socket, version: int) -> None:
        """Catch up with a server at ``version``: tell it where the replica is
        (it replays the history from there, or snapshots if cheaper); a device
        with nothing asks for the snapshot.  Asked once per version the server
        is known to be at: a request whose answer never came (dropped, or
        refused as a repeat) is asked again when a newer version shows up in
        a Task or an Update."""
        if self.snap_asked is None or version > self.snap_asked:
            self.snap_asked = version
            r = self.replica
            self._send(sock, SnapshotRequest() if r is None else CatchUp(version=r.version, adapter_sha256=r.sha))

    def _replay(self, sock: zmq.Socket, msg: Replay) -> None:
        self.snap_asked = None
        r = self.replica
        try:
            updates = History.decode(msg.history).since(r.version) if r is not None else None
            ok = updates is not None and r.replay(updates, msg.adapter_sha256)
        except ValueError as e:
            log.warning("replay failed: %s", e)
            ok = False
        self.events("replay", version=None if r is None else r.version, ok=ok, bytes=len(msg.history))
        if not ok:
            log.warning("replay did not reach the announced hash; asking for a snapshot")
            self.replica = None
            self._catch_up(sock, msg.version)
            return
        self._start(sock)

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
            self._catch_up(sock, msg.version)
            return
        if msg.version <= r.version:
            return
        if msg.version != r.version + 1:
            self._catch_up(sock, msg.version)
            return
        sha = r.apply(msg)
        match = sha == msg.adapter_sha256
        self.events("update", round=msg.round, version=r.version, sha=sha, match=match)
        if not match:
            log.warning("adapter hash mismatch after round %d; pulling a snapshot", msg.round)
            self.replica = None
            self._catch_up(sock, msg.version)

    # -- scoring in the background -------------------------------------- #

    def _start(self, sock: zmq.Socket) -> None:
        """Start the pending task if the replica is at its version."""
        task, r = self.pending, self.replica
        if task is None or self.busy is not None:
            return
        if r is None or r.version != task.version or r.sha != task.adapter_sha256:
            if r is None or r.version <= task.version:
                self._catch_up(sock, task.version)
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
        if self.secagg is not None and self.secagg.params.round == out.round:
            self.sa_result = out
            self._secagg_mask(sock)
        else:
            self._send(sock, out)
        self.events("result", round=out.round, seeds=len(out.seeds), seconds=round(out.seconds, 3))
        self._start(sock)

    # -- secure aggregation (--secagg) ----------------------------------- #

    def _secagg_begin(self, sock: zmq.Socket, task: Task) -> None:
        """Stage 1 as the task arrives: keys go out while the batch is scored."""
        try:
            params = SecAggParams.from_dict(task.secagg)
            self.secagg = SecAggClient(params, int(task.secagg["index"]))
        except (SecAggError, KeyError, TypeError, ValueError) as e:
            log.warning("bad secure-aggregation task: %s", e)
            return
        self.sa_inbox, self.sa_result, self.sa_task = None, None, task
        self._send(sock, SecAgg(round=task.round, stage="keys", data=self.secagg.keys()))

    def _secagg(self, sock: zmq.Socket, msg: SecAgg) -> None:
        c = self.secagg
        if c is None or msg.round != c.params.round:
            return
        try:
            if msg.stage == "roster":
                self._send(sock, SecAgg(round=msg.round, stage="shares", data=c.shares(msg.data)))
            elif msg.stage == "inbox":
                self.sa_inbox = msg.data
                self._secagg_mask(sock)
            elif msg.stage == "unmask":
                self._send(sock, SecAgg(round=msg.round, stage="reveal", data=c.reveal(msg.data)))
        except SecAggError as e:
            log.warning("secure aggregation round %d: %s", msg.round, e)
            self.events("error", reason=str(e))

    def _secagg_mask(self, sock: zmq.Socket) -> None:
        """Stage 3 once both the result and the inbox are here: the
        contribution vector, clipped to the round's bound, masked."""
        c, res, task = self.secagg, self.sa_result, self.sa_task
        if c is None or res is None or task is None or self.sa_inbox is None or c.masked:
            return
        head = self.replica.layout.head if self.replica is not None and not task.dp else None
        shape = contribution.Shape(len(res.seeds), head, bool(task.dp))
        if task.dp:
            vec = contribution.vector(shape, res.sums)
        else:
            proj = (res.loss_plus - res.loss_minus) / (task.eps if task.one_sided else 2 * task.eps)
            loss = float(res.loss_minus[0]) if task.one_sided else float(np.mean((res.loss_plus + res.loss_minus) / 2))
            grad = np.frombuffer(res.head_grad, "<f4").reshape(head) if head and res.head_grad else None
            vec = contribution.vector(shape, proj, loss, grad, res.head_rows)
        vec = np.clip(vec, -c.params.bound, c.params.bound)  # the bound robust= means under --secagg
        try:
            data = c.mask(vec, self.sa_inbox)
        except SecAggError as e:
            log.warning("secure aggregation round %d: %s", c.params.round, e)
            return
        self._send(sock, SecAgg(round=c.params.round, stage="masked", data=data,
                                meta={"n_tokens": res.n_tokens, "seconds": round(res.seconds, 3)}))


# --------------------------------------------------------------------------- #
# CLI
# --------------------------------------------------------------------------- #


def _mem_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 0


def _replay_rate() -> float:
    """Direction entries per second this device generates (~50 ms to
    measure): the compute side of the server's replay-or-snapshot choice."""
    from fwdllm.core.directions import tensor_direction

    n, t0 = 1 << 18, time.perf_counter()
    tensor_direction(0, "replay-rate-probe", (n,))
    return n / max(time.perf_counter() - t0, 1e-6)


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
    no_mmap: bool = False,
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
    scorer = Scorer(EdgeSession(model_path, spec, n_threads=threads, max_batch=max_batch, mmap=not no_mmap),
                    read_examples(spec, data), spec.name)
    scorer = wrap(scorer) if wrap else scorer

    replay_rate = _replay_rate()

    def make_join(s: Scorer) -> Join:
        return Join(
            client_id=cid,
            model_sha256=sha,
            tokens_per_s=float(s.session.tokens_per_second()),
            mem_bytes=_mem_bytes(),
            max_batch=max_batch,
            n_examples=len(s.examples),
            replay_entries_per_s=replay_rate,
        )

    worker = Worker(connect, cid, make_join, scorer, EventLog(events), give_up_s, curve)
    try:
        worker.run()
    finally:
        scorer.session.close()
