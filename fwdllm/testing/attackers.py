"""Test-only attackers: allowed devices that lie, for robustness tests and benches.

Never part of a device install's code path: ``fwdllm simulate --byzantine``
starts them as their own processes (``python -m fwdllm.testing.attackers``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np


class Byzantine:
    """TEST-ONLY attacker: wraps a worker's scorer and replaces every Result's
    losses with huge random numbers (same seeds and round, so the frame is
    well-formed and only robust aggregation can tell).  Used by
    ``fwdllm simulate --byzantine FRACTION`` / ``client run --byzantine`` to
    measure what :class:`Robust` buys; never enable it on a real device."""

    def __init__(self, scorer: Any, scale: float = 1e3) -> None:
        self.scorer = scorer
        self.scale = scale

    def __getattr__(self, name: str) -> Any:  # session, examples, task_name: the real scorer's
        return getattr(self.scorer, name)

    def score(self, layout: Any, tensors: dict[str, np.ndarray], task: Any) -> Any:
        honest = self.scorer.score(layout, tensors, task)
        rng = np.random.default_rng(task.batch_seed ^ 0xBAD)
        n = len(honest.seeds)
        return replace(honest, loss_plus=rng.normal(0, self.scale, n), loss_minus=rng.normal(0, self.scale, n))


def main() -> None:
    """``python -m fwdllm.testing.attackers ARGS``: ``fwdllm client run`` with the
    same options, whose every Result is :class:`Byzantine` garbage."""
    from fwdllm.edge_client.cli import run_cmd
    from fwdllm.edge_client.worker import run_device
    from fwdllm.options import Command

    Command("attacker", params=run_cmd.params,
                  callback=lambda **kw: run_device(**kw, wrap=Byzantine))(prog_name="attacker")


if __name__ == "__main__":
    main()
