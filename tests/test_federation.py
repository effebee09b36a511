"""Federation end to end: real processes, real sockets on 127.0.0.1, real llama.cpp.

One aggregator (`python -m fwdllm.aggregator serve`) and three workers
(`python -m fwdllm.edge_client run`) on the tiny synthetic model.  Each worker's
shard is 8 examples and the batch size is 8, so every round scores the same
training batch and its loss must fall.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest

from fwdllm.aggregator.checkpoint import read_metrics
from fwdllm.aggregator.simulate import free_port, write_shards
from fwdllm.core.adapter_io import read_adapter

N_CLIENTS = 3
# q,v pinned: on the tiny random model 5 rounds on v alone move the loss less than the test's margin;
# --no-head: these tests check the scalars-only protocol (the head has its own test below)
TRAIN = ["--k", "12", "--eps", "1e-2", "--lr", "0.05", "--batch-size", "8", "--seed", "3", "--targets", "q,v",
         "--no-head"]


@pytest.fixture
def fed(tmp_path: Path, tiny_model: Path, data_dir: Path) -> Iterator["Fed"]:
    fed = Fed(tmp_path, tiny_model, data_dir)
    try:
        yield fed
    finally:
        fed.kill_all()


class Fed:
    """Starts and always reaps the processes of one test."""

    def __init__(self, tmp: Path, model: Path, data_dir: Path) -> None:
        self.tmp, self.model = tmp, model
        # The tiny model's vocabulary splits " negative"; one-token label words.
        self.task = tmp / "tiny-sst2.json"
        self.task.write_text(json.dumps({
            "kind": "classify", "template": "Review: {text}\nSentiment:", "label_words": ["bad", "good"],
            "labels": ["0", "1"], "text_columns": ["sentence"], "format": "tsv",
            "train": str(data_dir / "sst2" / "train.tsv"),
        }))
        self.shards = write_shards(str(self.task), tmp / "shards", N_CLIENTS, 8, None, seed=1)
        self.procs: list[subprocess.Popen] = []
        self.url = f"tcp://127.0.0.1:{free_port()}"

    def _spawn(self, args: list[str], log: str) -> subprocess.Popen:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.tmp / log, "ab") as f:
            p = subprocess.Popen([sys.executable, "-m", *args], stdout=f, stderr=subprocess.STDOUT, env=env)
        self.procs.append(p)
        return p

    def aggregator(self, out: Path, rounds: int, resume: bool = False, extra: tuple[str, ...] = ()) -> subprocess.Popen:
        args = ["fwdllm.aggregator", "serve", "--bind", self.url, "--min-clients", str(N_CLIENTS),
                "--heartbeat", "0.5", "--threads", "1"]
        if resume:
            args += ["--resume", str(out), "--model", str(self.model)]
        else:
            args += ["--model", str(self.model), "--task", str(self.task), "--rounds", str(rounds),
                     "--out", str(out), *TRAIN, *extra]
        return self._spawn(args, f"aggregator-{out.name}.log")

    def client(self, i: int, events: Path) -> subprocess.Popen:
        return self._spawn(
            ["fwdllm.edge_client", "run", "--connect", self.url, "--model", str(self.model), "--data", str(self.shards[i]),
             "--task", str(self.task), "--threads", "1", "--client-id", f"c{i}", "--events", str(events),
             "--give-up", "60"],
            f"client-{events.stem}.log",
        )

    def kill_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            p.wait(10)

    def logs(self) -> str:
        return "\n".join(f"--- {f.name}\n{f.read_text()[-2000:]}" for f in sorted(self.tmp.glob("*.log")))


def wait_for(cond: Callable[[], bool], fed: Fed, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            pytest.fail("timed out\n" + fed.logs())
        time.sleep(0.05)


def events(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_three_clients_train_agree_and_survive_a_dead_client(fed: Fed, tiny_model: Path) -> None:
    out = fed.tmp / "run"
    agg = fed.aggregator(out, rounds=5)
    ev = [fed.tmp / f"c{i}.jsonl" for i in range(N_CLIENTS)]
    clients = [fed.client(i, ev[i]) for i in range(N_CLIENTS)]
    # c2 applied round 2's update: it has just been handed round 3's task.
    wait_for(lambda: any(e["event"] == "update" and e["round"] == 2 for e in events(ev[2])), fed)
    clients[2].send_signal(signal.SIGKILL)
    assert agg.wait(180) == 0, fed.logs()
    recs = read_metrics(out)
    assert [r["round"] for r in recs] == [1, 2, 3, 4, 5], fed.logs()
    assert "c2" in recs[2]["dropped"] and recs[2]["clients"] == 2
    assert all(r["participants"] == 2 for r in recs[3:])
    # every client's replayed adapter equals the server's after every round it saw
    sha = {r["round"]: r["adapter_sha256"] for r in recs}
    for i, path in enumerate(ev):
        seen = {e["round"]: e["sha"] for e in events(path) if e["event"] == "update"}
        assert seen and all(sha[r] == s for r, s in seen.items()), path
        assert set(seen) == ({1, 2} if i == 2 else set(sha))
    # the training loss on the clients' own data went down
    from fwdllm.runtime.session import EdgeSession
    from fwdllm.runtime.tasks import load_task, read_examples

    task = load_task(str(fed.task))
    examples = [x for s in fed.shards for x in read_examples(task, s)]
    layout, tensors = read_adapter(out / "adapter.gguf")
    with EdgeSession(tiny_model, task, n_threads=1) as s:
        s.engine.free_adapter(s.engine.load_adapter(out / "adapter.gguf"))  # llama.cpp takes the file as is
        before = s.evaluate(examples).loss
        s.set_lora(layout, tensors)
        after = s.evaluate(examples).loss
    assert after < before - 0.01, (before, after)


def test_kill9_aggregator_then_resume_is_bit_identical(fed: Fed) -> None:
    def clients(tag: str) -> list[subprocess.Popen]:
        return [fed.client(i, fed.tmp / f"{tag}-c{i}.jsonl") for i in range(N_CLIENTS)]

    ref = fed.tmp / "straight"
    agg = fed.aggregator(ref, rounds=4)
    clients("a")
    assert agg.wait(180) == 0, fed.logs()
    fed.kill_all()

    fed.url = f"tcp://127.0.0.1:{free_port()}"
    cut = fed.tmp / "resumed"
    agg = fed.aggregator(cut, rounds=4)
    clients("b")
    wait_for(lambda: len([r for r in read_metrics(cut) if r["round"] == 2]) == 1, fed)
    agg.send_signal(signal.SIGKILL)
    agg.wait(10)
    agg = fed.aggregator(cut, rounds=4, resume=True)  # the same clients reconnect by themselves
    assert agg.wait(180) == 0, fed.logs()

    assert [r["round"] for r in read_metrics(cut)] == [1, 2, 3, 4]
    a, b = read_metrics(ref)[-1], read_metrics(cut)[-1]
    assert a["adapter_sha256"] == b["adapter_sha256"]
    (_, ta), (_, tb) = read_adapter(ref / "adapter.gguf"), read_adapter(cut / "adapter.gguf")
    assert all(np.array_equal(ta[n], tb[n]) for n in ta)
    assert any(np.any(ta[n] != 0) for n in ta if n.endswith("lora_b"))  # it did train


def test_head_run_trains_agrees_and_ships_head_npy(fed: Fed, tiny_model: Path) -> None:
    """--head end to end: the exact head gradients travel up, their mean travels
    down, every replica lands on the server's hash, and eval --head scores
    exactly what the run trained."""
    from click.testing import CliRunner

    from fwdllm.core.layout import HEAD
    from fwdllm.edge_client.cli import eval_cmd
    from fwdllm.runtime.session import EdgeSession
    from fwdllm.runtime.tasks import load_task, read_examples

    out = fed.tmp / "head"
    agg = fed.aggregator(out, rounds=3, extra=("--head", "--head-lr", "0.01"))
    ev = [fed.tmp / f"h{i}.jsonl" for i in range(N_CLIENTS)]
    for i in range(N_CLIENTS):
        fed.client(i, ev[i])
    assert agg.wait(180) == 0, fed.logs()
    recs = read_metrics(out)
    sha = {r["round"]: r["adapter_sha256"] for r in recs}
    for path in ev:
        seen = {e["round"]: e["sha"] for e in events(path) if e["event"] == "update"}
        assert seen == sha, path
    head = np.load(out / "head.npy")
    n_head = head.shape[0] * (head.shape[1] + 4)  # the default int8 codec: a byte an entry, a scale a row
    assert head.dtype == np.float32 and head.shape[0] == 2 and np.any(head != 0)
    assert all(r["bytes_up_per_client"] > n_head and r["bytes_update"] > n_head for r in recs)

    task = load_task(str(fed.task))
    layout, tensors = read_adapter(out / "adapter.gguf")
    import dataclasses

    headed = dataclasses.replace(layout, head=head.shape)
    with EdgeSession(tiny_model, task, n_threads=1) as s:
        examples = [x for sh in fed.shards for x in read_examples(task, sh)]
        s.set_lora(headed, {**layout.zeros(), HEAD: np.zeros_like(head)})
        before = s.evaluate(examples).loss
        s.set_lora(headed, {**tensors, HEAD: head})
        after = s.evaluate(examples).loss
        shard0 = s.evaluate(read_examples(task, fed.shards[0]))
    assert after < before - 0.01, (before, after)
    res = CliRunner().invoke(eval_cmd, ["--model", str(tiny_model), "--task", str(fed.task), "--data",
                                        str(fed.shards[0]), "--lora", str(out / "adapter.gguf"),
                                        "--head-file", str(out / "head.npy"), "--threads", "1", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["loss"] == pytest.approx(shard0.loss, abs=1e-9)
    res = CliRunner().invoke(eval_cmd, ["--model", str(tiny_model), "--task", str(fed.task),
                                        "--head-file", str(out / "head.npy")])
    assert res.exit_code == 2 and "--head-file needs the run's --lora" in res.output


def test_head_only_rounds_cost_one_pass_per_client_and_leave_the_lora(fed: Fed) -> None:
    """--k 0 --head: every client scores one batch with no seeds, so a round is
    one forward pass per client; the base loss travels up in place of the
    missing loss_minus, the head learns, the LoRA stays bit for bit where it
    started (B = 0), and the replicas still agree with the server."""
    out = fed.tmp / "head-only"
    agg = fed.aggregator(out, rounds=3, extra=("--head", "--head-lr", "0.01", "--k", "0"))
    ev = [fed.tmp / f"o{i}.jsonl" for i in range(N_CLIENTS)]
    for i in range(N_CLIENTS):
        fed.client(i, ev[i])
    assert agg.wait(180) == 0, fed.logs()
    recs = [r for r in read_metrics(out) if r["round"] > 0]
    assert [r["round"] for r in recs] == [1, 2, 3], fed.logs()
    assert all(r["forward_passes"] == N_CLIENTS and r["perturbations"] == 0 for r in recs)
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in recs)
    sha = {r["round"]: r["adapter_sha256"] for r in recs}
    for path in ev:
        assert {e["round"]: e["sha"] for e in events(path) if e["event"] == "update"} == sha, path
    assert np.any(np.load(out / "head.npy") != 0)
    _, end = read_adapter(out / "adapter.gguf")
    assert all(not np.any(t) for n, t in end.items() if n.endswith("lora_b"))  # B starts at zero and stays there
