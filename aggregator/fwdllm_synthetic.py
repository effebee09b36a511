"""A synthetic ZO training problem: the seconds-long ablation of the FwdLLM strategies.

A diagonal quadratic ``f(x) = 1/2 sum h_i (x_i - x*_i)^2`` in ``d`` dims split
into "layers", with a low effective rank (power-law ``h``, the regime in which
MeZO-style ZO works on LLMs) and batch noise ``g_b = g + xi_b`` whose
covariance is proportional to ``h`` (Fisher-like).  A client's scalar is the
exact directional derivative ``g_b . v``.  Every strategy is run with the
same math as the aggregator (:mod:`aggregator.fwdllm_algos`), and forward
passes are counted as two per scalar (central differences), so the numbers
compare what a real run pays.  It is a sanity check of the mechanisms, not a
model of a transformer: conclusions must be confirmed on the real path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from fwdllm.aggregator import fwdllm_algos as algos


@dataclass(frozen=True)
class Problem:
    h: np.ndarray  # diagonal curvature, (d,)
    x_star: np.ndarray  # optimum, (d,)
    noise: float  # batch-noise scale: xi_b ~ noise * sqrt(h) * N(0, 1)
    n_layers: int

    @property
    def dim(self) -> int:
        return len(self.h)

    def loss(self, x: np.ndarray) -> float:
        return float(0.5 * np.sum(self.h * (x - self.x_star) ** 2))

    def grad(self, x: np.ndarray) -> np.ndarray:
        return self.h * (x - self.x_star)

    def layer_slice(self, start: int, stop: int) -> slice:
        per = self.dim // self.n_layers
        return slice(start * per, stop * per)


def make_problem(n_layers: int = 8, per_layer: int = 128, noise: float = 0.3, seed: int = 0) -> Problem:
    """Power-law curvature ``h_i ~ i^-1.5`` shuffled over coordinates, so each
    layer holds a few stiff directions and many flat ones."""
    rng = np.random.default_rng(seed)
    d = n_layers * per_layer
    h = rng.permutation(np.arange(1, d + 1, dtype=np.float64) ** -1.5)
    return Problem(h=h, x_star=rng.standard_normal(d), noise=noise, n_layers=n_layers)


@dataclass(frozen=True)
class SimConfig:
    """One strategy: plain ZO-SGD when every option is off."""

    k: int = 16  # seeds per round (pacing: seeds per chunk)
    replicas: int = 1  # batches each seed is scored on
    pacing: float = 0.0  # inner-product-test threshold, 0 = off
    z: float = 2.0  # pacing: |g|^2 lower confidence bound, in standard errors
    k_max: int = 128
    scale_lr: bool = False  # pacing: step lr * K_round / k (linear scaling rule)
    oversample: int = 0  # discriminative candidates per seed, 0 = off
    debias: bool = False
    blocks: int = 1


@dataclass(frozen=True)
class SimResult:
    steps: int
    forward_passes: int
    final_loss: float
    reached: bool
    mean_k: float


def _estimate(
    prob: Problem, x: np.ndarray, sl: slice, cfg: SimConfig, u: np.ndarray | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, int]:
    """One round: (gradient estimate on ``sl``, raw estimate, scalars used)."""
    g = prob.grad(x)[sl]
    hs = np.sqrt(prob.h[sl])
    dim = len(g)
    dirs, ids, vals = [], [], []
    while True:
        n_cand = cfg.k * max(1, cfg.oversample)
        cand = rng.standard_normal((n_cand, dim))
        if cfg.oversample and u is not None:
            cand = cand[algos.select_discriminative(cand @ u, cfg.k)]
        else:
            cand = cand[: cfg.k]
        for v in cand:
            xi = prob.noise * hs * rng.standard_normal((cfg.replicas, dim))
            ids.extend([len(dirs)] * cfg.replicas)
            vals.extend((g + xi) @ v)
            dirs.append(v)
        if not cfg.pacing:
            break
        done, _ = algos.pace(ids, vals, cfg.pacing, cfg.k, cfg.k_max, z=cfg.z)
        if done:
            break
    v_mat = np.array(dirs)
    p = np.bincount(ids, weights=vals) / cfg.replicas
    raw = p @ v_mat / len(dirs)
    est = raw
    if cfg.oversample and cfg.debias and u is not None:
        a = v_mat @ u
        est = raw + algos.debias_along_u(p, a, algos.selection_kappa(a)) * u
    return est, raw, len(vals)


def run(
    prob: Problem, cfg: SimConfig, lr: float, seed: int, target: float = 0.1, max_forward: int = 200_000
) -> SimResult:
    """Train from ``x = 0`` until ``f <= target * f(0)`` or the forward-pass budget."""
    rng = np.random.default_rng(seed)
    x = np.zeros(prob.dim)
    goal = target * prob.loss(x)
    blocks = algos.block_ranges(prob.n_layers, cfg.blocks)
    last_raw: dict[int, np.ndarray] = {}
    steps = passes = 0
    loss = prob.loss(x)
    blown = 1e6 * loss  # a diverged run stops here instead of overflowing
    while passes < max_forward and goal < loss < blown:
        b = steps % cfg.blocks
        sl = prob.layer_slice(*blocks[b])
        prev = last_raw.get(b)
        norm = float(np.linalg.norm(prev)) if prev is not None else 0.0
        u = prev / norm if norm > 0 else None
        est, last_raw[b], n_scalars = _estimate(prob, x, sl, cfg, u, rng)
        n_seeds = n_scalars // cfg.replicas
        x[sl] -= (lr * n_seeds / cfg.k if cfg.scale_lr else lr) * est
        steps += 1
        passes += 2 * n_scalars
        loss = prob.loss(x)
    reached = loss <= goal
    return SimResult(steps, passes, loss, reached, passes / 2 / cfg.replicas / max(1, steps))


def best_lr(
    prob: Problem, cfg: SimConfig, lrs: tuple[float, ...], seeds: tuple[int, ...], **kw: float
) -> tuple[float, list[SimResult]]:
    """The learning rate with the fewest median forward passes to target
    (runs that miss count as the budget): each strategy at its own best lr,
    so the ablation compares tuned against tuned."""
    best: tuple[float, float, list[SimResult]] | None = None
    for lr in lrs:
        res = [run(prob, cfg, lr, s, **kw) for s in seeds]
        cost = float(np.median([r.forward_passes if r.reached else math.inf for r in res]))
        if best is None or cost < best[0]:
            best = (cost, lr, res)
    assert best is not None
    return best[1], best[2]


#: The ablation: each strategy alone, then combined (names as in the report).
ABLATION: dict[str, SimConfig] = {
    "zo-sgd": SimConfig(),
    "pacing": SimConfig(k=8, replicas=2, pacing=0.25),
    "pacing-scaled-lr": SimConfig(k=8, replicas=2, pacing=0.25, scale_lr=True),
    "discriminative": SimConfig(oversample=10),
    "discriminative-debiased": SimConfig(oversample=10, debias=True),
    "block-cyclic": SimConfig(blocks=4),
}
ABLATION["pacing-scaled-lr-z0"] = replace(ABLATION["pacing-scaled-lr"], z=0.0)
ABLATION["fwdllm"] = replace(ABLATION["pacing"], oversample=10)  # the "fwdllm" strategy's defaults
ABLATION["fwdllm-scaled-lr"] = replace(ABLATION["pacing-scaled-lr"], oversample=10)


def round_time(
    throughput: np.ndarray, seeds: list[int], needed: int, rng: np.random.Generator, jitter: float = 0.3
) -> float:
    """Wall time of one round in which client ``c`` scores ``seeds[c]`` seeds
    one after another, each taking ``1/throughput[c]`` times a log-normal
    jitter, and the round ends when ``needed`` scalars are in."""
    done_at = []
    for tp, n in zip(throughput, seeds):
        if n:
            done_at.extend(np.cumsum(rng.lognormal(0.0, jitter, n) / tp))
    return float(np.sort(done_at)[needed - 1])


def main() -> None:
    """Print the ablation table: ``python -m fwdllm.aggregator.fwdllm_synthetic [noise] [target]``."""
    import sys

    noise = float(sys.argv[1]) if len(sys.argv) > 1 else 0.1
    target = float(sys.argv[2]) if len(sys.argv) > 2 else 0.2
    prob = make_problem(per_layer=64, noise=noise)
    lrs = tuple(0.125 * 2 ** (i / 2) for i in range(10))
    print(f"d={prob.dim}, noise={noise}, target={target} f(0), budget 40000 forward passes, 5 seeds, median")
    print("| strategy | lr | forward passes | rounds | K/round | reached |\n|---|---|---|---|---|---|")
    for name, cfg in ABLATION.items():
        lr, res = best_lr(prob, cfg, lrs, (0, 1, 2, 3, 4), target=target, max_forward=40_000)
        med = [float(np.median([getattr(r, f) for r in res])) for f in ("forward_passes", "steps", "mean_k")]
        print(f"| {name} | {lr:.3g} | {med[0]:.0f} | {med[1]:.0f} | {med[2]:.1f} | {sum(r.reached for r in res)}/5 |",
              flush=True)


if __name__ == "__main__":
    main()
