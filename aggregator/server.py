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
from fwdllm.aggregator.privacy import Ledger
from fwdllm.aggregator.secure import AggregateRound
from fwdllm.aggregator.strategy import ClientView, RoundConfig, Scored, Strategy, Work
from fwdllm.core import compress, contribution
from fwdllm.core.history import History, catch_up_plan
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
            # protocol v2: a new device builds version 0 from this seed (None: it
            # needs a snapshot, e.g. a run that started from --init-adapter)
            "init_seed": cfg.init_seed,
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
        self.traffic = {"heartbeat": 0, "snapshot": 0, "replay": 0, "secagg": 0, "control": 0}
        self.session_id = uuid.uuid4().hex[:8]
        self.sock: zmq.Socket | None = None
        self.stop = threading.Event()  # set from another thread to end serve() early
        # protocol v2: what a late device replays, the head codec's carried
        # error, the privacy ledger, and the summed round in progress
        extra = checkpoint.load_extra(run_dir)
        self.history = extra.get("history") or History(replica.version, replica.sha)
        self.head_residual: np.ndarray | None = extra.get("head_residual")
        self.ledger = Ledger(config.dp_spec) if config.dp_spec else None
        if self.ledger is not None:
            self.ledger.load_state_dict(extra.get("dp", {}))
        self.agg: AggregateRound | None = None

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
        if self.ledger is not None and self._budget_spent(views):
            return
        cfg = self.strategy.begin(number, views)
        self.round = RoundState(number=number, config=cfg, participants=views, started=now,
                                by_id={v.client_id: v for v in views})
        if self.config.secagg or self.config.dp_spec:
            self.agg = self._aggregate_round(number, views)
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
            head_codec=self.config.head_codec,
            **(self.agg.task_fields(peer.client_id) if self.agg else {}),
        )
        peer.work, peer.task = work, task
        if self.agg is not None:
            self.agg.seeds = work.seeds  # a shared plan: every participant scores the same seeds
        n = self._send(peer, task, "task")
        rs.bytes_down[peer.client_id] = rs.bytes_down.get(peer.client_id, 0) + n

    def _on_result(self, peer: Peer, msg: Result, nbytes: int) -> None:
        rs = self.round
        if rs is None or msg.round != rs.number or peer.work is None or peer.task is None:
            log.info("late/unexpected result for round %d from %s ignored", msg.round, peer.client_id)
            return
        task = peer.task
        n = len(task.seeds)
        if self.agg is not None:
            self._on_contribution(peer, lambda: self.agg.on_sums(peer.client_id, msg.sums, {}), msg.n_tokens, nbytes)
            return
        if not (np.array_equal(msg.seeds, task.seeds) and len(msg.loss_plus) == n and len(msg.loss_minus) == n):
            self._send(peer, Error(reason="result does not match the task's seeds", code="result"), "control")
            return
        head = None
        if self.replica.layout.head is not None:
            try:
                head = (msg.head_rows, head_array(msg.head_grad, self.replica.layout, msg.head_codec))
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
        agg, self.agg = self.agg, None
        if agg is not None:
            if not agg.done:
                log.warning("round %d: the sum was not complete (stage %s); it will be retried", rs.number, agg.stage)
                return
            head_mean_bytes = self._add_aggregate(rs, agg)
        elif not rs.results:
            log.warning("round %d got no results; it will be retried", rs.number)
            return
        else:
            head_mean_bytes = head_mean(rs.head)
        head_raw = b""
        if head_mean_bytes:
            # every replica applies the decoded bytes; the server carries the rounding error
            mean = np.frombuffer(head_mean_bytes, "<f4").reshape(self.replica.layout.head)
            head_raw, self.head_residual = compress.encode(mean, self.config.head_codec, self.head_residual)
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
            head_grad=head_raw,
            head_codec=self.config.head_codec if head_raw else "f32",
        )
        sha = self.replica.apply(update)
        update = replace(update, adapter_sha256=sha)
        self.history.append(update)
        self.strategy.committed(rs.number, step)
        update_bytes = sum(len(f) for f in update.to_frames())
        clients = sorted(set(rs.bytes_down) | set(rs.bytes_up))
        down = [rs.bytes_down.get(c, 0) + update_bytes for c in clients]
        up = [rs.bytes_up.get(c, 0) for c in clients]
        record: dict[str, Any] = {
            "round": rs.number,
            "loss": float(np.mean(rs.losses)) if rs.losses else None,  # DP rounds report none
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
        if agg is not None:
            record["clients"] = len(agg.contributors)  # in the sum (a dropout may have sent keys and shares)
            record["secagg_bytes_per_client"] = agg.sa_bytes // max(1, len(rs.participants)) if agg.server else None
        if self.ledger is not None and agg is not None:
            record["dp_epsilon_spent"] = self.ledger.record(agg.result()[3])
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
        checkpoint.save(self.run_dir, self.replica, self.strategy.state_dict(), elapsed, self._extra())
        self.pending = None
        self._broadcast(update, "update")
        log.info(
            "round %d/%d loss %s%s clients %d fwd %d down %d B up %d B (%.1f s)",
            record["round"],
            self.config.rounds,
            "-" if record["loss"] is None else f"{record['loss']:.4f}",
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
        elif isinstance(msg, CatchUp):
            self._catch_up(peer, msg)
        elif isinstance(msg, SecAgg):
            self._on_secagg(peer, msg, nbytes)
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
            if self.agg is not None and peer.client_id in self.agg.index:
                self._route(self.agg.drop(peer.client_id))

    # ------------------------------------------------------------------ #
    # protocol v2: catch-up by replay, summed rounds (--secagg, --dp-epsilon)
    # ------------------------------------------------------------------ #

    def _extra(self) -> dict[str, Any]:
        return {"history": self.history, "head_residual": self.head_residual,
                "dp": self.ledger.state_dict() if self.ledger else None}

    def _catch_up(self, peer: Peer, msg: CatchUp) -> None:
        """Replay the history from the device's version, or snapshot when
        that is cheaper or the device is not on our history."""
        if self.snapshot_cache is None or self.snapshot_cache[0] != self.replica.version:
            self.snapshot_cache = (self.replica.version, self.replica.to_bytes())
        rate = peer.join.replay_entries_per_s
        plan = catch_up_plan(self.history, self.replica.layout, msg.version, msg.adapter_sha256,
                             len(self.snapshot_cache[1]), **({"replay_entries_per_s": rate} if rate > 0 else {}))
        log.info("client %s at version %d: %s (replay %d B, ~%.2f s; snapshot %d B, ~%.2f s)", peer.client_id,
                 msg.version, plan.how, plan.replay_bytes, plan.replay_s, plan.snapshot_bytes, plan.snapshot_s)
        if plan.how == "snapshot":
            self._send_snapshot(peer)
            return
        blob = self.history.encode(msg.version, all_shas=False)
        self._send(peer, Replay(version=self.replica.version, adapter_sha256=self.replica.sha, history=blob), "replay")

    def _budget_spent(self, views: list[ClientView]) -> bool:
        """True when the run must stop because the next round would pass the
        privacy budget (``--dp-on-spent stop``); warns otherwise."""
        assert self.ledger is not None
        rate = max(min(1.0, self.strategy.spec.batch_size / max(1, v.n_examples)) for v in views)
        self.ledger.calibrate(rate)
        if not self.ledger.would_exceed(rate):
            return False
        spec = self.ledger.spec
        if spec.on_spent == "warn":
            log.warning("round %d passes the privacy budget epsilon=%g (spent %.3f); continuing (--dp-on-spent warn)",
                        self.replica.version + 1, spec.epsilon, self.ledger.epsilon())
            return False
        log.warning("privacy budget epsilon=%g spent (%.3f): stopping before round %d (--dp-on-spent stop)",
                    spec.epsilon, self.ledger.epsilon(), self.replica.version + 1)
        self.config = replace(self.config, rounds=self.replica.version)  # _finished() ends serve()
        return True

    def _aggregate_round(self, number: int, views: list[ClientView]) -> AggregateRound:
        rs = self.round
        assert rs is not None
        shape = contribution.Shape(self.strategy.spec.k, self.replica.layout.head, self.config.dp_spec is not None)
        bs = self.strategy.spec.batch_size
        return AggregateRound(
            number, [v.client_id for v in views], shape, self.config.secagg_options,
            self.ledger.spec if self.ledger else None,
            rates={v.client_id: min(1.0, bs / max(1, v.n_examples)) for v in views},
            batch_sizes={v.client_id: bs for v in views})

    def _route(self, out: list[tuple[str, SecAgg]]) -> None:
        by_id = {p.client_id: p for p in self.peers.values()}
        for cid, m in out:
            if cid in by_id:
                self._send(by_id[cid], m, "secagg")
        if self.agg is not None and (self.agg.done or self.agg.failed) and self.round is not None:
            self._end_round()

    def _on_contribution(self, peer: Peer, feed: Callable[[], list], n_tokens: int, nbytes: int) -> None:
        rs = self.round
        assert rs is not None and self.agg is not None
        try:
            out = feed()
        except Exception as e:  # SecAggError, ValueError: this peer's input, never the loop's
            self._send(peer, Error(reason=f"result: {e}", code="result"), "control")
            return
        rs.results += 1
        rs.forward_passes += (len(peer.task.seeds) + 1) if rs.config.one_sided else 2 * len(peer.task.seeds)
        rs.n_tokens += max(0, int(n_tokens))
        rs.bytes_up[peer.client_id] = rs.bytes_up.get(peer.client_id, 0) + nbytes
        self._route(out)

    def _on_secagg(self, peer: Peer, msg: SecAgg, nbytes: int) -> None:
        rs, agg = self.round, self.agg
        if rs is None or agg is None or msg.round != rs.number or peer.client_id not in agg.index:
            log.info("late/unexpected secagg %s for round %d from %s ignored", msg.stage, msg.round, peer.client_id)
            return
        if msg.stage == "masked":
            tokens = msg.meta.get("n_tokens", 0)
            self._on_contribution(peer, lambda: agg.on_secagg(peer.client_id, msg),
                                  tokens if isinstance(tokens, int) else 0, nbytes)
            return
        rs.bytes_up[peer.client_id] = rs.bytes_up.get(peer.client_id, 0) + nbytes
        try:
            out = agg.on_secagg(peer.client_id, msg)
        except Exception as e:
            self._send(peer, Error(reason=f"secagg: {e}", code="result"), "control")
            return
        self._route(out)

    def _add_aggregate(self, rs: RoundState, agg: AggregateRound) -> bytes:
        """Hand the round's sum to the strategy as one result; the mean head
        gradient as float32 bytes (b"" without a head)."""
        proj, loss, head, _ = agg.result()
        seeds = np.array(agg.seeds, dtype=np.uint32)
        if not math.isnan(loss):
            rs.losses.append(loss)
        view = ClientView("sum", -1, 0.0, 0, 0)
        work = Work(seeds=tuple(int(s) for s in seeds), batch_size=0, batch_seed=0)
        self.strategy.add(view, work, Scored(seeds, proj, loss, rs.n_tokens, 0.0, rs.forward_passes))
        return b"" if head is None else np.ascontiguousarray(head, dtype="<f4").tobytes()
