"""Secure aggregation of the per-seed scalars (``--secagg``): the server learns
only the sum of the clients' vectors, never one client's.

The protocol is Bonawitz et al. 2017 ("Practical Secure Aggregation for
Privacy-Preserving Machine Learning"), in the stage shape Flower's SecAgg+
uses, over a complete graph (every participant masks with every other),
run afresh every round.  This module is the whole protocol as two state
machines over bytes - no sockets - so it is tested alone; the server and
the worker only carry its payloads in :class:`fwdllm.core.protocol.SecAgg`
messages.

Stages of one round (``u``, ``v`` are 1-based participant indices)::

    1 keys     client -> server  two fresh X25519 public keys: c (encrypts shares) and s (masks)
       roster  server -> client  every participant's keys (the set U1)
    2 shares   client -> server  for each v: AEAD(Shamir share of b_u, Shamir shares of s_sk_u)
       inbox   server -> client  the ciphertexts addressed to it (their senders are U2)
    3 masked   client -> server  y_u = x_u + PRG(b_u) + sum_v sign(u, v) PRG(s_uv)   (mod 2^64)
       unmask  server -> client  survivors U3 (sent y) and dropped U2 \\ U3
    4 reveal   client -> server  shares of b_v for v in U3, of s_sk_v for v dropped, never both
       sum     server            sum_U3 y - sum_U3 PRG(b_v) - (the dropped's pairwise masks)

* Primitives come from maintained libraries only: X25519, HKDF-SHA256,
  ChaCha20 (the mask PRG) and ChaCha20-Poly1305 (the share envelopes) from
  ``cryptography``; Shamir secret sharing over GF(2^128) from PyCryptodome
  (``Crypto.Protocol.SecretSharing``, 16-byte secrets: the 32-byte masking
  key travels as two shared halves).
* Vectors are fixed point in Z_{2^64}: ``round(x * 2^frac_bits)`` with
  ``|x| <= bound`` checked, and ``n * bound * 2^frac_bits < 2^63`` checked at
  set-up, so the sum of ``n`` in-range inputs never wraps.  Precision is
  ``2^-frac_bits`` per input (the sum of n is within ``n * 2^-(frac_bits+1)``).
* Threat model: a semi-honest (honest-but-curious) server and any minority
  of colluding clients below the threshold ``t``.  A client refuses to reveal
  both secrets of one peer, to reveal anything with fewer than ``t``
  survivors, and to accept ciphertexts that are not addressed to it.  Public
  keys are not signed: a server that substitutes keys (an active attacker)
  is out of scope until identities are bound to keys (issue 31's CURVE
  binding).  Robust aggregation cannot see per-client values: see
  docs/security.md for what ``robust=`` means under ``--secagg``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass, field

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

RING = 2**64
MAX_PARTICIPANTS = 1000


class SecAggError(ValueError):
    """A stage's input breaks the protocol (wrong size, wrong sender, too few
    survivors, a request to reveal both secrets of a peer...)."""


# --------------------------------------------------------------------------- #
# parameters and fixed point
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class SecAggParams:
    """One round's shared settings, sent to every participant in its Task."""

    n: int  # participants (indices 1..n)
    threshold: int  # shares needed to reconstruct; also the fewest survivors accepted
    length: int  # entries of the summed vector
    round: int
    frac_bits: int = 24
    bound: float = 1e6  # |entry| each client may contribute
    #: neighbours each participant masks with and shares its secrets among
    #: (SecAgg+'s graph degree; n - 1 = every other participant, Bonawitz's SecAgg)
    degree: int = 0

    def __post_init__(self) -> None:
        if not 2 <= self.n <= MAX_PARTICIPANTS:
            raise SecAggError(f"secure aggregation needs 2..{MAX_PARTICIPANTS} participants, got {self.n}")
        if self.degree == 0:
            object.__setattr__(self, "degree", self.default_degree(self.n))
        if not (2 <= self.degree <= self.n - 1 and (self.degree % 2 == 0 or self.degree == self.n - 1)):
            raise SecAggError(f"graph degree {self.degree} must be even and in 2..{self.n - 1}, or {self.n - 1}")
        if not ((self.degree + 1) // 2 < self.threshold <= self.degree + 1):
            raise SecAggError(f"threshold {self.threshold} must be a majority of a neighbourhood of "
                              f"{self.degree + 1} and at most it")
        if self.length < 1 or self.frac_bits < 0 or not self.bound > 0:
            raise SecAggError("bad vector length, precision or bound")
        if self.n * self.bound * 2.0**self.frac_bits >= 2.0**63:
            raise SecAggError(f"{self.n} x bound {self.bound:g} at 2^-{self.frac_bits} would wrap the 64-bit ring")

    @staticmethod
    def default_degree(n: int) -> int:
        """Every other participant up to 20 of them; beyond, SecAgg+'s
        logarithmic degree (Bell et al. 2020), 2 * ceil(1.5 log2 n): Shamir
        costs grow with the square of a neighbourhood, and at 100 clients
        the complete graph's reconstruction alone took 21 s."""
        return n - 1 if n <= 21 else min(n - 1, 2 * math.ceil(1.5 * math.log2(n)))

    @classmethod
    def default_threshold(cls, n: int, degree: int = 0) -> int:
        """A strict majority of a neighbourhood: dropouts up to just under
        half are recovered, and no minority of it with the server unmasks anyone."""
        return ((degree or cls.default_degree(n)) + 1) // 2 + 1

    def neighbours(self, u: int) -> list[int]:
        """``u``'s neighbours: a Harary (circulant) graph of this degree over a
        permutation of 1..n derived from the round, as in SecAgg+."""
        if self.degree >= self.n - 1:
            return [v for v in range(1, self.n + 1) if v != u]
        order = sorted(range(1, self.n + 1),
                       key=lambda i: hashlib.sha256(f"fwdllm-secagg-graph:{self.round}:{i}".encode()).digest())
        pos = order.index(u)
        half = self.degree // 2
        return sorted({order[(pos + d) % self.n] for d in range(-half, half + 1) if d})

    def to_dict(self) -> dict:
        return {"n": self.n, "threshold": self.threshold, "length": self.length, "round": self.round,
                "frac_bits": self.frac_bits, "bound": self.bound, "degree": self.degree}

    @classmethod
    def from_dict(cls, d: dict) -> "SecAggParams":
        try:
            return cls(int(d["n"]), int(d["threshold"]), int(d["length"]), int(d["round"]),
                       int(d["frac_bits"]), float(d["bound"]), int(d.get("degree", 0)))
        except (KeyError, TypeError, ValueError) as e:
            raise SecAggError(f"bad secure-aggregation parameters: {e}") from None


def encode_fixed(x: np.ndarray, params: SecAggParams) -> np.ndarray:
    """Floats -> ring elements (uint64); ``SecAggError`` if one is out of range."""
    x = np.asarray(x, dtype=np.float64)
    if x.shape != (params.length,):
        raise SecAggError(f"vector of shape {x.shape}, the round sums {params.length} entries")
    if not np.all(np.isfinite(x)) or np.abs(x).max(initial=0.0) > params.bound:
        raise SecAggError(f"an entry is outside +-{params.bound:g}: clip before masking")
    return np.rint(x * 2.0**params.frac_bits).astype(np.int64).view(np.uint64)


def decode_fixed(s: np.ndarray, params: SecAggParams) -> np.ndarray:
    """Ring elements (a sum) -> floats."""
    return np.asarray(s, dtype=np.uint64).view(np.int64).astype(np.float64) * 2.0**-params.frac_bits


# --------------------------------------------------------------------------- #
# primitives (thin wrappers over the libraries)
# --------------------------------------------------------------------------- #


def _kdf(secret: bytes, purpose: str, rnd: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=f"fwdllm-secagg/{purpose}/{rnd}".encode()).derive(secret)


def _prg(key: bytes, length: int) -> np.ndarray:
    """``length`` uint64 words of the ChaCha20 keystream under ``key``."""
    enc = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    return np.frombuffer(enc.update(bytes(8 * length)), dtype="<u8").astype(np.uint64)


def _raw(pk: X25519PublicKey) -> bytes:
    return pk.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _private_raw(sk: X25519PrivateKey) -> bytes:
    return sk.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                            serialization.NoEncryption())


