"""The aggregator's event loop: one ROUTER socket, many DEALER workers.

The loop owns the mechanics - who is connected, heartbeats, deadlines,
snapshots, checkpoints, byte accounting - and asks a
:class:`~aggregator.strategy.Strategy` for the algorithm.  It is single
threaded; only the dev-set evaluation runs in a helper thread (llama.cpp
releases the GIL), so heartbeats keep flowing while it runs.

Round life cycle::

    WAIT   until enough clients are live (``min_clients`` before this
           process's first round, then at least one)
    RUN    Tasks out, Results in; dead peers dropped; ends when the strategy
           is ready, when a quorum of participants reported, when nothing
           is outstanding, or at the deadline
    STEP   coefficients -> Update -> applied to the server's replica
    EVAL   (every ``eval_every`` rounds, in a thread) dev loss / accuracy
    COMMIT metrics line, checkpoint, then broadcast the Update

Nothing a peer sends can raise out of the loop: undecodable frames get an
``Error`` reply and a log line; late results (older round id) are dropped.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import zmq

from fwdllm.aggregator import checkpoint
from fwdllm.aggregator.checkpoint import RunConfig
from fwdllm.aggregator.strategy import ClientView, RoundConfig, Scored, Strategy, Work
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
    head_array,
)
from fwdllm.core.replica import Replica
from fwdllm.runtime import transport as security

log = logging.getLogger("fwdllm.aggregator")

#: Inbound frame limit: clients only ever send small messages.
SERVER_MAX_MSG = 1 << 20
MAX_FRAMES = 8


@dataclass(frozen=True)
class ServerOptions:
    """Transport and pacing knobs (not part of the run's identity)."""

    bind: str = "tcp://*:5555"
    heartbeat_s: float = 1.0
    liveness: int = 5  # missed heartbeats before a peer is dropped
    round_timeout_s: float = 900.0
    min_clients: int = 1
    quorum: float = 1.0  # end a round once this fraction of its participants reported
    keys: security.ServerKeys | None = None  # CURVE + allow-list; None = plaintext (warned)


def welcome(cfg: RunConfig, replica: Replica, heartbeat_s: float) -> Welcome:
    """What a joining client must mirror: task, layout, optimizer, and the
    version and hash its replica must match (else it asks for a snapshot)."""
    return Welcome(
        run_id=cfg.run_id,
        heartbeat_s=heartbeat_s,
        config={
            "task": cfg.task_name,
            "layout": cfg.layout,
            "optimizer": cfg.optimizer,
            "version": replica.version,
            "adapter_sha256": replica.sha,
            "rounds": cfg.rounds,
        },
    )


@dataclass
class Peer:
    identity: bytes
    join: Join
    last_seen: float
    work: Work | None = None
    task: Task | None = None

    @property
    def client_id(self) -> str:
        return self.join.client_id


@dataclass
class RoundState:
    """Book-keeping of the round in progress (reset every round)."""

    number: int
    config: RoundConfig
    participants: list[ClientView]
    started: float
    results: int = 0
    losses: list[float] = field(default_factory=list)
    forward_passes: int = 0
    n_tokens: int = 0
    bytes_down: dict[str, int] = field(default_factory=dict)
    bytes_up: dict[str, int] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    by_id: dict[str, ClientView] = field(default_factory=dict)  # participants by client id (O(1) lookups at 1,000 clients)
    #: classifier head: (client id, batch seed, seeds) -> (rows, exact gradient); summed in key order
    head: dict[tuple, tuple[int, np.ndarray]] = field(default_factory=dict)


Evaluate = Callable[[Replica], dict[str, float]]


def head_mean(grads: dict[tuple, tuple[int, np.ndarray]]) -> bytes:
    """The row-weighted mean of the round's head gradients as ``Update.head_grad``
    (float64 sums in sorted key order: the arrival order never shows in the bits)."""
    if not grads:
        return b""
    total = sum(rows for rows, _ in grads.values())
    acc = sum((rows * g.astype(np.float64) for rows, g in (grads[k] for k in sorted(grads))), np.float64(0))
    return np.ascontiguousarray(acc / total, dtype="<f4").tobytes()


class Aggregator:
    """Serve one run until ``config.rounds`` rounds are committed."""

    def __init__(
        self,
        run_dir: Path,
        config: RunConfig,
        replica: Replica,
        strategy: Strategy,
        options: ServerOptions,
        evaluate: Evaluate | None = None,
        elapsed_s: float = 0.0,
    ) -> None:
        self.run_dir = run_dir
        self.config = config
        self.replica = replica
        self.strategy = strategy
        self.opts = options
        self.evaluate = evaluate
        self.elapsed_at_start = elapsed_s
        self.t0 = time.monotonic()
        self.peers: dict[bytes, Peer] = {}
        self.round: RoundState | None = None
        self.first_round = True
        self.eval_thread: threading.Thread | None = None
        self.eval_out: dict[str, Any] = {}
        self.pending: tuple[Update, dict[str, Any]] | None = None  # stepped, not yet committed
        self.snapshot_cache: tuple[int, bytes] | None = None
        self.traffic = {"heartbeat": 0, "snapshot": 0, "control": 0}
        self.session_id = uuid.uuid4().hex[:8]
        self.sock: zmq.Socket | None = None
        self.stop = threading.Event()  # set from another thread to end serve() early

    # ------------------------------------------------------------------ #
    # main loop
    # ------------------------------------------------------------------ #

    def serve(self) -> None:
        ctx = zmq.Context.instance()
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, SERVER_MAX_MSG)
        auth = security.secure_server(ctx, self.sock, self.opts.keys, self.opts.bind)
        self.sock.bind(self.opts.bind)
        log.info("listening on %s (run %s, version %d)", self.opts.bind, self.config.run_id, self.replica.version)
        try:
            if self.replica.version == 0 and self.evaluate:
                self._start_eval()
            next_tick = time.monotonic()
            while not self._finished() and not self.stop.is_set():
                timeout = max(0.0, next_tick - time.monotonic())
                if self.sock.poll(int(timeout * 1000) + 1):
                    self._drain()
                now = time.monotonic()
                if now >= next_tick:
                    self._tick(now)
                    next_tick = now + self.opts.heartbeat_s
                self._advance(now)
            if not self.stop.is_set():
                self._broadcast(Bye(reason="run finished"))
                time.sleep(0.2)  # let the Byes leave before the socket closes
        finally:
            self.sock.close(0)
            self.sock = None
            if auth is not None:
                auth.stop()

    def _finished(self) -> bool:
        return (
            self.replica.version >= self.config.rounds
            and self.pending is None
            and self.eval_thread is None
            and self.round is None
        )

    def _drain(self) -> None:
        """Handle everything queued, without blocking."""
        assert self.sock is not None
        for _ in range(10_000):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                self._on_frames(frames[0], frames[1:])
            except Exception:  # never let one peer take the server down
                log.exception("internal error while handling a message; continuing")

    def _tick(self, now: float) -> None:
        """Heartbeat every peer and drop those that went silent."""
        dead_after = self.opts.heartbeat_s * self.opts.liveness
        for ident, peer in list(self.peers.items()):
            if now - peer.last_seen > dead_after:
                log.warning("client %s silent for %.1f s: dropped", peer.client_id, now - peer.last_seen)
                self._remove(ident, "timeout")
            else:
                self._send(peer, Heartbeat(), "heartbeat")

    def _advance(self, now: float) -> None:
        """Move the round state machine forward."""
        if self.eval_thread is not None:
            if self.eval_thread.is_alive():
                return
            self.eval_thread = None
            self._after_eval()
            return
        if self.round is not None:
            self._dispatch()
            if self.round is not None and now - self.round.started > self.opts.round_timeout_s:
                log.warning("round %d hit its %.0f s deadline", self.round.number, self.opts.round_timeout_s)
                self._end_round()
            return
        if self.pending is None and self.replica.version < self.config.rounds:
            need = self.opts.min_clients if self.first_round else 1
            if len(self.peers) >= need:
                self._begin_round(now)

    # ------------------------------------------------------------------ #
    # rounds
    # ------------------------------------------------------------------ #

    def _view(self, peer: Peer, slot: int) -> ClientView:
        j = peer.join
        return ClientView(j.client_id, slot, j.tokens_per_s, j.n_examples, j.max_batch)

    def _participant(self, peer: Peer) -> ClientView:
        assert self.round is not None
        view = self.round.by_id.get(peer.client_id)
        return view if view is not None else self._view(peer, -1)

    def _begin_round(self, now: float) -> None:
        peers = sorted(self.peers.values(), key=lambda p: p.client_id)
        views = [self._view(p, i) for i, p in enumerate(peers)]
        number = self.replica.version + 1
        cfg = self.strategy.begin(number, views)
        self.round = RoundState(number=number, config=cfg, participants=views, started=now,
                                by_id={v.client_id: v for v in views})
        self.first_round = False
        log.info("round %d/%d: %d clients", number, self.config.rounds, len(views))
        self._dispatch()

    def _dispatch(self) -> None:
        """Give work to idle peers; end the round when nothing is left."""
        rs = self.round
        assert rs is not None
        # quorum < 1 cuts stragglers off; at 1 the strategy alone decides (it
        # may hand a client more work after its first result)
        quorum = self.opts.quorum < 1 and len(rs.bytes_up) >= math.ceil(self.opts.quorum * len(rs.participants))
        if rs.results and (self.strategy.ready() or quorum):
            self._end_round()
            return
        for peer in sorted(self.peers.values(), key=lambda p: p.client_id) if self.strategy.has_work() else ():
            if peer.work is None:
                work = self.strategy.next_work(self._participant(peer))
                if work is not None:
                    self._assign(peer, work)
        if not any(p.work is not None for p in self.peers.values()):
            self._end_round()

    def _assign(self, peer: Peer, work: Work) -> None:
        rs = self.round
        assert rs is not None
        task = Task(
            round=rs.number,
            version=self.replica.version,
            adapter_sha256=self.replica.sha,
            seeds=np.array(work.seeds, dtype=np.uint32),
            mask=rs.config.mask.to_dict(),
            dist=rs.config.dist,
            eps=rs.config.eps,
            batch_size=work.batch_size,
            batch_seed=work.batch_seed,
            one_sided=rs.config.one_sided,
            stratify=self.strategy.spec.stratify,
        )
        peer.work, peer.task = work, task
        n = self._send(peer, task, "task")
        rs.bytes_down[peer.client_id] = rs.bytes_down.get(peer.client_id, 0) + n

    def _on_result(self, peer: Peer, msg: Result, nbytes: int) -> None:
        rs = self.round
        if rs is None or msg.round != rs.number or peer.work is None or peer.task is None:
            log.info("late/unexpected result for round %d from %s ignored", msg.round, peer.client_id)
            return
        task = peer.task
        n = len(task.seeds)
        if not (np.array_equal(msg.seeds, task.seeds) and len(msg.loss_plus) == n and len(msg.loss_minus) == n):
            self._send(peer, Error(reason="result does not match the task's seeds", code="result"), "control")
            return
        head = None
        if self.replica.layout.head is not None:
            try:
                head = (msg.head_rows, head_array(msg.head_grad, self.replica.layout))
            except ProtocolError as e:
                self._send(peer, Error(reason=f"result: {e}", code="result"), "control")
                return
            if msg.head_rows < 1:
                self._send(peer, Error(reason="result: head_rows must be >= 1", code="result"), "control")
                return
        eps = rs.config.eps
        if rs.config.one_sided:
            projected = (msg.loss_plus - msg.loss_minus) / eps
            loss = float(msg.loss_minus[0]) if n else msg.base_loss
            passes = n + 1
        else:
            projected = (msg.loss_plus - msg.loss_minus) / (2 * eps)
            loss = float(np.mean((msg.loss_plus + msg.loss_minus) / 2)) if n else math.nan
            passes = 2 * n
        scored = Scored(msg.seeds, projected, loss, msg.n_tokens, msg.seconds, passes)
        work = peer.work
        peer.work, peer.task = None, None
        if head is not None:
            rs.head[(peer.client_id, work.batch_seed, work.seeds)] = head
        rs.results += 1
        rs.losses.append(loss)
        rs.forward_passes += passes
        rs.n_tokens += msg.n_tokens
        rs.bytes_up[peer.client_id] = rs.bytes_up.get(peer.client_id, 0) + nbytes
        self.strategy.add(self._participant(peer), work, scored)
        self._dispatch()

    def _end_round(self) -> None:
        rs = self.round
        assert rs is not None
        for peer in self.peers.values():  # anything still out is late from now on
            peer.work, peer.task = None, None
        self.round = None
        if not rs.results:
            log.warning("round %d got no results; it will be retried", rs.number)
            return
        step = self.strategy.step()
        lr = self.config.optimizer_spec.lr_at(rs.number - 1)
        update = Update(
            round=rs.number,
            version=rs.number,
            lr=lr,
            adapter_sha256="",
            seeds=step.seeds,
            coeffs=step.coeffs,
            mask=rs.config.mask.to_dict(),
            dist=rs.config.dist,
            head_grad=head_mean(rs.head),
        )
        sha = self.replica.apply(update)
        update = replace(update, adapter_sha256=sha)
        self.strategy.committed(rs.number, step)
        update_bytes = sum(len(f) for f in update.to_frames())
        clients = sorted(set(rs.bytes_down) | set(rs.bytes_up))
        down = [rs.bytes_down.get(c, 0) + update_bytes for c in clients]
        up = [rs.bytes_up.get(c, 0) for c in clients]
        record: dict[str, Any] = {
            "round": rs.number,
            "loss": float(np.mean(rs.losses)),
            "dev_loss": None,
            "dev_accuracy": None,
            "clients": len(rs.bytes_up),
            "participants": len(rs.participants),
            "dropped": rs.dropped,
            "perturbations": int(len(step.seeds)),
            "forward_passes": rs.forward_passes,
            "tokens": rs.n_tokens,
            "lr": lr,
            "bytes_down_per_client": int(np.mean(down)),
            "bytes_up_per_client": int(np.mean(up)),
            "bytes_update": update_bytes,
            "adapter_sha256": sha,
            "round_s": round(time.monotonic() - rs.started, 3),
            **step.info,
        }
        self.pending = (update, record)
        if self.evaluate and (rs.number % self.config.eval_every == 0 or rs.number == self.config.rounds):
            self._start_eval()
        else:
            self._commit()

    def _commit(self) -> None:
        """Metrics, checkpoint, then broadcast (never the other way round)."""
        assert self.pending is not None
        update, record = self.pending
        record.update(self.eval_out)
        self.eval_out = {}
        elapsed = self.elapsed_at_start + time.monotonic() - self.t0
        record["wall_s"] = round(elapsed, 3)
        record.update({f"bytes_{k}_total": v for k, v in self.traffic.items()})
        checkpoint.append_metrics(self.run_dir, record)
        checkpoint.save(self.run_dir, self.replica, self.strategy.state_dict(), elapsed)
        self.pending = None
        self._broadcast(update, "update")
        log.info(
            "round %d/%d loss %.4f%s clients %d fwd %d down %d B up %d B (%.1f s)",
            record["round"],
            self.config.rounds,
            record["loss"],
            "" if record["dev_accuracy"] is None else f" dev acc {record['dev_accuracy']:.4f}",
            record["clients"],
            record["forward_passes"],
            record["bytes_down_per_client"],
            record["bytes_up_per_client"],
            record["round_s"],
        )

    # ------------------------------------------------------------------ #
    # evaluation (helper thread)
    # ------------------------------------------------------------------ #

    def _start_eval(self) -> None:
        assert self.evaluate is not None
        frozen = Replica(self.replica.layout, self.replica.tensors, self.replica.optimizer, self.replica.version)
        evaluate, out = self.evaluate, self.eval_out

        def run() -> None:
            try:
                out.update(evaluate(frozen))
            except Exception as e:  # reported in the metrics, never fatal
                log.exception("dev evaluation failed")
                out["eval_error"] = str(e)

        self.eval_thread = threading.Thread(target=run, name="dev-eval", daemon=True)
        self.eval_thread.start()

    def _after_eval(self) -> None:
        if self.pending is not None:
            self._commit()
            return
        record = {"round": 0, **self.eval_out, "wall_s": round(time.monotonic() - self.t0, 3)}
        self.eval_out = {}
        checkpoint.append_metrics(self.run_dir, record)
        log.info("before training: dev loss %s, dev accuracy %s", record.get("dev_loss"), record.get("dev_accuracy"))

    # ------------------------------------------------------------------ #
    # messages
    # ------------------------------------------------------------------ #

    def _send(self, peer: Peer, msg: Message, kind: str) -> int:
        frames = msg.to_frames()
        assert self.sock is not None
        self.sock.send_multipart([peer.identity, *frames])
        n = sum(len(f) for f in frames)
        if kind in self.traffic:
            self.traffic[kind] += n
        return n

    def _send_raw(self, identity: bytes, msg: Message) -> None:
        assert self.sock is not None
        self.sock.send_multipart([identity, *msg.to_frames()])

    def _broadcast(self, msg: Message, kind: str = "control") -> None:
        assert self.sock is not None
        frames = msg.to_frames()  # encoded once: a K=1000 Update is 16 KB of JSON
        for peer in list(self.peers.values()):
            self.sock.send_multipart([peer.identity, *frames])
        if kind in self.traffic:
            self.traffic[kind] += len(self.peers) * sum(len(f) for f in frames)

    def _on_frames(self, identity: bytes, frames: list[bytes]) -> None:
        nbytes = sum(len(f) for f in frames)
        try:
            if len(frames) > MAX_FRAMES:
                raise ProtocolError(f"{len(frames)} frames; at most {MAX_FRAMES}")
            msg = Message.from_frames(frames)
        except ProtocolError as e:
            log.warning("rejected frame from %s: %s", identity.hex(), e)
            self._send_raw(identity, Error(reason=str(e), code="frame"))
            return
        peer = self.peers.get(identity)
        if isinstance(msg, Join):
            self._on_join(identity, msg)
            return
        if peer is None:
            self._send_raw(identity, Error(reason="unknown peer: send Join first", code="join"))
            return
        peer.last_seen = time.monotonic()
        if isinstance(msg, Result):
            self._on_result(peer, msg, nbytes)
        elif isinstance(msg, SnapshotRequest):
            self._send_snapshot(peer)
        elif isinstance(msg, Bye):
            log.info("client %s left: %s", peer.client_id, msg.reason)
            self._remove(identity, "bye")
        elif not isinstance(msg, Heartbeat):
            self._send(peer, Error(reason=f"unexpected {msg.TYPE} from a client", code="frame"), "control")

    def _on_join(self, identity: bytes, msg: Join) -> None:
        if msg.model_sha256 != self.config.model_sha256:
            reason = (
                f"base model sha256 {msg.model_sha256[:16]}... differs from the aggregator's "
                f"{self.config.model_sha256[:16]}... ({Path(self.config.model).name}); load the same GGUF"
            )
            log.warning("refused %s: %s", msg.client_id, reason)
            self._send_raw(identity, Refuse(reason=reason))
            return
        carried: tuple[Work | None, Task | None] = (None, None)
        for ident, old in list(self.peers.items()):
            if old.client_id == msg.client_id and ident != identity:  # reconnect from a new socket
                carried = (old.work, old.task)
                del self.peers[ident]
        peer = self.peers.get(identity)
        if peer is None:
            peer = Peer(identity, msg, time.monotonic(), *carried)
            self.peers[identity] = peer
            log.info("client %s joined (%.0f tok/s, %d examples)", msg.client_id, msg.tokens_per_s, msg.n_examples)
        else:
            peer.join, peer.last_seen = msg, time.monotonic()
        self._send(peer, welcome(self.config, self.replica, self.opts.heartbeat_s), "control")
        if carried[1] is not None:  # a reconnected worker may have lost its task
            self._send(peer, carried[1], "control")

    def _send_snapshot(self, peer: Peer) -> None:
        if self.snapshot_cache is None or self.snapshot_cache[0] != self.replica.version:
            self.snapshot_cache = (self.replica.version, self.replica.to_bytes())
        snap = Snapshot(version=self.replica.version, adapter_sha256=self.replica.sha, state=self.snapshot_cache[1])
        self._send(peer, snap, "snapshot")

    def _remove(self, identity: bytes, why: str) -> None:
        peer = self.peers.pop(identity)
        if self.round is not None:
            self.round.dropped.append(peer.client_id)
            if peer.work is not None:
                self.strategy.drop(self._participant(peer), peer.work)
