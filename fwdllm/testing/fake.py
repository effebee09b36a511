"""Model-free federation: a synthetic objective for protocol and load tests.

:class:`QuadraticScorer` plugs into the real :class:`~fwdllm.edge_client.worker.Worker`
in place of llama.cpp, so a test or a load bench exercises the genuine
socket, heartbeat, snapshot and update code with clients that cost
microseconds: the "loss" is ``mean((theta - target)^2)`` over the perturbed
tensors, evaluated exactly at ``theta +- eps * direction(seed)``.
:func:`synthetic_run` makes a matching run (layout, config, replica) without
any GGUF file.
"""

from __future__ import annotations

import hashlib
import sys
import time
import uuid
from dataclasses import asdict, dataclass

import numpy as np

from fwdllm.aggregator.checkpoint import RunConfig
from fwdllm.aggregator.strategy import StrategySpec
from fwdllm.core.directions import direction
from fwdllm.core.layout import HEAD, LoraLayout, PerturbMask
from fwdllm.core.lora import initial_tensors
from fwdllm.core.optim import Optimizer, OptimizerSpec
from fwdllm.core.protocol import Result, Task
from fwdllm.core.replica import Replica

FAKE_MODEL_SHA = "f" * 64


def synthetic_layout(n_layers: int = 2, dim: int = 16, rank: int = 4) -> LoraLayout:
    shapes = {f"blk.{i}.attn_{t}.weight": (dim, dim) for i in range(n_layers) for t in ("q", "v")}
    return LoraLayout.for_base(shapes, rank=rank, alpha=float(rank), targets=("q", "v"))


def synthetic_run(rounds: int, optimizer: OptimizerSpec, strategy: StrategySpec, layout: LoraLayout | None = None,
                  model_sha: str = FAKE_MODEL_SHA) -> tuple[RunConfig, Replica]:
    """A RunConfig + round-0 Replica (the init seed 0's adapter: A random, B
    zero) for a model-free run."""
    layout = layout or synthetic_layout()
    cfg = RunConfig(
        run_id=uuid.uuid4().hex[:12], model="synthetic", model_sha256=model_sha, task="synthetic",
        task_name="synthetic", dev=None, dev_limit=None, rounds=rounds, eval_every=rounds,
        layout=layout.to_dict(), optimizer=asdict(optimizer), strategy=strategy.to_dict(), init_seed=0,
    )
    return cfg, Replica(layout, initial_tensors(layout, 0), Optimizer(optimizer), version=0)


@dataclass
class QuadraticScorer:
    """Worker scorer for ``L(theta) = mean((theta - target)^2)`` over masked tensors.

    ``target`` is 1.0 everywhere, so training moves B away from zero and the
    loss must fall.  ``delay_s`` simulates compute time as a wait;
    ``cpu_work`` as real work (SHA-256 rounds per seed), which a CPU quota or
    a slow core stretches the way it stretches a forward pass; ``noise``
    (seeded by the task's batch seed) simulates data noise.  A layout with a
    classifier head also gets the exact gradient of ``mean((head - 1)^2)``,
    over ``batch_size`` rows, as a device's ``--head`` result carries.
    """

    task_name: str = "synthetic"
    delay_s: float = 0.0
    noise: float = 0.0
    cpu_work: int = 0

    def loss(self, tensors: dict[str, np.ndarray], names: list[str], batch_seed: int) -> float:
        sq = sum(float(np.sum((tensors[n].astype(np.float64) - 1.0) ** 2)) for n in names)
        size = sum(tensors[n].size for n in names)
        jitter = np.random.default_rng(batch_seed).standard_normal() * self.noise
        return sq / size + jitter

    def score(self, layout: LoraLayout, tensors: dict[str, np.ndarray], task: Task) -> Result:
        t0 = time.perf_counter()
        mask = PerturbMask.from_dict(task.mask)
        names = mask.names(layout)
        plus, minus = [], []
        base = self.loss(tensors, names, task.batch_seed)
        for seed in task.seeds:
            v = direction(int(seed), layout, mask, task.dist)
            plus.append(self.loss({n: tensors[n] + task.eps * v[n] for n in names}, names, task.batch_seed))
            minus.append(base if task.one_sided else
                         self.loss({n: tensors[n] - task.eps * v[n] for n in names}, names, task.batch_seed))
        burn(self.cpu_work * len(task.seeds))
        time.sleep(self.delay_s)
        head = b""
        if layout.head is not None:
            h = tensors[HEAD].astype(np.float64)
            head = np.ascontiguousarray(2.0 * (h - 1.0) / h.size, dtype="<f4").tobytes()
        return Result(round=task.round, seeds=np.asarray(task.seeds, dtype=np.uint32),
                      loss_plus=np.array(plus), loss_minus=np.array(minus),
                      n_tokens=len(task.seeds), seconds=time.perf_counter() - t0,
                      head_grad=head, head_rows=task.batch_size if head else 0,
                      base_loss=base if not len(task.seeds) else 0.0)



def burn(rounds: int) -> None:
    """``rounds`` chained SHA-256 hashes: CPU work that no cache or vector unit shortcuts."""
    h = b""
    for _ in range(rounds):
        h = hashlib.sha256(h).digest()


def tokens_per_s(scorer: QuadraticScorer, probe_seeds: int = 4) -> float:
    """The fake's self-benchmark for its Join, as a device measures its decode speed:
    one "token" per seed, so the aggregator's throughput estimate is in seeds/s."""
    t0 = time.perf_counter()
    burn(scorer.cpu_work * probe_seeds)
    return probe_seeds / max(time.perf_counter() - t0 + scorer.delay_s * probe_seeds, 1e-6)


def main(argv: list[str]) -> None:
    """``python -m fwdllm.testing.fake URL CLIENT_ID CPU_WORK``: one model-free device as its own
    process (a real Worker), e.g. inside a CPU-limited cgroup; exits on the run's Bye."""
    from fwdllm.core.protocol import Join
    from fwdllm.edge_client.worker import EventLog, Worker

    url, cid, work = argv[0], argv[1], int(argv[2])
    scorer = QuadraticScorer(cpu_work=work)
    speed = tokens_per_s(scorer)
    join = Join(client_id=cid, model_sha256=FAKE_MODEL_SHA, tokens_per_s=speed, mem_bytes=0, max_batch=8,
                n_examples=100)
    Worker(url, cid, lambda _: join, scorer, EventLog(None), give_up_s=60).run()


if __name__ == "__main__":
    main(sys.argv[1:])
