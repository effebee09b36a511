"""Shared fixtures: real GGUF files made through fwdllm's own convert code."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FWDLLM_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """../shared/data (sst2/train.tsv, ag_news/{train,dev}.csv)."""
    if not (DATA / "sst2" / "train.tsv").exists():
        pytest.fail(f"shared data not found at {DATA}; set FWDLLM_DATA")
    return DATA


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few-M-parameter random llama GGUF (Q4_0), written by `convert synth`."""
    from fwdllm.convert.synth import write_synth

    out = tmp_path_factory.mktemp("tiny") / "tiny-q4_0.gguf"
    return write_synth(out, preset="tiny", quant="Q4_0", seed=0)


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The embedded default model from the model store (pulled once, cached)."""
    from fwdllm.runtime.models import resolve_model

    return resolve_model("smollm2-135m")
