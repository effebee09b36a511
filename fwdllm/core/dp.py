"""Differential privacy of the scalars, the device's side (``--dp-epsilon``).

The unit of privacy is one training **example** (record-level DP, as in
DP-ZO, Tang et al. 2024, and DPZero, Zhang et al. 2024): whatever one example
of one device does, the released updates change in distribution by at most
(epsilon, delta).  Per round a device

1. draws its batch by Poisson sampling - each of its examples independently
   with rate ``q = batch_size / n_examples`` - from its own secret randomness
   (a server that chose the batch would know which examples it holds, and
   amplification by sampling assumes nobody does);
2. scores every seed of the round on each example: ``d[j, k]`` is example j's
   loss difference along seed k, divided by 2 eps (or eps, one-sided);
3. clips each example's row ``d[j]`` to L2 norm ``clip`` and sends the sum
   of the clipped rows - plus, under ``--secagg``, its share of the Gaussian
   noise (distributed noise: the server never sees a less noisy sum).

Adding or removing one example moves that sum by at most ``clip`` in L2, so
a Gaussian of standard deviation ``sigma * clip`` on the round's total is the
subsampled Gaussian mechanism that ``dp-accounting`` composes over rounds
(:mod:`fwdllm.aggregator.privacy`).
"""

from __future__ import annotations

import numpy as np


def poisson_sample(n_examples: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of a Poisson-sampled batch (each example kept with ``rate``)."""
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"sampling rate must be in (0, 1], got {rate}")
    return np.flatnonzero(rng.random(n_examples) < rate)


def clipped_sum(diffs: np.ndarray, clip: float) -> np.ndarray:
    """Sum over examples (rows) of each row scaled down to L2 norm <= ``clip``."""
    d = np.asarray(diffs, dtype=np.float64)
    if d.ndim != 2:
        raise ValueError(f"per-example differences are (examples, seeds), got shape {d.shape}")
    if not clip > 0:
        raise ValueError(f"clip must be positive, got {clip}")
    norms = np.linalg.norm(d, axis=1)
    scale = np.minimum(1.0, clip / np.maximum(norms, 1e-300))
    return (d * scale[:, None]).sum(axis=0)


def gaussian_noise(size: int, std: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise for the mechanism (from a generator seeded by the OS's
    entropy: noise anyone can recompute protects nothing)."""
    return rng.normal(0.0, std, size) if std > 0 else np.zeros(size)
