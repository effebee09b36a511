"""Training algorithms as strategy objects; the socket loop is not the algorithm.

The server (:mod:`aggregator.server`) owns sockets, heartbeats, deadlines,
checkpoints and byte accounting.  A :class:`Strategy` owns *what* is computed:
which seeds, how many, on which data, who does what, and when a round has
enough perturbations to step.  The loop drives one round like this::

    cfg = strategy.begin(round, participants)   # RoundConfig: mask, eps, dist, one_sided
    for every idle live client c:               # right after begin, and after each of c's results
        work = strategy.next_work(c)            # Work (seeds + batch) or None = nothing for c now
        -> Task to c
    on a Result from c:  strategy.add(c, work, scored)
    on c dying/leaving, or missing its task's deadline:
                         strategy.drop(c, work)  # never scored: hand it to someone else
    the round ends as soon as strategy.ready(), or when no work is outstanding
    and next_work() has nothing more for anyone, or at the round deadline;
    then head = strategy.head_step(heads)       # --head runs: the head's gradient
         step = strategy.step()                 # seeds + coefficients of the gradient estimate
    -> Optimizer.step(combine(step.seeds, step.coeffs, ...)) -> Update to everyone

Participants arrive in an order no client can choose: the loop sorts them by
a hash of (run seed, round, identity), where the identity is the client's
CURVE key (its allow-list name), never a name the client picked; ``slot`` is
the position in that order and ``client_id`` is that identity.

What this supports without touching the loop (``strategies_fwdllm.py`` uses
all of it; :mod:`fwdllm.aggregator.registry` lists every strategy by name):

* **Variable perturbations per round / variance-controlled pacing**: keep
  returning new :class:`Work` from ``next_work`` until the stopping rule in
  ``ready()`` holds (e.g. the variance of the aggregated estimate falls under a
  threshold).  Results still in flight when ``ready()`` turns true are dropped
  as late by round id.
* **Discriminative seed sampling**: ``next_work`` may draw many candidate seeds
  and hand out the best ones.  The previous round's gradient estimate is
  ``combine(prev.seeds, prev.coeffs)`` - keep ``prev`` (a :class:`Step`) in the
  strategy state; the loop passes every finished step to ``committed``.
* **Throughput-proportional load**: :class:`ClientView` carries the
  ``tokens_per_s`` each client measured and sent in ``Join``; size each
  ``Work`` (number of seeds, batch size) from it.
* **Block-cyclic schedules**: ``begin`` returns the round's
  :class:`~fwdllm.core.layout.PerturbMask` (e.g. one block of layers per round).

Options: :class:`StrategySpec` carries the common knobs (K, eps, batch size,
mask, distribution, run seed); strategy-specific ones arrive in
``spec.extra`` from ``--strategy-opt KEY=VALUE`` (repeatable, JSON values);
the loop adds ``spec.extra["layout"]``, the run's ``LoraLayout.to_dict()``.
A new strategy is one class plus one entry in ``registry.STRATEGIES``; the
CLI's ``--strategy`` choice list is built from that dict.

Rules a strategy must keep, because ``--resume`` promises a bit-identical
trajectory: everything it decides is a pure function of the run seed, the
round, the participants (in the loop's order, their ``slot``), the scalars it
was given and its own state; and ``state_dict()`` / ``load_state_dict()``
round-trip that state exactly (JSON; Python floats survive JSON exactly).
``step()`` must not depend on the *arrival order* of results.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np

from fwdllm.core.layout import PerturbMask
from fwdllm.core.optim import Stage, stage_at
from fwdllm.core.seeds import derive_seed


@dataclass(frozen=True)
class ClientView:
    """What a strategy may know about a participant of the current round."""

    client_id: str  # the client's identity: its CURVE key's allow-list name (plaintext: the id it sent)
    slot: int  # position among the round's participants, in the loop's keyed-hash order
    tokens_per_s: float
    n_examples: int
    max_batch: int


@dataclass(frozen=True)
class RoundConfig:
    """Settings shared by every task of one round (and by its Update)."""

    mask: PerturbMask
    eps: float
    dist: str = "gaussian"
    one_sided: bool = False


@dataclass(frozen=True)
class Work:
    """One task's content: score ``seeds`` on a batch drawn with ``batch_seed``."""

    seeds: tuple[int, ...]
    batch_size: int
    batch_seed: int


