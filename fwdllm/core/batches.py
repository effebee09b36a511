"""Which examples a device scores: a batch drawn from its shard by a seed alone.

The server sends only a batch seed; every machine holding the same examples
picks the same batch, whatever its numpy version, so a replayed or resumed
round sees the same data.
"""

from __future__ import annotations

from typing import Protocol, Sequence, TypeVar

from fwdllm.core.seeds import stream


class Labelled(Protocol):
    """An example as batch sampling sees it: a label index, or None (sft)."""

    label: int | None


T = TypeVar("T", bound=Labelled)


def partial_shuffle(n: int, k: int, words: Sequence[int]) -> list[int]:
    """The first ``k`` of ``range(n)`` after a partial Fisher-Yates shuffle
    driven by raw 64-bit ``words`` (exact integer arithmetic: no float, no
    numpy distribution method, so every numpy version picks the same)."""
    idx = list(range(n))
    for i in range(k):
        j = i + int(words[i]) % (n - i)
        idx[i], idx[j] = idx[j], idx[i]
    return idx[:k]


def sample_batch(examples: Sequence[T], batch_size: int, batch_seed: int, stratify: bool = False) -> list[T]:
    """``batch_size`` distinct examples chosen by ``batch_seed`` alone.

    Uses the contract's raw PCG64 stream, so every machine holding the same
    examples picks the same batch, whatever its numpy version.

    ``stratify`` (classify data): each label gets ``batch_size * n_label / n``
    slots, rounded up or down at random so that the expected count is exact
    (systematic sampling), and its slots are filled uniformly within the
    label.  The batch gradient stays an unbiased estimate of the shard's,
    and the part of its noise that comes from how many rows of each label a
    uniform batch happens to hold is gone.  That part matters because every
    perturbation's scalar carries this batch noise (docs/algorithms.md).
    """
    n = len(examples)
    k = min(batch_size, n)
    labels = sorted({e.label for e in examples}) if stratify and k < n else []
    if len(labels) < 2 or None in labels:
        words = stream(batch_seed, "batch").random_raw(k) if k else []
        return [examples[i] for i in partial_shuffle(n, k, words)]
    groups = [[i for i, e in enumerate(examples) if e.label == lab] for lab in labels]
    words = [int(w) for w in stream(batch_seed, "strata").random_raw(1 + k)]
    out: list[T] = []
    for members, slots in zip(groups, stratum_sizes(k, [len(m) for m in groups], words[0] % n)):
        picked = partial_shuffle(len(members), slots, words[1 + len(out):])
        out.extend(examples[members[i]] for i in picked)
    return out


def stratum_sizes(k: int, sizes: Sequence[int], offset: int) -> list[int]:
    """Split ``k`` slots over strata of ``sizes`` (``n = sum(sizes)``) by
    systematic sampling: stratum c gets ``floor(k n_c / n)`` plus one if one of
    the points ``offset + m n`` falls in its stretch of the remainders
    ``(k n_c) mod n``.  With ``offset`` uniform on ``0..n-1`` the expected
    count is exactly ``k n_c / n``, so the batch mean stays unbiased, and the
    counts always sum to ``k``."""
    n = sum(sizes)
    out, start = [], 0
    for size in sizes:
        rem = k * size % n
        out.append(k * size // n + (offset - start) // n - (offset - start - rem) // n)
        start += rem
    return out
