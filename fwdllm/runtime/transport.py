"""Authenticated, encrypted transport: ZeroMQ CURVE keys and an allow-list.

Why CURVE: the aggregator hands out training work and accepts scalars that
move the shared adapter, so who may join matters as much as secrecy.  CURVE
gives both with one mechanism: the server proves its identity with its
secret key (clients pin its public key), every client proves its own, and
the server's ZAP handler (pyzmq's :class:`ThreadAuthenticator`) admits only
public keys found in the allow-list directory.  A client whose key is not
listed never completes the handshake, so it cannot send a single frame to
the aggregator's loop.

Key files are pyzmq's certificate format (``NAME.key`` = public, safe to
copy; ``NAME.key_secret`` = public + secret, mode 0600).  The allow-list is
re-read on every handshake, so a device is added or revoked by copying or
deleting its ``.key`` file, without restarting the aggregator.

Identity is the key: the ZAP handler names every connection it admits after
the allow-list file that holds its key (``device-1.key`` -> ``device-1``),
and libzmq attaches that name to every message of the connection as its
``User-Id`` property.  The aggregator uses that name, never the
``client_id`` a device sends, for everything that must not be forgeable:
one connection per key, strikes, quarantine, eviction, the order of work.

Plaintext stays available for local simulation, but both sides log a loud
warning when no keys are configured.  Without keys there is nothing to bind
an identity to: the aggregator then takes the ``client_id`` a device sends
as its identity (one connection per id), which is only as good as the trust
in every process that can reach the port.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from fwdllm.core.errors import UserError

log = logging.getLogger("fwdllm.security")

PLAINTEXT_WARNING = (
    "PLAINTEXT TRANSPORT: no CURVE keys configured - anyone who can reach %s can join, "
    "send scalars and read the traffic. Fine for local simulation only; see `fwdllm keys generate`."
)


def load_public(path: Path) -> bytes:
    """The z85 public key in a ``.key`` or ``.key_secret`` file."""
    public, _ = _load(path)
    return public


def load_keypair(path: Path) -> tuple[bytes, bytes]:
    """(public, secret) from a ``.key_secret`` file."""
    public, secret = _load(path)
    if not secret:
        raise UserError(f"{path} holds no secret key (pass the .key_secret file, not the public .key)")
    return public, secret


def _load(path: Path) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read CURVE key {path}: {e}") from None
    if not public:
        raise UserError(f"{path} holds no CURVE public key")
    return public, secret


@dataclass(frozen=True)
class ServerKeys:
    """The aggregator's keypair and the directory of allowed client public keys."""

    public: bytes
    secret: bytes
    allow_dir: Path


@dataclass(frozen=True)
class ClientKeys:
    """A device's keypair and the aggregator's pinned public key."""

    public: bytes
    secret: bytes
    server_public: bytes


