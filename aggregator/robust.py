"""Byzantine-robust aggregation of per-seed scalars, as a strategy wrapper.

Why a wrapper: every algorithm (ZO-SGD, the FwdLLM strategies) consumes the
same per-seed projections, and a client that sends garbage can poison any of
them.  :class:`Robust` sits between the loop and the real strategy and
changes only the scalars it forwards:

* **Clipping at a running quantile.**  The clip level is ``mult`` times a
  robust scale of recent ``|projection|`` values (a window over past rounds).
  The scale is taken per client first, then the median over clients, so a
  client counts once however many values it sent: the scale stays put while
  fewer than half of the *clients* lie, even when one of them sent most of
  the values.  A client's own scale is the median of its values by default
  (``quantile=0.5``; a 0.9 quantile would already follow 20 % of garbage
  values); ``scale="mom"`` uses a median-of-means instead (its values split
  into ``groups`` interleaved groups, the median of their means): smoother
  on heavy-tailed honest values.  Clients are identities (CURVE keys), so
  Sybil ids behind one key are one client.
* **Outlier tracking and quarantine.**  A result more than half of whose
  scalars exceed the clip level is discarded whole (clipping it would still
  inject clip-sized noise of random sign) and its client gets a strike; after
  ``strikes`` strikes the client is quarantined: it gets no more work and
  anything it still sends is ignored (the loop keeps it connected, so it
  learns nothing).

* **Audit on shared seeds** (``robust_audit=F``, off by default): a
  fraction ``F`` of every task's seeds is scored again, on its own batch, by
  another client once that one is idle.  Two honest clients agree in sign on
  a seed more often than not (both estimate ``g . v``); a client that sends
  ``-c`` times its true projections disagrees with everyone.  Per pair of
  clients the loop keeps (shared seeds, agreements) across rounds; a client
  whose sign-agreement z-score ``(2 agree - n) / sqrt(n)`` is below
  ``-audit_z`` with most of its partners (at least two, each with
  ``audit_pairs`` shared seeds) gets a strike each round.  Its power falls
  with the batch noise ``rho = sigma^2/|g|^2``: an honest pair agrees with
  probability ``1/2 + delta``, ``delta = arcsin(1/(1+rho))/pi``, a liar and
  an honest client with ``1/2 - delta``, so at ``audit_z = 3`` a liar shows
  after about ``(1.5/delta)^2`` shared seeds per partner: 9 at rho ~ 0,
  about 6,400 at SST-2's rho ~ 16 with 8-row batches (docs/security.md).
  Audit results feed only the verdict, never the step.
* **Head gradients** (``--head``) get the same treatment: a result whose
  head gradient's norm exceeds ``mult`` times the robust scale of recent
  norms (per client, then the median over clients) is left out of the
  round's mean and its client gets a strike.

Resume stays bit-identical: the clip level of a round is fixed when the
round begins (from the window), the window is updated in a canonical order
(client id, then seed order) at ``step()``, and all of it is in
``state_dict()``.  Until the window holds ``min_history`` values there is no
trustworthy scale yet, so those first rounds are buffered and clipped at
``step()`` with a scale taken over the whole round (order independent; the
inner strategy then cannot pace within that round).

Enabled with ``--strategy-opt robust=clip`` (or ``robust=mom``) plus optional
``robust_quantile``, ``robust_mult``, ``robust_window``, ``robust_groups``,
``robust_strikes``, ``robust_min_history``, ``robust_audit``, ``robust_audit_z``,
``robust_audit_pairs``; these keys are removed from
``spec.extra`` before the inner strategy sees it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

from fwdllm.aggregator.strategy import ClientView, RoundConfig, Scored, Step, Strategy, Work
from fwdllm.core.seeds import derive_seed

log = logging.getLogger("fwdllm.aggregator.robust")

PREFIX = "robust"
SCALES = ("quantile", "mom")


@dataclass(frozen=True)
class RobustOptions:
    scale: str = "quantile"  # "quantile" or "mom" (median of means)
    quantile: float = 0.5
    mult: float = 5.0
    window: int = 512
    groups: int = 5
    strikes: int = 3
    min_history: int = 16
    audit: float = 0.0  # fraction of each task's seeds scored again by another client (0 = off)
    audit_z: float = 3.0  # sign-agreement z below which a partner counts as disagreeing
    audit_pairs: int = 9  # shared seeds with a partner before that partner's verdict counts

    @classmethod
    def split(cls, extra: dict[str, Any]) -> tuple["RobustOptions | None", dict[str, Any]]:
        """(options or None when off, the rest of ``extra`` for the inner strategy)."""
        mine = {k: v for k, v in extra.items() if k == PREFIX or k.startswith(PREFIX + "_")}
        rest = {k: v for k, v in extra.items() if k not in mine}
        mode = mine.pop(PREFIX, None)
        if mode in (None, False, "off"):
            if mine:
                raise ValueError(f"{sorted(mine)} given without robust=clip|mom")
            return None, rest
        if mode not in ("clip", *SCALES):
            raise ValueError(f"robust={mode!r}: choose clip (quantile scale) or mom (median-of-means scale)")
        known = {f.name for f in fields(cls)}
        kw = {k[len(PREFIX) + 1:]: v for k, v in mine.items()}
        unknown = sorted(set(kw) - known)
        if unknown:
            raise ValueError(f"unknown robust option(s) {unknown}; known: {', '.join(sorted(known))}")
        opts = cls(**{"scale": "mom" if mode == "mom" else "quantile", **kw})
        if not (0 < opts.quantile < 1 and opts.mult > 0 and opts.window >= 1 and opts.groups >= 1
                and opts.strikes >= 1 and opts.min_history >= 1 and opts.scale in SCALES
                and 0 <= opts.audit <= 1 and opts.audit_z > 0 and opts.audit_pairs >= 1):
            raise ValueError(f"bad robust options {opts}")
        return opts, rest


def robust_scale(values: np.ndarray, opts: RobustOptions) -> float:
    """The typical ``|projection|``: a quantile, or a median of interleaved group means."""
    if opts.scale == "mom":
        g = max(1, min(opts.groups, len(values)))
        return float(np.median([values[i::g].mean() for i in range(g)]))
    return float(np.quantile(values, opts.quantile))


def client_scale(pairs: list[tuple[str, float]], opts: RobustOptions) -> float:
    """The median over clients of each client's :func:`robust_scale`; 0.0 when empty.

    One client counts once, however many values it contributed, so the scale
    cannot follow a majority of values that comes from a minority of clients."""
    by_client: dict[str, list[float]] = {}
    for client, v in pairs:
        by_client.setdefault(client, []).append(v)
    if not by_client:
        return 0.0
    return float(np.median([robust_scale(np.array(by_client[c]), opts) for c in sorted(by_client)]))


class Audit:
    """The audit of ``robust_audit`` (module docstring): who re-scores what,
    and the running sign agreement of every pair of clients."""

    def __init__(self, fraction: float, z: float, min_pairs: int) -> None:
        self.fraction, self.z, self.min_pairs = fraction, z, min_pairs
        self.pairs: dict[tuple[str, str], list[int]] = {}  # (a, b), a < b -> [shared seeds, sign agreements]
        self._queue: list[tuple[ClientView, tuple[int, ...]]] = []  # (owner, seeds) waiting for an auditor
        self._out: dict[tuple[str, tuple[int, ...]], str] = {}  # (auditor, seeds) -> owner
        self._values: dict[int, dict[str, float]] = {}  # audited seed -> client -> projection
        self._round, self._n = 0, 1

    def begin(self, round: int, n_clients: int) -> None:
        self._round, self._n, self._queue, self._out, self._values = round, n_clients, [], {}, {}

    def owned(self, client: ClientView, work: Work) -> None:
        """``client`` got ``work``: queue the first ``fraction`` of its seeds for someone else."""
        n = math.ceil(self.fraction * len(work.seeds))
        if n:
            self._queue.append((client, work.seeds[:n]))
            self._values.update({s: {} for s in work.seeds[:n]})

    def pending(self) -> bool:
        return bool(self._queue)

    def work_for(self, client: ClientView, spec: Any) -> Work | None:
        """An audit task for an idle ``client``: seeds of someone else's task,
        on its own batch.  Preferably of the client ``shift`` slots before it,
        ``shift`` turning every round, so every client meets every other."""
        if not self._queue:
            return None
        shift = 1 + (self._round - 1) % max(1, self._n - 1)
        wanted = (client.slot - shift) % max(1, self._n)
        mine = [i for i, (o, _) in enumerate(self._queue) if o.slot == wanted and o.client_id != client.client_id]
        others = [i for i, (o, _) in enumerate(self._queue) if o.client_id != client.client_id]
        for i in mine[:1] or others[:1]:
            owner, seeds = self._queue.pop(i)
            self._out[(client.client_id, seeds)] = owner
            bs = min(spec.batch_size, client.max_batch) if client.max_batch > 0 else spec.batch_size
            return Work(seeds, bs, derive_seed(spec.run_seed, "audit", self._round, client.client_id, seeds[0]))
        return None

    def is_audit(self, client: str, work: Work) -> bool:
        return (client, work.seeds) in self._out

    def dropped(self, client: str, work: Work | None) -> None:
        """An auditor left or missed its deadline: the seeds wait for another."""
        if work is not None and (client, work.seeds) in self._out:
            self._queue.append((self._out.pop((client, work.seeds)), work.seeds))  # someone else audits it

    def record(self, client: str, seeds: np.ndarray, projected: np.ndarray) -> None:
        """A scored seed that is being audited: pair it with the other client's value once both are in."""
        for seed, p in zip(seeds.tolist(), projected.tolist()):
            seen = self._values.get(int(seed))
            if seen is None or client in seen:
                continue
            for other, q in seen.items():
                key = (client, other) if client < other else (other, client)
                tally = self.pairs.setdefault(key, [0, 0])
                tally[0] += 1
                tally[1] += (p > 0) == (q > 0)
            seen[client] = p

    def disagreeing(self) -> list[str]:
        """Clients whose sign agreement is significantly negative with most of
        their partners (at least two partners with enough shared seeds)."""
        verdicts: dict[str, list[bool]] = {}
        for (a, b), (n, agree) in self.pairs.items():
            if n >= self.min_pairs:
                bad = (2 * agree - n) / math.sqrt(n) < -self.z
                verdicts.setdefault(a, []).append(bad)
                verdicts.setdefault(b, []).append(bad)
        return sorted(c for c, v in verdicts.items() if len(v) >= 2 and 2 * sum(v) > len(v))