def _pairwise_mask(sk: X25519PrivateKey, peer_pk: bytes, params: SecAggParams) -> np.ndarray:
    shared = sk.exchange(X25519PublicKey.from_public_bytes(peer_pk))
    return _prg(_kdf(shared, "mask", params.round), params.length)


def _sign(u: int, v: int) -> int:
    return 1 if u < v else -1


def _apply(acc: np.ndarray, mask: np.ndarray, sign: int) -> np.ndarray:
    """acc +- mask in Z_{2^64} (numpy's uint64 arithmetic wraps)."""
    return acc + mask if sign > 0 else acc - mask


# --------------------------------------------------------------------------- #
# wire payloads: length-prefixed JSON index + raw bytes (no pickle)
# --------------------------------------------------------------------------- #


def _pack(index: dict, blobs: list[bytes]) -> bytes:
    head = json.dumps({**index, "lens": [len(b) for b in blobs]}, separators=(",", ":")).encode()
    return struct.pack("<I", len(head)) + head + b"".join(blobs)


def _unpack(data: bytes) -> tuple[dict, list[bytes]]:
    try:
        (n,) = struct.unpack_from("<I", data, 0)
        index = json.loads(data[4:4 + n])
        lens = [int(x) for x in index.pop("lens")]
        if min(lens, default=0) < 0 or 4 + n + sum(lens) != len(data):
            raise SecAggError("payload length does not match its index")
        out, pos = [], 4 + n
        for k in lens:
            out.append(data[pos:pos + k])
            pos += k
        return index, out
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise SecAggError(f"malformed secure-aggregation payload: {e}") from None


