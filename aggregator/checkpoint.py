"""The run directory: configuration, per-round checkpoints and metrics.

Layout of ``RUN_DIR``::

    run.json        the run's fixed configuration (model hash, task, layout,
                    optimizer, strategy, run seed); written once
    state.npz       the authoritative checkpoint: adapter tensors, optimizer
                    state, version (= rounds finished), strategy state,
                    elapsed seconds.  Replaced atomically after every round.
    adapter.gguf    the run's product as a llama.cpp LoRA: the adapter, or
                    its moving average under ``--ema`` (written just before
                    state.npz, so it is never older than the checkpoint)
    head.npy        runs with ``--head`` only: the classifier-head correction
                    (label words x n_embd, float32; ``fwdllm eval --head``),
                    averaged like adapter.gguf and written with it
    metrics.jsonl   one JSON line per round (round 0 = before training)

Crash safety: every file is written to a temporary name and renamed, and the
Update of round r is broadcast only after round r's checkpoint is on disk, so
a restarted aggregator never applies a round twice and no client is ever
ahead of it.  ``--resume`` trims metrics lines newer than the checkpoint.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fwdllm.core.adapter_io import write_adapter
from fwdllm.core.files import atomic_write
from fwdllm.core.layout import HEAD, LoraLayout
from fwdllm.core.optim import OptimizerSpec
from fwdllm.core.replica import Replica

RUN_JSON = "run.json"
STATE = "state.npz"
ADAPTER = "adapter.gguf"
HEAD_FILE = "head.npy"
METRICS = "metrics.jsonl"


@dataclass(frozen=True)
class RunConfig:
    """What a run is; a resumed run must reuse it unchanged."""

    run_id: str
    model: str
    model_sha256: str
    task: str  # preset name or spec path, as given
    task_name: str
    dev: str | None
    dev_limit: int | None
    rounds: int
    eval_every: int
    layout: dict[str, Any]
    optimizer: dict[str, Any]
    strategy: dict[str, Any]
    #: the adapter round 0 started from (``--init-adapter``): path and sha256
    init_adapter: dict[str, str] | None = None
    #: protocol v2 (runs written before it resume with the v1 behaviour: no
    #: init seed, so devices older than the checkpoint get a snapshot, raw
    #: float32 head gradients, no secure aggregation, no DP)
    #: the seed round 0's adapter was drawn from (:func:`fwdllm.core.lora.initial_tensors`)
    init_seed: int | None = None
    head_codec: str = "f32"
    secagg: dict[str, Any] | None = None  # SecAggOptions
    dp: dict[str, Any] | None = None  # DPSpec, calibrated

    @property
    def secagg_options(self):  # noqa: ANN201 - aggregator.secure.SecAggOptions | None
        from fwdllm.aggregator.secure import SecAggOptions

        return SecAggOptions(**self.secagg) if self.secagg is not None else None

    @property
    def dp_spec(self):  # noqa: ANN201 - aggregator.privacy.DPSpec | None
        from fwdllm.aggregator.privacy import DPSpec

        return DPSpec.from_dict(self.dp) if self.dp is not None else None

    @property
    def lora_layout(self) -> LoraLayout:
        return LoraLayout.from_dict(self.layout)

    @property
    def optimizer_spec(self) -> OptimizerSpec:
        return OptimizerSpec.from_dict(self.optimizer)


def write_config(run_dir: Path, cfg: RunConfig) -> None:
    atomic_write(run_dir / RUN_JSON, json.dumps(asdict(cfg), indent=2).encode())


def read_config(run_dir: Path) -> RunConfig:
    return RunConfig(**json.loads((run_dir / RUN_JSON).read_text()))


def save(run_dir: Path, replica: Replica, strategy_state: dict[str, Any], elapsed_s: float,
         extra: dict[str, Any] | None = None) -> None:
    """Checkpoint after a finished round: adapter.gguf, then state.npz.

    ``extra`` (protocol v2): ``history`` (:class:`~fwdllm.core.history.History`),
    ``head_residual`` (the head codec's carried error) and ``dp`` (the
    privacy ledger's state), saved with the round they belong to."""
    shipped = replica.optimizer.averaged(replica.tensors)
    write_adapter(run_dir / ADAPTER, replica.layout, shipped)
    if replica.layout.head is not None:
        buf = io.BytesIO()
        np.save(buf, shipped[HEAD], allow_pickle=False)
        atomic_write(run_dir / HEAD_FILE, buf.getvalue())
    extra = extra or {}
    meta = {"strategy": strategy_state, "elapsed_s": elapsed_s, "dp": extra.get("dp")}
    arrays = {
        "replica": np.frombuffer(replica.to_bytes(), dtype=np.uint8),
        "meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
    }
    if extra.get("history") is not None:
        arrays["history"] = np.frombuffer(extra["history"].encode(), dtype=np.uint8)
    if extra.get("head_residual") is not None:
        arrays["head_residual"] = np.asarray(extra["head_residual"], dtype=np.float32)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write(run_dir / STATE, buf.getvalue())


def load(run_dir: Path, spec: OptimizerSpec) -> tuple[Replica, dict[str, Any], float]:
    """(replica, strategy state, elapsed seconds) of the last finished round."""
    with np.load(run_dir / STATE, allow_pickle=False) as z:
        replica = Replica.from_bytes(z["replica"].tobytes(), spec)
        meta = json.loads(z["meta"].tobytes())
    return replica, meta["strategy"], float(meta["elapsed_s"])


def load_extra(run_dir: Path) -> dict[str, Any]:
    """The protocol-v2 parts of ``state.npz`` that are there (a v1 checkpoint
    has none: its history starts at its own version)."""
    from fwdllm.core.history import History

    path = run_dir / STATE
    if not path.exists():
        return {}
    with np.load(path, allow_pickle=False) as z:
        out: dict[str, Any] = {}
        if "history" in z.files:
            out["history"] = History.decode(z["history"].tobytes())
        if "head_residual" in z.files:
            out["head_residual"] = np.array(z["head_residual"], dtype=np.float32)
        dp = json.loads(z["meta"].tobytes()).get("dp")
        if dp:
            out["dp"] = dp
    return out


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    with open(run_dir / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """All complete metrics lines (a torn last line from a crash is skipped)."""
    path = run_dir / METRICS
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def trim_metrics(run_dir: Path, version: int) -> None:
    """Keep only lines of finished rounds; at version 0 nothing is kept, so
    the before-training evaluation is redone."""
    keep = [r for r in read_metrics(run_dir) if version > 0 and r["round"] <= version]
    atomic_write(run_dir / METRICS, "".join(json.dumps(r) + "\n" for r in keep).encode())
