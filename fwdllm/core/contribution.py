"""One client's contribution to a round as a single vector, for rounds whose
server only ever sees a sum (``--secagg``) or a privatised sum (``--dp-epsilon``).

Without DP the vector is ``[projection per seed (K), batch loss, rows *
head gradient (n_labels * n_embd, with --head), rows]``: the server divides
the projection and loss sums by the number of contributors and the head sum
by the summed rows, which is exactly the plain mean of per-client results.
With DP it is the clipped per-seed sums over the device's examples, plus its
share of the noise (:mod:`fwdllm.core.dp`); losses and the head stay home.

Under ``--secagg`` every entry is clipped to the round's ``bound`` before it
is masked: the one per-client bound a server that sees only sums can rely on
(docs/security.md, robust aggregation under --secagg).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Shape:
    """Where each part sits in a round's contribution vector."""

    k: int
    head: tuple[int, int] | None
    dp: bool

    @property
    def length(self) -> int:
        if self.dp:
            return self.k
        return self.k + 1 + (self.head[0] * self.head[1] + 1 if self.head else 0)


@dataclass(frozen=True)
class Parts:
    """A contribution vector (or a sum of them) split into its parts."""

    projections: np.ndarray
    loss: float
    head: np.ndarray | None  # rows-weighted head gradient sum
    rows: float


def vector(shape: Shape, projections: np.ndarray, loss: float = 0.0, head: np.ndarray | None = None,
           rows: int = 0) -> np.ndarray:
    """The float64 vector of one client (DP: ``projections`` are its clipped sums plus noise)."""
    p = np.asarray(projections, dtype=np.float64)
    if p.shape != (shape.k,):
        raise ValueError(f"{p.shape[0] if p.ndim else 0} projections for a round of {shape.k} seeds")
    if shape.dp:
        return p
    parts = [p, [float(loss)]]
    if shape.head:
        if head is None or rows < 1:
            raise ValueError("a head run's contribution needs the head gradient and its rows")
        parts += [rows * np.asarray(head, dtype=np.float64).ravel(), [float(rows)]]
    return np.concatenate(parts)


def split(shape: Shape, total: np.ndarray) -> Parts:
    t = np.asarray(total, dtype=np.float64)
    if t.shape != (shape.length,):
        raise ValueError(f"vector of {t.shape} entries, the round's contributions have {shape.length}")
    if shape.dp:
        return Parts(t, float("nan"), None, 0.0)
    head = t[shape.k + 1:-1].reshape(shape.head) if shape.head else None
    return Parts(t[:shape.k], float(t[shape.k]), head, float(t[-1]) if shape.head else 0.0)
