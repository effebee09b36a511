"""Every random choice of a run is a pure function of a seed.

Devices and the server must draw the same perturbations and the same batches
on every platform and numpy version, and a resumed run must hand out exactly
what the uninterrupted run would have.  So only raw bit-generator output and
SHA-256 are used here: numpy's distribution methods (``standard_normal``,
``uniform`` ...) have changed between releases, and are never called.
"""

from __future__ import annotations

import hashlib

import numpy as np


def derive_seed(run_seed: int, *path: int | str) -> int:
    """A uint32 that is a pure function of ``(run_seed, *path)``: the seeds of
    perturbations and data batches, keyed by round, client and index."""
    key = ":".join(str(p) for p in (run_seed, *path)).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "little")


def stream(seed: int, name: str) -> np.random.PCG64:
    """A PCG64 generator whose 128-bit state and increment are the SHA-256 of
    ``"{seed}:{name}"``: one independent stream per (seed, tensor).

    The state is set directly (no SeedSequence), and only ``random_raw`` is
    used; bit generators' raw streams are covered by numpy's stability policy
    (NEP 19).
    """
    digest = hashlib.sha256(f"{int(seed)}:{name}".encode()).digest()
    bg = np.random.PCG64()
    bg.state = {
        "bit_generator": "PCG64",
        "state": {
            "state": int.from_bytes(digest[:16], "little"),
            "inc": int.from_bytes(digest[16:], "little") | 1,
        },
        "has_uint32": 0,
        "uinteger": 0,
    }
    return bg
