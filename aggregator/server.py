"""The aggregator's event loop: one ROUTER socket, many DEALER workers.

The loop owns the mechanics - who is connected, heartbeats, deadlines,
snapshots, checkpoints, byte accounting - and asks a
:class:`~aggregator.strategy.Strategy` for the algorithm.  It is single
threaded; only the dev-set evaluation runs in a helper thread (llama.cpp
releases the GIL), so heartbeats keep flowing while it runs.

Round life cycle::

    WAIT   until enough clients are live (``min_clients`` before this
           process's first round, then at least one)
    RUN    Tasks out, Results in; dead peers dropped, late tasks taken back
           and handed to others; ends when the strategy is ready, when a
           quorum of participants reported, when nothing is outstanding, or
           at the round deadline
    STEP   coefficients -> Update -> applied to the server's replica
           (refused, and the round retried, if it would not be finite)
    EVAL   (every ``eval_every`` rounds, in a thread) dev loss / accuracy
    COMMIT metrics line, checkpoint, then broadcast the Update

Who a peer is (docs/security.md): under CURVE its identity is its key - the
name the ZAP handler gave it, read from each message's ``User-Id`` - and the
``client_id`` it sends is a label for logs only.  One connection per
identity; strikes, quarantine and eviction attach to the identity.  In
plaintext (local simulation) the identity is the ``client_id``.

Every peer costs bounded memory: a low send high-water mark that drops
rather than queues, large frames shared (not copied) between peers, at most
one snapshot per identity per version and one in flight at a time, a limit
on a whole inbound message, and connections that stop reading are cut by
TCP (``TCP_MAXRT``).  Nothing a peer sends can raise out of the loop, and
the warnings it can provoke are rate-limited.
"""

from __future__ import annotations

