"""The run directory: configuration, per-round checkpoints and metrics.

Layout of ``RUN_DIR``::

    run.json        the run's fixed configuration (model hash, task, layout,
                    optimizer, strategy, run seed), written once, plus the
                    ``serve`` options the last ``aggregator serve`` ran with
                    (bind, quorum, timeouts, keys...), which ``--resume``
                    restores and explicit flags override
    state.npz       the authoritative checkpoint: adapter tensors, optimizer
                    state, version (= rounds finished), strategy state,
                    elapsed seconds, and the server's own record (identities
                    evicted from the run, the privacy ledger, the update
                    history and the head codec's carried error).  Replaced
                    atomically after every round.
    adapter.gguf    the run's product as a llama.cpp LoRA: the adapter, or
                    its moving average under ``--ema`` (written just before
                    state.npz, so it is never older than the checkpoint); a
                    ``--head`` run's classifier head is in it as a LoRA of
                    the output projection
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
import zipfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from fwdllm.core.adapter_io import write_adapter
from fwdllm.core.errors import UserError
from fwdllm.core.files import atomic_write
from fwdllm.core.history import History
from fwdllm.core.layout import LoraLayout
from fwdllm.core.optim import OptimizerSpec
from fwdllm.core.replica import Replica

RUN_JSON = "run.json"
STATE = "state.npz"
ADAPTER = "adapter.gguf"
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
    #: the recipe that filled the options the user did not pass (``--recipe``), if any
    recipe: str | None = None
    #: protocol v2 (runs written before it resume with the v1 behaviour: no
    #: init seed, so devices older than the checkpoint get a snapshot, raw
    #: float32 head gradients, no secure aggregation, no DP)
    #: the seed round 0's adapter was drawn from (:func:`fwdllm.core.lora.initial_tensors`)
    init_seed: int | None = None
    head_codec: str = "f32"
    secagg: dict[str, Any] | None = None  # SecAggOptions
    dp: dict[str, Any] | None = None  # DPSpec, calibrated
    #: the serve options (``aggregator serve``'s flags, by parameter name) of
    #: the last process that served this run; None in runs that predate it
    serve: dict[str, Any] | None = None

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
    """run.json; a file that is not one is a one-line :class:`UserError`."""
    path = run_dir / RUN_JSON
    try:
        cfg = RunConfig(**json.loads(path.read_text()))
    except (OSError, UnicodeDecodeError, ValueError, TypeError) as e:
        raise UserError(f"{path} is not a fwdllm run configuration ({type(e).__name__}: {e})") from None
    if not isinstance(cfg.optimizer, dict) or not isinstance(cfg.layout, dict) or not isinstance(cfg.strategy, dict):
        raise UserError(f"{path} is not a fwdllm run configuration (layout, optimizer or strategy is not an object)")
    return cfg


def save_serve_options(run_dir: Path, cfg: RunConfig, serve: dict[str, Any]) -> RunConfig:
    """Record the serve options in run.json (the rest of it never changes)."""
    if serve == cfg.serve:
        return cfg
    cfg = replace(cfg, serve=dict(serve))
    write_config(run_dir, cfg)
    return cfg


def save(run_dir: Path, replica: Replica, strategy_state: dict[str, Any], elapsed_s: float,
         server_state: dict[str, Any] | None = None, history: History | None = None,
         head_residual: np.ndarray | None = None) -> None:
    """Checkpoint after a finished round: adapter.gguf, then state.npz.

    ``server_state`` is the server's own record (JSON: identities evicted,
    the privacy ledger); protocol v2 adds the update ``history`` and
    ``head_residual`` (the head codec's carried error), saved with the round
    they belong to."""
    write_adapter(run_dir / ADAPTER, replica.layout, replica.optimizer.averaged(replica.tensors))
    meta = {"strategy": strategy_state, "elapsed_s": elapsed_s, "server": server_state or {}}
    arrays = {
        "replica": np.frombuffer(replica.to_bytes(), dtype=np.uint8),
        "meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
    }
    if history is not None:
        arrays["history"] = np.frombuffer(history.encode(), dtype=np.uint8)
    if head_residual is not None:
        arrays["head_residual"] = np.asarray(head_residual, dtype=np.float32)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write(run_dir / STATE, buf.getvalue())


def load(run_dir: Path, spec: OptimizerSpec) -> tuple[Replica, dict[str, Any], float]:
    """(replica, strategy state, elapsed seconds) of the last finished round;
    a file that is not a checkpoint is a one-line :class:`UserError`."""
    meta, blob = _read_state(run_dir)
    try:
        replica = Replica.from_bytes(blob, spec)
        return replica, dict(meta["strategy"]), float(meta["elapsed_s"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{run_dir / STATE} is not a fwdllm checkpoint ({type(e).__name__}: {e})") from None


def server_state(run_dir: Path) -> dict[str, Any]:
    """The server's record in the last checkpoint ({} in runs that predate it)."""
    meta, _ = _read_state(run_dir)
    state = meta.get("server", {})
    return state if isinstance(state, dict) else {}


def _read_state(run_dir: Path) -> tuple[dict[str, Any], bytes]:
    path = run_dir / STATE
    try:
        with np.load(path, allow_pickle=False) as z:
            blob = z["replica"].tobytes()
            meta = json.loads(z["meta"].tobytes())
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a fwdllm checkpoint, or it is damaged ({type(e).__name__}: {e}); "
                        "a run directory keeps only its last checkpoint, so start over or restore a copy") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path} is not a fwdllm checkpoint (its meta is not an object)")
    return meta, blob


def load_extra(run_dir: Path) -> dict[str, Any]:
    """The protocol-v2 parts of ``state.npz`` that are there: ``history``
    (a :class:`~fwdllm.core.history.History`; a v1 checkpoint has none, so
    the history starts at its own version), ``head_residual`` and ``dp`` (the
    privacy ledger's state).  {} without a checkpoint; a damaged one is a
    one-line :class:`UserError`."""
    path = run_dir / STATE
    if not path.exists():
        return {}
    out: dict[str, Any] = {}
    dp = server_state(run_dir).get("dp")
    if dp:
        out["dp"] = dp
    try:
        with np.load(path, allow_pickle=False) as z:
            if "history" in z.files:
                out["history"] = History.decode(z["history"].tobytes())
            if "head_residual" in z.files:
                out["head_residual"] = np.array(z["head_residual"], dtype=np.float32)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
        raise UserError(f"{path} is not a fwdllm checkpoint, or it is damaged ({type(e).__name__}: {e})") from None
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
