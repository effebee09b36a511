"""CURVE on the federation sockets: allow-listed keys join, others never get
a frame through, and the bytes on the wire carry no plaintext.

A recording TCP relay on 127.0.0.1 sits between clients and the aggregator,
so the test sees exactly what a network observer would.  (CURVE between real
processes, through the commands' flags: tests/system/test_processes.py.)
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
import zmq
from click.testing import CliRunner
from harness import free_url, join_msg, serving, start_worker
from zmq.utils.monitor import recv_monitor_message

from fwdllm.aggregator import checkpoint
from fwdllm.cli import keys
from fwdllm.core.errors import UserError
from fwdllm.core.protocol import Message, Welcome
from fwdllm.runtime.transport import ClientKeys, ServerKeys, client_keys, server_keys
from fwdllm.testing.fake import FAKE_MODEL_SHA

ROUNDS = 3


class Relay:
    """Plain TCP relay 127.0.0.1:port -> upstream that records every byte."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.data = bytearray()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            try:
                up = socket.create_connection(("127.0.0.1", self.upstream))
            except OSError:  # server not bound yet: drop it, ZeroMQ reconnects
                down.close()
                continue
            for a, b in ((down, up), (up, down)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(65536):
                with self.lock:
                    self.data += chunk
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()


def run_through_relay(tmp_path: Path, skeys: ServerKeys | None, ckeys: ClientKeys | None) -> bytes:
    """ROUNDS rounds with one honest worker behind the relay; the recorded bytes."""
    url = free_url()
    relay = Relay(int(url.rsplit(":", 1)[1]))
    try:
        with serving(tmp_path, url=url, rounds=ROUNDS, k=8, keys=skeys) as agg:
            w, t = start_worker(f"tcp://127.0.0.1:{relay.port}", "device-1", keys=ckeys)
            t.join(60)
            assert not t.is_alive()
            assert w.replica is not None and w.replica.sha == agg.replica.sha
        assert [r["round"] for r in checkpoint.read_metrics(tmp_path)] == list(range(1, ROUNDS + 1))
    finally:
        relay.close()
    with relay.lock:
        return bytes(relay.data)


def test_curve_known_key_trains_and_wire_is_not_plaintext(tmp_path: Path, keydir: Path) -> None:
    skeys = server_keys(keydir / "server.key_secret", tmp_path / "allowed")
    ckeys = client_keys(keydir / "device-1.key_secret", keydir / "server.key")
    wire = run_through_relay(tmp_path / "curve", skeys, ckeys)
    assert len(wire) > 1000
    for plain in (b'"type"', b'"join"', b"device-1", FAKE_MODEL_SHA.encode(), b'"result"', b'"update"', b'"hb"'):
        assert plain not in wire, plain
    # the same check does catch plaintext
    wire = run_through_relay(tmp_path / "plain", None, None)
    assert b'"type":"join"' in wire and b"device-1" in wire and FAKE_MODEL_SHA.encode() in wire


HANDSHAKE_FAILED = {zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL}


def _handshake(url: str, ck: ClientKeys | None, timeout_s: float = 3.0) -> tuple[bool, set[int]]:
    """(got a Welcome, monitor events) for one raw DEALER that sends a Join."""
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    if ck is not None:
        s.curve_secretkey, s.curve_publickey, s.curve_serverkey = ck.secret, ck.public, ck.server_public
    mon = s.get_monitor_socket()
    s.connect(url)
    try:
        # A handshake the server refuses can end before this send and take the DEALER's only
        # pipe with it; a blocking send then waits forever (seen once in CI, under load).
        s.send_multipart(join_msg("raw").to_frames(), zmq.NOBLOCK)
    except zmq.Again:
        pass  # nothing went out: no Welcome can come, and the monitor events still tell why
    welcomed, seen = False, set()
    try:
        poller = zmq.Poller()
        poller.register(s, zmq.POLLIN)
        poller.register(mon, zmq.POLLIN)
        end = time.monotonic() + timeout_s
        # the monitor's HANDSHAKE_SUCCEEDED may trail the Welcome on a loaded machine: wait for both,
        # or for its failure (a refused key or mechanism is refused again on every reconnect)
        while time.monotonic() < end and not (welcomed and zmq.EVENT_HANDSHAKE_SUCCEEDED in seen) \
                and not seen & HANDSHAKE_FAILED:
            for sock, _ in poller.poll(100):
                if sock is mon:
                    seen.add(recv_monitor_message(mon)["event"])
                elif isinstance(Message.from_frames(s.recv_multipart()), Welcome):
                    welcomed = True
    finally:
        s.disable_monitor()
        mon.close(0)
        s.close(0)
    return welcomed, seen


def test_unknown_or_plaintext_client_is_rejected(tmp_path: Path, keydir: Path) -> None:
    skeys = server_keys(keydir / "server.key_secret", tmp_path / "allowed")
    with serving(tmp_path / "run", rounds=1, keys=skeys) as agg:
        url = agg.opts.bind
        intruder = client_keys(keydir / "intruder.key_secret", keydir / "server.key")
        ok, events = _handshake(url, intruder)
        assert not ok and zmq.EVENT_HANDSHAKE_FAILED_AUTH in events
        ok, _ = _handshake(url, None)  # plaintext against a CURVE server
        assert not ok
        assert not agg.peers
        ok, events = _handshake(url, client_keys(keydir / "device-1.key_secret", keydir / "server.key"))
        assert ok and zmq.EVENT_HANDSHAKE_SUCCEEDED in events
        (tmp_path / "allowed" / "device-1.key").unlink()  # revocation: no restart needed
        ok, events = _handshake(url, client_keys(keydir / "device-1.key_secret", keydir / "server.key"))
        assert not ok and zmq.EVENT_HANDSHAKE_FAILED_AUTH in events


def test_key_cli_refuses_bad_input(tmp_path: Path, keydir: Path) -> None:
    r = CliRunner().invoke(keys, ["generate", "server", "--out", str(keydir)])
    assert r.exit_code != 0 and "refusing to overwrite" in r.output
    with pytest.raises(UserError, match="both"):
        server_keys(keydir / "server.key_secret", None)
    with pytest.raises(UserError, match="no secret key"):
        client_keys(keydir / "server.key", keydir / "server.key")
    assert oct((keydir / "server.key_secret").stat().st_mode & 0o777) == "0o600"
