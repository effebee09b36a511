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
``robust_strikes``, ``robust_min_history``; these keys are removed from
``spec.extra`` before the inner strategy sees it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

from fwdllm.aggregator.strategy import ClientView, RoundConfig, Scored, Step, Strategy, Work

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
                and opts.strikes >= 1 and opts.min_history >= 1 and opts.scale in SCALES):
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

    # -- the round ------------------------------------------------------- #

    def begin(self, round: int, participants: list[ClientView]) -> RoundConfig:
        active = [p for p in participants if p.client_id not in self.quarantined]
        self._views = {p.client_id: replace(p, slot=i) for i, p in enumerate(active)}
        self._limit = self._level(self.history) if len(self.history) >= self.opts.min_history else None
        self._buffer, self._seen, self._struck = [], {}, set()
        return self.inner.begin(round, list(self._views.values()))

    def _view(self, client: ClientView) -> ClientView:
        return self._views.get(client.client_id, client)

    def next_work(self, client: ClientView) -> Work | None:
        if client.client_id in self.quarantined:
            return None
        return self.inner.next_work(self._view(client))

    def add(self, client: ClientView, work: Work, scored: Scored) -> None:
        if client.client_id in self.quarantined:
            return
        self._seen.setdefault(client.client_id, []).extend(np.abs(scored.projected).tolist())
        if self._limit is None:
            self._buffer.append((client, work, scored))
        else:
            self._forward(client, work, scored, self._limit)

    def drop(self, client: ClientView, work: Work | None) -> None:
        self.inner.drop(self._view(client), work)

    def ready(self) -> bool:
        return self.inner.ready()

    def has_work(self) -> bool:
        return self.inner.has_work()

    def step(self) -> Step:
        limit = self._limit
        if limit is None:  # warm-up: one scale over the whole round, then replay in canonical order
            raw = [(c, v) for c in sorted(self._seen) for v in self._seen[c]]
            limit = self._level(self.history + raw)
            for client, work, scored in sorted(self._buffer, key=lambda b: b[0].client_id):
                self._forward(client, work, scored, limit)
        clipped, newly = self._judge(limit)
        step = self.inner.step()
        step.info.update({
            "robust_limit": limit if np.isfinite(limit) else None,
            "robust_outliers": clipped,
            "quarantined": sorted(self.quarantined),
            **({"newly_quarantined": newly} if newly else {}),
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
                    log.warning("client %s quarantined: its results were outliers in %d rounds",
                                client, self.strikes[client])
            self.history.extend((client, v) for v in np.minimum(values, limit).tolist())
        self.history = self.history[-self.opts.window:]
        return clipped, newly

    # -- persistence ----------------------------------------------------- #

    def state_dict(self) -> dict[str, Any]:
        return {
            "inner": self.inner.state_dict(),
            "robust": {"history": [list(p) for p in self.history], "head_history": [list(p) for p in self.head_history],
                       "strikes": self.strikes, "quarantined": sorted(self.quarantined)},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state.get("inner", {}))
        mine = state.get("robust", {})
        self.history = [_pair(v) for v in mine.get("history", [])]
        self.head_history = [_pair(v) for v in mine.get("head_history", [])]
        self.strikes = {str(k): int(v) for k, v in mine.get("strikes", {}).items()}
        self.quarantined = set(mine.get("quarantined", []))


def _pair(v: Any) -> tuple[str, float]:
    """A window entry; runs saved before per-client scales kept bare values (one anonymous client)."""
    return (str(v[0]), float(v[1])) if isinstance(v, list) else ("", float(v))
