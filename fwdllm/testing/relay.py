"""A TCP relay that makes a loopback connection behave like a slow, lossy field link.

This kernel has no ``netem`` qdisc, and no maintained TCP fault relay ships on
the package registries this project can reach (toxiproxy is a Go binary; PyPI
only has its clients), so delay, loss and resets are made here, in userspace,
between an edge worker and the aggregator::

    worker --TCP--> Relay(listen port) --TCP--> aggregator

What a :class:`LinkSpec` adds, per direction, to every byte that crosses:

* **delay**: half of ``rtt_s`` each way;
* **loss, the way TCP experiences it**: the stream is cut into ``mss``-byte
  segments; each is lost with probability ``loss`` and then arrives one
  retransmission timeout later (doubling per repeated loss, as TCP backs off),
  and since TCP delivers in order, every later segment waits behind it
  (head-of-line blocking).  Nothing is ever corrupted or dropped for good:
  that is what the application above a lossy TCP link sees;
* **bandwidth**: ``rate_bps`` per direction, as serialization time on a
  link shared by everything that crosses this relay (0 = unlimited, e.g. when
  :mod:`fwdllm.testing.netns` shapes the traffic in the kernel instead);
* **resets**: with ``reset_every_s`` > 0 each connection is aborted with a TCP
  RST after an exponentially distributed lifetime of that mean, as a phone
  that changes cell or Wi-Fi does; ZeroMQ reconnects through the relay.

Everything is seeded (``seed``), bounded (a connection's queue holds at most
``QUEUE_SEGMENTS`` segments, which pushes back on the sender like a socket
buffer) and runs on one event loop in a daemon thread, so a test uses it as a
context manager and nothing outlives the ``with``.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import sys
import threading
from dataclasses import asdict, dataclass, field

#: Linux's floor on the retransmission timeout above the smoothed RTT (``TCP_RTO_MIN``).
RTO_MIN_S = 0.2
#: Segments one direction of a connection may hold in flight before the relay stops reading.
QUEUE_SEGMENTS = 256


@dataclass(frozen=True)
class LinkSpec:
    """The impairments of one field link (see the module docstring)."""

    rtt_s: float = 0.0
    loss: float = 0.0
    rate_bps: float = 0.0
    reset_every_s: float = 0.0
    mss: int = 1448
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rtt_s < 0 or not 0 <= self.loss < 1 or self.rate_bps < 0 or self.reset_every_s < 0 or self.mss < 1:
            raise ValueError(f"link out of range: {self}")

    @property
    def rto_s(self) -> float:
        """The first retransmission timeout of a settled connection: SRTT plus Linux's floor."""
        return self.rtt_s + RTO_MIN_S

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class Direction:
    """One direction of the link: when its next segment can leave and arrive."""

    spec: LinkSpec
    rng: random.Random
    free_at: float = 0.0  # when the link finishes serializing what it was given
    last_arrival: float = 0.0  # in-order delivery: nothing overtakes a retransmitted segment
    bytes: int = 0
    segments: int = 0
    lost: int = 0

    def schedule(self, n: int, now: float) -> float:
        """Arrival time of an ``n``-byte segment that is handed to the link at ``now``."""
        s = self.spec
        wire = n * 8 / s.rate_bps if s.rate_bps else 0.0
        self.free_at = max(self.free_at, now) + wire
        arrival = self.free_at + s.rtt_s / 2
        rto = s.rto_s
        while self.rng.random() < s.loss:  # every try costs a timeout, and the wire time again
            self.lost += 1
            arrival += rto
            self.free_at += wire
            rto *= 2
        self.last_arrival = max(self.last_arrival, arrival)
        self.bytes += n
        self.segments += 1
        return self.last_arrival


@dataclass
class RelayStats:
    """What crossed the relay (``up`` = towards the target, the aggregator)."""

    connections: int = 0
    resets: int = 0
    up: dict[str, int] = field(default_factory=dict)
    down: dict[str, int] = field(default_factory=dict)


