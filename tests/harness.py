"""What the tests share besides conftest's fixtures: the llama.cpp thread count
(THREADS), the tiny model's SST-2 task and its federation clients (Devices),
the bench smoke helpers, and the in-thread federation: the real
:class:`Aggregator` and real :class:`Worker`s as threads of the test process,
talking over real ZeroMQ sockets on 127.0.0.1, with model-free quadratic
clients or llama.cpp ones.

Run as a script it is one federation process, for the tests where the process
boundary is the point (kill -9)::

    python tests/harness.py server RUN_DIR URL ROUNDS [--resume]
    python tests/harness.py client URL CLIENT_ID DELAY_S
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # as a child process, run from anywhere

from fwdllm.aggregator import checkpoint, setup  # noqa: E402
from fwdllm.aggregator.server import Aggregator, ServerOptions  # noqa: E402
from fwdllm.aggregator.strategy import StrategySpec  # noqa: E402
from fwdllm.core.layout import PerturbMask  # noqa: E402
from fwdllm.core.optim import OptimizerSpec  # noqa: E402
from fwdllm.core.protocol import Join  # noqa: E402
from fwdllm.edge_client.worker import EventLog, Scorer, Worker  # noqa: E402
from fwdllm.runtime.transport import ClientKeys, ServerKeys  # noqa: E402
from fwdllm.testing.attackers import Byzantine  # noqa: E402
from fwdllm.testing.fake import FAKE_MODEL_SHA, QuadraticScorer, synthetic_run  # noqa: E402
from fwdllm.testing.harness import serving_thread  # noqa: E402

#: llama.cpp and torch threads per model in a test.  One, not the cores: their
#: threads spin at every barrier, so with more threads than free cores (a CI
#: runner's neighbours, a shared machine, the federation tests' own threads)
#: each op waits for a descheduled sibling, and a test runs many times slower.
THREADS = 1
HB = 0.2  # heartbeat of the in-thread aggregators, seconds


def free_url() -> str:
    from fwdllm.aggregator.simulate import free_port

    return f"tcp://127.0.0.1:{free_port()}"


def join_msg(cid: str, sha: str = FAKE_MODEL_SHA, tokens_per_s: float = 100.0) -> Join:
    return Join(client_id=cid, model_sha256=sha, tokens_per_s=tokens_per_s, mem_bytes=0, max_batch=8, n_examples=10)


def tiny_sst2_task(directory: Path, data_dir: Path) -> Path:
    """SST-2 as a task file for the tiny model, whose vocabulary splits " negative"
    but has one-token "bad"/"good"."""
    path = directory / "tiny-sst2.json"
    path.write_text(json.dumps({
        "kind": "classify", "template": "Review: {text}\nSentiment:", "label_words": ["bad", "good"],
        "labels": ["0", "1"], "text_columns": ["sentence"], "format": "tsv",
        "train": str(data_dir / "sst2" / "train.tsv")}))
    return path


@dataclass
class Devices:
    """Federation clients on the tiny model: its SST-2 task, and per client a
    shard (which is also its batch: every round scores the same rows) and an
    EdgeSession.  Built once per test session (conftest's ``tiny_devices``):
    a worker sets the LoRA of each task it scores."""

    model: Path
    task_file: Path
    task: Any  # fwdllm.runtime.tasks.TaskSpec
    shards: list[Path]
    sessions: list[Any]  # fwdllm.runtime.session.EdgeSession

    SHARD = 4

    @classmethod
    def make(cls, model: Path, data_dir: Path, out: Path, n: int = 3) -> "Devices":
        from fwdllm.aggregator.simulate import write_shards
        from fwdllm.runtime.session import EdgeSession
        from fwdllm.runtime.tasks import load_task

        task_file = tiny_sst2_task(out, data_dir)
        task = load_task(str(task_file))
        shards = write_shards(str(task_file), out / "shards", n, cls.SHARD, None, seed=1)
        sessions = [EdgeSession(model, task, n_threads=THREADS, max_batch=cls.SHARD) for _ in range(n)]
        return cls(model, task_file, task, shards, sessions)

    def close(self) -> None:
        for s in self.sessions:
            s.close()

    def examples(self, i: int | None = None) -> list:
        """Client ``i``'s shard, or every client's."""
        from fwdllm.runtime.tasks import read_examples

        return [x for j, s in enumerate(self.shards) if i in (None, j) for x in read_examples(self.task, s)]

    def scorer(self, i: int) -> Scorer:
        return Scorer(self.sessions[i], self.examples(i), self.task.name)

    def start(self, url: str, events: list[Path] | None = None,
              scorers: dict[int, Any] | None = None) -> list[tuple[Worker, threading.Thread]]:
        """A real Worker per client, in threads, each logging to ``events[i]``
        (``scorers`` replaces some clients' scorer)."""
        from fwdllm.runtime.models import model_sha256

        sha, scorers = model_sha256(self.model), scorers or {}
        return [start_worker(url, f"c{i}", scorers.get(i) or self.scorer(i), events=events[i] if events else None,
                             sha=sha, give_up_s=60) for i in range(len(self.sessions))]


#: a bench on the tiny model: one-token label words (its vocabulary splits " negative"/" positive"), THREADS
TINY_BENCH = ["--label-words", "good,bad", "--threads", str(THREADS)]


def invoke(cmd: Any, args: list[str]) -> None:
    """Run a click command in-process; it must succeed."""
    from click.testing import CliRunner

    result = CliRunner().invoke(cmd, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output


def bench_result(out: Path, name: str) -> dict:
    """A bench's JSON record (with its PNG beside it) in ``out``."""
    assert (out / f"{name}.png").stat().st_size > 0
    data = json.loads((out / f"{name}.json").read_text())
    assert data["bench"] == name and data["commit"] and "CPU" in data["machine"]
    return data


def new_or_resumed(run_dir: Path, rounds: int, k: int, resume: bool, extra: dict[str, Any] | None = None,
                   lr: float = 0.05, ema: float = 0.0, stratify: bool = False) -> tuple[Any, Any, dict, float]:
    """(config, replica, strategy state, elapsed) of a synthetic run, new or from its checkpoint."""
    if resume:
        return setup.resume_run(run_dir, FAKE_MODEL_SHA)
    cfg, replica = synthetic_run(rounds, OptimizerSpec(lr=lr, total_rounds=rounds, ema=ema),
                                 StrategySpec(k=k, stratify=stratify, extra=extra or {}))
    checkpoint.write_config(run_dir, cfg)
    checkpoint.save(run_dir, replica, {}, 0.0)  # round 0, as `aggregator serve` does
    return cfg, replica, {}, 0.0


def server_options(url: str, **opts: Any) -> ServerOptions:
    """The in-thread aggregators' options: a fast heartbeat, generous deadlines."""
    return ServerOptions(**{"bind": url, "heartbeat_s": HB, "liveness": 5, "round_timeout_s": 30.0, **opts})


def make_aggregator(run_dir: Path, url: str, rounds: int = 5, k: int = 16, resume: bool = False,
                    extra: dict[str, Any] | None = None, keys: ServerKeys | None = None, lr: float = 0.05,
                    ema: float = 0.0, stratify: bool = False, **opts: Any) -> Aggregator:
    """An aggregator of a synthetic run (new, or resumed from ``run_dir``)."""
    cfg, replica, state, elapsed = new_or_resumed(run_dir, rounds, k, resume, extra, lr, ema, stratify)
    return Aggregator(run_dir, cfg, replica, setup.strategy_for(cfg, state), server_options(url, keys=keys, **opts),
                      None, elapsed)


@contextmanager
def running(agg: Aggregator) -> Iterator[Aggregator]:
    """``agg.serve()`` in a thread (fwdllm.testing.harness); always stopped and
    joined, and the loop must have ended (its socket closed) by then."""
    with serving_thread(agg):
        yield agg
    assert agg.sock is None, "the aggregator loop did not stop"


@contextmanager
def serving(run_dir: Path, **kw: Any) -> Iterator[Aggregator]:
    """A synthetic run's aggregator in a thread on a free port (see :func:`make_aggregator`)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with running(make_aggregator(run_dir, kw.pop("url", None) or free_url(), **kw)) as agg:
        yield agg


def start_worker(url: str, cid: str, scorer: Any = None, keys: ClientKeys | None = None, give_up_s: float = 30.0,
                 events: Path | None = None, sha: str = FAKE_MODEL_SHA,
                 tokens_per_s: float = 100.0) -> tuple[Worker, threading.Thread]:
    """A real Worker (quadratic objective unless ``scorer``) in a thread."""
    scorer = scorer or QuadraticScorer()
    join = join_msg(cid, sha, tokens_per_s)
    w = Worker(url, cid, lambda _s: join, scorer, EventLog(events), give_up_s, keys)
    t = threading.Thread(target=w.run, daemon=True)
    t.start()
    return w, t


def finish(workers: list[tuple[Worker, threading.Thread]], timeout: float = 60.0) -> None:
    """Wait for every worker to end (the run's Bye), and for a task one may still
    be scoring, so that the caller can close a llama.cpp session after it."""
    for w, t in workers:
        t.join(timeout)
        assert not t.is_alive(), f"worker {w.client_id} still running"
        if w.busy is not None:
            w.busy.join(timeout)


def stop(workers: list[tuple[Worker, threading.Thread]]) -> None:
    """End workers whose aggregator is gone or stopped (no Bye will come), and wait for them."""
    for w, _ in workers:
        w.done = w.done or "test over"
    finish(workers)


def wait_until(cond: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.02)


def quadratic_loss(agg: Aggregator) -> float:
    """The exact objective at the server's adapter (noise-free)."""
    names = PerturbMask(parts="b").names(agg.replica.layout)
    return QuadraticScorer().loss(agg.replica.tensors, names, 0)


def garbage_scorer() -> Byzantine:
    """A byzantine device: well-formed Results whose losses are huge random numbers."""
    return Byzantine(QuadraticScorer())


def lora_with_b(model: Path, out: Path, b_std: float = 0.5) -> Path:
    """A random q,v LoRA of ``model`` whose B (std ``b_std``) is large enough to
    change the model's greedy text."""
    from fwdllm.core.lora import layout_for_base, write_lora

    layout = layout_for_base(model, 4, 8.0, ("q", "v"))
    rng = np.random.default_rng(0)
    tensors = {n: rng.standard_normal(s).astype(np.float32) * (b_std if n.endswith("lora_b") else 0.2)
               for n, s in layout.shapes().items()}
    return write_lora(out, layout, tensors, model)


def _main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    if argv[0] == "server":
        run_dir, url, rounds = Path(argv[1]), argv[2], int(argv[3])
        make_aggregator(run_dir, url, rounds=rounds, k=12, resume="--resume" in argv, min_clients=3).serve()
    elif argv[0] == "client":
        url, cid, delay = argv[1], argv[2], float(argv[3])
        start_worker(url, cid, QuadraticScorer(delay_s=delay, noise=0.01), give_up_s=60)[1].join()


if __name__ == "__main__":
    _main(sys.argv[1:])
