"""Compressed head gradients, bit-exact on every replica.

The classifier head's gradient is the one part of a round that is a tensor
(n_labels x n_embd float32: 4.6 KB on SmolLM2 SST-2, each way, every round),
so it dominates a ``--head`` run's traffic.  A codec turns it into fewer
bytes; every party then applies the *decoded bytes* - the aggregator decodes
what it broadcasts before stepping its own replica - so all replicas stay
identical whatever the rounding.  The sender keeps what the rounding lost
and adds it to its next gradient (error feedback, Seide et al. 2014; Karimireddy
et al. 2019), so no part of the gradient is lost for good, only delayed.

Codecs:

* ``f32`` - the raw little-endian float32 (protocol v1's format).
* ``f16`` - IEEE half precision, 2 bytes an entry.
* ``int8`` - per row a float32 scale ``max|row| / 127`` and one signed byte an
  entry (``n_labels * (4 + n_embd)`` bytes): 3.9x smaller than f32.

Decoding is ``q * scale`` in float32 (or a float16 -> float32 widening):
exact IEEE operations that every platform computes the same.
"""

from __future__ import annotations

import numpy as np

CODECS = ("f32", "f16", "int8")


def encode(grad: np.ndarray, codec: str, residual: np.ndarray | None = None) -> tuple[bytes, np.ndarray]:
    """(bytes, new residual) for a 2-D float gradient plus the carried
    ``residual`` (error feedback; None = zero)."""
    g = np.asarray(grad, dtype=np.float32)
    if g.ndim != 2:
        raise ValueError(f"a head gradient is 2-D, got shape {g.shape}")
    x = g if residual is None else g + residual.astype(np.float32)
    if codec == "f32":
        raw = np.ascontiguousarray(x, dtype="<f4").tobytes()
    elif codec == "f16":
        raw = np.ascontiguousarray(x, dtype="<f2").tobytes()
    elif codec == "int8":
        peak = np.abs(x).max(axis=1).astype(np.float32)
        scale = np.where(peak > 0, peak / np.float32(127), np.float32(1)).astype(np.float32)
        q = np.clip(np.rint(x / scale[:, None]), -127, 127).astype(np.int8)
        raw = scale.astype("<f4").tobytes() + q.tobytes()
    else:
        raise ValueError(f"unknown head codec {codec!r}; choose from {CODECS}")
    return raw, x - decode(raw, codec, g.shape)


def decode(raw: bytes, codec: str, shape: tuple[int, int]) -> np.ndarray:
    """The float32 gradient every party applies; ``ValueError`` if ``raw``
    does not fit ``shape`` or holds a non-finite value."""
    rows, cols = shape
    want = {"f32": 4 * rows * cols, "f16": 2 * rows * cols, "int8": rows * (4 + cols)}.get(codec)
    if want is None:
        raise ValueError(f"unknown head codec {codec!r}; choose from {CODECS}")
    if len(raw) != want:
        raise ValueError(f"{codec} head gradient of {len(raw)} bytes, want {want}")
    if codec == "f32":
        out = np.frombuffer(raw, "<f4").astype(np.float32).reshape(shape)
    elif codec == "f16":
        out = np.frombuffer(raw, "<f2").astype(np.float32).reshape(shape)
    else:
        scale = np.frombuffer(raw, "<f4", rows).astype(np.float32)
        q = np.frombuffer(raw, np.int8, rows * cols, 4 * rows).reshape(shape)
        out = q.astype(np.float32) * scale[:, None]
    if not np.all(np.isfinite(out)):
        raise ValueError("head gradient has a non-finite value")
    return out