def pack_keys(keys: dict[int, tuple[bytes, bytes]]) -> bytes:
    """A roster: index -> (c_pk, s_pk)."""
    ids = sorted(keys)
    return _pack({"ids": ids}, [k for i in ids for k in keys[i]])


def unpack_keys(data: bytes) -> dict[int, tuple[bytes, bytes]]:
    index, blobs = _unpack(data)
    ids = [int(i) for i in index.get("ids", [])]
    if len(blobs) != 2 * len(ids) or any(len(b) != 32 for b in blobs) or len(set(ids)) != len(ids):
        raise SecAggError("a roster holds two 32-byte keys per distinct participant")
    return {i: (blobs[2 * j], blobs[2 * j + 1]) for j, i in enumerate(ids)}


def pack_map(items: dict[int, bytes]) -> bytes:
    ids = sorted(items)
    return _pack({"ids": ids}, [items[i] for i in ids])


def unpack_map(data: bytes) -> dict[int, bytes]:
    index, blobs = _unpack(data)
    ids = [int(i) for i in index.get("ids", [])]
    if len(blobs) != len(ids) or len(set(ids)) != len(ids):
        raise SecAggError("an index names each participant once")
    return dict(zip(ids, blobs))


def pack_unmask(survivors: list[int], dropped: list[int]) -> bytes:
    return _pack({"survivors": sorted(survivors), "dropped": sorted(dropped)}, [])


def unpack_unmask(data: bytes) -> tuple[list[int], list[int]]:
    index, _ = _unpack(data)
    try:
        return [int(i) for i in index["survivors"]], [int(i) for i in index["dropped"]]
    except (KeyError, TypeError, ValueError) as e:
        raise SecAggError(f"bad unmask request: {e}") from None


def pack_vector(y: np.ndarray) -> bytes:
    return np.ascontiguousarray(y, dtype="<u8").tobytes()


