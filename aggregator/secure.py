"""Rounds whose server sees only a sum: ``--secagg`` and/or ``--dp-epsilon``.

The server loop hands such a round to an :class:`AggregateRound`: it gives
every participant its place and settings (``Task.secagg`` / ``Task.dp``),
routes the secure-aggregation stages (:mod:`fwdllm.core.secagg`) or collects
the clear DP sums, and, once the sum is known, turns it into the one
:class:`~fwdllm.aggregator.strategy.Scored` the strategy steps on.  Every
participant scores the same seeds (the strategy's shared plan), so the sum
over clients is the per-seed aggregate and never one client's value.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from fwdllm.aggregator.privacy import DPSpec
from fwdllm.core import contribution
from fwdllm.core.protocol import SecAgg
from fwdllm.core.secagg import SecAggError, SecAggParams, SecAggServer

log = logging.getLogger("fwdllm.aggregator.secure")


@dataclass(frozen=True)
class SecAggOptions:
    """``--secagg`` settings (run.json)."""

    bound: float = 1e4  # per-entry clip on the client before masking
    frac_bits: int = 24

    def to_dict(self) -> dict:
        return {"bound": self.bound, "frac_bits": self.frac_bits}


class AggregateRound:
    """One round of summed contributions (see the module doc)."""

    def __init__(self, number: int, client_ids: list[str], shape: contribution.Shape,
                 secagg: SecAggOptions | None, dp: DPSpec | None, rates: dict[str, float],
                 batch_sizes: dict[str, int]) -> None:
        self.number = number
        self.shape = shape
        self.index = {cid: i + 1 for i, cid in enumerate(client_ids)}
        self.ids = {i: cid for cid, i in self.index.items()}
        self.dp = dp
        self.rates, self.batch_sizes = rates, batch_sizes
        self.live = set(self.ids)
        self.sums: dict[int, np.ndarray] = {}  # DP without secagg: clear clipped sums
        self.meta: dict[int, dict] = {}
        self.total: np.ndarray | None = None
        self.contributors: list[str] = []
        self.params = self.server = None
        self.stage = "sums"
        self.sa_bytes = 0
        self.seeds: tuple[int, ...] = ()  # the shared plan's seeds (the server sets them at the first task)
        self.reveal_deadline: float | None = None  # the loop's clock: when silent revealers are dropped
        if secagg is not None:
            n = len(client_ids)
            self.params = SecAggParams(n=n, threshold=SecAggParams.default_threshold(n), length=shape.length,
                                       round=number, frac_bits=secagg.frac_bits, bound=secagg.bound)
            self.server = SecAggServer(self.params)
            self.stage = "keys"

    def task_fields(self, client_id: str) -> dict:
        out: dict = {}
        if self.params is not None:
            out["secagg"] = {**self.params.to_dict(), "index": self.index[client_id]}
        if self.dp is not None:
            # under secagg each client adds its share; t survivors carry the full variance
            share = self.dp.sigma * self.dp.clip / np.sqrt(self.params.threshold) if self.params else 0.0
            out["dp"] = {"clip": self.dp.clip, "noise_std": float(share)}
        return out

    # -- inputs ------------------------------------------------------------ #

    def on_sums(self, client_id: str, sums: np.ndarray, meta: dict) -> list[tuple[str, SecAgg]]:
        u = self.index[client_id]
        if self.params is not None or u in self.sums or len(sums) != self.shape.length:
            raise SecAggError("a clear contribution where none is expected, twice, or of the wrong length")
        self.sums[u], self.meta[u] = np.asarray(sums, dtype=np.float64), meta
        return self._advance()

    def on_secagg(self, client_id: str, msg: SecAgg) -> list[tuple[str, SecAgg]]:
        """Feed one stage payload; returns the messages to send."""
        if self.server is None:
            raise SecAggError("this round has no secure aggregation")
        u = self.index[client_id]
        self.sa_bytes += len(msg.data)
        want = {"keys": self.server.add_keys, "shares": self.server.add_shares,
                "masked": self.server.add_masked, "reveal": self.server.add_reveal}.get(msg.stage)
        if want is None:
            raise SecAggError(f"unexpected stage {msg.stage!r} from a client")
        want(u, msg.data)
        if msg.stage == "masked":
            self.meta[u] = msg.meta
        return self._advance()

    def drop(self, client_id: str) -> list[tuple[str, SecAgg]]:
        """``client_id`` left the round (gone, or its deadline passed): the
        stages go on without it, its masks recovered from the others' shares."""
        self.live.discard(self.index[client_id])
        return self._advance()

    def fail(self, why: str) -> list[tuple[str, SecAgg]]:
        """Give the round up (nothing to send): the loop retries it."""
        log.warning("round %d: the sum failed: %s", self.number, why)
        self.stage = "failed"
        return []

    def awaiting(self) -> list[str]:
        """The identities the last stage still waits on: survivors that have
        not revealed (the only stage in which no participant holds a task, so
        the loop times it with :attr:`reveal_deadline`)."""
        if self.stage != "reveal" or self.server is None:
            return []
        return [self.ids[u] for u in sorted(self.live - set(self.server.reveals))]

    def is_live(self, client_id: str) -> bool:
        """Is ``client_id`` (an identity) in this round's sum and not dropped from it?"""
        return self.index.get(client_id) in self.live

    @property
    def done(self) -> bool:
        return self.total is not None

    @property
    def failed(self) -> bool:
        return self.stage == "failed"

    # -- progress ------------------------------------------------------------ #

    def _send(self, stage: str, to: list[int], make) -> list[tuple[str, SecAgg]]:
        out = [(self.ids[v], SecAgg(round=self.number, stage=stage, data=make(v))) for v in to]
        self.sa_bytes += sum(len(m.data) for _, m in out)
        return out

    def _advance(self) -> list[tuple[str, SecAgg]]:
        s = self.server
        try:
            if self.stage == "sums":
                if self.live and self.live <= set(self.sums):
                    self._finish(sorted(self.sums), sum(self.sums[u] for u in sorted(self.sums)))
                elif not self.live and self.sums:
                    self._finish(sorted(self.sums), sum(self.sums[u] for u in sorted(self.sums)))
                return []
            assert s is not None
            if self.stage == "keys" and self.live <= set(s.keys):
                self.stage = "shares"
                return self._send("roster", sorted(self.live & set(s.keys)), s.roster)
            if self.stage == "shares" and self.live <= set(s.envelopes):
                self.stage = "masked"
                return self._send("inbox", sorted(self.live & set(s.envelopes)), s.inbox)
            if self.stage == "masked" and self.live <= set(s.vectors):
                self.stage = "reveal"
                req = s.unmask_request()
                return self._send("unmask", sorted(s.request[0]), lambda v: req)
            if self.stage == "reveal":
                heard_all = self.live <= set(s.reveals)
                if s.ready() and (heard_all or len(s.reveals) >= len(self.live)):
                    self._finish(s.request[0], s.total())
                elif heard_all:
                    raise SecAggError(f"{len(s.reveals)} reveals, below the threshold {self.params.threshold}")
        except SecAggError as e:
            log.warning("round %d: secure aggregation failed: %s", self.number, e)
            self.stage = "failed"
        return []

    def _finish(self, contributors: list[int], total: np.ndarray) -> None:
        if self.params is not None and np.abs(total).max(initial=0) > len(contributors) * self.params.bound:
            # each honest entry is clipped to +-bound: a sum outside n x bound is a lie
            raise SecAggError(f"the sum leaves +-{len(contributors)} x bound: a client sent an out-of-range vector")
        rows = contribution.split(self.shape, total).rows
        if rows > sum(self.batch_sizes[self.ids[u]] for u in contributors) + 0.5:  # + fixed-point rounding
            # an honest device weighs its head gradient by at most its task's batch
            raise SecAggError(f"the sum claims {rows:g} head rows, more than the contributors' batches hold")
        if self.dp is not None and self.params is None:
            rng = np.random.default_rng()
            total = total + rng.normal(0.0, self.dp.sigma * self.dp.clip, total.shape)  # central noise
        self.contributors = [self.ids[u] for u in contributors]
        self.total = np.asarray(total, dtype=np.float64)
        self.stage = "done"

    # -- the round's estimate ---------------------------------------------- #

    @property
    def sampling_rate(self) -> float:
        """The largest sampling rate among the participants: the DP ledger's
        ``q`` (every participant touched its data, dropped or not)."""
        return max(self.rates.values(), default=0.0)

    def result(self) -> tuple[np.ndarray, float, np.ndarray | None]:
        """(mean projection per seed, mean loss, mean head gradient or None)."""
        assert self.total is not None
        parts = contribution.split(self.shape, self.total)
        n = len(self.contributors)
        if self.dp is not None:
            # the sum of clipped per-example scalars over the expected batch: a mean over examples
            denom = sum(self.batch_sizes[c] for c in self.contributors)
            return parts.projections / denom, float("nan"), None
        head = parts.head / parts.rows if parts.head is not None and parts.rows > 0 else None
        return parts.projections / n, parts.loss / n, head
