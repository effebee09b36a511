"""FwdLLM's algorithms as plain numpy math (no sockets, no torch, no llama.cpp).

Notation: ``g`` is the gradient of the full-data loss over the ``d`` perturbed
LoRA entries, ``v_k`` a direction with i.i.d. unit-variance entries (Gaussian,
Irwin-Hall or Rademacher, :func:`fwdllm.core.directions.tensor_direction`), and a
client reports ``p = g_b . v_k``, the directional derivative of the loss on its
batch ``b``.  The aggregated estimate is ``G = (1/N) sum_obs p v_k``.

Two facts drive every design choice below (both are checked by brute force in
``tests/core/test_fwdllm_algos.py``).  With ``rho = sigma^2 / |g|^2`` the
noise-to-signal ratio of the scalars (``sigma^2 = E[((g_b - g) . v)^2]``, the
data noise a batch adds to one scalar):

* **Norm test is hopeless in ZO.**  ``E|G - g|^2 / |g|^2 = ((d+1) + d rho)/K``
  (:func:`zo_norm_relvar`).  It is at least ``d/K`` whatever the scalars say,
  so pacing on it just means "K >= d/threshold".  FwdLLM's "variance between
  the two half-means of one layer" measures the same ``d/K`` quantity on one
  layer, with an absolute threshold that depends on the gradient scale.
* **Inner-product test is dimension-free.**  What a step needs is to be a
  descent direction: ``Var(G . g) / |g|^4 = (2 + rho/m) / K`` for ``K`` seeds
  each scored on ``m`` independent batches (Bollapragada, Byrd & Nocedal 2018
  adapted to ZO).  It depends on ``d`` not at all and on the data only
  through ``rho``, which scalars alone estimate once a seed is scored on two
  batches (:func:`pacing_stats`).  Pacing on it asks for few perturbations
  while the gradient is strong and more as the data noise takes over.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from fwdllm.core.layout import PerturbMask

# --------------------------------------------------------------------------- #
# Estimator variance
# --------------------------------------------------------------------------- #


def zo_norm_relvar(dim: int, k: float, rho: float = 0.0) -> float:
    """``E|G - g|^2 / |g|^2`` for ``K`` Gaussian directions in ``dim`` dims.

    One term ``(g.v + n) v`` has ``E|.|^2 = (d+2)|g|^2 + d sigma^2`` and mean
    ``g``, so its trace variance is ``(d+1)|g|^2 + d sigma^2``; averaging K
    independent terms divides by K.  Used to report what a smaller perturbed
    set (block-cyclic, A-only/B-only) buys per round.
    """
    return ((dim + 1) + dim * rho) / k


# --------------------------------------------------------------------------- #
# Variance-controlled pacing
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class PacingStats:
    """What the pacing rule saw; logged per round (``asdict`` is JSON-able).

    ``grad_sq`` and ``noise_var`` are NaN until some seed was scored on two
    batches; ``rho`` then falls back to the caller's prior.
    """

    n_obs: int
    n_seeds: int
    n_replicated: int
    grad_sq: float
    grad_sq_se: float
    noise_var: float
    rho: float
    rel_var: float

    def to_dict(self) -> dict[str, float]:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}

    def passes(self, threshold: float, k_min: int) -> bool:
        """The variance test alone, without the cap: what a round that ran
        to ``k_max`` did *not* certify (NaN/inf ``rel_var`` fail it)."""
        return self.n_seeds >= k_min and self.rel_var <= threshold


def pacing_stats(
    seed_ids: Sequence[int], values: Sequence[float], rho_prior: float = 0.0, z: float = 2.0
) -> PacingStats:
    """Estimate ``|g|^2``, ``sigma^2`` and ``Var(G.g)/|g|^4`` from scalars alone.

    ``seed_ids[i]`` and ``values[i]`` form one observation; repeated seeds
    must have been scored on *different, independently drawn* batches.  For a
    seed scored ``m >= 2`` times, ``p_i = u + n_i`` with ``u = g.v`` and
    independent zero-mean ``n_i``, so

    * the mean pairwise product ``((sum p)^2 - sum p^2) / (m(m-1))`` has
      expectation ``E[u^2] = |g|^2`` (unbiased, and free of ``d``), and
    * the sample variance of the ``p_i`` has expectation ``sigma^2``.

    ``G = (1/N) sum_k m_k pbar_k v_k`` then has
    ``Var(G.g)/|g|^4 = sum_k (2 m_k^2 + m_k rho) / N^2`` (Gaussian fourth
    moment ``E u^4 = 3|g|^4``).  ``rho`` is computed against the lower
    confidence bound ``grad_sq - z * se``: the plug-in ratio has a noisy
    denominator, and on a zero gradient a lucky positive ``grad_sq`` would
    otherwise end the round early (a test checks that it does not).  Without
    replicated seeds ``rho`` is unknown and ``rho_prior`` is used (e.g. the
    previous round's value).
    """
    ids = np.asarray(seed_ids, dtype=np.int64)
    p = np.asarray(values, dtype=np.float64)
    if ids.shape != p.shape or p.ndim != 1:
        raise ValueError("seed_ids and values must be 1-D and of equal length")
    uniq, inv, counts = np.unique(ids, return_inverse=True, return_counts=True)
    s1 = np.bincount(inv, weights=p, minlength=len(uniq))
    s2 = np.bincount(inv, weights=p * p, minlength=len(uniq))
    rep = counts >= 2
    if rep.any():
        m = counts[rep].astype(np.float64)
        cross = (s1[rep] ** 2 - s2[rep]) / (m * (m - 1))
        grad_sq = float(np.mean(cross))
        se = float(np.std(cross, ddof=1) / math.sqrt(len(cross))) if len(cross) > 1 else math.inf
        noise_var = float(np.mean((s2[rep] - s1[rep] ** 2 / m) / (m - 1)))
        lcb = grad_sq - z * se
        rho = max(noise_var, 0.0) / lcb if lcb > 0 else math.inf
    else:
        grad_sq = se = noise_var = math.nan
        rho = rho_prior
    n = float(len(p))
    c = counts.astype(np.float64)
    rel_var = float(np.sum(2 * c * c + c * rho) / (n * n)) if n else math.inf
    return PacingStats(len(p), len(uniq), int(rep.sum()), grad_sq, se, noise_var, rho, rel_var)


def pace(
    seed_ids: Sequence[int],
    values: Sequence[float],
    threshold: float,
    k_min: int,
    k_max: int,
    rho_prior: float = 0.0,
    z: float = 2.0,
) -> tuple[bool, PacingStats]:
    """Is the aggregated estimate precise enough to step?

    Done once ``k_min`` distinct seeds are in and the estimated
    ``Var(G.g)/|g|^4`` is at most ``threshold`` (0.25 ~ "the descent along
    g is known to +-50%"), or as soon as ``k_max`` seeds are in.  A
    ``|g|^2`` estimate whose lower confidence bound is not positive means no
    signal is visible yet: keep collecting.
    """
    stats = pacing_stats(seed_ids, values, rho_prior, z)
    done = stats.n_seeds >= k_max or stats.passes(threshold, k_min)
    return done, stats


# --------------------------------------------------------------------------- #
# Discriminative perturbation sampling
# --------------------------------------------------------------------------- #


def select_discriminative(proj: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` candidates with the largest ``|v_c . u|``, in
    candidate order (so the choice is independent of tie-breaking by sort).

    ``proj[c] = v_c . u`` for the unit vector ``u`` along the previous
    gradient estimate.  ``|proj|`` ranks like FwdLLM's ``|cos(v_c, u)|`` up to
    the ``|v_c|`` factor, which concentrates at ``sqrt(d)``; using the
    projection keeps the selection a function of ``v.u`` only, which is what
    makes the bias below exactly computable.  The sign is irrelevant:
    ``(g.v) v`` is even in ``v``.
    """
    proj = np.asarray(proj, dtype=np.float64)
    if not 0 < n <= len(proj):
        raise ValueError(f"cannot select {n} of {len(proj)} candidates")
    order = np.argsort(-np.abs(proj), kind="stable")[:n]
    return np.sort(order)


def selection_kappa(selected_proj: np.ndarray) -> float:
    """``kappa = E[(v.u)^2 | selected]``, estimated on the selected directions.

    For Gaussian ``v`` write ``v = a u + w`` with ``w`` independent of
    ``a = v.u``.  Selecting on ``a`` leaves ``w`` isotropic, so
    ``E[v v^T | sel] = I + (kappa - 1) u u^T`` and the plain estimator is
    biased: ``E[(g.v) v] = g + (kappa - 1)(u.g) u``.  The bias only stretches
    the component along ``u`` (still a descent direction, like a
    preconditioner); top-10% selection gives ``kappa ~ 4.4``.
    """
    a = np.asarray(selected_proj, dtype=np.float64)
    return float(np.mean(a * a))


def debias_along_u(values: np.ndarray, selected_proj: np.ndarray, kappa: float) -> float:
    """Coefficient ``beta`` on ``u`` that makes ``mean_k p_k v_k + beta u`` unbiased.

    Multiplying by ``E[v v^T|sel]^-1 = I - (1 - 1/kappa) u u^T`` gives
    ``beta = -(1 - 1/kappa) mean_k p_k (v_k . u)``.  Since ``u`` is a known
    combination of the previous round's seeds, the corrected step is still
    "seeds plus coefficients".
    """
    p = np.asarray(values, dtype=np.float64)
    a = np.asarray(selected_proj, dtype=np.float64)
    return float(-(1.0 - 1.0 / kappa) * np.mean(p * a))


# --------------------------------------------------------------------------- #
# Adaptive load allocation
# --------------------------------------------------------------------------- #


def allocate(total: int, throughput: Sequence[float], min_each: int = 1) -> list[int]:
    """Split ``total`` units (seeds) over clients proportionally to throughput.

    A client with a non-finite or non-positive throughput is treated as dead
    and gets 0; every live client gets at least ``min_each``: clients whose
    proportional share falls below it are pinned there and the rest is
    re-split among the others (water-filling).  The final split is by largest
    remainder (Hamilton), ties going to the lower index, so the counts are
    integers that sum to ``total`` exactly, never give a faster client fewer
    units, and are a pure function of the inputs.
    """
    tp = np.array([t if math.isfinite(t) and t > 0 else 0.0 for t in throughput], dtype=np.float64)
    live = tp > 0
    if not live.any():
        raise ValueError("no live client to allocate work to")
    if total < min_each * int(live.sum()):
        raise ValueError(f"cannot give {int(live.sum())} clients {min_each} each out of {total}")
    pinned = np.zeros(len(tp), dtype=bool)
    while True:
        free = live & ~pinned
        rest = total - min_each * int(pinned.sum())
        share = np.where(free, rest * tp / tp[free].sum(), 0.0) if free.any() else np.zeros(len(tp))
        low = free & (share < min_each)
        if not low.any():
            break
        pinned |= low
    out = np.where(pinned, min_each, np.floor(share)).astype(np.int64)
    left = total - int(out.sum())
    frac = np.where(free, share - np.floor(share), -1.0)
    out[np.argsort(-frac, kind="stable")[:left]] += 1
    return [int(x) for x in out]


def ewma_throughput(previous: float, tokens: int, seconds: float, alpha: float = 0.5) -> float:
    """Smoothed tokens/s after a task: the allocation's input for next rounds.

    A bad measurement (no tokens, zero time) keeps the previous value.
    """
    if tokens <= 0 or not seconds > 0:
        return previous
    now = tokens / seconds
    return now if not previous > 0 else alpha * now + (1 - alpha) * previous


def overprovision(needed: int, slack: float) -> int:
    """How many seeds to hand out so that ``needed`` arrive without waiting
    for the slowest device: ``ceil(needed * (1 + slack))``.  The round ends
    at ``needed`` results (:func:`round_done`); the rest are dropped as late,
    which is harmless because arrival time is independent of the seed."""
    return int(math.ceil(needed * (1.0 + slack)))


def round_done(n_received: int, needed: int, n_outstanding: int) -> bool:
    """End the round once ``needed`` perturbations are in, or nothing more can come."""
    return n_received >= needed or n_outstanding == 0


# --------------------------------------------------------------------------- #
# Block-cyclic schedule (FedCyBGD)
# --------------------------------------------------------------------------- #


def block_ranges(n_layers: int, n_blocks: int) -> list[tuple[int, int]]:
    """Split layers ``0..n_layers`` into ``n_blocks`` contiguous half-open
    ranges whose sizes differ by at most one (larger blocks first)."""
    if not 1 <= n_blocks <= n_layers:
        raise ValueError(f"need 1 <= blocks <= layers, got {n_blocks} blocks for {n_layers} layers")
    size, extra = divmod(n_layers, n_blocks)
    out, start = [], 0
    for b in range(n_blocks):
        stop = start + size + (1 if b < extra else 0)
        out.append((start, stop))
        start = stop
    return out


def block_mask(round: int, n_layers: int, n_blocks: int, base: PerturbMask) -> PerturbMask:
    """The mask of 1-based ``round``: ``base`` restricted to block
    ``(round - 1) mod n_blocks`` of its layer range (all layers if none).
    Each round's estimate then lives in ``d_b ~ d / n_blocks`` dimensions, so
    for a fixed K its relative variance ``(d_b + 1)/K`` (:func:`zo_norm_relvar`)
    is ``n_blocks`` times smaller than the full-space one, at the price of
    updating one block per round."""
    lo, hi = base.layers or (0, n_layers)
    start, stop = block_ranges(hi - lo, n_blocks)[(round - 1) % n_blocks]
    return PerturbMask(parts=base.parts, layers=(lo + start, lo + stop), targets=base.targets)
