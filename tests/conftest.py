"""Fixtures shared by every tier (see tests/README.md): real GGUF files made
through fwdllm's own convert code, the embedded SmolLM2, and the objects that
cost seconds to build, built once per test session."""

from __future__ import annotations

import os

# One BLAS/OpenMP thread per process, for the reason THREADS (tests/harness.py) is one
# llama.cpp thread: OpenBLAS's threads spin as well. Set before numpy loads; the tests'
# child processes inherit it.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from pathlib import Path  # noqa: E402
from typing import Callable, Iterator  # noqa: E402

import pytest  # noqa: E402
from harness import THREADS, Devices  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FWDLLM_DATA", REPO.parent / "shared" / "data"))
SYSTEM = Path(__file__).parent / "system"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The system tier is the slow tier: `make test-fast` (-m "not slow") skips it."""
    for item in items:
        if SYSTEM in item.path.parents:
            item.add_marker(pytest.mark.slow)


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
def tiny_devices(tiny_model: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Devices]:
    """Three federation clients on the tiny model (harness.Devices)."""
    devices = Devices.make(tiny_model, data_dir, tmp_path_factory.mktemp("devices"))
    yield devices
    devices.close()


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The embedded default model from the model store (pulled once, cached)."""
    from fwdllm.runtime.models import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_session(smollm2: Path):  # noqa: ANN201 - EdgeSession
    """One llama.cpp EdgeSession on SmolLM2 for the sst2 preset. Shared: a test
    sets the LoRA it scores under (``set_lora``) rather than assume one."""
    from fwdllm.runtime.session import EdgeSession
    from fwdllm.runtime.tasks import load_task

    with EdgeSession(smollm2, load_task("sst2"), n_threads=THREADS) as s:
        yield s


@pytest.fixture
def keydir(tmp_path: Path) -> Path:
    """CURVE keys made by `fwdllm keys generate`: server, device-1 (allowed in
    tmp_path/allowed) and intruder (not allowed)."""
    from click.testing import CliRunner

    from fwdllm.cli import keys

    for args in (["server"], ["device-1", "--allow", str(tmp_path / "allowed")], ["intruder"]):
        r = CliRunner().invoke(keys, ["generate", *args, "--out", str(tmp_path / "keys")])
        assert r.exit_code == 0, r.output
    return tmp_path / "keys"


@pytest.fixture(scope="session")
def torch_ref() -> Callable[[Path], object]:
    """``torch_ref(model)``: the dequantized torch copy of a GGUF model
    (fwdllm.reference.torch_ref.TorchRef), loaded once per model and session."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from fwdllm.reference.torch_ref import TorchRef

    refs: dict[Path, TorchRef] = {}

    def get(model: Path) -> TorchRef:
        if model not in refs:
            refs[model] = TorchRef(model, n_threads=THREADS)
        return refs[model]

    return get
