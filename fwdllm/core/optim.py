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
class Stage:
    """One stage of a staged run: ``rounds`` rounds with ``k`` perturbations
    per round (0 = the head alone), the LoRA at ``lr`` and the head at
    ``head_lr`` (0 = held still), the schedule starting afresh inside it.
    With ``ema`` the stage's product is its moving average: the next stage
    starts from it (every replica swaps it in at the boundary), and the last
    stage's is what the run ships."""

    rounds: int
    k: int
    lr: float
    head_lr: float
    ema: float = 0.0

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.k < 0:
            raise ValueError(f"a stage needs >= 1 round and k >= 0, got {self.rounds} rounds, k {self.k}")
        if not all(x >= 0 and math.isfinite(x) for x in (self.lr, self.head_lr)):
            raise ValueError(f"stage learning rates must be >= 0, got lr {self.lr}, head lr {self.head_lr}")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"a stage's ema decay must be in [0, 1), got {self.ema}")

    @classmethod
    def from_dict(cls, d: Mapping) -> "Stage":
        return cls(int(d["rounds"]), int(d["k"]), float(d["lr"]), float(d["head_lr"]), float(d.get("ema", 0.0)))


def stage_at(stages: tuple[Stage, ...], step: int) -> tuple[int, int]:
    """The index of the stage that 0-based round ``step`` falls in, and the
    step within it (past the end: the last stage's last step)."""
    for i, st in enumerate(stages):
        if step < st.rounds:
            return i, step
        step -= st.rounds
    return len(stages) - 1, stages[-1].rounds - 1


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
    #: the run's stages (``--stages``): each sets the rates of its rounds and
    #: restarts the schedule; none = one stage at ``lr`` and ``head_lr``
    stages: tuple[Stage, ...] = ()
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
        if self.stages and sum(st.rounds for st in self.stages) != self.total_rounds:
            raise ValueError(f"the stages' rounds add up to {sum(st.rounds for st in self.stages)}, "
                             f"not the run's {self.total_rounds}")

    def _shaped(self, lr: float, step: int, total: int, warmup: int) -> float:
        """``lr`` at 0-based ``step`` of ``total``: linear warmup, then the schedule."""
        if step < warmup:
            return lr * (step + 1) / warmup
        span = max(1, total - warmup)
        frac = min(1.0, (step - warmup) / span)
        if self.schedule == "cosine":
            return lr * 0.5 * (1.0 + math.cos(math.pi * frac))
        if self.schedule == "linear":
            return lr * (1.0 - frac)
        return lr

    def lr_at(self, step: int) -> float:
        """The LoRA's learning rate for 0-based ``step`` (the warmup opens the first stage)."""
        if not self.stages:
            return self._shaped(self.lr, step, self.total_rounds, self.warmup)
        n, i = stage_at(self.stages, step)
        return self._shaped(self.stages[n].lr, i, self.stages[n].rounds, 0 if n else self.warmup)

    def head_rate(self, step: int, lr: float) -> float:
        """The head's learning rate at 0-based ``step``, where the LoRA's is ``lr``."""
        if not self.stages:
            return lr * self.head_lr / self.lr if self.head_lr else lr
        n, i = stage_at(self.stages, step)
        return self._shaped(self.stages[n].head_lr, i, self.stages[n].rounds, 0 if n else self.warmup)

    def ema_at(self, step: int) -> float:
        """The moving average's decay at 0-based ``step`` (0 = none)."""
        return self.stages[stage_at(self.stages, step)[0]].ema if self.stages else self.ema

    def stage_start(self, step: int) -> bool:
        """Whether 0-based ``step`` opens a stage after the first one."""
        return bool(self.stages) and stage_at(self.stages, step)[1] == 0 and step > 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "OptimizerSpec":
        out = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        out["stages"] = tuple(Stage.from_dict(st) for st in d.get("stages", ()))
        return cls(**out)


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
        (``lr`` is the LoRA's scheduled rate; the head's is
        :meth:`OptimizerSpec.head_rate` of this step)."""
        s = self.spec
        self.step_count += 1
        t = self.step_count
        ema = s.ema_at(t - 1)
        if s.stage_start(t - 1):  # a stage starts from the last one's product
            for name, a in self.avg.items():
                params[name][...] = a
            self.avg = {}
        for name, g in grad.items():
            head = name == HEAD
            rate = s.head_rate(t - 1, lr) if head else lr
            g = g.astype(np.float32, copy=True)
            p = params[name]
            if ema and name not in self.avg:
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
            if ema:
                a = self.avg[name]
                a *= np.float32(ema)
                a += np.float32(1 - ema) * p

    def averaged(self, params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The adapter to evaluate and ship: the moving average when ``ema`` is
        on in the current stage (``params`` itself before its first step), else ``params``."""
        on = self.spec.ema_at(max(0, self.step_count - 1))
        return {n: self.avg.get(n, p) if on else p for n, p in params.items()}

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
