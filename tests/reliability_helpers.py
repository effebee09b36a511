"""Shared by test_aggregator_protocol.py and the test_reliability_*.py files:
model-free aggregators and fake clients on 127.0.0.1, in threads or (for kill -9) in child processes.

Run as a script it is one such child::

    python tests/reliability_helpers.py server RUN_DIR URL ROUNDS [--resume]
    python tests/reliability_helpers.py client URL CLIENT_ID DELAY_S
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fwdllm.aggregator import checkpoint, setup  # noqa: E402
from fwdllm.aggregator.server import Aggregator, ServerOptions  # noqa: E402
from fwdllm.aggregator.strategy import StrategySpec  # noqa: E402
from fwdllm.core.layout import PerturbMask  # noqa: E402
from fwdllm.core.optim import OptimizerSpec  # noqa: E402
from fwdllm.core.protocol import Join
from fwdllm.edge_client.worker import EventLog, Worker  # noqa: E402
from fwdllm.runtime.transport import ClientKeys, ServerKeys  # noqa: E402
from fwdllm.testing.attackers import Byzantine  # noqa: E402
from fwdllm.testing.fake import FAKE_MODEL_SHA, QuadraticScorer, synthetic_run  # noqa: E402

HB = 0.2


def free_url() -> str:
    from fwdllm.aggregator.simulate import free_port

    return f"tcp://127.0.0.1:{free_port()}"


def join_msg(cid: str, sha: str = FAKE_MODEL_SHA) -> Join:
    return Join(client_id=cid, model_sha256=sha, tokens_per_s=100.0, mem_bytes=0, max_batch=8, n_examples=10)


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


def make_aggregator(run_dir: Path, url: str, rounds: int = 5, k: int = 16, resume: bool = False,
                    extra: dict[str, Any] | None = None, keys: ServerKeys | None = None, lr: float = 0.05,
                    ema: float = 0.0, stratify: bool = False, **opts: Any) -> Aggregator:
    cfg, replica, state, elapsed = new_or_resumed(run_dir, rounds, k, resume, extra, lr, ema, stratify)
    options = ServerOptions(**{"bind": url, "heartbeat_s": HB, "liveness": 5, "round_timeout_s": 30.0,
                               "keys": keys, **opts})
    return Aggregator(run_dir, cfg, replica, setup.strategy_for(cfg, state), options, None, elapsed)


@contextmanager
def serving(run_dir: Path, **kw: Any) -> Iterator[Aggregator]:
    """An aggregator in a thread on a free port; always stopped and joined."""
    run_dir.mkdir(parents=True, exist_ok=True)
    agg = make_aggregator(run_dir, kw.pop("url", None) or free_url(), **kw)
    t = threading.Thread(target=agg.serve, daemon=True)
    t.start()
    try:
        yield agg
    finally:
        agg.stop.set()
        t.join(15)
        assert not t.is_alive()


def start_worker(url: str, cid: str, scorer: Any = None, keys: ClientKeys | None = None,
                 give_up_s: float = 30.0, events: Path | None = None) -> tuple[Worker, threading.Thread]:
    """A real Worker (quadratic objective unless ``scorer``) in a thread."""
    scorer = scorer or QuadraticScorer()
    w = Worker(url, cid, lambda s: join_msg(cid), scorer, EventLog(events), give_up_s, keys)
    t = threading.Thread(target=w.run, daemon=True)
    t.start()
    return w, t


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
