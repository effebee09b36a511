"""FwdLLM's algorithms as aggregator strategies.

One configurable class, :class:`FwdLLM`, switched by ``StrategySpec.extra``
and registered under one name per idea so each can be run and measured
alone (``--strategy pacing`` ...) or together (``--strategy fwdllm``):

* ``pacing``: hand out seeds in chunks, each chunk scored on ``replicas``
  independent batches, until the inner-product test of
  :func:`aggregator.fwdllm_algos.pace` says the estimate is a reliable
  descent direction (or ``k_max`` seeds).  K per round adapts and is logged.
* ``discriminative``: draw ``oversample`` x the needed seeds, keep those whose
  direction is most aligned (``|v.u|``) with the previous estimate of the same
  block ``u`` (reconstructed from its seeds and coefficients); optionally
  remove the selection bias along ``u`` (``debias``).
* ``adaptive``: seeds per task proportional to each client's measured tokens/s
  (EWMA); ``slack`` more seeds than needed are handed out and the round ends
  as soon as ``k`` are in.
* ``block-cyclic``: round r perturbs only block ``(r-1) mod blocks`` of layers.

Per-round decisions that depend on which results arrived first (pacing,
adaptive) make reruns differ in timing-dependent ways; what *is* kept: seeds
are a pure function of (run seed, round, draw index), ``step()`` sums in
issue order, and ``state_dict`` carries everything across ``--resume``.

The strategy needs the run's LoRA layout for discriminative sampling and
block-cyclic schedules: it reads ``spec.extra["layout"]``
(``LoraLayout.to_dict()``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import numpy as np

from fwdllm.aggregator import fwdllm_algos as algos
from fwdllm.aggregator.strategy import (
    ClientView,
    RoundConfig,
    Scored,
    Step,
    Strategy,
    StrategySpec,
    Work,
    projected_mean,
)
from fwdllm.core.directions import combine, tensor_direction
from fwdllm.core.layout import LoraLayout
from fwdllm.core.seeds import derive_seed


@dataclass(frozen=True)
class FwdOptions:
    """Strategy switches and knobs (keys of ``StrategySpec.extra``)."""

    pacing: bool = False
    threshold: float = 0.25  # pacing: max Var(G.g)/|g|^4
    z: float = 2.0  # pacing: |g|^2 must clear z standard errors (0 = plug-in, fewer seeds, may step on noise)
    k_max: int = 0  # pacing: seed cap per round, 0 = 4 * k
    replicas: int = 2  # pacing: batches per seed (>= 2 to measure the data noise)
    scale_lr: bool = False  # pacing: step = sum p v / k (lr grows with K/k; risky when K hits k_max on noise)
    oversample: int = 0  # discriminative: candidates per handed-out seed, 0 = off
    debias: bool = False  # discriminative: remove the bias along u
    adaptive: bool = False  # throughput-proportional seeds per task
    slack: float = 0.25  # adaptive: extra seeds handed out, the round ends at k
    blocks: int = 1  # block-cyclic: number of layer blocks, 1 = off

    @classmethod
    def parse(cls, defaults: dict[str, Any], extra: dict[str, Any]) -> "FwdOptions":
        """Defaults of the strategy name, overridden by ``--strategy-opt``s
        (type-checked: they arrive as JSON values or strings)."""
        kinds = {f.name: type(f.default) for f in fields(cls)}
        opts = {k: v for k, v in extra.items() if k != "layout"}
        unknown = sorted(set(opts) - set(kinds))
        if unknown:
            raise ValueError(f"unknown strategy option(s) {unknown}; known: {', '.join(kinds)}")
        for key, value in opts.items():
            kind = kinds[key]
            ok = isinstance(value, bool) if kind is bool else (
                isinstance(value, (int, float)) and not isinstance(value, bool) and (kind is float or value == int(value)))
            if not ok:
                raise ValueError(f"strategy option {key}={value!r}: expected {kind.__name__}")
            opts[key] = kind(value)
        out = cls(**{**defaults, **opts})
        if out.replicas < 1 or out.oversample < 0 or out.blocks < 1 or out.slack < 0 or out.threshold <= 0 \
                or out.z < 0 or out.k_max < 0:
            raise ValueError(f"strategy options out of range: {out}")
        return out


def _flat_dot(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return float(sum(np.dot(a[n].ravel().astype(np.float64), b[n].ravel().astype(np.float64)) for n in a))


class FwdLLM(Strategy):
    """All four FwdLLM ideas, each switchable (see the module docstring)."""

    name: ClassVar[str] = "fwdllm"
    DEFAULTS: ClassVar[dict[str, Any]] = {"pacing": True, "oversample": 10, "adaptive": True}

    def __init__(self, spec: StrategySpec) -> None:
        super().__init__(spec)
        self.opts = FwdOptions.parse(self.DEFAULTS, spec.extra)
        layout = spec.extra.get("layout")
        self.layout = LoraLayout.from_dict(layout) if layout else None
        if self.layout is None and (self.opts.oversample or self.opts.blocks > 1):
            raise ValueError("discriminative sampling and block-cyclic schedules need spec.extra['layout']")
        self.k_max = self.opts.k_max or 4 * spec.k
        if self.opts.blocks > 1:  # fail at startup, not at the first round
            algos.block_mask(1, self.layout.n_layers, self.opts.blocks, spec.mask)
        # state that survives rounds (state_dict)
        self._tp: dict[str, float] = {}
        self._prev: dict[str, dict[str, list]] = {}  # block -> raw estimate of its last round
        self._rho = 0.0
        # per-round state
        self._round = 0
        self._block = 0
        self._mask = spec.mask
        self._u: dict[str, np.ndarray] | None = None
        self._u_norm = 0.0
        self._share: dict[str, int] = {}
        self._issued: list[int] = []
        self._proj: dict[int, float] = {}
        self._queue: list[tuple[tuple[int, ...], int]] = []
        self._spare = 0  # seeds of shares whose client left before taking them
        self._obs_seeds: list[int] = []
        self._obs_vals: list[float] = []
        self._raw: dict[str, list] | None = None

    # ------------------------------------------------------------------ #
    # round setup

    def begin(self, round: int, participants: list[ClientView]) -> RoundConfig:
        s, o = self.spec, self.opts
        self._round = round
        self._block = (round - 1) % o.blocks
        self._mask = s.mask
        if o.blocks > 1:
            self._mask = algos.block_mask(round, self.layout.n_layers, o.blocks, s.mask)
        self._issued, self._proj, self._queue, self._spare = [], {}, [], 0
        self._obs_seeds, self._obs_vals = [], []
        self._raw = None
        self._u = self._previous_direction() if o.oversample else None
        for c in participants:
            self._tp.setdefault(c.client_id, c.tokens_per_s)
        total = s.k if o.pacing else algos.overprovision(s.k, o.slack) if o.adaptive else s.k
        self._share = self._split(total, participants)
        return RoundConfig(mask=self._mask, eps=s.eps, dist=s.dist, one_sided=s.one_sided)

    def _split(self, total: int, participants: list[ClientView]) -> dict[str, int]:
        """Seeds per task: proportional to throughput (adaptive) or even.

        With more clients than seeds only the fastest (adaptive) or the first
        slots get work, as in plain ZO-SGD.  A client that has not measured its
        throughput yet (0 in its Join) counts as an average one.
        """
        known = [t for t in self._tp.values() if t > 0]
        typical = float(np.mean(known)) if known else 1.0
        weights = [(self._tp[c.client_id] if self._tp[c.client_id] > 0 else typical) if self.opts.adaptive else 1.0
                   for c in participants]
        keep = set(np.argsort([-w for w in weights], kind="stable")[:total].tolist())
        weights = [w if i in keep else 0.0 for i, w in enumerate(weights)]
        counts = algos.allocate(total, weights)
        return {c.client_id: n for c, n in zip(participants, counts) if n}

    def _previous_direction(self) -> dict[str, np.ndarray] | None:
        """Unit vector along this block's last raw estimate, or None (first visit)."""
        prev = self._prev.get(str(self._block))
        if not prev or not prev["seeds"]:
            return None
        assert self.layout is not None
        names = self._mask.names(self.layout)
        full = combine(prev["seeds"], prev["coeffs"], self.layout, self._mask, self.spec.dist)
        u = {n: full[n].astype(np.float64) for n in names}
        norm = math.sqrt(_flat_dot(u, u))
        if not norm > 0:
            return None
        self._u_norm = norm
        return {n: t / norm for n, t in u.items()}

    def _draw(self, n: int) -> tuple[int, ...]:
        """The next ``n`` seeds of the round: plain, or the best of ``oversample * n``."""
        start = len(self._issued)
        if self._u is None:
            seeds = [derive_seed(self.spec.run_seed, "seed", self._round, start + i) for i in range(n)]
        else:
            assert self.layout is not None
            shapes = self.layout.shapes()
            cands = [derive_seed(self.spec.run_seed, "cand", self._round, start, i)
                     for i in range(n * self.opts.oversample)]
            proj = np.array([
                _flat_dot({m: tensor_direction(c, m, shapes[m], self.spec.dist) for m in self._u}, self._u)
                for c in cands
            ])
            picked = algos.select_discriminative(proj, n)
            seeds = [cands[i] for i in picked]
            self._proj.update({cands[i]: float(proj[i]) for i in picked})
        self._issued.extend(seeds)
        return tuple(seeds)

    # ------------------------------------------------------------------ #
    # the round

    def _work(self, client: ClientView, seeds: tuple[int, ...], replica: int) -> Work:
        """A task; its batch seed is keyed by (client, first seed, replica), so
        the replicas of one seed group always land on different batches."""
        bs = min(self.spec.batch_size, client.max_batch) if client.max_batch > 0 else self.spec.batch_size
        return Work(seeds, bs, derive_seed(self.spec.run_seed, "batch", self._round, client.client_id,
                                           seeds[0], replica))

    def next_work(self, client: ClientView) -> Work | None:
        if not self.opts.pacing:
            n = self._share.pop(client.client_id, 0)
            if not n and self._spare:
                n, self._spare = self._spare, 0
            if n:
                return self._work(client, self._draw(n), 0)
            if self._queue:  # a share someone dropped, scored on this client's batch
                seeds, replica = self._queue.pop(0)
                return self._work(client, seeds, replica)
            return None
        if self.ready():
            return None
        if self._queue:
            seeds, replica = self._queue.pop(0)
            return self._work(client, seeds, replica)
        if len(self._issued) >= self.k_max or client.client_id not in self._share:
            return None
        n = min(self._share[client.client_id], self.k_max - len(self._issued))
        seeds = self._draw(n)
        self._queue.extend((seeds, j) for j in range(1, self.opts.replicas))
        return self._work(client, seeds, 0)

    def add(self, client: ClientView, work: Work, scored: Scored) -> None:
        self._obs_seeds.extend(int(s) for s in scored.seeds)
        self._obs_vals.extend(float(p) for p in scored.projected)
        prev = self._tp.get(client.client_id, client.tokens_per_s)
        self._tp[client.client_id] = algos.ewma_throughput(prev, scored.n_tokens, scored.seconds)

    def drop(self, client: ClientView, work: Work | None) -> None:
        if work is not None and work.seeds:  # someone else scores it on another batch
            self._queue.append((work.seeds, self.opts.replicas + len(self._obs_vals)))
        if not self.opts.pacing:  # a share it never took goes to the next idle client
            self._spare += self._share.pop(client.client_id, 0)

    def ready(self) -> bool:
        o = self.opts
        if o.pacing:
            if not self._obs_vals:
                return False
            done, _ = algos.pace(self._obs_seeds, self._obs_vals, o.threshold, self.spec.k, self.k_max, self._rho, o.z)
            return done
        return o.adaptive and len(set(self._obs_seeds)) >= self.spec.k

    def step(self) -> Step:
        o = self.opts
        results: dict[int, list[float]] = {}
        for seed, p in zip(self._obs_seeds, self._obs_vals):
            results.setdefault(seed, []).append(p)
        seeds, pbar = projected_mean(results, self._issued)
        k_in = len(seeds)
        raw = pbar / max(1, k_in)
        scale = k_in / self.spec.k if o.pacing and o.scale_lr else 1.0
        self._raw = {"seeds": [int(x) for x in seeds], "coeffs": [float(c) for c in raw]}
        info: dict[str, Any] = {"strategy": self.name, "perturbations": k_in, "seeds_issued": len(self._issued),
                                "block": self._block, "step_scale": scale}
        out_seeds, out_coeffs = [seeds], [raw * scale]
        if self._u is not None:
            a = np.array([self._proj[int(x)] for x in seeds])
            kappa = algos.selection_kappa(a)
            info["kappa"] = kappa
            if o.debias and kappa > 0:
                beta = algos.debias_along_u(pbar, a, kappa) * scale / self._u_norm
                prev = self._prev[str(self._block)]
                out_seeds.append(np.array(prev["seeds"], dtype=np.uint32))
                out_coeffs.append(beta * np.array(prev["coeffs"], dtype=np.float64))
        if o.pacing:
            stats = algos.pacing_stats(self._obs_seeds, self._obs_vals, self._rho, o.z)
            info.update({f"pacing_{k}": v for k, v in stats.to_dict().items()})
            # whether the variance test or the cap ended the round: a run that lives at the cap pays
            # k_max seeds a round for a precision it never certifies (simulate's summary counts them)
            info["pacing_passed"] = bool(stats.passes(o.threshold, self.spec.k))
            info["pacing_k_max"] = self.k_max
            if stats.n_replicated and math.isfinite(stats.rho):
                self._rho = stats.rho
        if o.adaptive:
            info["throughput"] = {c: round(t, 3) for c, t in sorted(self._tp.items())}
        return Step(np.concatenate(out_seeds).astype(np.uint32), np.concatenate(out_coeffs), info)

    def committed(self, round: int, step: Step) -> None:
        if self._raw is not None:
            self._prev[str(self._block)] = self._raw

    def state_dict(self) -> dict[str, Any]:
        return {"tp": dict(self._tp), "prev": dict(self._prev), "rho": self._rho}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._tp = {str(k): float(v) for k, v in state.get("tp", {}).items()}
        self._prev = {str(k): {"seeds": list(v["seeds"]), "coeffs": list(v["coeffs"])}
                      for k, v in state.get("prev", {}).items()}
        self._rho = float(state.get("rho", 0.0))


class Pacing(FwdLLM):
    name = "pacing"
    DEFAULTS = {"pacing": True}


class Discriminative(FwdLLM):
    name = "discriminative"
    DEFAULTS = {"oversample": 10}


class Adaptive(FwdLLM):
    name = "adaptive"
    DEFAULTS = {"adaptive": True}


class BlockCyclic(FwdLLM):
    name = "block-cyclic"
    DEFAULTS = {"blocks": 4}