@dataclass(frozen=True)
class Scored:
    """A client's answer to one :class:`Work`.

    ``projected`` is the directional-derivative estimate per seed,
    ``(L+ - L-) / 2eps`` (central) or ``(L+ - L0) / eps`` (one-sided);
    ``loss`` is the batch loss at the current adapter (its estimate from the
    perturbed evaluations for central differences).
    """

    seeds: np.ndarray
    projected: np.ndarray
    loss: float
    n_tokens: int
    seconds: float
    forward_passes: int


@dataclass(frozen=True)
class Step:
    """The round's gradient estimate ``sum_k coeffs[k] * direction(seeds[k])``."""

    seeds: np.ndarray  # uint32
    coeffs: np.ndarray  # float64
    info: dict[str, Any] = field(default_factory=dict)  # goes into metrics.jsonl

    def to_dict(self) -> dict[str, Any]:
        return {"seeds": [int(s) for s in self.seeds], "coeffs": [float(c) for c in self.coeffs]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Step":
        return cls(np.array(d["seeds"], dtype=np.uint32), np.array(d["coeffs"], dtype=np.float64))


@dataclass(frozen=True)
class StrategySpec:
    """CLI-level knobs shared by strategies (each reads what it needs)."""

    name: str = "zo-sgd"
    run_seed: int = 0
    k: int = 16  # perturbations per round (all clients together)
    eps: float = 1e-2
    batch_size: int = 8
    mask: PerturbMask = PerturbMask(parts="b")
    dist: str = "gaussian"
    one_sided: bool = False
    stratify: bool = False  # batches stratified by label (clients do the drawing)
    extra: dict[str, Any] = field(default_factory=dict)  # strategy-specific options
    #: a staged run's stages (``--stages``); their ``k`` replaces ``k`` round by round
    stages: tuple[Stage, ...] = ()

    def k_at(self, round: int) -> int:
        """Perturbations of 1-based ``round``."""
        return self.stages[stage_at(self.stages, round - 1)[0]].k if self.stages else self.k

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "run_seed": self.run_seed,
            "k": self.k,
            "eps": self.eps,
            "batch_size": self.batch_size,
            "mask": self.mask.to_dict(),
            "dist": self.dist,
            "one_sided": self.one_sided,
            "stratify": self.stratify,
            "extra": dict(self.extra),
            **({"stages": [asdict(st) for st in self.stages]} if self.stages else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StrategySpec":
        # runs written before ``stratify`` existed drew uniform batches: resume them that way
        return cls(**{"stratify": False, **d, "mask": PerturbMask.from_dict(d["mask"]),
                      "extra": dict(d.get("extra", {})),
                      "stages": tuple(Stage.from_dict(st) for st in d.get("stages", ()))})


class Strategy(ABC):
    """Base class; see the module docstring for the protocol the loop follows."""

    name: ClassVar[str] = ""

    def __init__(self, spec: StrategySpec) -> None:
        self.spec = spec

    @abstractmethod
    def begin(self, round: int, participants: list[ClientView]) -> RoundConfig:
        """Start ``round`` (1-based) with these live clients, in the loop's order."""

    @abstractmethod
    def next_work(self, client: ClientView) -> Work | None:
        """Work for an idle client, or None when there is nothing for it now."""

    @abstractmethod
    def add(self, client: ClientView, work: Work, scored: Scored) -> None:
        """Record a client's scalars for ``work``."""

    def drop(self, client: ClientView, work: Work | None) -> None:
        """``client`` left the round or missed its deadline; ``work`` (if any)
        will never be scored by it.  A strategy should offer that work to the
        next idle client in this round (the loop never hands a client work
        again in a round where its deadline passed)."""

    def ready(self) -> bool:
        """Stop the round now, even if work is outstanding (pacing rules)."""
        return False

    def has_work(self) -> bool:
        """False only when ``next_work`` would return None for every client now.

        The loop then skips offering work to each idle peer after every
        result, which is O(clients) per result (bench load: 1,000 clients)."""
        return True

    @abstractmethod
    def step(self) -> Step:
        """The round's gradient estimate; called once, with >= 1 result in."""

    def head_step(self, heads: dict[tuple, tuple[int, np.ndarray]]) -> np.ndarray | None:
        """The classifier head's gradient for the round (``--head`` runs), from
        ``heads``: (client id, batch seed, seeds) -> (rows, gradient), every
        result's exact head gradient over ``rows`` examples.  Called once per
        stepped round, before :meth:`step`."""
        return head_mean(heads)

    def committed(self, round: int, step: Step) -> None:
        """The loop applied ``step`` as round ``round`` (keep it if you need it)."""

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state that must survive a restart between rounds."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`."""


def head_mean(grads: dict[tuple, tuple[int, np.ndarray]]) -> np.ndarray | None:
    """The row-weighted mean of head gradients (float64 sums in sorted key
    order: the arrival order never shows in the bits), or None when empty."""
    if not grads:
        return None
    total = sum(rows for rows, _ in grads.values())
    acc = sum((rows * g.astype(np.float64) for rows, g in (grads[k] for k in sorted(grads))), np.float64(0))
    return acc / total


def projected_mean(results: dict[int, list[float]], order: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Average the per-seed projections scored by several clients.

    ``results`` maps seed -> projections; ``order`` fixes the canonical seed
    order (so the sum in :func:`fwdllm.core.directions.combine` never depends on
    arrival order).  Returns (seeds, mean projection) for seeds with results.
    """
    seeds = [s for s in order if results.get(s)]
    means = [float(np.mean(np.array(results[s], dtype=np.float64))) for s in seeds]
    return np.array(seeds, dtype=np.uint32), np.array(means, dtype=np.float64)


#: ``spec.extra`` key the server sets for summed rounds (not a --strategy-opt)
SHARED = "shared_seeds"


class ZOSGD(Strategy):
    """Plain zeroth-order SGD (MeZO-style): a fixed K perturbations per round.

    The K seeds of round r are split evenly over the participants (slot i
    gets seeds i, i+n, ...), each scores its share on one local batch, and
    the estimate is ``g = 1/K' * sum_k proj_k * u_k`` over the K' seeds that
    came back.  The share of a client that dies or misses its deadline goes
    to the next idle participant (scored on that client's batch); seeds
    nobody scored by the end of the round are missing from the sum.

    K = 0 is the head-only mode (``--k 0 --head``): every participant scores
    one batch at the current adapter and sends only its exact head gradient,
    one forward pass per client, and the LoRA's estimate is empty.
    """

    name = "zo-sgd"

    def __init__(self, spec: StrategySpec) -> None:
        super().__init__(spec)
        self._plan: dict[str, Work] = {}
        self._reissue: list[Work] = []  # shares dropped this round, for the next idle client
        self._round = 0
        self._order: list[int] = []
        self._proj: dict[int, list[float]] = {}
        # a summed round (--secagg, --dp-epsilon): everyone scores every seed, so the
        # per-seed sum over clients is all the server needs and all it learns
        self._shared = bool(spec.extra.get(SHARED))

    def begin(self, round: int, participants: list[ClientView]) -> RoundConfig:
        s = self.spec
        self._round = round
        k = s.k_at(round)
        seeds = [derive_seed(s.run_seed, "seed", round, i) for i in range(k)]
        # k = 0 (head-only, --k 0 --head): every participant still scores a batch, with no seeds
        n = max(1, min(len(participants), k)) if k else len(participants)
        shared = self._shared
        if shared:
            n = len(participants)
        self._order = seeds
        self._proj, self._reissue = {}, []
        self._plan = {
            c.client_id: Work(
                seeds=tuple(seeds) if shared else tuple(seeds[c.slot :: n]),
                batch_size=min(s.batch_size, c.max_batch) if c.max_batch > 0 else s.batch_size,
                batch_seed=derive_seed(s.run_seed, "batch", round, c.client_id),
            )
            for c in participants[:n]
        }
        return RoundConfig(mask=s.mask, eps=s.eps, dist=s.dist, one_sided=s.one_sided)

    def next_work(self, client: ClientView) -> Work | None:
        work = self._plan.pop(client.client_id, None)
        if work is None and self._reissue:
            dropped = self._reissue.pop(0)
            s = self.spec
            work = Work(dropped.seeds, min(s.batch_size, client.max_batch) if client.max_batch > 0 else s.batch_size,
                        derive_seed(s.run_seed, "batch", self._round, client.client_id))
        return work

    def has_work(self) -> bool:
        return bool(self._plan or self._reissue)

    def drop(self, client: ClientView, work: Work | None) -> None:
        for lost in (work, self._plan.pop(client.client_id, None)):  # what it held, and what it never took
            if lost is not None and lost.seeds and not self._shared:  # a sum simply goes on without it
                self._reissue.append(lost)

    def add(self, client: ClientView, work: Work, scored: Scored) -> None:
        for seed, p in zip(scored.seeds, scored.projected):
            self._proj.setdefault(int(seed), []).append(float(p))

    def step(self) -> Step:
        seeds, proj = projected_mean(self._proj, self._order)
        coeffs = proj / max(1, len(seeds))
        return Step(seeds, coeffs, info={"perturbations": int(len(seeds))})
