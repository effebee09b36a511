"""Issue #31, item 5: ``serve --resume RUN_DIR`` restores every serve option.

The attack runs against a live ``aggregator serve`` process
(``$FWDLLM_ATTACK_TARGET`` aims it at another install).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fwdllm.testing.attacks import check

pytestmark = pytest.mark.timeout(60)


def test_attack_resume_keeps_min_clients(tmp_path: Path, tiny_model: Path) -> None:
    check("resume", tmp_path, tiny_model)


def test_resume_restores_serve_options_and_given_flags_win(tmp_path: Path) -> None:
    """What --resume keeps, and that a flag given again wins (parsed as click parses serve)."""
    from fwdllm.aggregator.cli import SERVE_OPTIONS, _serve_options, serve

    saved = _serve_options(serve.make_context("serve", ["--bind", "tcp://127.0.0.1:7001", "--min-clients", "4",
                                                        "--quorum", "0.5", "--deadline-floor", "30"]), None)
    assert set(saved) == set(SERVE_OPTIONS) and saved["min_clients"] == 4 and saved["deadline_floor_s"] == 30
    again = _serve_options(serve.make_context("serve", ["--resume", str(tmp_path), "--quorum", "0.8"]), saved)
    assert again == {**saved, "quorum": 0.8}
    old_run = _serve_options(serve.make_context("serve", ["--resume", str(tmp_path)]), {})
    assert old_run["min_clients"] == 1 and old_run["bind"] == "tcp://*:5555"  # a run.json without the block
