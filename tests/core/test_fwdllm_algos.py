"""FwdLLM math checked against brute force on synthetic problems (numpy only)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fwdllm.aggregator import fwdllm_algos as algos
from fwdllm.core.layout import LoraLayout, PerturbMask


def _scalars(rng: np.random.Generator, g: np.ndarray, v: np.ndarray, sigma: float, m: int) -> np.ndarray:
    """``m`` batch observations of ``g_b . v`` with isotropic batch noise:
    ``(g + sigma/sqrt(d) xi) . v`` has noise variance ``sigma^2 |v|^2/d ~ sigma^2``."""
    xi = rng.standard_normal((m, len(g))) * sigma / math.sqrt(len(g))
    return (g + xi) @ v


# --------------------------------------------------------------------------- #
# estimator variance


def test_norm_relvar_matches_brute_force() -> None:
    """``E|G - g|^2/|g|^2 = ((d+1) + d rho)/K``: at least d/K whatever the scalars."""
    rng = np.random.default_rng(0)
    d, k, sigma = 40, 8, 0.5
    g = rng.standard_normal(d)
    rho = sigma**2 / (g @ g)
    errs = []
    for _ in range(4000):
        v = rng.standard_normal((k, d))
        p = np.array([_scalars(rng, g, vk, sigma, 1)[0] for vk in v])
        errs.append(np.sum((p @ v / k - g) ** 2) / (g @ g))
    assert np.mean(errs) == pytest.approx(algos.zo_norm_relvar(d, k, rho), rel=0.06)
    assert algos.zo_norm_relvar(d, k, rho) > d / k


# --------------------------------------------------------------------------- #
# pacing


def test_pacing_stats_unbiased_and_predicts_inner_product_variance() -> None:
    """Over many rounds: mean grad_sq ~ |g|^2, mean noise_var ~ sigma^2, and the
    predicted Var(G.g)/|g|^4 matches the empirical one."""
    rng = np.random.default_rng(1)
    d, k, m, sigma = 30, 12, 2, 1.5
    g = rng.standard_normal(d) / math.sqrt(d)  # |g| ~ 1, rho ~ 2.25
    gs, ns, rels, dots = [], [], [], []
    for _ in range(3000):
        v = rng.standard_normal((k, d))
        ids = np.repeat(np.arange(k), m)
        vals = np.concatenate([_scalars(rng, g, vk, sigma, m) for vk in v])
        st_ = algos.pacing_stats(ids, vals, z=0.0)
        gs.append(st_.grad_sq)
        ns.append(st_.noise_var)
        rels.append(st_.rel_var)
        pbar = vals.reshape(k, m).mean(axis=1)
        dots.append((pbar @ v / k) @ g)
    g2 = g @ g
    assert np.mean(gs) == pytest.approx(g2, rel=0.05)
    assert np.mean(ns) == pytest.approx(sigma**2, rel=0.03)
    empirical = np.var(dots) / g2**2
    truth = (2 + sigma**2 / g2 / m) / k
    assert empirical == pytest.approx(truth, rel=0.1)
    assert np.median(rels) == pytest.approx(truth, rel=0.35)  # plug-in ratio: noisier, roughly centred


def test_pacing_stats_without_replicas_uses_prior() -> None:
    st_ = algos.pacing_stats([1, 2, 3, 4], [0.1, -0.2, 0.3, 0.0], rho_prior=6.0)
    assert st_.n_replicated == 0 and math.isnan(st_.grad_sq)
    assert st_.rel_var == pytest.approx((2 + 6.0) / 4)
    assert st_.to_dict()["grad_sq"] is None  # JSON-safe for metrics.jsonl


def test_pacing_stats_rejects_mismatched_inputs() -> None:
    with pytest.raises(ValueError):
        algos.pacing_stats([1, 2], [0.1])


def _collect_until_done(g: np.ndarray, sigma: float, seed: int, k_min: int = 8, k_max: int = 256) -> int:
    rng = np.random.default_rng(seed)
    ids: list[int] = []
    vals: list[float] = []
    while True:
        v = rng.standard_normal(len(g))
        ids += [len(set(ids))] * 2
        vals += list(_scalars(rng, g, v, sigma, 2))
        done, stats = algos.pace(ids, vals, threshold=0.25, k_min=k_min, k_max=k_max)
        if done:
            return stats.n_seeds


def test_pace_asks_for_more_seeds_as_noise_dominates() -> None:
    """The number of perturbations adapts: ~k_min on a clean gradient, more with
    noisy scalars, the cap when there is no gradient at all."""
    g = np.ones(50) / math.sqrt(50)
    clean = [_collect_until_done(g, 0.05, s) for s in range(5)]
    noisy = [_collect_until_done(g, 3.0, s) for s in range(5)]
    none = [_collect_until_done(np.zeros(50), 1.0, s) for s in range(3)]
    assert max(clean) <= 24
    assert np.median(noisy) >= 2 * np.median(clean)
    assert np.median(none) >= 128  # signal never shows: mostly runs to the cap


def test_pace_caps_at_k_max_and_waits_for_k_min() -> None:
    done, st_ = algos.pace([1, 1, 2, 2], [1.0, 1.0, 1.0, 1.0], threshold=10.0, k_min=3, k_max=10)
    assert not done and st_.n_seeds == 2
    done, _ = algos.pace([1, 2, 3], [0.0, 0.0, 0.0], threshold=1e-9, k_min=1, k_max=3)
    assert done


# --------------------------------------------------------------------------- #
# discriminative sampling


def test_select_discriminative_picks_largest_abs_projection_in_order() -> None:
    proj = np.array([0.1, -3.0, 2.0, 0.5, -2.5])
    assert list(algos.select_discriminative(proj, 3)) == [1, 2, 4]
    with pytest.raises(ValueError):
        algos.select_discriminative(proj, 6)


def test_discriminative_bias_is_as_derived_and_debiasing_removes_it() -> None:
    """Top-10% selection by |v.u|: the plain estimator's mean is
    ``g + (kappa-1)(u.g) u`` (biased along u only); the corrected one is ~g."""
    rng = np.random.default_rng(2)
    d, k, over = 12, 4, 10
    g = rng.standard_normal(d)
    u = g + rng.standard_normal(d)  # the previous estimate: correlated with g, not equal
    u /= np.linalg.norm(u)
    plain, fixed, kappas = np.zeros(d), np.zeros(d), []
    trials = 20000
    for _ in range(trials):
        cand = rng.standard_normal((k * over, d))
        v = cand[algos.select_discriminative(cand @ u, k)]
        a = v @ u
        p = v @ g
        kappa = algos.selection_kappa(a)
        kappas.append(kappa)
        plain += p @ v / k
        fixed += p @ v / k + algos.debias_along_u(p, a, kappa) * u
    plain /= trials
    fixed /= trials
    kappa = float(np.mean(kappas))
    assert 3.5 < kappa < 5.5  # ~4.4 for the top decile of |N(0,1)|
    predicted = g + (kappa - 1) * (u @ g) * u
    assert np.linalg.norm(plain - predicted) < 0.1 * np.linalg.norm(g)
    assert np.linalg.norm(plain - g) > 1.0 * np.linalg.norm(g)  # the bias is large...
    assert np.linalg.norm(fixed - g) < 0.1 * np.linalg.norm(g)  # ...and corrected
    assert plain @ g > 0  # biased, but still a descent direction


# --------------------------------------------------------------------------- #
# adaptive allocation


@settings(max_examples=200, deadline=None)
@given(
    total=st.integers(0, 500),
    tp=st.lists(st.one_of(st.floats(0.0, 1e4), st.just(math.nan)), min_size=1, max_size=12),
)
def test_allocate_sums_exactly_with_min_one_for_live(total: int, tp: list[float]) -> None:
    live = [t > 0 for t in tp]
    if not any(live) or total < sum(live):
        with pytest.raises(ValueError):
            algos.allocate(total, tp)
        return
    out = algos.allocate(total, tp)
    assert sum(out) == total
    assert all((n >= 1) if ok else (n == 0) for n, ok in zip(out, live))
    speed = [t if ok else 0.0 for t, ok in zip(tp, live)]
    assert all(out[i] >= out[j] for i in range(len(tp)) for j in range(len(tp)) if speed[i] > speed[j])
    ideal = total * np.array(speed) / sum(speed)
    if ideal[np.array(live)].min() >= 1:  # the minimum does not bind: plain proportional
        assert np.all(np.abs(np.array(out) - ideal) < 1.0)


def test_allocate_is_proportional() -> None:
    assert algos.allocate(16, [100.0, 300.0]) == [4, 12]
    assert algos.allocate(10, [1.0, 1.0, 1.0]) == [4, 3, 3]
    assert algos.allocate(5, [1.0, 0.0, 1000.0]) == [1, 0, 4]


def test_throughput_and_round_rules() -> None:
    assert algos.ewma_throughput(0.0, 100, 2.0) == 50.0
    assert algos.ewma_throughput(50.0, 300, 2.0, alpha=0.5) == 100.0
    assert algos.ewma_throughput(50.0, 0, 2.0) == 50.0
    assert algos.overprovision(16, 0.25) == 20
    assert algos.round_done(16, 16, 4) and algos.round_done(3, 16, 0) and not algos.round_done(15, 16, 2)


# --------------------------------------------------------------------------- #
# block-cyclic schedule


@given(n_layers=st.integers(1, 64), data=st.data())
def test_block_ranges_partition_layers(n_layers: int, data: st.DataObject) -> None:
    n_blocks = data.draw(st.integers(1, n_layers))
    ranges = algos.block_ranges(n_layers, n_blocks)
    assert ranges[0][0] == 0 and ranges[-1][1] == n_layers
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    sizes = [b - a for a, b in ranges]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_block_mask_cycles_and_shrinks_the_perturbed_dimension() -> None:
    shapes = {f"blk.{i}.attn_{t}.weight": (64, 64) for i in range(6) for t in ("q", "v")}
    layout = LoraLayout.for_base(shapes, rank=4, alpha=8, targets=["q", "v"])
    base = PerturbMask(parts="b", targets=("q", "v"))
    full = sum(np.prod(layout.shapes()[n]) for n in base.names(layout))
    masks = [algos.block_mask(r, 6, 3, base) for r in range(1, 7)]
    assert [m.layers for m in masks] == [(0, 2), (2, 4), (4, 6)] * 2
    dims = [sum(np.prod(layout.shapes()[n]) for n in m.names(layout)) for m in masks[:3]]
    assert dims == [full // 3] * 3
    inner = [algos.block_mask(r, 6, 2, PerturbMask(layers=(2, 6))).layers for r in range(1, 4)]
    assert inner == [(2, 4), (4, 6), (2, 4)]  # blocks cycle inside --layers
    with pytest.raises(ValueError):
        algos.block_mask(1, 6, 3, PerturbMask(layers=(0, 2)))
    with pytest.raises(ValueError):
        algos.block_ranges(3, 4)


def test_block_estimator_relative_variance_drops_with_block_dimension() -> None:
    """For fixed K the relative error of the block's estimate is (d_b+1)/K,
    about n_blocks times below the full-space (d+1)/K."""
    rng = np.random.default_rng(3)
    d, k, n_blocks = 64, 8, 4
    g = rng.standard_normal(d)
    blk = slice(0, d // n_blocks)
    full_err, blk_err = [], []
    for _ in range(3000):
        v = rng.standard_normal((k, d))
        full_err.append(np.sum(((v @ g) @ v / k - g) ** 2) / (g @ g))
        vb = v[:, blk]
        gb = g[blk]
        blk_err.append(np.sum(((vb @ gb) @ vb / k - gb) ** 2) / (gb @ gb))
    assert np.mean(full_err) == pytest.approx(algos.zo_norm_relvar(d, k), rel=0.08)
    assert np.mean(blk_err) == pytest.approx(algos.zo_norm_relvar(d // n_blocks, k), rel=0.08)
    assert np.mean(full_err) / np.mean(blk_err) > 3.0
