"""Protocol v2's byte budget: a whole 50-round run, join included, costs each
device at most 0.1 MB (0.25 MB with the classifier head), counted frame by
frame at the aggregator's socket.

The run is the demo's shape - K=16 seeds a round over 4 devices, 1 s
heartbeats, the 2 x 576 head of SST-2 - on the model-free scorer and two
layers of SmolLM2's v LoRA: no message's size depends on what a forward pass
computes or on how many layers the LoRA has (only a snapshot's would, and
none is sent).
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import numpy as np
import pytest
from harness import free_url, join_msg, wait_until

from fwdllm.aggregator import checkpoint, setup
from fwdllm.aggregator.server import Aggregator, ServerOptions
from fwdllm.aggregator.strategy import StrategySpec
from fwdllm.core.layout import LoraLayout
from fwdllm.core.optim import OptimizerSpec
from fwdllm.edge_client.worker import EventLog, Worker
from fwdllm.testing.fake import QuadraticScorer, synthetic_run

ROUNDS, CLIENTS = 50, 4


class Counting(Aggregator):
    """The real aggregator, counting every byte in and out of its socket."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.bytes_in = self.bytes_out = 0

    def _on_frames(self, raw) -> None:
        self.bytes_in += sum(len(f) for f in raw[1:])
        super()._on_frames(raw)

    def _send_raw(self, routing, msg, kind="control") -> int:  # every reply to one peer goes through here
        n = super()._send_raw(routing, msg, kind)
        self.bytes_out += n
        return n

    def _send_tracked(self, peer, st, msg, kind) -> None:  # catch-ups (none expected)
        self.bytes_out += sum(len(f) for f in msg.to_frames())
        super()._send_tracked(peer, st, msg, kind)

    def _broadcast(self, msg, kind="control") -> None:
        self.bytes_out += len(self.peers) * sum(len(f) for f in msg.to_frames())
        super()._broadcast(msg, kind)


@dataclasses.dataclass
class WithHead(QuadraticScorer):
    """Adds an exact-head-shaped gradient to every result."""

    def score(self, layout, tensors, task):
        r = super().score(layout, tensors, task)
        grad = np.random.default_rng(task.batch_seed).normal(size=layout.head).astype(np.float32)
        self.res = getattr(self, "res", None)
        from fwdllm.core import compress

        raw, self.res = compress.encode(grad, task.head_codec, self.res)
        return dataclasses.replace(r, head_grad=raw, head_rows=8, head_codec=task.head_codec)


def _smollm2_demo_layout(head: bool) -> LoraLayout:
    shapes = {f"blk.{i}.attn_v.weight": (192, 576) for i in range(2)}
    lay = LoraLayout.for_base(shapes, 8, 16, ["v"])
    return dataclasses.replace(lay, head=(2, 576), head_ids=(3, 7), n_vocab=100) if head else lay


@pytest.mark.parametrize("head,budget", [(False, 100_000), (True, 250_000)])
@pytest.mark.timeout(120)
def test_a_whole_run_costs_each_device_under_budget(tmp_path: Path, head: bool, budget: int) -> None:
    opt = OptimizerSpec(name="sgd", lr=0.05, total_rounds=ROUNDS, head_lr=3e-3)
    cfg, replica = synthetic_run(ROUNDS, opt, StrategySpec(k=16, one_sided=True), layout=_smollm2_demo_layout(head))
    cfg = dataclasses.replace(cfg, head_codec="int8")
    checkpoint.write_config(tmp_path, cfg)
    checkpoint.save(tmp_path, replica, {}, 0.0)
    opts = ServerOptions(bind=free_url(), heartbeat_s=1.0, liveness=5, round_timeout_s=30.0, min_clients=CLIENTS)
    agg = Counting(tmp_path, cfg, replica, setup.strategy_for(cfg, {}), opts, None, 0.0)
    t = threading.Thread(target=agg.serve, daemon=True)
    t.start()
    ws = []
    for i in range(CLIENTS):
        w = Worker(agg.opts.bind, f"c{i}", lambda _s, cid=f"c{i}": join_msg(cid),
                   WithHead() if head else QuadraticScorer(), EventLog(None), 30.0)
        ws.append((w, threading.Thread(target=w.run, daemon=True)))
        ws[-1][1].start()
    try:
        wait_until(lambda: not t.is_alive(), 110, "the run to finish")
    finally:
        agg.stop.set()
        t.join(10)
        for w, wt in ws:
            w.done = "test over"
            wt.join(10)
    per_client = (agg.bytes_in + agg.bytes_out) / CLIENTS
    assert all(w.replica.sha == agg.replica.sha for w, _ in ws)
    assert agg.traffic["snapshot"] == 0  # the join was the init seed
    print(f"bytes per client over {ROUNDS} rounds, join included (head={head}): {per_client:.0f}")
    assert per_client <= budget
