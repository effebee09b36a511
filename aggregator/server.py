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
           at the round deadline.  A summed round (``--secagg``,
           ``--dp-epsilon``; :mod:`fwdllm.aggregator.secure`) ends when its
           sum is complete or has failed: every participant scores the same
           seeds, the secure-aggregation stages travel as ``SecAgg``
           messages, and a participant that drops or misses a deadline
           leaves the sum, which goes on without it
    STEP   coefficients -> Update -> applied to the server's replica
           (refused, and the round retried, if it would not be finite)
    EVAL   (every ``eval_every`` rounds, in a thread) dev loss / accuracy
    COMMIT metrics line, checkpoint, then broadcast the Update

Who a peer is (docs/security.md): under CURVE its identity is its key - the
name the ZAP handler gave it, read from each message's ``User-Id`` - and the
``client_id`` it sends is a label for logs only.  One connection per
identity; strikes, quarantine and eviction attach to the identity.  In
plaintext (local simulation) the identity is the ``client_id``.

A device that is behind catches up by replaying the update history
(protocol v2, :mod:`fwdllm.core.history`) or by snapshot, whichever the
cost model finds cheaper.

Every peer costs bounded memory: a low send high-water mark that drops
rather than queues, large frames shared (not copied) between peers, at most
one replay and one snapshot per identity per version and one catch-up in
flight at a time, a limit on a whole inbound message (``SecAgg`` stages
included; each stage is accepted once per participant and round), and
connections that stop reading are cut by TCP (``TCP_MAXRT``).  Nothing a peer sends can raise out of the loop, and
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
from fwdllm.aggregator.privacy import Ledger
from fwdllm.aggregator.secure import AggregateRound
from fwdllm.aggregator.strategy import ClientView, RoundConfig, Scored, Strategy, Work
from fwdllm.core import compress, contribution
from fwdllm.core.errors import UserError
from fwdllm.core.history import History, catch_up_plan
from fwdllm.core.protocol import (
    MAX_HEADER_BYTES,
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


def _passes(task: Task) -> int:
    """Forward passes a task costs its device."""
    return len(task.seeds) + 1 if task.one_sided else 2 * len(task.seeds)


def _check_counters(task: Task, n_tokens: Any, seconds: Any) -> str | None:
    """Why an answer's counters cannot be what ``task`` cost, or None."""
    passes = _passes(task)
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or not 0 <= n_tokens <= passes * task.batch_size * MAX_TOKENS_PER_ROW:
        return f"n_tokens {n_tokens} is not what {passes} passes of {task.batch_size} rows can cost"
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds <= MAX_SECONDS:
        return f"seconds {seconds} out of range"
    return None


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
    replay_version: int = -1  # the last version it was sent a replay to
    #: the last catch-up reply (snapshot or replay), until libzmq lets go of it
    snapshot: zmq.MessageTracker | None = None


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
        self.traffic = {"heartbeat": 0, "snapshot": 0, "replay": 0, "secagg": 0, "control": 0}
        self.session_id = uuid.uuid4().hex[:8]
        self.sock: zmq.Socket | None = None
        self.auth: security.KeyedAuthenticator | None = None
        self.noise = Throttle(log)  # warnings a peer can provoke at will
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
            # a device still holding an expired task gets no work until it answers: a round
            # begun with only such devices would end empty at once, again and again
            if len(self.peers) >= need and any(p.expired is None for p in self.peers.values()):
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
        if self.ledger is not None and self._budget_spent(views):
            return
        cfg = self.strategy.begin(number, views)
        self.round = RoundState(number=number, config=cfg, participants=views, started=now,
                                by_id={v.client_id: v for v in views})
        if self.config.secagg or self.config.dp_spec:
            # summed: only identities that can take work now are in the sum's
            # roster (one still silent on an expired task would stall its stages)
            self.agg = self._aggregate_round(number, [self._view(p, i) for i, p in enumerate(peers)
                                                       if p.expired is None])
        self.first_round = False
        log.info("round %d/%d: %d clients", number, self.config.rounds, len(views))
        self._dispatch()

    def _dispatch(self) -> None:
        """Give work to idle peers; end the round when nothing is left."""
        rs = self.round
        assert rs is not None
        if self.agg is not None and (self.agg.done or self.agg.failed):
            self._end_round()
            return
        # quorum < 1 cuts stragglers off; at 1 the strategy alone decides (it
        # may hand a client more work after its first result)
        quorum = self.opts.quorum < 1 and len(rs.bytes_up) >= math.ceil(self.opts.quorum * len(rs.participants))
        if rs.results and (self.strategy.ready() or quorum) and self.agg is None:  # a sum ends when it is complete
            self._end_round()
            return
        if self.strategy.has_work():
            for peer in sorted(self.peers.values(), key=lambda p: (p.rank, p.who)):
                if peer.work is not None:
                    continue
                if peer.expired is not None or peer.benched == rs.number:  # no work for it now: its share goes
                    if peer.who in rs.by_id and peer.who not in rs.released:
                        rs.released.add(peer.who)
                        self._drop_participant(peer, None)
                    continue
                if self.agg is not None and not self.agg.is_live(peer.who):
                    continue  # not in this round's sum (joined after it began, or dropped out of it)
                work = self.strategy.next_work(self._participant(peer))
                if work is not None:
                    self._assign(peer, work)
        if self.round is not None and not any(p.work is not None for p in self.peers.values()):
            if self.agg is None:
                self._end_round()
            elif not self.agg.live:  # nobody is left to finish the sum's stages
                self._route(self.agg.fail("no participant left"))

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
            **(self.agg.task_fields(peer.who) if self.agg else {}),
        )
        if self.agg is not None:
            self.agg.seeds = work.seeds  # a shared plan: every participant scores the same seeds
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
        self._reveal_deadline(now)
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

    def _reveal_deadline(self, now: float) -> None:
        """A secure sum's last stage (reveal) has no task to time: survivors
        that have not revealed ``deadline_floor_s x deadline_slack`` after the
        request leave the sum (which goes on with the others) with a strike."""
        agg = self.agg
        waiting = agg.awaiting() if agg is not None else []
        if not waiting:
            return
        assert agg is not None
        if agg.reveal_deadline is None:
            agg.reveal_deadline = now + self.opts.deadline_floor_s * self.opts.deadline_slack
        elif now > agg.reveal_deadline:
            for who in waiting:
                peer = self.by_who.get(who)
                if peer is not None:
                    self._drop_participant(peer, None)
                    self._strike(peer, "did not reveal its shares of the secure sum in time")

    def _take_back(self, peer: Peer, why: str) -> None:
        """The peer's task goes to others in this round, and its identity gets
        a strike (a deadline missed, or a result refused)."""
        rs = self.round
        assert rs is not None and peer.work is not None
        work, peer.benched = peer.work, rs.number
        peer.work, peer.task = None, None
        rs.expired.append(peer.who)
        self._drop_participant(peer, work)
        self._strike(peer, f"{why}; its seeds go to others")

    def _drop_participant(self, peer: Peer, work: Work | None) -> None:
        """``peer`` will not score ``work`` (nor, in a summed round, be in the sum)."""
        self.strategy.drop(self._participant(peer), work)
        if self.agg is not None and self.agg.is_live(peer.who):
            self._route(self.agg.drop(peer.who))

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
        if self.agg is not None:  # --dp-epsilon without --secagg: the device's clipped, noised sums
            agg, sums = self.agg, np.asarray(msg.sums, dtype=np.float64)
            if not (np.all(np.isfinite(sums)) and np.all(np.abs(sums) <= MAX_LOSS)):
                self._refuse(peer, f"sums must be finite and within +-{MAX_LOSS:g}")
            else:
                self._on_contribution(peer, task, lambda: agg.on_sums(peer.who, sums, {}), 0, nbytes)
            return
        checked = self._check_result(msg, task)
        if isinstance(checked, str):
            self._refuse(peer, checked)
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

    def _refuse(self, peer: Peer, why: str) -> None:
        """Refuse the peer's answer to its task: it is told, its work goes to
        others (a summed round goes on without it) and it gets a strike."""
        self._send(peer, Error(reason=f"result: {why}", code="result"), "control")
        self._take_back(peer, f"sent a result that was refused: {why}")
        if self.round is not None:
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
        bad = _check_counters(task, msg.n_tokens, msg.seconds)
        if bad:
            return bad
        head = None
        if self.replica.layout.head is not None:
            try:
                grad = head_array(msg.head_grad, self.replica.layout, msg.head_codec)
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
        for peer in self.peers.values():  # anything still out is late from now on; a retried round deals anew
            peer.work, peer.task, peer.benched = None, None, 0
        self.round = None
        agg, self.agg = self.agg, None
        if agg is not None:
            if not agg.done:
                log.warning("round %d: the sum was not complete (stage %s); it will be retried", rs.number, agg.stage)
                return
            head = self._add_aggregate(rs, agg)
        elif not rs.results:
            log.warning("round %d got no results; it will be retried", rs.number)
            return
        else:
            head = self.strategy.head_step(rs.head)
        head_raw, residual = b"", self.head_residual
        if head is not None:
            # every replica applies the decoded bytes; the server carries the rounding error
            head_raw, residual = compress.encode(head, self.config.head_codec, self.head_residual)
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
        sha = self.replica.apply_if_finite(update) if np.all(np.isfinite(step.coeffs)) else None
        if sha is None:
            self.refused_steps += 1
            log.error("round %d: the step would make the adapter or the optimizer state non-finite; refused, "
                      "the round will be retried", rs.number)
            return
        self.head_residual = residual
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
        if agg is not None:
            record["clients"] = len(agg.contributors)  # in the sum (a dropout may have sent keys and shares)
            record["secagg_bytes_per_client"] = agg.sa_bytes // max(1, len(agg.index)) if agg.server else None
            if self.ledger is not None:
                record["dp_epsilon_spent"] = self.ledger.record(agg.sampling_rate)
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
                        {"evicted": sorted(self.evicted), "dp": self.ledger.state_dict() if self.ledger else None},
                        self.history, self.head_residual)
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
        elif isinstance(msg, CatchUp):
            self._catch_up(peer, msg)
        elif isinstance(msg, SecAgg):
            self._on_secagg(peer, msg, nbytes)
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
        """At most one snapshot per identity and version (see
        :meth:`_in_flight`).  A device that misses one asks again once it
        sees a newer version."""
        st = self._standing(peer.who)
        version = self.replica.version
        if st.snapshot_version == version:
            self.noise.warning(("snapshot", peer.who), "snapshot request from %s ignored (version %d already sent)",
                               peer.label, version)
            return
        if self._in_flight(st, peer, "snapshot"):
            return
        snap = Snapshot(version=version, adapter_sha256=self.replica.sha, state=self._snapshot_bytes())
        self._send_tracked(peer, st, snap, "snapshot")
        st.snapshot_version = version

    def _catch_up(self, peer: Peer, msg: CatchUp) -> None:
        """Replay the history from the device's version, or snapshot when that
        is cheaper or the device is not on our history.  One replay per
        identity and version: a device that asks again at the same version
        failed its replay and gets the snapshot (once)."""
        st = self._standing(peer.who)
        version = self.replica.version
        if st.replay_version == version:
            self._send_snapshot(peer)
            return
        if self._in_flight(st, peer, "catch-up"):
            return
        st.replay_version = version  # decided once per version, whatever the plan: a flood costs one plan
        rate = peer.join.replay_entries_per_s
        plan = catch_up_plan(self.history, self.replica.layout, msg.version, msg.adapter_sha256,
                             len(self._snapshot_bytes()), **({"replay_entries_per_s": rate} if rate > 0 else {}))
        log.info("client %s at version %d: %s (replay %d B, ~%.2f s; snapshot %d B, ~%.2f s)", peer.label,
                 msg.version, plan.how, plan.replay_bytes, plan.replay_s, plan.snapshot_bytes, plan.snapshot_s)
        if plan.how == "snapshot":
            self._send_snapshot(peer)
            return
        blob = self.history.encode(msg.version, all_shas=False)
        self._send_tracked(peer, st, Replay(version=version, adapter_sha256=self.replica.sha, history=blob), "replay")

    def _in_flight(self, st: Standing, peer: Peer, what: str) -> bool:
        """Whether the identity's last catch-up (snapshot or replay) is still
        queued in libzmq: then nothing more is sent, so a peer that does not
        read cannot pile catch-ups up (warned, rate-limited)."""
        if st.snapshot is not None and st.snapshot.done:
            st.snapshot = None
        if st.snapshot is None:
            return False
        self.noise.warning((what, peer.who), "%s request from %s ignored (one still in flight)", what, peer.label)
        return True

    def _snapshot_bytes(self) -> bytes:
        """The current version's snapshot, serialised once per version."""
        if self.snapshot_cache is None or self.snapshot_cache[0] != self.replica.version:
            self.snapshot_cache = (self.replica.version, self.replica.to_bytes())
        return self.snapshot_cache[1]

    def _send_tracked(self, peer: Peer, st: Standing, msg: Message, kind: str) -> None:
        """Send a catch-up zero-copy and keep its tracker until libzmq lets go."""
        assert self.sock is not None
        frames = msg.to_frames()
        st.snapshot = self.sock.send_multipart([peer.routing, *frames], copy=False, track=True)
        self.traffic[kind] += sum(len(f) for f in frames)

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
                self._drop_participant(peer, peer.work)
        peer.work = peer.task = None

    # ------------------------------------------------------------------ #
    # summed rounds (--secagg, --dp-epsilon)
    # ------------------------------------------------------------------ #

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
        """The sum of round ``number`` over ``views`` (identities: a key is one
        participant however it connects)."""
        shape = contribution.Shape(self.strategy.spec.k, self.replica.layout.head, self.config.dp_spec is not None)
        bs = self.strategy.spec.batch_size
        batch = {v.client_id: min(bs, v.max_batch) if v.max_batch > 0 else bs for v in views}
        return AggregateRound(
            number, [v.client_id for v in views], shape, self.config.secagg_options,
            self.ledger.spec if self.ledger else None,
            rates={v.client_id: min(1.0, batch[v.client_id] / max(1, v.n_examples)) for v in views},
            batch_sizes=batch)

    def _route(self, out: list[tuple[str, SecAgg]]) -> None:
        """Send the sum's stage messages to the identities they are for (the
        round ends at the next :meth:`_dispatch` once the sum is done or failed)."""
        for who, m in out:
            peer = self.by_who.get(who)
            if peer is not None:
                self._send(peer, m, "secagg")

    def _on_contribution(self, peer: Peer, task: Task, feed: Callable[[], list], n_tokens: int,
                         nbytes: int) -> None:
        """A participant's share of a summed round is in: its clipped DP sums,
        or its masked vector (``feed`` hands it to the sum).  Refused like a
        bad result when the sum's state machine rejects it."""
        rs = self.round
        assert rs is not None
        try:
            out = feed()
        except ValueError as e:  # SecAggError is one: this peer's input, never the loop's
            self._refuse(peer, str(e))
            return
        self._measure(peer, time.monotonic(), len(task.seeds), peer.task_sent)
        peer.work, peer.task = None, None
        rs.results += 1
        rs.forward_passes += _passes(task)
        rs.n_tokens += n_tokens
        rs.bytes_up[peer.who] = rs.bytes_up.get(peer.who, 0) + nbytes
        self._route(out)

    def _on_secagg(self, peer: Peer, msg: SecAgg, nbytes: int) -> None:
        """A stage of the secure sum from ``peer``.  Only identities in the
        round's sum, and not dropped from it, are heard; a masked vector must
        answer the task the peer holds, and its clear counters are checked
        like a result's."""
        rs, agg = self.round, self.agg
        if msg.stage == "masked" and peer.expired is not None and msg.round == peer.expired.round:
            self._measure(peer, time.monotonic(), len(peer.expired.seeds), peer.expired_sent)  # late, not silent
            peer.expired = None
            self.noise.warning(("late", peer.who), "late masked vector for round %d from %s ignored (the sum went "
                               "on without it)", msg.round, peer.label)
            return
        if rs is None or agg is None or msg.round != rs.number or not agg.is_live(peer.who):
            self.noise.warning(("late", peer.who), "late/unexpected secagg %s for round %d from %s ignored",
                               msg.stage, msg.round, peer.label)
            return
        if msg.stage == "masked":
            task = peer.task
            if task is None or peer.work is None or task.round != msg.round:
                self.noise.warning(("late", peer.who), "masked vector from %s without its task ignored", peer.label)
                return
            tokens, seconds = msg.meta.get("n_tokens", 0), msg.meta.get("seconds", 0.0)
            bad = _check_counters(task, tokens, seconds)
            if bad:
                self._refuse(peer, bad)
                return
            self._on_contribution(peer, task, lambda: agg.on_secagg(peer.who, msg), tokens, nbytes)
            return
        rs.bytes_up[peer.who] = rs.bytes_up.get(peer.who, 0) + nbytes
        try:
            out = agg.on_secagg(peer.who, msg)
        except ValueError as e:  # a stage out of turn or malformed: the sum goes on without this peer
            self._send(peer, Error(reason=f"secagg: {e}", code="result"), "control")
            if peer.work is not None:
                self._take_back(peer, f"broke the secure sum: {e}")
            else:
                self._drop_participant(peer, None)
                self._strike(peer, f"broke the secure sum: {e}")
            return
        self._route(out)

    def _add_aggregate(self, rs: RoundState, agg: AggregateRound) -> np.ndarray | None:
        """Hand the round's sum to the strategy as one result; the mean head
        gradient (None without a head)."""
        proj, loss, head = agg.result()
        seeds = np.array(agg.seeds, dtype=np.uint32)
        if not math.isnan(loss):
            rs.losses.append(loss)
        view = ClientView("sum", -1, 0.0, 0, 0)
        work = Work(seeds=tuple(int(s) for s in seeds), batch_size=0, batch_seed=0)
        self.strategy.add(view, work, Scored(seeds, proj, loss, rs.n_tokens, 0.0, rs.forward_passes))
        return head