class AllowList:
    """ZAP credentials provider: a client key is allowed iff some ``*.key``
    file in ``directory`` holds it (re-read per handshake: revocation is
    deleting the file) and its name is not in ``barred`` (keys the
    aggregator evicted: they cannot even complete a handshake again)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.names: dict[bytes, str] = {}  # z85 public key -> allow-list name, as of the last handshake
        self.barred: set[str] = set()  # set from the server loop, read by the ZAP thread (one GIL-atomic lookup)

    def _read(self) -> dict[bytes, str]:
        names: dict[bytes, str] = {}
        for path in sorted(self.directory.glob("*.key")):
            public, _ = zmq.auth.load_certificate(str(path))
            names.setdefault(public, path.stem)  # the same key in two files: the first name, sorted
        return names

    def callback(self, domain: str, key: bytes) -> bool:
        try:
            names = self._read()
        except (OSError, ValueError) as e:
            log.error("allow-list %s unreadable (%s): refusing every client", self.directory, e)
            return False
        name = names.get(key)
        if name is None:
            log.warning("CURVE handshake refused: key %s is not in %s", key.decode()[:12] + "...", self.directory)
            return False
        if name in self.barred:
            log.warning("CURVE handshake refused: %s was evicted from this run", name)
            return False
        self.names = names
        return True

    def name(self, z85_key: bytes) -> str:
        return self.names.get(z85_key) or z85_key.decode()


class KeyedAuthenticator(ThreadAuthenticator):
    """pyzmq's ZAP handler thread, with the allow-list name as each
    connection's ``User-Id`` (pyzmq's default is the z85 key itself)."""

    def __init__(self, ctx: zmq.Context, allow: AllowList) -> None:
        super().__init__(ctx, log=logging.getLogger("fwdllm.security.zap"))
        self.allow = allow

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self.allow.name(z85.encode(client_public_key))


def check_bind(where: str) -> None:
    """A ``--bind`` that libzmq cannot bind (malformed, an address this host
    does not have, a port in use) as one line, before anything is written."""
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(where)
    except zmq.ZMQError as e:
        raise UserError(f"--bind {where}: {e}; expected e.g. tcp://*:5555") from None
    finally:
        sock.close(0)


def server_keys(secret_file: Path | None, allow_dir: Path | None) -> ServerKeys | None:
    """Both or neither: a server key without an allow-list would admit no one."""
    if secret_file is None and allow_dir is None:
        return None
    if secret_file is None or allow_dir is None:
        raise UserError("CURVE needs both --curve-secret (the server's .key_secret) and --allow (client keys dir)")
    if not allow_dir.is_dir():
        raise UserError(f"allow-list directory {allow_dir} not found")
    public, secret = load_keypair(secret_file)
    return ServerKeys(public, secret, allow_dir)


def client_keys(secret_file: Path | None, server_key: Path | None) -> ClientKeys | None:
    """Both or neither: the client must pin the server's public key."""
    if secret_file is None and server_key is None:
        return None
    if secret_file is None or server_key is None:
        raise UserError("CURVE needs both --curve-secret (this device's .key_secret) and --server-key (server's .key)")
    public, secret = load_keypair(secret_file)
    return ClientKeys(public, secret, load_public(server_key))


def secure_server(ctx: zmq.Context, sock: zmq.Socket, keys: ServerKeys | None, where: str) -> KeyedAuthenticator | None:
    """Make ``sock`` (not yet bound) a CURVE server guarded by the allow-list.

    Returns the authenticator to ``stop()`` after closing the socket (its
    ``allow.barred`` shuts evicted keys out), or None in plaintext mode
    (after the loud warning).
    """
    if keys is None:
        log.warning(PLAINTEXT_WARNING, where)
        return None
    allow = AllowList(keys.allow_dir)
    auth = KeyedAuthenticator(ctx, allow)
    auth.start()
    auth.configure_curve_callback(domain="*", credentials_provider=allow)
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_server = True
    log.info("CURVE on: clients must hold a key listed in %s", keys.allow_dir)
    return auth


def secure_client(sock: zmq.Socket, keys: ClientKeys | None) -> None:
    """Make ``sock`` (not yet connected) a CURVE client pinned to the server key."""
    if keys is None:
        return
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_serverkey = keys.server_public


def warn_if_plaintext(keys: ClientKeys | None, where: str) -> None:
    if keys is None:
        log.warning(PLAINTEXT_WARNING, where)


def generate_keypair(name: str, out: Path, allow: Path | None) -> tuple[Path, Path]:
    """Write a new keypair ``out/NAME.key`` / ``out/NAME.key_secret`` (mode 0600),
    and copy the public key into ``allow`` when given; never overwrites."""
    if not name or "/" in name or name.startswith("."):
        raise UserError(f"bad key name {name!r}: use a plain file name such as server or device-1")
    try:
        out.mkdir(parents=True, exist_ok=True)
        targets = [out / f"{name}.key", out / f"{name}.key_secret"] + ([allow / f"{name}.key"] if allow else [])
        existing = [str(p) for p in targets if p.exists()]
        if existing:
            raise UserError(f"refusing to overwrite {', '.join(existing)}")
        public_file, secret_file = zmq.auth.create_certificates(str(out), name)
        os.chmod(secret_file, 0o600)
        if allow is not None:
            allow.mkdir(parents=True, exist_ok=True)
            (allow / f"{name}.key").write_bytes(Path(public_file).read_bytes())
    except OSError as e:
        raise UserError(f"cannot write the keys ({e.strerror or e}: {e.filename})") from None
    return Path(public_file), Path(secret_file)