def unpack_vector(data: bytes, params: SecAggParams) -> np.ndarray:
    if len(data) != 8 * params.length:
        raise SecAggError(f"masked vector of {len(data)} bytes, want {8 * params.length}")
    return np.frombuffer(data, dtype="<u8").astype(np.uint64)


# --------------------------------------------------------------------------- #
# the client
# --------------------------------------------------------------------------- #

_SHARE = 16  # PyCryptodome's Shamir shares 16-byte secrets


@dataclass
class SecAggClient:
    """One participant's side of one round."""

    params: SecAggParams
    index: int
    _c_sk: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate, repr=False)
    _s_sk: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate, repr=False)
    _b: bytes = field(default_factory=lambda: os.urandom(_SHARE), repr=False)
    roster: dict[int, tuple[bytes, bytes]] = field(default_factory=dict, repr=False)
    inbox: dict[int, bytes] = field(default_factory=dict, repr=False)
    masked: bool = False
    revealed: bool = False
    _own_share: tuple[int, list[bytes]] = field(default=(0, []), repr=False)

    def __post_init__(self) -> None:
        if not 1 <= self.index <= self.params.n:
            raise SecAggError(f"participant index {self.index} outside 1..{self.params.n}")

    def keys(self) -> bytes:
        """Stage 1: my two public keys."""
        return pack_keys({self.index: (_raw(self._c_sk.public_key()), _raw(self._s_sk.public_key()))})

    def _envelope(self, v: int) -> ChaCha20Poly1305:
        shared = self._c_sk.exchange(X25519PublicKey.from_public_bytes(self.roster[v][0]))
        return ChaCha20Poly1305(_kdf(shared, "share", self.params.round))

    def shares(self, roster: bytes) -> bytes:
        """Stage 2: Shamir shares of my self-mask seed and masking key, one
        envelope per peer in the roster (which must hold me, with my keys)."""
        keys = unpack_keys(roster)
        mine = unpack_keys(self.keys())[self.index]
        if keys.get(self.index) != mine:
            raise SecAggError("the roster does not hold my keys")
        if len(keys) < self.params.threshold or not set(keys) <= {self.index, *self.params.neighbours(self.index)}:
            raise SecAggError(f"a roster of {len(keys)} below the threshold {self.params.threshold}, "
                              "or naming a participant that is not my neighbour")
        self.roster = keys
        ids = sorted(keys)
        # Shamir indexes shares 1..n; share j goes to the j-th roster member
        sk = _private_raw(self._s_sk)
        split = [Shamir.split(self.params.threshold, len(ids), s) for s in (self._b, sk[:_SHARE], sk[_SHARE:])]
        out: dict[int, bytes] = {}
        for j, v in enumerate(ids):
            if v == self.index:
                continue
            x = split[0][j][0]
            plain = struct.pack("<III", self.index, v, x) + b"".join(s[j][1] for s in split)
            nonce = os.urandom(12)
            out[v] = nonce + self._envelope(v).encrypt(nonce, plain, self._aad(self.index, v))
        self._own_share = (split[0][ids.index(self.index)][0], [s[ids.index(self.index)][1] for s in split])
        return pack_map(out)

    def _aad(self, sender: int, receiver: int) -> bytes:
        return struct.pack("<III", self.params.round, sender, receiver)

    def mask(self, x: np.ndarray, inbox: bytes) -> bytes:
        """Stage 3: my vector (floats, range-checked) masked by my self-mask
        and a pairwise mask with every peer that sent me its shares (U2)."""
        if not self.roster:
            raise SecAggError("mask before shares")
        got = unpack_map(inbox)
        if self.index in got or not set(got) <= set(self.roster):
            raise SecAggError("the inbox names me or a peer outside the roster")
        if len(got) + 1 < self.params.threshold:
            raise SecAggError(f"{len(got) + 1} participants sent shares, below the threshold {self.params.threshold}")
        self.inbox = got
        y = encode_fixed(x, self.params)
        y = _apply(y, _prg(_kdf(self._b, "self", self.params.round), self.params.length), 1)
        for v in sorted(got):
            y = _apply(y, _pairwise_mask(self._s_sk, self.roster[v][1], self.params), _sign(self.index, v))
        self.masked = True
        return pack_vector(y)

    def _open(self, v: int) -> tuple[int, list[bytes]]:
        """(Shamir x, [share of b_v, shares of s_sk_v halves]) from v's envelope."""
        if v == self.index:
            return self._own_share
        blob = self.inbox[v]
        try:
            plain = self._envelope(v).decrypt(blob[:12], blob[12:], self._aad(v, self.index))
        except (InvalidTag, ValueError):
            raise SecAggError(f"the envelope from participant {v} does not open") from None
        sender, receiver, x = struct.unpack_from("<III", plain)
        if (sender, receiver) != (v, self.index) or len(plain) != 12 + 3 * _SHARE:
            raise SecAggError(f"the envelope from participant {v} is not addressed to me")
        return x, [plain[12 + i * _SHARE:12 + (i + 1) * _SHARE] for i in range(3)]

    def reveal(self, request: bytes) -> bytes:
        """Stage 4: shares of b_v for survivors, of s_sk_v for the dropped."""
        survivors, dropped = unpack_unmask(request)
        if self.revealed or not self.masked:
            raise SecAggError("reveal once, and only after masking")
        s, d = set(survivors), set(dropped)
        known = set(self.inbox) | {self.index}
        if s & d or self.index not in s or len(s & known) < self.params.threshold:
            raise SecAggError("an unmask request must split the participants into survivors (at least the "
                              "threshold of my neighbourhood) and dropped, never both")
        self.revealed = True
        out: dict[int, bytes] = {}
        for v in sorted((s | d) & known):
            x, parts = self._open(v)
            out[v] = struct.pack("<I", x) + (parts[0] if v in s else parts[1] + parts[2])
        return pack_map(out)