class Relay:
    """Forward ``127.0.0.1:port`` (a free one unless given) to ``target`` through a :class:`LinkSpec`.

    ``with Relay(("127.0.0.1", 5555), spec) as relay:`` then connect to
    ``relay.url``; leaving the ``with`` closes every connection and the thread.
    """

    def __init__(self, target: tuple[str, int], spec: LinkSpec, host: str = "127.0.0.1", port: int = 0) -> None:
        self.target = target
        self.spec = spec
        self.host = host
        self.port = port
        rng = random.Random(spec.seed)
        self._up = Direction(spec, random.Random(rng.getrandbits(64)))
        self._down = Direction(spec, random.Random(rng.getrandbits(64)))
        self._resets = random.Random(rng.getrandbits(64))
        self._connections = 0
        self._n_resets = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    def stats(self) -> RelayStats:
        def part(d: Direction) -> dict[str, int]:
            return {"bytes": d.bytes, "segments": d.segments, "lost": d.lost}

        return RelayStats(self._connections, self._n_resets, part(self._up), part(self._down))

    # -- life cycle ------------------------------------------------------ #

    def start(self) -> "Relay":
        self._thread = threading.Thread(target=self._run, name=f"relay-{self.target[1]}", daemon=True)
        self._thread.start()
        if not self._ready.wait(10) or self._error is not None:
            raise RuntimeError(f"relay did not start: {self._error}")
        return self

    def close(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            loop.call_soon_threadsafe(self._shutdown)
            thread.join(10)

    def __enter__(self) -> "Relay":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._main())
        finally:
            self._loop.close()

    async def _main(self) -> None:
        try:
            self._server = await asyncio.start_server(self._serve, self.host, self.port)
        except OSError as e:
            self._error = e
            self._ready.set()
            return
        self.port = self._server.sockets[0].getsockname()[1]
        self._stopped = asyncio.Event()
        self._ready.set()
        await self._stopped.wait()
        self._server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _shutdown(self) -> None:
        self._stopped.set()

    # -- one connection -------------------------------------------------- #

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._connections += 1
        up_w: asyncio.StreamWriter | None = None
        try:
            up_r, up_w = await asyncio.open_connection(*self.target)
            pipes = [asyncio.create_task(self._pipe(reader, up_w, self._up)),
                     asyncio.create_task(self._pipe(up_r, writer, self._down))]
            if self.spec.reset_every_s:
                pipes.append(asyncio.create_task(asyncio.sleep(self._resets.expovariate(1 / self.spec.reset_every_s))))
            try:
                done, _ = await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
                if pipes[-1] in done and self.spec.reset_every_s:
                    self._n_resets += 1
                    _abort(writer)
                    _abort(up_w)
            finally:
                for p in pipes:
                    p.cancel()
        except (OSError, asyncio.CancelledError):
            pass  # the target is down or the relay is closing: the peer sees the connection end
        finally:
            for w in (writer, up_w):
                if w is not None:
                    w.close()
            self._tasks.discard(task)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, d: Direction) -> None:
        """Copy ``src`` to ``dst`` through ``d``: segments leave the queue at their arrival time."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(QUEUE_SEGMENTS)

        async def deliver() -> None:
            while (item := await queue.get()) is not None:
                at, segment = item
                if at > loop.time():
                    await asyncio.sleep(at - loop.time())
                dst.write(segment)
                await dst.drain()

        sender = asyncio.create_task(deliver())
        try:
            while data := await src.read(1 << 16):
                for i in range(0, len(data), self.spec.mss):
                    segment = data[i:i + self.spec.mss]
                    await queue.put((d.schedule(len(segment), loop.time()), segment))
            await queue.put(None)
            await sender  # a clean close arrives after the data it follows
        finally:
            sender.cancel()


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a dropped mobile connection looks to its peer."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


def main(argv: list[str]) -> None:
    """``python -m fwdllm.testing.relay PORT TARGET_PORT LINK_JSON``: one relay as its own
    process (inside a network namespace, say) on 127.0.0.1 until SIGTERM; prints ``ready``."""
    import json
    import signal

    port, target, spec = int(argv[0]), int(argv[1]), LinkSpec(**json.loads(argv[2]))
    relay = Relay(("127.0.0.1", target), spec, port=port).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("ready", flush=True)
    stop.wait()
    relay.close()
    print(json.dumps(asdict(relay.stats())), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
