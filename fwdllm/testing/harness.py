"""An aggregator in a thread of the calling process, for field tests and benches.

The loop is the real :class:`~fwdllm.aggregator.server.Aggregator` on a real
socket; only its process is shared with the caller, which then watches
``agg.replica.version`` and the run directory.  No dev-set evaluation runs
(``evaluate=None``): a bench that times rounds must not time a 7B dev pass.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from fwdllm.aggregator import setup
from fwdllm.aggregator.checkpoint import RunConfig
from fwdllm.aggregator.server import Aggregator, ServerOptions
from fwdllm.core.replica import Replica


@contextmanager
def serving_thread(agg: Aggregator) -> Iterator[Aggregator]:
    """``agg.serve()`` in a daemon thread; always stopped and joined."""
    thread = threading.Thread(target=agg.serve, name="aggregator", daemon=True)
    thread.start()
    try:
        yield agg
    finally:
        agg.stop.set()
        thread.join(15)


@contextmanager
def aggregator_thread(run_dir: Path, cfg: RunConfig, replica: Replica, options: ServerOptions) -> Iterator[Aggregator]:
    """Serve ``cfg`` from round ``replica.version`` in a daemon thread; always stopped and joined."""
    with serving_thread(Aggregator(run_dir, cfg, replica, setup.strategy_for(cfg, {}), options)) as agg:
        yield agg


def port_of(agg: Aggregator) -> int:
    """The TCP port an aggregator bound (``tcp://HOST:PORT``)."""
    return int(agg.opts.bind.rsplit(":", 1)[1])