import hashlib
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
from fwdllm.core.errors import UserError
from fwdllm.core.protocol import (
    MAX_HEADER_BYTES,
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
from fwdllm.runtime.log import Throttle

log = logging.getLogger("fwdllm.aggregator")

#: Inbound limits.  Clients only ever send small messages: a header and at
#: most one blob (a head gradient).  libzmq's MAXMSGSIZE bounds one frame;
#: the loop refuses a message whose frames add up to more than the total.
SERVER_MAX_MSG = 1 << 20
MAX_FRAMES = 4
MAX_TOTAL = SERVER_MAX_MSG + MAX_HEADER_BYTES
#: Outbound messages queued per peer before libzmq drops (a heartbeat, a
#: task and an update per round: an honest reader is never near it).
SEND_HWM = 64
#: Inbound messages waiting per peer before libzmq stops reading it (TCP
#: pushes back; nothing is lost): an honest device sends about one a second.
RECV_HWM = 8
#: frames at least this long are sent zero-copy: every peer's queue then
#: shares one Update or Snapshot buffer instead of holding its own copy
SHARE_BYTES = 1024
#: a connection whose peer stops reading (zero TCP window) for this long is
#: cut by the kernel (TCP_USER_TIMEOUT), and what was queued for it is freed
STALLED_READER_MS = 30_000
#: bounds on what a result may claim; anything outside is refused whole
MAX_LOSS = 1e6  # a cross-entropy this large is no loss but an attack or a bug
MAX_HEAD_GRAD = 1e6  # per entry of an exact head gradient
MAX_TOKENS_PER_ROW = 1 << 16  # per perturbed pass and batch row
MAX_SECONDS = 86_400.0


@dataclass(frozen=True)
class ServerOptions:
    """Transport and pacing knobs (not part of the run's identity; saved in
    run.json's ``serve`` block so that ``--resume`` restores them)."""

    bind: str = "tcp://*:5555"
    heartbeat_s: float = 1.0
    liveness: int = 5  # missed heartbeats before a peer is dropped
    round_timeout_s: float = 900.0
    min_clients: int = 1
    quorum: float = 1.0  # end a round once this fraction of its participants reported
    #: a task's deadline: deadline_floor_s + deadline_slack x the client's measured seconds per seed
    deadline_floor_s: float = 5.0
    deadline_slack: float = 4.0
    evict_after: int = 3  # deadlines missed in a row before an identity is evicted from the run
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
    """One live connection, and the identity behind it."""

    routing: bytes  # ZeroMQ routing id of the connection
    who: str  # identity: the CURVE key's allow-list name, or (plaintext) the client_id
    join: Join
    last_seen: float
    work: Work | None = None
    task: Task | None = None
    task_sent: float = 0.0
    deadline: float = math.inf
    rank: int = 0  # position key in this round's order (a keyed hash; see Aggregator._rank)
    benched: int = 0  # the round in which a task of its was taken back: no more work in that round
    #: the task whose deadline it missed, while unanswered: it gets no other
    #: work meanwhile (it is still busy with this one, or silent), a strike
    #: for every further budget of silence, and a late answer still counts
    #: for its speed and clears its strikes
    expired: Task | None = None
    expired_sent: float = 0.0
    silent_until: float = math.inf  # the next strike, if still unanswered by then
    expired_budget: float = 0.0

    @property
    def label(self) -> str:
        """For logs: the identity, and the id the client calls itself when it differs."""
        return self.who if self.join.client_id == self.who else f"{self.who} ({self.join.client_id})"


@dataclass
class Standing:
    """What the loop remembers about an identity: its speed and its record."""

    strikes: int = 0  # deadlines missed in a row
    seconds_per_seed: float | None = None  # measured by the server: task sent -> result in
    snapshot_version: int = -1  # the last version it was sent a snapshot of
    snapshot: zmq.MessageTracker | None = None  # that snapshot, until libzmq lets go of it


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
    expired: list[str] = field(default_factory=list)  # identities whose task was taken back (deadline, refused)
    released: set[str] = field(default_factory=set)  # participants whose share went to others (no work for them)
    by_id: dict[str, ClientView] = field(default_factory=dict)  # participants by identity (O(1) at 1,000 clients)
    #: classifier head: (identity, batch seed, seeds) -> (rows, exact gradient)
    head: dict[tuple, tuple[int, np.ndarray]] = field(default_factory=dict)


Evaluate = Callable[[Replica], dict[str, float]]


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
        evicted: tuple[str, ...] = (),
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
        self.by_who: dict[str, Peer] = {}
        self.standing: dict[str, Standing] = {}
        self.evicted: set[str] = set(evicted)
        self.round: RoundState | None = None
        self.first_round = True
        self.refused_steps = 0  # steps refused as non-finite since the last committed round
        self.eval_thread: threading.Thread | None = None
        self.eval_out: dict[str, Any] = {}
        self.pending: tuple[Update, dict[str, Any]] | None = None  # stepped, not yet committed
        self.snapshot_cache: tuple[int, bytes] | None = None
        self.traffic = {"heartbeat": 0, "snapshot": 0, "control": 0}
        self.session_id = uuid.uuid4().hex[:8]
        self.sock: zmq.Socket | None = None
        self.auth: security.KeyedAuthenticator | None = None
        self.noise = Throttle(log)  # warnings a peer can provoke at will
        self.stop = threading.Event()  # set from another thread to end serve() early

    # ------------------------------------------------------------------ #
    # main loop
    # ------------------------------------------------------------------ #

    def serve(self) -> None:
        ctx = zmq.Context.instance()
        self.sock = ctx.socket(zmq.ROUTER)
        for opt, value in ((zmq.LINGER, 0), (zmq.MAXMSGSIZE, SERVER_MAX_MSG), (zmq.SNDHWM, SEND_HWM),
                           (zmq.RCVHWM, RECV_HWM), (zmq.TCP_MAXRT, STALLED_READER_MS)):
            self.sock.setsockopt(opt, value)
        self.sock.copy_threshold = SHARE_BYTES
        self.auth = security.secure_server(ctx, self.sock, self.opts.keys, self.opts.bind)
        if self.auth is not None:
            self.auth.allow.barred.update(self.evicted)
        try:
            self.sock.bind(self.opts.bind)
        except zmq.ZMQError as e:  # taken since the CLI's check_bind: one line, the run directory intact
            self.sock.close(0)
            if self.auth is not None:
                self.auth.stop()
            raise UserError(f"--bind {self.opts.bind}: {e}") from None
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
            self.noise.flush()
            self.sock.close(0)
            self.sock = None
            if self.auth is not None:
                self.auth.stop()

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
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                self._on_frames(frames)
            except Exception:  # never let one peer take the server down
                log.exception("internal error while handling a message; continuing")

    def _tick(self, now: float) -> None:
        """Heartbeat every peer, drop those that went silent, take back late work."""
        dead_after = self.opts.heartbeat_s * self.opts.liveness
        for peer in list(self.peers.values()):
            if now - peer.last_seen > dead_after:
                log.warning("client %s silent for %.1f s: dropped", peer.label, now - peer.last_seen)
                self._remove(peer, "timeout")
            else:
                self._send(peer, Heartbeat(), "heartbeat")
        if self.round is not None:
            self._deadlines(now)
        self.noise.tick(now)

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
        return ClientView(peer.who, slot, j.tokens_per_s, j.n_examples, j.max_batch)

    def _participant(self, peer: Peer) -> ClientView:
        assert self.round is not None
        view = self.round.by_id.get(peer.who)
        return view if view is not None else self._view(peer, -1)

    def _rank(self, number: int, who: str) -> int:
        """The order of work in round ``number``: a hash of the run seed, the
        round and the identity.  No client chooses its identity (a key's name
        is the operator's) and the order changes every round."""
        data = f"{self.strategy.spec.run_seed}:order:{number}:{who}".encode()
        return int.from_bytes(hashlib.sha256(data).digest()[:8], "little")

    def _begin_round(self, now: float) -> None:
        number = self.replica.version + 1
        for peer in self.peers.values():
            peer.rank = self._rank(number, peer.who)
        peers = sorted(self.peers.values(), key=lambda p: (p.rank, p.who))
        views = [self._view(p, i) for i, p in enumerate(peers)]
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
        if self.strategy.has_work():
            for peer in sorted(self.peers.values(), key=lambda p: (p.rank, p.who)):
                if peer.work is not None:
                    continue
                if peer.expired is not None or peer.benched == rs.number:  # no work for it now: its share goes
                    if peer.who in rs.by_id and peer.who not in rs.released:
                        rs.released.add(peer.who)
                        self.strategy.drop(self._participant(peer), None)
                    continue
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
        now = time.monotonic()
        peer.work, peer.task, peer.task_sent = work, task, now
        peer.deadline = now + self._budget(peer.who, len(work.seeds), self._typical_speed())
        n = self._send(peer, task, "task")
        rs.bytes_down[peer.who] = rs.bytes_down.get(peer.who, 0) + n

    # -- deadlines ------------------------------------------------------- #

    def _typical_speed(self) -> float | None:
        """The median measured seconds per seed over known identities, or None."""
        measured = [s.seconds_per_seed for s in self.standing.values() if s.seconds_per_seed is not None]
        return float(np.median(measured)) if measured else None

    def _budget(self, who: str, n_seeds: int, typical: float | None) -> float:
        """Seconds a task of ``n_seeds`` seeds may take: the floor plus
        ``slack`` x the identity's measured seconds per seed; an identity not
        measured yet is judged by the ``typical`` (median) one, and before
        anyone is measured the budget is ``slack`` x the floor."""
        o = self.opts
        own = self.standing.get(who)
        speed = own.seconds_per_seed if own is not None and own.seconds_per_seed is not None else typical
        if speed is None:
            return o.deadline_slack * o.deadline_floor_s
        return o.deadline_floor_s + o.deadline_slack * speed * max(1, n_seeds)

    def _deadlines(self, now: float) -> None:
        """Take back every task past its deadline and hand it to someone else;
        evict identities that keep letting tasks expire.  Tasks handed out
        before anyone was measured are re-budgeted once someone is."""
        typical = self._typical_speed()
        for peer in list(self.peers.values()):
            if peer.work is None:
                if peer.expired is not None and now > peer.silent_until:
                    self._strike(peer, f"still silent {now - peer.expired_sent:.1f} s after its task")
                    peer.silent_until = now + peer.expired_budget
                continue
            own = self.standing.get(peer.who)
            if own is None or own.seconds_per_seed is None:
                budget = self._budget(peer.who, len(peer.work.seeds), typical)
                peer.deadline = min(peer.deadline, peer.task_sent + budget)
            if now > peer.deadline:
                budget = peer.deadline - peer.task_sent
                unanswered = peer.task
                self._take_back(peer, f"missed its task deadline ({budget:.1f} s)")
                if peer.routing in self.peers:
                    peer.expired, peer.expired_sent = unanswered, peer.task_sent
                    peer.expired_budget, peer.silent_until = budget, now + budget

    def _take_back(self, peer: Peer, why: str) -> None:
        """The peer's task goes to others in this round, and its identity gets
        a strike (a deadline missed, or a result refused)."""
        rs = self.round
        assert rs is not None and peer.work is not None
        work, peer.benched = peer.work, rs.number
        peer.work, peer.task = None, None
        rs.expired.append(peer.who)
        self.strategy.drop(self._participant(peer), work)
        self._strike(peer, f"{why}; its seeds go to others")

    def _strike(self, peer: Peer, why: str) -> None:
        """One more strike; ``evict_after`` in a row evict the identity.  An
        answer, even a late one, clears them: slowness costs a task, only
        silence and refused results add up."""
        st = self._standing(peer.who)
        st.strikes += 1
        self.noise.warning(("strike", peer.who), "client %s %s (strike %d of %d)", peer.label, why, st.strikes,
                           self.opts.evict_after)
        if st.strikes >= self.opts.evict_after:
            self._evict(peer, f"{st.strikes} strikes in a row (deadlines missed, silence or refused results)")

    def _evict(self, peer: Peer, why: str) -> None:
        """Out of the run for good: this connection, and under CURVE its key
        at every later handshake (the checkpoint keeps the list)."""
        log.warning("client %s evicted: %s", peer.label, why)
        self.evicted.add(peer.who)
        if self.auth is not None:
            self.auth.allow.barred.add(peer.who)
        self._send(peer, Refuse(reason=f"evicted from the run: {why}"), "control")
        self._remove(peer, "evicted")

    def _standing(self, who: str) -> Standing:
        st = self.standing.get(who)
        if st is None:
            st = self.standing[who] = Standing()
        return st

    # -- results --------------------------------------------------------- #

    def _on_result(self, peer: Peer, msg: Result, nbytes: int) -> None:
        rs = self.round
        now = time.monotonic()
        if peer.expired is not None and self._is_answer(msg, peer.expired):
            if not isinstance(self._check_result(msg, peer.expired), str):
                self._measure(peer, now, len(msg.seeds), peer.expired_sent)  # late, not silent: speed counts
            peer.expired = None
            self.noise.warning(("late", peer.who), "late result for round %d from %s ignored (its seeds went to "
                               "others)", msg.round, peer.label)
            return
        if rs is None or msg.round != rs.number or peer.work is None or peer.task is None:
            self.noise.warning(("late", peer.who), "late/unexpected result for round %d from %s ignored", msg.round, peer.label)
            return
        task, work = peer.task, peer.work
        if not self._is_answer(msg, task):
            self._send(peer, Error(reason="result does not match the task's seeds", code="result"), "control")
            return
        checked = self._check_result(msg, task)
        if isinstance(checked, str):
            self._send(peer, Error(reason=f"result: {checked}", code="result"), "control")
            self._take_back(peer, f"sent a result that was refused: {checked}")
            if self.round is not None:
                self._dispatch()
            return
        scored, head = checked
        self._measure(peer, now, len(msg.seeds), peer.task_sent)
        peer.work, peer.task = None, None
        if head is not None:
            rs.head[(peer.who, work.batch_seed, work.seeds)] = head
        rs.results += 1
        rs.losses.append(scored.loss)
        rs.forward_passes += scored.forward_passes
        rs.n_tokens += scored.n_tokens
        rs.bytes_up[peer.who] = rs.bytes_up.get(peer.who, 0) + nbytes
        self.strategy.add(self._participant(peer), work, scored)
        self._dispatch()

    @staticmethod
    def _is_answer(msg: Result, task: Task) -> bool:
        n = len(task.seeds)
        return (msg.round == task.round and np.array_equal(msg.seeds, task.seeds)
                and len(msg.loss_plus) == n and len(msg.loss_minus) == n)

    def _check_result(self, msg: Result, task: Task) -> tuple[Scored, Any] | str:
        """The result as the strategy sees it (float64, bounded), plus its head
        gradient, or why it is refused.  Bounds keep every later sum finite:
        a loss beyond ``MAX_LOSS``, a counter beyond what the task could have
        cost, or a head gradient over more rows than the batch has."""
        n = len(msg.seeds)
        losses = np.concatenate([msg.loss_plus, msg.loss_minus, [msg.base_loss]])
        if np.any(np.abs(losses) > MAX_LOSS):
            return f"a loss beyond +-{MAX_LOSS:g}"
        eps = task.eps
        if task.one_sided:
            projected = (msg.loss_plus - msg.loss_minus) / eps
            loss = float(msg.loss_minus[0]) if n else msg.base_loss
            passes = n + 1
        else:
            projected = (msg.loss_plus - msg.loss_minus) / (2 * eps)
            loss = float(np.mean((msg.loss_plus + msg.loss_minus) / 2)) if n else math.nan
            passes = 2 * n
        if not np.all(np.isfinite(projected)):
            return "the projections are not finite at this eps"
        if not 0 <= msg.n_tokens <= passes * task.batch_size * MAX_TOKENS_PER_ROW:
            return f"n_tokens {msg.n_tokens} is not what {passes} passes of {task.batch_size} rows can cost"
        if not 0 <= msg.seconds <= MAX_SECONDS:
            return f"seconds {msg.seconds:g} out of range"
        head = None
        if self.replica.layout.head is not None:
            try:
                grad = head_array(msg.head_grad, self.replica.layout)
            except ProtocolError as e:
                return str(e)
            if not 1 <= msg.head_rows <= task.batch_size:
                return f"head_rows must be 1..{task.batch_size} (the task's batch)"
            if np.any(np.abs(grad) > MAX_HEAD_GRAD):
                return f"a head gradient entry beyond +-{MAX_HEAD_GRAD:g}"
            head = (msg.head_rows, grad)
        return Scored(msg.seeds, projected, loss, msg.n_tokens, msg.seconds, passes), head

    def _measure(self, peer: Peer, now: float, n_seeds: int, sent: float) -> None:
        """The identity's seconds per seed (EWMA of what the server saw), and a clean record."""
        st = self._standing(peer.who)
        sample = (now - sent) / max(1, n_seeds)
        st.seconds_per_seed = sample if st.seconds_per_seed is None else 0.5 * sample + 0.5 * st.seconds_per_seed
        st.strikes = 0
        if peer.work is not None:  # a late answer measured it while it holds a newer task: judge that one fairly
            peer.deadline = peer.task_sent + self._budget(peer.who, len(peer.work.seeds), None)

    # -- stepping -------------------------------------------------------- #

    def _end_round(self) -> None:
        rs = self.round
        assert rs is not None
        for peer in self.peers.values():  # anything still out is late from now on
            peer.work, peer.task = None, None
        self.round = None
        if not rs.results:
            log.warning("round %d got no results; it will be retried", rs.number)
            return
        head = self.strategy.head_step(rs.head)
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
            head_grad=b"" if head is None else np.ascontiguousarray(head, dtype="<f4").tobytes(),
        )
        sha = self.replica.apply_if_finite(update) if np.all(np.isfinite(step.coeffs)) else None
        if sha is None:
            self.refused_steps += 1
            log.error("round %d: the step would make the adapter or the optimizer state non-finite; refused, "
                      "the round will be retried", rs.number)
            return
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
            "expired": rs.expired,
            "evicted": sorted(self.evicted),
            "refused_steps": self.refused_steps,
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
        self.refused_steps = 0
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
        checkpoint.save(self.run_dir, self.replica, self.strategy.state_dict(), elapsed,
                        {"evicted": sorted(self.evicted)})
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
        return self._send_raw(peer.routing, msg, kind)

    def _send_raw(self, routing: bytes, msg: Message, kind: str = "control") -> int:
        """Never blocks: a peer whose queue is full (SNDHWM) loses the message."""
        assert self.sock is not None
        frames = msg.to_frames()
        self.sock.send_multipart([routing, *frames], copy=False)
        n = sum(len(f) for f in frames)
        if kind in self.traffic:
            self.traffic[kind] += n
        return n

    def _broadcast(self, msg: Message, kind: str = "control") -> None:
        assert self.sock is not None
        frames = msg.to_frames()  # encoded once and shared by every peer's queue (zero-copy)
        for peer in list(self.peers.values()):
            self.sock.send_multipart([peer.routing, *frames], copy=False)
        if kind in self.traffic:
            self.traffic[kind] += len(self.peers) * sum(len(f) for f in frames)

    def _on_frames(self, raw: list[zmq.Frame]) -> None:
        routing = raw[0].bytes
        peer = self.peers.get(routing)
        who = raw[1].get("User-Id") if self.opts.keys is not None and len(raw) > 1 else None
        if who is not None and who in self.evicted:
            return  # a connection opened before its key was barred: not a byte of reply
        nbytes = sum(len(f) for f in raw[1:])
        try:
            if len(raw) - 1 > MAX_FRAMES or nbytes > MAX_TOTAL:
                raise ProtocolError(f"{len(raw) - 1} frames of {nbytes} bytes; at most {MAX_FRAMES} "
                                    f"frames and {MAX_TOTAL} bytes in all")
            msg = Message.from_frames([f.bytes for f in raw[1:]])
        except ProtocolError as e:
            self.noise.warning(("frame", routing), "rejected frame from %s: %s", peer.label if peer else routing.hex(), e)
            self._send_raw(routing, Error(reason=str(e), code="frame"))
            return
        if isinstance(msg, Join):
            self._on_join(routing, who, msg)
            return
        if peer is None:
            self._send_raw(routing, Error(reason="unknown peer: send Join first", code="join"))
            return
        peer.last_seen = time.monotonic()
        if isinstance(msg, Result):
            self._on_result(peer, msg, nbytes)
        elif isinstance(msg, SnapshotRequest):
            self._send_snapshot(peer)
        elif isinstance(msg, Bye):
            log.info("client %s left: %s", peer.label, msg.reason)
            self._remove(peer, "bye")
        elif not isinstance(msg, Heartbeat):
            self._send(peer, Error(reason=f"unexpected {msg.TYPE} from a client", code="frame"), "control")

    def _on_join(self, routing: bytes, key_name: str | None, msg: Join) -> None:
        """Admit a connection under its identity (its key; the id it sends in
        plaintext).  One connection per identity: a second one waits ("busy")
        until the first is gone or has gone quiet, then takes over its task
        and deadline; an evicted identity is refused."""
        who = key_name if key_name is not None else msg.client_id
        if who in self.evicted:
            self._send_raw(routing, Refuse(reason="this client was evicted from the run"))
            return
        if msg.model_sha256 != self.config.model_sha256:
            reason = (
                f"base model sha256 {msg.model_sha256[:16]}... differs from the aggregator's "
                f"{self.config.model_sha256[:16]}... ({Path(self.config.model).name}); load the same GGUF"
            )
            self.noise.warning(("model", routing), "refused %s: %s", who, reason)
            self._send_raw(routing, Refuse(reason=reason))
            return
        now = time.monotonic()
        peer = self.peers.get(routing)
        if peer is not None and peer.who != who:  # a plaintext connection renaming itself: leave as the old name
            self._remove(peer, "renamed")
            peer = None
        old = self.by_who.get(who)
        if old is not None and old.routing != routing:
            if now - old.last_seen <= 2 * self.opts.heartbeat_s:
                self.noise.warning(("busy", who), "client %s: a second connection, refused while the first is alive", who)
                self._send_raw(routing, Error(reason="this identity is connected from another socket; retry",
                                              code="busy"))
                return
            # a reconnect: the new connection takes the old one's place, task and deadline included
            peer = replace(old, routing=routing, join=msg, last_seen=now)
            old.work = old.task = None
            self._remove(old, "replaced by a new connection")
            self.peers[routing] = self.by_who[who] = peer
            log.info("client %s reconnected", peer.label)
        elif peer is None:
            peer = Peer(routing, who, msg, now)
            if self.round is not None:
                peer.rank = self._rank(self.round.number, who)
            self.peers[routing] = self.by_who[who] = peer
            self._standing(who)
            log.info("client %s joined (%.0f tok/s, %d examples)", peer.label, msg.tokens_per_s, msg.n_examples)
        else:
            peer.join, peer.last_seen = msg, now
        self._send(peer, welcome(self.config, self.replica, self.opts.heartbeat_s), "control")
        if peer.task is not None:  # a reconnected worker may have lost its task
            self._send(peer, peer.task, "control")

    def _send_snapshot(self, peer: Peer) -> None:
        """At most one snapshot per identity and version, and none while the
        previous one is still queued in libzmq (a peer that does not read
        cannot pile them up).  A device that misses one asks again once it
        sees a newer version."""
        st = self._standing(peer.who)
        version = self.replica.version
        if st.snapshot is not None and st.snapshot.done:
            st.snapshot = None
        if st.snapshot_version == version or st.snapshot is not None:
            self.noise.warning(("snapshot", peer.who), "snapshot request from %s ignored (version %d already sent or in flight)",
                               peer.label, version)
            return
        if self.snapshot_cache is None or self.snapshot_cache[0] != version:
            self.snapshot_cache = (version, self.replica.to_bytes())
        snap = Snapshot(version=version, adapter_sha256=self.replica.sha, state=self.snapshot_cache[1])
        assert self.sock is not None
        frames = snap.to_frames()
        st.snapshot = self.sock.send_multipart([peer.routing, *frames], copy=False, track=True)
        st.snapshot_version = version
        self.traffic["snapshot"] += sum(len(f) for f in frames)

    def _remove(self, peer: Peer, why: str) -> None:
        """Forget a connection.  Under CURVE the identity's record (speed,
        strikes, last snapshot) stays: keys are few, the allow-list bounds
        them.  Plaintext ids are unbounded, so there a record outlives its
        connection only while it carries strikes or a snapshot in flight."""
        self.peers.pop(peer.routing, None)
        if self.by_who.get(peer.who) is peer:
            del self.by_who[peer.who]
            st = self.standing.get(peer.who)
            if (self.opts.keys is None and st is not None and not st.strikes
                    and (st.snapshot is None or st.snapshot.done)):
                del self.standing[peer.who]
        if self.round is not None and why != "replaced by a new connection":
            self.round.dropped.append(peer.who)
            if peer.who in self.round.by_id:
                self.strategy.drop(self._participant(peer), peer.work)
        peer.work = peer.task = None
