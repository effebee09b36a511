"""Issue #31, item 5: ``serve --resume RUN_DIR`` restores every serve option.

The attack runs against a live ``aggregator serve`` process
(``$FWDLLM_ATTACK_TARGET`` aims it at another install).
"""

from __future__ import annotations

from pathlib import Path

from fwdllm.testing.attacks import run_attack, under_attack


def test_attack_resume_keeps_min_clients(tmp_path: Path, tiny_model: Path) -> None:
    outcome = run_attack("resume", under_attack(), tmp_path, tiny_model)
    assert outcome.held, outcome.to_dict()
