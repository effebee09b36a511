"""Every training algorithm by name: the one list a new strategy joins.

The CLI's ``--strategy`` choices are this dict's keys; ``build`` adds the
robust-aggregation wrapper when ``--strategy-opt robust=...`` asks for it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

from fwdllm.aggregator.robust import Robust, RobustOptions
from fwdllm.aggregator.strategies_fwdllm import Adaptive, BlockCyclic, Discriminative, FwdLLM, Pacing
from fwdllm.aggregator.strategy import ZOSGD, Strategy, StrategySpec

STRATEGIES: dict[str, Callable[[StrategySpec], Strategy]] = {
    c.name: c for c in (ZOSGD, FwdLLM, Pacing, Discriminative, Adaptive, BlockCyclic)
}


def make_strategy(spec: StrategySpec) -> Strategy:
    """The strategy named in ``spec`` (``ValueError`` if unknown), wrapped in
    :class:`Robust` when ``spec.extra`` asks for robust aggregation."""
    opts, rest = RobustOptions.split(spec.extra)
    try:
        inner = STRATEGIES[spec.name](replace(spec, extra=rest))
    except KeyError:
        raise ValueError(f"unknown strategy {spec.name!r}; choose from {', '.join(STRATEGIES)}") from None
    return inner if opts is None else Robust(inner, opts)