class Robust(Strategy):
    """Clip, track and quarantine around ``inner`` (see the module docstring)."""

    def __init__(self, inner: Strategy, opts: RobustOptions) -> None:
        super().__init__(inner.spec)
        self.name = inner.name
        self.inner = inner
        self.opts = opts
        self.history: list[tuple[str, float]] = []  # (client, clipped |projection|) of past rounds, oldest first
        self.head_history: list[tuple[str, float]] = []  # (client, head gradient norm) of past rounds
        self.strikes: dict[str, int] = {}
        self.quarantined: set[str] = set()
        self._views: dict[str, ClientView] = {}
        self._limit: float | None = None
        self._buffer: list[tuple[ClientView, Work, Scored]] = []
        self._seen: dict[str, list[float]] = {}  # client -> raw |projection| this round
        self._struck: set[str] = set()  # clients with a discarded result this round
        self.audit = Audit(opts.audit, opts.audit_z, opts.audit_pairs) if opts.audit else None

    # -- the round ------------------------------------------------------- #

    def begin(self, round: int, participants: list[ClientView]) -> RoundConfig:
        active = [p for p in participants if p.client_id not in self.quarantined]
        self._views = {p.client_id: replace(p, slot=i) for i, p in enumerate(active)}
        self._limit = self._level(self.history) if len(self.history) >= self.opts.min_history else None
        self._buffer, self._seen, self._struck = [], {}, set()
        if self.audit is not None:
            self.audit.begin(round, len(self._views))
        return self.inner.begin(round, list(self._views.values()))

    def _view(self, client: ClientView) -> ClientView:
        return self._views.get(client.client_id, client)

    def next_work(self, client: ClientView) -> Work | None:
        if client.client_id in self.quarantined:
            return None
        work = self.inner.next_work(self._view(client))
        if self.audit is not None:
            if work is not None:
                self.audit.owned(self._view(client), work)
            else:
                work = self.audit.work_for(self._view(client), self.spec)
        return work

    def add(self, client: ClientView, work: Work, scored: Scored) -> None:
        if client.client_id in self.quarantined:
            return
        if self.audit is not None:
            self.audit.record(client.client_id, scored.seeds, scored.projected)
            if self.audit.is_audit(client.client_id, work):
                return  # an audit answer feeds the verdict only
        self._seen.setdefault(client.client_id, []).extend(np.abs(scored.projected).tolist())
        if self._limit is None:
            self._buffer.append((client, work, scored))
        else:
            self._forward(client, work, scored, self._limit)

    def drop(self, client: ClientView, work: Work | None) -> None:
        if self.audit is not None and work is not None and self.audit.is_audit(client.client_id, work):
            self.audit.dropped(client.client_id, work)
            return
        self.inner.drop(self._view(client), work)

    def ready(self) -> bool:
        return self.inner.ready()

    def has_work(self) -> bool:
        return self.inner.has_work() or (self.audit is not None and self.audit.pending())

    def step(self) -> Step:
        limit = self._limit
        if limit is None:  # warm-up: one scale over the whole round, then replay in canonical order
            raw = [(c, v) for c in sorted(self._seen) for v in self._seen[c]]
            limit = self._level(self.history + raw)
            for client, work, scored in sorted(self._buffer, key=lambda b: b[0].client_id):
                self._forward(client, work, scored, limit)
        disagreeing = [] if self.audit is None else self.audit.disagreeing()
        self._struck.update(c for c in disagreeing if c in self._views)
        clipped, newly = self._judge(limit)
        step = self.inner.step()
        step.info.update({
            "robust_limit": limit if np.isfinite(limit) else None,
            "robust_outliers": clipped,
            "quarantined": sorted(self.quarantined),
            **({"newly_quarantined": newly} if newly else {}),
            **({"audit_disagreeing": disagreeing} if self.audit is not None else {}),
        })
        return step

    def committed(self, round: int, step: Step) -> None:
        self.inner.committed(round, step)

    # -- scale, clipping, strikes ---------------------------------------- #

    def _level(self, pairs: list[tuple[str, float]]) -> float:
        """The clip level; +inf (no clipping) while there is no non-zero scale."""
        scale = client_scale(pairs, self.opts)
        return self.opts.mult * scale if scale > 0 else float("inf")

    def head_step(self, heads: dict[tuple, tuple[int, np.ndarray]]) -> np.ndarray | None:
        """The mean of the round's head gradients whose norm is within the
        level (``mult`` x the clients' robust scale of recent norms; this
        round's own while the window is short); the others strike their client."""
        keys = sorted(heads)
        norms = [(k[0], float(np.linalg.norm(heads[k][1].astype(np.float64)))) for k in keys]
        window = self.head_history if len(self.head_history) >= self.opts.min_history else self.head_history + norms
        limit = self._level(window)
        kept = {}
        for k, (client, norm) in zip(keys, norms):
            if norm > limit:
                self._struck.add(client)
            else:
                kept[k] = heads[k]
        self.head_history = (self.head_history + [(c, min(n, limit)) for c, n in norms])[-self.opts.window:]
        return self.inner.head_step(kept)

    def _forward(self, client: ClientView, work: Work, scored: Scored, limit: float) -> None:
        """Hand the inner strategy the clipped result, or nothing if it is mostly outliers."""
        if 2 * int(np.sum(np.abs(scored.projected) > limit)) > len(scored.projected):
            self._struck.add(client.client_id)
            return
        self.inner.add(self._view(client), work, replace(scored, projected=np.clip(scored.projected, -limit, limit)))

    def _judge(self, limit: float) -> tuple[int, list[str]]:
        """Strike clients that sent a mostly-outlier result; grow the window."""
        clipped, newly = 0, []
        for client in sorted(set(self._seen) | self._struck):
            values = np.array(self._seen.get(client, []), dtype=np.float64)
            clipped += int(np.sum(values > limit))
            if client in self._struck:
                self.strikes[client] = self.strikes.get(client, 0) + 1
                if self.strikes[client] >= self.opts.strikes and client not in self.quarantined:
                    self.quarantined.add(client)
                    newly.append(client)
                    log.warning("client %s quarantined: its results were outliers (or disagreed with the "
                                "others' on shared seeds) in %d rounds", client, self.strikes[client])
            self.history.extend((client, v) for v in np.minimum(values, limit).tolist())
        self.history = self.history[-self.opts.window:]
        return clipped, newly

    # -- persistence ----------------------------------------------------- #

    def state_dict(self) -> dict[str, Any]:
        return {
            "inner": self.inner.state_dict(),
            "robust": {"history": [list(p) for p in self.history], "head_history": [list(p) for p in self.head_history],
                       "strikes": self.strikes, "quarantined": sorted(self.quarantined),
                       "audit": [] if self.audit is None else [[a, b, *t] for (a, b), t in sorted(self.audit.pairs.items())]},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state.get("inner", {}))
        mine = state.get("robust", {})
        self.history = [_pair(v) for v in mine.get("history", [])]
        self.head_history = [_pair(v) for v in mine.get("head_history", [])]
        self.strikes = {str(k): int(v) for k, v in mine.get("strikes", {}).items()}
        self.quarantined = set(mine.get("quarantined", []))
        if self.audit is not None:
            self.audit.pairs = {(str(a), str(b)): [int(n), int(agree)] for a, b, n, agree in mine.get("audit", [])}


def _pair(v: Any) -> tuple[str, float]:
    """A window entry; runs saved before per-client scales kept bare values (one anonymous client)."""
    return (str(v[0]), float(v[1])) if isinstance(v, list) else ("", float(v))
