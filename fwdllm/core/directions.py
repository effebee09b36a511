"""seed -> direction: a perturbation for every trainable tensor.

Derived from ``(seed, tensor name)`` alone, bit-identical on every platform
and numpy version (golden vectors in the tests pin it).  Only raw
bit-generator output (:func:`fwdllm.core.seeds.stream`) and exact integer
arithmetic are used, because transcendental functions differ in the last ulp
across CPUs.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from fwdllm.core.layout import LoraLayout, PerturbMask
from fwdllm.core.seeds import stream

DISTRIBUTIONS = ("gaussian", "rademacher")


def tensor_direction(seed: int, name: str, shape: tuple[int, ...], dist: str = "gaussian") -> np.ndarray:
    """The perturbation of one tensor, float32, mean 0 and variance ~1 per entry.

    * ``rademacher``: one raw bit per entry, +-1.
    * ``gaussian``: Irwin-Hall(12), the sum of twelve 16-bit uniforms (three
      raw words per entry), centred and scaled by 2^-16.  Every step is exact
      (integers below 2^24, then a power-of-two scale), and a sum over all
      16-bit lanes of the words does not depend on byte order, so the result is
      bit-identical everywhere.  Support is +-6, variance 1 - 2^-32: all a ZO
      estimator needs from a Gaussian.
    """
    n = int(np.prod(shape))
    bg = stream(seed, name)
    if dist == "rademacher":
        words = bg.random_raw((n + 63) // 64)
        bits = (words[:, None] >> np.arange(64, dtype=np.uint64)) & np.uint64(1)
        signs = bits.reshape(-1)[:n].astype(np.int8)
        return (1 - 2 * signs).astype(np.float32).reshape(shape)
    if dist != "gaussian":
        raise ValueError(f"unknown distribution {dist!r}; choose from {DISTRIBUTIONS}")
    # The lane sum runs as a float32 mat-vec (2x faster than an integer
    # reduction over a 12-wide axis): every partial sum is an integer below
    # 12 * 0xFFFF < 2^24, so each float32 addition is exact in any order, and
    # so are the centring and the power-of-two scaling.
    lanes = bg.random_raw(3 * n).view(np.uint16).reshape(n, 12).astype(np.float32)
    centred = lanes @ np.ones(12, dtype=np.float32) - np.float32(6 * 0xFFFF)
    return (centred * np.float32(2.0**-16)).reshape(shape)


def direction(
    seed: int, layout: LoraLayout, mask: PerturbMask, dist: str = "gaussian"
) -> dict[str, np.ndarray]:
    """The direction for ``seed``: perturbed tensors only (absent = zero)."""
    shapes = layout.shapes()
    return {n: tensor_direction(seed, n, shapes[n], dist) for n in mask.names(layout)}


def combine(
    seeds: Iterable[int],
    coeffs: Iterable[float],
    layout: LoraLayout,
    mask: PerturbMask,
    dist: str = "gaussian",
) -> dict[str, np.ndarray]:
    """``sum_k coeff_k * direction(seed_k)`` over every layout tensor, float32.

    The sum runs in float64 in the given seed order, so every party that
    replays the same (seeds, coeffs) gets the same bits.
    """
    acc = {n: np.zeros(s, dtype=np.float64) for n, s in layout.shapes().items()}
    for seed, c in zip(seeds, coeffs):
        for n, v in direction(int(seed), layout, mask, dist).items():
            acc[n] += float(c) * v.astype(np.float64)
    return {n: a.astype(np.float32) for n, a in acc.items()}
