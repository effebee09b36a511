"""Protocol v2 and old run directories: a v1 checkpoint (no history, no init
seed in run.json) resumes, with its history starting at the checkpoint, and
a v2 checkpoint keeps its whole history, so a new device still joins by
replay from version 0 after a restart."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from harness import serving, start_worker

from fwdllm.aggregator import checkpoint


def _events(path: Path) -> list[str]:
    return [json.loads(x)["event"] for x in path.read_text().splitlines()]


def _run_to(tmp: Path, rounds: int, resume: bool, events: Path) -> str:
    with serving(tmp, rounds=rounds, k=4, min_clients=1, resume=resume) as agg:
        w, t = start_worker(agg.opts.bind, f"w{rounds}", events=events)
        t.join(30)
        assert w.replica is not None and w.replica.sha == agg.replica.sha
        return agg.replica.sha


def test_a_v2_checkpoint_keeps_its_history_across_a_restart(tmp_path: Path) -> None:
    _run_to(tmp_path, 2, False, tmp_path / "a.jsonl")
    hist = checkpoint.load_extra(tmp_path)["history"]
    assert hist.base_version == 0 and hist.version == 2
    cfg = json.loads((tmp_path / "run.json").read_text())
    cfg["rounds"] = 4
    (tmp_path / "run.json").write_text(json.dumps(cfg))
    _run_to(tmp_path, 4, True, tmp_path / "b.jsonl")
    ev = _events(tmp_path / "b.jsonl")
    assert "replay" in ev and "snapshot" not in ev  # the new device replayed rounds 1-2 from the init seed


def test_a_v1_run_directory_resumes_and_old_devices_get_a_snapshot(tmp_path: Path) -> None:
    _run_to(tmp_path, 2, False, tmp_path / "a.jsonl")
    # make it what protocol v1 wrote: no init seed or v2 fields in run.json, no history in state.npz
    cfg = json.loads((tmp_path / "run.json").read_text())
    for key in ("init_seed", "head_codec", "secagg", "dp"):
        cfg.pop(key)
    cfg["rounds"] = 4
    (tmp_path / "run.json").write_text(json.dumps(cfg))
    with np.load(tmp_path / "state.npz") as z:
        keep = {k: z[k] for k in ("replica", "meta")}
    buf = io.BytesIO()
    np.savez(buf, **keep)
    (tmp_path / "state.npz").write_bytes(buf.getvalue())
    assert checkpoint.load_extra(tmp_path) == {}
    _run_to(tmp_path, 4, True, tmp_path / "b.jsonl")
    ev = _events(tmp_path / "b.jsonl")
    assert "snapshot" in ev  # no init seed: the device cannot build version 0 itself
    hist = checkpoint.load_extra(tmp_path)["history"]
    assert hist.base_version == 2 and hist.version == 4
