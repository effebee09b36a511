"""Differential privacy (``--dp-epsilon``): the mechanism's pieces and the
accountant.  The epsilon the run reports must be dp-accounting's epsilon for
the same mechanism (the Poisson-subsampled Gaussian, composed per round)."""

from __future__ import annotations

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp

from fwdllm.aggregator.privacy import DPSpec, Ledger
from fwdllm.core.dp import clipped_sum, gaussian_noise, poisson_sample


def test_epsilon_spent_matches_dp_accounting_for_the_same_mechanism():
    spec = DPSpec(epsilon=4.0, delta=1e-5, clip=1.0, sample_rate=0.004, rounds=50).calibrated()
    ledger = Ledger(spec)
    direct = rdp.RdpAccountant()
    rates = [0.004] * 6 + [0.008] * 2 + [0.004] * 4  # a round with a smaller device samples faster
    for r, q in enumerate(rates, 1):
        spent = ledger.record(q)
        direct.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(spec.sigma)))
        assert spent == pytest.approx(direct.get_epsilon(1e-5), rel=1e-9), r
    half = DPSpec(epsilon=4.0, delta=1e-5, sample_rate=0.004, rounds=12).calibrated()
    assert Ledger(half, [0.004] * 12).epsilon() < Ledger(half, rates).epsilon()  # the faster rounds spent more


def test_calibration_spends_the_budget_in_the_planned_rounds_and_stop_sees_the_end():
    sigmas = []
    for eps in (8.0, 2.0):
        spec = DPSpec(epsilon=eps, delta=1e-5, sample_rate=0.004, rounds=50).calibrated()
        sigmas.append(spec.sigma)
        ledger = Ledger(spec, [0.004] * 49)
        assert not ledger.would_exceed(0.004)
        ledger.record(0.004)
        assert eps * 0.98 <= ledger.epsilon() <= eps * (1 + 1e-6)
        assert ledger.would_exceed(0.004)  # a 51st round would pass the budget
    assert sigmas[0] < sigmas[1]
    back = Ledger(spec)
    back.load_state_dict(ledger.state_dict())
    assert back.epsilon() == ledger.epsilon()
    with pytest.raises(ValueError):
        DPSpec(epsilon=1, delta=2)


def test_one_example_moves_the_clipped_sum_by_at_most_the_clip():
    rng = np.random.default_rng(0)
    d = rng.normal(scale=10, size=(32, 16))
    extra = rng.normal(scale=100, size=(1, 16))
    s0, s1 = clipped_sum(d, 0.5), clipped_sum(np.vstack([d, extra]), 0.5)
    assert np.linalg.norm(s1 - s0) == pytest.approx(0.5)
    small = np.full((2, 4), 0.01)
    np.testing.assert_allclose(clipped_sum(small, 1.0), small.sum(axis=0))  # rows inside the ball are untouched


def test_poisson_batches_and_noise():
    rng = np.random.default_rng(1)
    sizes = [len(poisson_sample(2000, 0.004, rng)) for _ in range(2000)]
    assert abs(np.mean(sizes) - 8) < 0.3 and abs(np.var(sizes) - 8 * 0.996) < 1.0
    z = gaussian_noise(100_000, 3.0, rng)
    assert abs(z.std() - 3) < 0.05
    assert not gaussian_noise(3, 0.0, rng).any()
    with pytest.raises(ValueError):
        poisson_sample(10, 0.0, rng)
