"""Logging: llama.cpp's is very loud and stays quiet unless --verbose; the
aggregator's own must never stall it (:class:`Throttle`,
:func:`log_to_stderr_without_blocking`)."""

from __future__ import annotations

import logging
import logging.handlers
import os
import queue
import sys
import time

_callback = None  # keep the ctypes callback alive for the process lifetime


def verbose() -> bool:
    """True when the user asked for llama.cpp's own logging (``--verbose``)."""
    return os.environ.get("FWDLLM_VERBOSE", "") not in ("", "0")


def set_verbose(on: bool) -> None:
    # An environment variable, so that worker processes started by
    # ``fwdllm simulate`` inherit the choice.
    os.environ["FWDLLM_VERBOSE"] = "1" if on else "0"


def quiet_llama() -> None:
    """Install a no-op llama.cpp log callback, unless verbose.  Idempotent;
    call it before loading any model."""
    global _callback
    if verbose() or _callback is not None:
        return
    import llama_cpp

    @llama_cpp.llama_log_callback
    def _drop(level, text, user_data):  # noqa: ANN001 - ctypes signature
        return None

    _callback = _drop
    llama_cpp.llama_log_set(_callback, None)


class Throttle:
    """At most ``per_key`` lines per key and ``total`` lines in all per
    ``interval_s``; what it holds back is counted and reported in one
    summary line per interval.

    Why: a peer can make the aggregator warn once per frame it sends, and a
    log line costs a write that may block (a full pipe, a slow disk).
    Thousands of junk frames must cost a few lines, not thousands.
    """

    def __init__(self, logger: logging.Logger, per_key: int = 3, total: int = 20, interval_s: float = 10.0) -> None:
        self.log = logger
        self.per_key, self.total, self.interval_s = per_key, total, interval_s
        self.window = time.monotonic()
        self.counts: dict[object, int] = {}
        self.shown = 0
        self.held: dict[object, int] = {}

    def warning(self, key: object, msg: str, *args: object) -> None:
        self.tick(time.monotonic())
        n = self.counts.get(key, 0)
        if n < self.per_key and self.shown < self.total:
            self.counts[key] = n + 1
            self.shown += 1
            self.log.warning(msg, *args)
        else:
            self.held[key] = self.held.get(key, 0) + 1

    def tick(self, now: float) -> None:
        """Close the interval when it is over (the summary line must not wait for the next warning)."""
        if now - self.window >= self.interval_s:
            self.flush(now)

    def flush(self, now: float | None = None) -> None:
        """Report what was held back, and open a new interval."""
        if self.held:
            self.log.warning("... and %d more such warnings from %d peer(s) in the last %.0f s",
                             sum(self.held.values()), len(self.held), self.interval_s)
        self.window = time.monotonic() if now is None else now
        self.counts, self.shown, self.held = {}, 0, {}


class _DroppingQueueHandler(logging.handlers.QueueHandler):
    """A QueueHandler that drops a record when its queue is full instead of
    blocking or printing a traceback (which would block on the same pipe)."""

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            pass


def log_to_stderr_without_blocking(fmt: str, capacity: int = 10_000) -> logging.handlers.QueueListener:
    """Route the root logger to stderr through a bounded queue and a writer
    thread, so that a stalled stderr (a log collector that stopped reading a
    pipe) costs dropped lines, never a stalled caller.  Returns the
    listener (already started; ``stop()`` flushes it)."""
    q: queue.Queue = queue.Queue(capacity)
    out = logging.StreamHandler(sys.stderr)
    out.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.handlers = [_DroppingQueueHandler(q)]
    root.setLevel(logging.WARNING)
    listener = logging.handlers.QueueListener(q, out, respect_handler_level=False)
    listener.start()
    return listener
