"""Federation end to end on real llama.cpp, in threads: one aggregator and
three workers of the test process, each worker scoring on its own EdgeSession
of the tiny synthetic model, over real sockets on 127.0.0.1.

Each worker's shard is its batch (harness.Devices), so every round scores the
same training batch and its loss must fall.  (The same run across
real processes, through the commands: tests/system/test_processes.py.)
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from harness import THREADS, Devices, finish, free_url, running, server_options, stop, wait_until

from fwdllm.aggregator import checkpoint, setup
from fwdllm.aggregator.server import Aggregator
from fwdllm.aggregator.strategy import StrategySpec
from fwdllm.core.adapter_io import read_adapter
from fwdllm.core.layout import HEAD
from fwdllm.core.optim import OptimizerSpec
from fwdllm.edge_client.worker import Scorer, Worker
from fwdllm.runtime.models import model_sha256

K = 12


def aggregator(dev: Devices, out: Path, rounds: int, k: int = K, head: bool = False) -> Aggregator:
    """A new run as `aggregator serve` makes it: k seeds a round, eps 1e-2, lr 0.05
    (cosine), batches of a shard, seed 3, one-sided, a rank-8 LoRA on q and v (on
    v alone 5 rounds move the tiny model's loss less than the tests' margin)."""
    cfg, replica = setup.new_run(
        out, dev.model, model_sha256(dev.model), str(dev.task_file), None, None, rounds, rounds,
        setup.LoraSpec(8, 16.0, ("q", "v"), 3, head),
        OptimizerSpec(lr=0.05, head_lr=0.01, schedule="cosine", total_rounds=rounds),
        StrategySpec(run_seed=3, k=k, eps=1e-2, batch_size=Devices.SHARD, one_sided=True))
    opts = server_options(free_url(), min_clients=len(dev.sessions), liveness=10)
    return Aggregator(out, cfg, replica, setup.strategy_for(cfg, {}), opts, None, 0.0)


def events(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


class DiesAtRound:
    """A device that dies, without a word, once handed round ``n``'s task: its
    worker stops (no Bye, no more heartbeats) while the task is never scored."""

    def __init__(self, scorer: Scorer, n: int) -> None:
        self.scorer, self.n = scorer, n
        self.worker: Worker | None = None
        self.released = threading.Event()

    def __getattr__(self, name: str) -> Any:  # session, examples, task_name: the real scorer's
        return getattr(self.scorer, name)

    def score(self, layout: Any, tensors: dict[str, np.ndarray], task: Any) -> Any:
        if task.round >= self.n:
            assert self.worker is not None
            self.worker.done = "killed"
            self.released.wait(60)  # the test lets the orphaned task end
        return self.scorer.score(layout, tensors, task)


@pytest.mark.timeout(60)
def test_three_clients_train_agree_and_survive_a_dead_client(tiny_devices: Devices, tmp_path: Path) -> None:
    out = tmp_path / "run"
    ev = [tmp_path / f"c{i}.jsonl" for i in range(3)]
    dies = DiesAtRound(tiny_devices.scorer(2), 3)
    with running(aggregator(tiny_devices, out, rounds=5)) as agg:
        ws = tiny_devices.start(agg.opts.bind, ev, {2: dies})
        dies.worker = ws[2][0]
        try:
            wait_until(lambda: agg.replica.version >= 5 and agg.pending is None, 45, "the last round")
            dies.released.set()
            finish(ws)  # the run's Bye ends the live ones, after its last Update
        finally:
            dies.released.set()
            stop(ws)
    recs = checkpoint.read_metrics(out)
    assert [r["round"] for r in recs] == [1, 2, 3, 4, 5]
    assert "c2" in recs[2]["dropped"] and recs[2]["clients"] == 2
    assert all(r["participants"] == 2 for r in recs[3:])
    # every client's replayed adapter equals the server's after every round it saw
    sha = {r["round"]: r["adapter_sha256"] for r in recs}
    for i, path in enumerate(ev):
        seen = {e["round"]: e["sha"] for e in events(path) if e["event"] == "update"}
        assert seen and all(sha[r] == s for r, s in seen.items()), path
        assert set(seen) == ({1, 2} if i == 2 else set(sha))
    # the training loss on the clients' own data went down
    layout, tensors = read_adapter(out / "adapter.gguf")
    s = tiny_devices.sessions[0]
    s.engine.free_adapter(s.engine.load_adapter(out / "adapter.gguf"))  # llama.cpp takes the file as is
    s.set_lora(None, None)
    before = s.evaluate(tiny_devices.examples()).loss
    s.set_lora(layout, tensors)
    after = s.evaluate(tiny_devices.examples()).loss
    assert after < before - 0.01, (before, after)


def _run_to_the_end(dev: Devices, agg: Aggregator, events_: list[Path]) -> list[dict]:
    with running(agg):
        finish(dev.start(agg.opts.bind, events_))
    return [r for r in checkpoint.read_metrics(agg.run_dir) if r["round"] > 0]


@pytest.mark.timeout(60)
def test_head_run_trains_agrees_and_ships_head_in_the_adapter(tiny_devices: Devices, tmp_path: Path) -> None:
    """--head end to end: the exact head gradients travel up, their mean travels
    down, every replica lands on the server's hash, and eval of adapter.gguf
    alone scores exactly what the run trained."""
    from fwdllm.edge_client.cli import eval_cmd

    out = tmp_path / "head"
    ev = [tmp_path / f"h{i}.jsonl" for i in range(3)]
    recs = _run_to_the_end(tiny_devices, aggregator(tiny_devices, out, rounds=3, head=True), ev)
    sha = {r["round"]: r["adapter_sha256"] for r in recs}
    for path in ev:
        seen = {e["round"]: e["sha"] for e in events(path) if e["event"] == "update"}
        assert seen == sha, path
    layout, tensors = read_adapter(out / "adapter.gguf")  # the head is a LoRA of the output projection in it
    head = tensors[HEAD]
    n_head = head.shape[0] * (head.shape[1] + 4)  # the default int8 codec: a byte an entry, a scale a row
    assert head.dtype == np.float32 and head.shape[0] == 2 and np.any(head != 0)
    assert all(r["bytes_up_per_client"] > n_head and r["bytes_update"] > n_head for r in recs)
    assert not (out / "head.npy").exists()

    s = tiny_devices.sessions[0]
    s.set_lora(layout, {**layout.zeros(), HEAD: np.zeros_like(head)})
    before = s.evaluate(tiny_devices.examples()).loss
    s.set_lora(layout, tensors)
    after = s.evaluate(tiny_devices.examples()).loss
    shard0 = s.evaluate(tiny_devices.examples(0))
    assert after < before - 0.01, (before, after)
    common = ["--model", str(tiny_devices.model), "--task", str(tiny_devices.task_file), "--threads", str(THREADS)]
    res = CliRunner().invoke(eval_cmd, [*common, "--data", str(tiny_devices.shards[0]), "--lora", str(out / "adapter.gguf"),
                                        "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["loss"] == pytest.approx(shard0.loss, abs=1e-9)


@pytest.mark.timeout(60)
def test_head_only_rounds_cost_one_pass_per_client_and_leave_the_lora(tiny_devices: Devices, tmp_path: Path) -> None:
    """--k 0 --head: every client scores one batch with no seeds, so a round is
    one forward pass per client; the base loss travels up in place of the
    missing loss_minus, the head learns, the LoRA stays bit for bit where it
    started (B = 0), and the replicas still agree with the server."""
    out = tmp_path / "head-only"
    ev = [tmp_path / f"o{i}.jsonl" for i in range(3)]
    recs = _run_to_the_end(tiny_devices, aggregator(tiny_devices, out, rounds=3, k=0, head=True), ev)
    assert [r["round"] for r in recs] == [1, 2, 3]
    assert all(r["forward_passes"] == 3 and r["perturbations"] == 0 for r in recs)
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in recs)
    sha = {r["round"]: r["adapter_sha256"] for r in recs}
    for path in ev:
        assert {e["round"]: e["sha"] for e in events(path) if e["event"] == "update"} == sha, path
    _, end = read_adapter(out / "adapter.gguf")
    assert np.any(end[HEAD] != 0)
    assert all(not np.any(t) for n, t in end.items() if n.endswith("lora_b"))  # B starts at zero and stays there
