"""Optimizers on LoRA tensors (numpy), shared by aggregator and clients.

Both sides run the same step on the same reconstructed gradient, so every
client lands on the server's adapter bit for bit.  Only element-wise IEEE
operations are used (no reductions whose order could vary), which keeps the
step reproducible across machines.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping

import numpy as np

from fwdllm.core.layout import HEAD

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "cosine", "linear")


@dataclass(frozen=True)
class OptimizerSpec:
    """Everything needed to replay a step: sent to clients in ``Welcome``."""

    name: str = "sgd"
    lr: float = 1e-3
    momentum: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup: int = 0
    total_rounds: int = 1
    #: decay of the exponential moving average of the adapter over rounds
    #: (0 = off).  ZO iterates carry noise of order ``lr * |g| * sqrt(d/K)``
    #: per round; averaging them cancels the part of it that the curvature
    #: keeps pulling back, at no forward-pass cost (docs/algorithms.md).
    ema: float = 0.0
    #: learning rate of the classifier head (``--head``), on the same
    #: schedule; 0 = ``lr``.  The head always steps with Adam: its curvature
    #: is dominated by the mean of the hidden states (large and shared by
    #: every example), so plain SGD on the exact gradient overshoots at any
    #: rate that learns in a few hundred rounds, while Adam's per-coordinate
    #: scale does not care (docs/algorithms.md).
    head_lr: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.name!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"learning rate must be positive, got {self.lr}")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"ema decay must be in [0, 1), got {self.ema}")
        if not (self.head_lr >= 0 and math.isfinite(self.head_lr)):
            raise ValueError(f"head learning rate must be >= 0, got {self.head_lr}")

    def lr_at(self, step: int) -> float:
        """Learning rate for 0-based ``step``: linear warmup, then the schedule."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        span = max(1, self.total_rounds - self.warmup)
        frac = min(1.0, (step - self.warmup) / span)
        if self.schedule == "cosine":
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * frac))
        if self.schedule == "linear":
            return self.lr * (1.0 - frac)
        return self.lr

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "OptimizerSpec":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


class Optimizer:
    """SGD (with momentum) or Adam over a dict of float32 tensors.

    State (momentum / moments, the weight average, step count) lives here and
    is saved in checkpoints and snapshots via :meth:`state_arrays`.
    """

    def __init__(self, spec: OptimizerSpec) -> None:
        self.spec = spec
        self.step_count = 0
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}
        self.avg: dict[str, np.ndarray] = {}

    def step(self, params: dict[str, np.ndarray], grad: Mapping[str, np.ndarray], lr: float) -> None:
        """In-place update of ``params`` with gradient estimate ``grad``
        (``lr`` is the scheduled rate; the head's is scaled by head_lr/lr)."""
        s = self.spec
        self.step_count += 1
        t = self.step_count
        for name, g in grad.items():
            head = name == HEAD
            rate = lr * s.head_lr / s.lr if head and s.head_lr else lr
            g = g.astype(np.float32, copy=True)
            p = params[name]
            if s.ema and name not in self.avg:
                self.avg[name] = p.copy()  # the average starts at the initial adapter
            if s.weight_decay:
                g += np.float32(s.weight_decay) * p
            if s.name == "sgd" and not head:
                if s.momentum:
                    m = self.m.get(name)
                    m = g if m is None else np.float32(s.momentum) * m + g
                    self.m[name] = m
                    g = m
                p -= np.float32(rate) * g
            else:
                m = self.m.get(name, np.zeros_like(p))
                v = self.v.get(name, np.zeros_like(p))
                m = np.float32(s.beta1) * m + np.float32(1 - s.beta1) * g
                v = np.float32(s.beta2) * v + np.float32(1 - s.beta2) * (g * g)
                self.m[name], self.v[name] = m, v
                mhat = m / np.float32(1 - s.beta1**t)
                vhat = v / np.float32(1 - s.beta2**t)
                p -= np.float32(rate) * mhat / (np.sqrt(vhat) + np.float32(s.adam_eps))
            if s.ema:
                a = self.avg[name]
                a *= np.float32(s.ema)
                a += np.float32(1 - s.ema) * p

    def averaged(self, params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The adapter to evaluate and ship: the moving average when ``ema`` is
        on (``params`` itself before the first step), else ``params``."""
        return {n: self.avg.get(n, p) if self.spec.ema else p for n, p in params.items()}

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Flat dict for ``np.savez``: ``m/<name>``, ``v/<name>``, ``a/<name>``, ``step``."""
        out = {f"m/{k}": a for k, a in self.m.items()}
        out.update({f"v/{k}": a for k, a in self.v.items()})
        out.update({f"a/{k}": a for k, a in self.avg.items()})
        out["step"] = np.array(self.step_count, dtype=np.int64)
        return out

    def load_state_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.step_count = int(arrays["step"])
        self.m = {k[2:]: np.array(a, dtype=np.float32) for k, a in arrays.items() if k.startswith("m/")}
        self.v = {k[2:]: np.array(a, dtype=np.float32) for k, a in arrays.items() if k.startswith("v/")}
        self.avg = {k[2:]: np.array(a, dtype=np.float32) for k, a in arrays.items() if k.startswith("a/")}
