"""Issue #31, item 6: bad input is one ``Error:`` line and a non-zero exit.

Runs ``fwdllm`` commands as a new user would (``$FWDLLM_ATTACK_TARGET`` aims
them at another install): ``--out`` where nothing can be written, corrupt
``run.json`` and ``state.npz`` on ``--resume``, a GGUF with a corrupt tensor
count.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fwdllm.testing.attacks import check


@pytest.mark.slow  # a multi-process attack of 10-30 s
@pytest.mark.timeout(300)
def test_attack_bad_input_is_one_line(tmp_path: Path, tiny_model: Path) -> None:
    check("bad-input", tmp_path, tiny_model)