# --------------------------------------------------------------------------- #
# the server
# --------------------------------------------------------------------------- #


@dataclass
class SecAggServer:
    """The aggregator's side of one round: routes payloads, then unmasks the sum.

    It never holds a client's unmasked vector: it sees masked vectors, and the
    secrets it reconstructs (survivors' self-mask seeds, dropped clients'
    masking keys) remove masks from the *sum* only."""

    params: SecAggParams
    keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    envelopes: dict[int, dict[int, bytes]] = field(default_factory=dict)  # sender -> receiver -> blob
    vectors: dict[int, np.ndarray] = field(default_factory=dict)
    reveals: dict[int, dict[int, bytes]] = field(default_factory=dict)  # revealer -> owner -> share
    request: tuple[list[int], list[int]] | None = None

    def _check(self, u: int) -> None:
        if not 1 <= u <= self.params.n:
            raise SecAggError(f"participant index {u} outside 1..{self.params.n}")

    def add_keys(self, u: int, data: bytes) -> None:
        self._check(u)
        keys = unpack_keys(data)
        if list(keys) != [u] or self.envelopes:
            raise SecAggError("keys: one participant's own keys, before any shares")
        self.keys[u] = keys[u]

    def _hood(self, u: int) -> set[int]:
        return {u, *self.params.neighbours(u)}

    def roster(self, u: int) -> bytes:
        """Stage 1 -> 2: the keys of ``u`` and of its neighbours that sent
        theirs (U1); ``SecAggError`` when they are fewer than the threshold."""
        keys = {v: k for v, k in self.keys.items() if v in self._hood(u)}
        if u not in keys or len(keys) < self.params.threshold:
            raise SecAggError(f"{len(keys)} of participant {u}'s neighbourhood sent keys, "
                              f"below the threshold {self.params.threshold}")
        return pack_keys(keys)

    def add_shares(self, u: int, data: bytes) -> None:
        self._check(u)
        env = unpack_map(data)
        if u not in self.keys or u in self.envelopes or self.vectors:
            raise SecAggError("shares: once, from a roster member, before any masked vector")
        if set(env) != (set(self.keys) & self._hood(u)) - {u}:
            raise SecAggError("shares must address every neighbour in the roster")
        self.envelopes[u] = env

    def inbox(self, v: int) -> bytes:
        """Stage 2 -> 3: the envelopes addressed to ``v`` from every sender (U2)."""
        return pack_map({u: env[v] for u, env in self.envelopes.items() if u != v and v in env})

    def add_masked(self, u: int, data: bytes) -> None:
        self._check(u)
        if u not in self.envelopes or u in self.vectors or self.request is not None:
            raise SecAggError("masked: once, from a participant that sent shares, before unmasking")
        self.vectors[u] = unpack_vector(data, self.params)

    def unmask_request(self) -> bytes:
        """Stage 3 -> 4: who survived (sent a masked vector) and who dropped."""
        survivors = sorted(self.vectors)
        if len(survivors) < self.params.threshold:
            raise SecAggError(f"{len(survivors)} masked vectors, below the threshold {self.params.threshold}")
        self.request = (survivors, sorted(set(self.envelopes) - set(survivors)))
        return pack_unmask(*self.request)

    def add_reveal(self, u: int, data: bytes) -> None:
        self._check(u)
        if self.request is None or u not in self.request[0] or u in self.reveals:
            raise SecAggError("reveal: once, from a survivor, after the unmask request")
        self.reveals[u] = unpack_map(data)

    def ready(self) -> bool:
        return len(self.reveals) >= self.params.threshold

    def _combine(self, owner: int, part: slice) -> bytes:
        shares = []
        for share_map in self.reveals.values():
            blob = share_map.get(owner)
            if blob is not None and len(blob) >= 4 + part.stop:
                shares.append((struct.unpack_from("<I", blob)[0], blob[4 + part.start:4 + part.stop]))
        if len(shares) < self.params.threshold:
            raise SecAggError(f"{len(shares)} shares for participant {owner}, need {self.params.threshold}")
        return Shamir.combine(shares[: self.params.threshold])

    def total(self) -> np.ndarray:
        """Stage 4: the sum of the survivors' vectors, as floats."""
        if self.request is None or not self.ready():
            raise SecAggError("not enough reveals to unmask")
        survivors, dropped = self.request
        acc = np.zeros(self.params.length, dtype=np.uint64)
        for u in survivors:
            acc = _apply(acc, self.vectors[u], 1)
            b = self._combine(u, slice(0, _SHARE))
            acc = _apply(acc, _prg(_kdf(b, "self", self.params.round), self.params.length), -1)
        for v in dropped:
            sk = X25519PrivateKey.from_private_bytes(
                self._combine(v, slice(0, _SHARE)) + self._combine(v, slice(_SHARE, 2 * _SHARE)))
            if _raw(sk.public_key()) != self.keys[v][1]:
                raise SecAggError(f"the reconstructed key of dropped participant {v} does not match its public key")
            for w in sorted(set(survivors) & set(self.envelopes[v])):
                # w added sign(w, v) * PRG(s_wv); v's opposite half never arrived
                acc = _apply(acc, _pairwise_mask(sk, self.keys[w][1], self.params), -_sign(w, v))
        return decode_fixed(acc, self.params)

    def bytes_per_client(self) -> int:
        """Mean secure-aggregation bytes one participant sent and received this
        round (payloads only: keys, roster, envelopes both ways, the masked
        vector, the unmask request and its reveal)."""
        n = max(1, len(self.keys))
        roster = sum(len(self.roster(u)) for u in self.envelopes)
        env = sum(len(pack_map(e)) for e in self.envelopes.values())
        inboxes = sum(len(self.inbox(v)) for v in self.envelopes)
        masked = 8 * self.params.length * len(self.vectors)
        req = len(pack_unmask(*self.request)) * len(self.request[0]) if self.request else 0
        rev = sum(len(pack_map(r)) for r in self.reveals.values())
        return math.ceil((len(self.keys) * 80 + roster + env + inboxes + masked + req + rev) / n)
