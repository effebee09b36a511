"""Federation across real processes, where the process boundary is the point:
the real commands (`python -m fwdllm.aggregator serve`, `python -m
fwdllm.edge_client run`) on the tiny synthetic model over 127.0.0.1, an
aggregator killed with SIGKILL and resumed, and CURVE between processes.
(The same federation in threads, with its training and agreement checks,
is tests/federation/test_llama_federation.py.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
from harness import Devices, stop

from fwdllm.aggregator.checkpoint import read_metrics
from fwdllm.aggregator.simulate import free_port
from fwdllm.core.adapter_io import read_adapter

# q,v pinned as in the in-thread federation tests; --no-head: the scalars-only protocol
TRAIN = ["--k", "12", "--eps", "1e-2", "--lr", "0.05", "--batch-size", "8", "--seed", "3", "--targets", "q,v",
         "--no-head"]


@pytest.fixture
def fed(tmp_path: Path, tiny_devices: Devices) -> Iterator["Fed"]:
    fed = Fed(tmp_path, tiny_devices)
    try:
        yield fed
    finally:
        fed.kill_all()


class Fed:
    """Starts and always reaps the processes of one test (on the clients' task and shards)."""

    def __init__(self, tmp: Path, devices: Devices) -> None:
        self.tmp, self.devices = tmp, devices
        self.model, self.task, self.shards = devices.model, devices.task_file, devices.shards
        self.procs: list[subprocess.Popen] = []
        self.url = f"tcp://127.0.0.1:{free_port()}"

    def _spawn(self, args: list[str], log: str) -> subprocess.Popen:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.tmp / log, "ab") as f:
            p = subprocess.Popen([sys.executable, "-m", *args], stdout=f, stderr=subprocess.STDOUT, env=env)
        self.procs.append(p)
        return p

    def aggregator(self, out: Path, rounds: int, resume: bool = False, extra: tuple[str, ...] = (),
                   clients: int = 3) -> subprocess.Popen:
        args = ["fwdllm.aggregator", "serve", "--bind", self.url, "--min-clients", str(clients),
                "--heartbeat", "0.5", "--threads", "1"]
        if resume:
            args += ["--resume", str(out), "--model", str(self.model)]
        else:
            args += ["--model", str(self.model), "--task", str(self.task), "--rounds", str(rounds),
                     "--out", str(out), *TRAIN, *extra]
        return self._spawn(args, f"aggregator-{out.name}.log")

    def client(self, i: int, events: Path, extra: tuple[str, ...] = ()) -> subprocess.Popen:
        return self._spawn(
            ["fwdllm.edge_client", "run", "--connect", self.url, "--model", str(self.model), "--data", str(self.shards[i]),
             "--task", str(self.task), "--threads", "1", "--client-id", f"c{i}", "--events", str(events),
             "--give-up", "60", *extra],
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


@pytest.mark.timeout(90)
def test_kill9_aggregator_then_resume_is_bit_identical(fed: Fed) -> None:
    """`serve` as a process, SIGKILLed after round 2 and resumed with `--resume`,
    ends on the adapter of the uninterrupted run, bit for bit.  The clients are
    real workers on llama.cpp in this process (the aggregator's death is the
    point here, not theirs): they reconnect to the resumed one by themselves."""
    ref = fed.tmp / "straight"
    agg = fed.aggregator(ref, rounds=4)
    ws = fed.devices.start(fed.url)
    assert agg.wait(180) == 0, fed.logs()
    stop(ws)

    fed.url = f"tcp://127.0.0.1:{free_port()}"
    cut = fed.tmp / "resumed"
    agg = fed.aggregator(cut, rounds=4)
    ws = fed.devices.start(fed.url)
    wait_for(lambda: len([r for r in read_metrics(cut) if r["round"] == 2]) == 1, fed)
    agg.send_signal(signal.SIGKILL)
    agg.wait(10)
    agg = fed.aggregator(cut, rounds=4, resume=True)
    assert agg.wait(180) == 0, fed.logs()
    stop(ws)

    assert [r["round"] for r in read_metrics(cut)] == [1, 2, 3, 4]
    a, b = read_metrics(ref)[-1], read_metrics(cut)[-1]
    assert a["adapter_sha256"] == b["adapter_sha256"]
    (_, ta), (_, tb) = read_adapter(ref / "adapter.gguf"), read_adapter(cut / "adapter.gguf")
    assert all(np.array_equal(ta[n], tb[n]) for n in ta)
    assert any(np.any(ta[n] != 0) for n in ta if n.endswith("lora_b"))  # it did train


@pytest.mark.timeout(60)
def test_cli_serve_and_client_run_over_curve(fed: Fed, keydir: Path) -> None:
    """The real commands, wired end to end: `aggregator serve --curve-secret --allow`
    and `client run --curve-secret --server-key` on the tiny model."""
    out = fed.tmp / "run"
    agg = fed.aggregator(out, rounds=2, clients=1, extra=("--curve-secret", str(keydir / "server.key_secret"),
                                                          "--allow", str(fed.tmp / "allowed")))
    fed.client(0, fed.tmp / "c0.jsonl", ("--curve-secret", str(keydir / "device-1.key_secret"),
                                         "--server-key", str(keydir / "server.key")))
    assert agg.wait(180) == 0, fed.logs()
    assert [r["round"] for r in read_metrics(out)] == [1, 2]
    assert "PLAINTEXT" not in fed.logs() and "CURVE on" in (fed.tmp / "aggregator-run.log").read_text()
