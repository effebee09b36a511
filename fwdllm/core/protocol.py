"""The messages between devices and the aggregator.

Versioned dataclasses exchanged over ZeroMQ.  A message is one JSON header
frame plus optional binary frames; decoding validates everything (version,
type, field types, finiteness, sizes) so that hostile input can only ever
produce a :class:`ProtocolError`.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from fwdllm.core import compress
from fwdllm.core.layout import LoraLayout

#: 2: seeds-only joins (init seed + update history), compressed head
#: gradients, secure aggregation and differential privacy of the scalars
PROTOCOL_VERSION = 2
MAX_HEADER_BYTES = 64 * 1024
MAX_BLOB_BYTES = 256 * 1024 * 1024
MAX_ARRAY_LEN = 65536


class ProtocolError(ValueError):
    """A frame that is not a valid message of this protocol version."""


@dataclass(frozen=True)
class F64s:
    """Marker: a float64 vector field (sent as base64 little-endian)."""


@dataclass(frozen=True)
class U32s:
    """Marker: a uint32 vector field (seeds)."""


_ARRAY_KINDS: dict[type, str] = {F64s: "<f8", U32s: "<u4"}
_REGISTRY: dict[str, type["Message"]] = {}


@dataclass(frozen=True)
class Message:
    """Base of all messages; subclasses set ``TYPE`` and declare fields.

    Field kinds: ``int``, ``float`` (finite), ``str``, ``bool``, ``dict``
    (JSON object), ``bytes`` (sent as its own frame) and numpy vectors declared
    with ``field(metadata={"array": F64s|U32s})``.
    """

    TYPE: ClassVar[str] = ""

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if cls.TYPE:
            _REGISTRY[cls.TYPE] = cls

    def to_frames(self) -> list[bytes]:
        header: dict[str, Any] = {"v": PROTOCOL_VERSION, "type": self.TYPE}
        blobs: list[bytes] = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if _is_default(f, value):
                continue  # the decoder fills it in: optional fields cost nothing when unused
            kind = f.metadata.get("array")
            if kind is not None:
                arr = np.ascontiguousarray(value, dtype=_ARRAY_KINDS[kind])
                header[f.name] = base64.b64encode(arr.tobytes()).decode()
            elif isinstance(value, bytes):
                header[f.name] = {"blob": len(blobs)}
                blobs.append(value)
            else:
                header[f.name] = value
        return [json.dumps(header, separators=(",", ":"), allow_nan=False).encode()] + blobs

    @staticmethod
    def from_frames(frames: list[bytes]) -> "Message":
        """Decode and validate; raises :class:`ProtocolError` on anything odd."""
        if not frames:
            raise ProtocolError("empty message")
        if len(frames[0]) > MAX_HEADER_BYTES:
            raise ProtocolError(f"header of {len(frames[0])} bytes exceeds {MAX_HEADER_BYTES}")
        try:
            header = json.loads(frames[0])
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise ProtocolError(f"header is not JSON: {e}") from None
        if not isinstance(header, dict):
            raise ProtocolError("header is not a JSON object")
        if header.get("v") != PROTOCOL_VERSION:
            raise ProtocolError(f"unsupported protocol version {header.get('v')!r} (want {PROTOCOL_VERSION})")
        cls = _REGISTRY.get(header.get("type")) if isinstance(header.get("type"), str) else None
        if cls is None:
            raise ProtocolError(f"unknown message type {header.get('type')!r}")
        blobs = frames[1:]
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in header:
                if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
                    continue
                raise ProtocolError(f"{cls.TYPE}: missing field {f.name!r}")
            kwargs[f.name] = _decode_field(cls.TYPE, f, header[f.name], blobs)
        return cls(**kwargs)


def _is_default(f: dataclasses.Field, value: Any) -> bool:
    """Whether ``value`` is ``f``'s plain default (same type, equal), so
    :meth:`Message.to_frames` may leave it out."""
    return f.default is not dataclasses.MISSING and type(value) is type(f.default) and value == f.default


def _decode_field(type_name: str, f: dataclasses.Field, raw: Any, blobs: list[bytes]) -> Any:
    where = f"{type_name}.{f.name}"
    kind = f.metadata.get("array")
    if kind is not None:
        if not isinstance(raw, str):
            raise ProtocolError(f"{where}: expected base64 string")
        try:
            data = base64.b64decode(raw, validate=True)
        except (ValueError, TypeError):
            raise ProtocolError(f"{where}: bad base64") from None
        dtype = np.dtype(_ARRAY_KINDS[kind])
        if len(data) % dtype.itemsize or len(data) // dtype.itemsize > MAX_ARRAY_LEN:
            raise ProtocolError(f"{where}: bad array length")
        arr = np.frombuffer(data, dtype=dtype).astype(dtype.newbyteorder("="))
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            raise ProtocolError(f"{where}: non-finite value")
        return arr
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if t == "bytes":
        if not (isinstance(raw, dict) and isinstance(raw.get("blob"), int) and 0 <= raw["blob"] < len(blobs)):
            raise ProtocolError(f"{where}: missing binary frame")
        blob = blobs[raw["blob"]]
        if len(blob) > MAX_BLOB_BYTES:
            raise ProtocolError(f"{where}: binary frame too large")
        return bytes(blob)
    if t == "int":
        if isinstance(raw, bool) or not isinstance(raw, int) or abs(raw) >= 2**63:
            raise ProtocolError(f"{where}: expected int")
        return raw
    if t == "float":
        if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw):
            raise ProtocolError(f"{where}: expected finite number")
        return float(raw)
    if t == "str":
        if not isinstance(raw, str) or len(raw) > 4096:
            raise ProtocolError(f"{where}: expected string")
        return raw
    if t == "bool":
        if not isinstance(raw, bool):
            raise ProtocolError(f"{where}: expected bool")
        return raw
    if t.startswith("dict"):
        if not isinstance(raw, dict):
            raise ProtocolError(f"{where}: expected object")
        return raw
    raise ProtocolError(f"{where}: undecodable field type {t}")  # pragma: no cover


def _f64() -> Any:
    return field(metadata={"array": F64s})


def _u32() -> Any:
    return field(metadata={"array": U32s})


@dataclass(frozen=True)
class Join(Message):
    """Client -> server, first message: who I am and what I can do."""

    TYPE: ClassVar[str] = "join"
    client_id: str
    model_sha256: str
    tokens_per_s: float
    mem_bytes: int
    max_batch: int
    n_examples: int
    #: direction entries per second this device generates (the catch-up cost
    #: model's compute term, :func:`fwdllm.core.history.catch_up_plan`); 0 = unknown
    replay_entries_per_s: float = 0.0


@dataclass(frozen=True)
class Welcome(Message):
    """Server -> client: accepted; run configuration the client must mirror."""

    TYPE: ClassVar[str] = "welcome"
    run_id: str
    heartbeat_s: float
    config: dict  # layout, mask, dist, task, optimizer spec


@dataclass(frozen=True)
class Refuse(Message):
    """Server -> client: not accepted (wrong model, bad key, ...)."""

    TYPE: ClassVar[str] = "refuse"
    reason: str


@dataclass(frozen=True)
class Heartbeat(Message):
    """Either way; liveness only."""

    TYPE: ClassVar[str] = "hb"


@dataclass(frozen=True)
class Task(Message):
    """Server -> client: score these seeds on a batch of local data."""

    TYPE: ClassVar[str] = "task"
    round: int
    version: int
    adapter_sha256: str
    seeds: np.ndarray = _u32()
    mask: dict = field(default_factory=dict)  # PerturbMask.to_dict(); may change per round
    dist: str = "gaussian"
    eps: float = 1e-2
    batch_size: int = 8
    batch_seed: int = 0
    one_sided: bool = False
    #: draw the batch stratified by label (``edge_client.tasks.sample_batch``);
    #: False is the uniform draw of clients that predate the field
    stratify: bool = False
    #: how to encode the result's head gradient (:mod:`fwdllm.core.compress`)
    head_codec: str = "f32"
    #: ``--secagg``: this round's :class:`~fwdllm.core.secagg.SecAggParams` plus
    #: ``index``, the client's 1-based place; the result goes through ``SecAgg``
    secagg: dict = field(default_factory=dict)
    #: ``--dp-epsilon``: ``clip`` (per-example L2 bound), ``noise_std`` (the
    #: device's share of the Gaussian, 0 when the server adds it): the device
    #: Poisson-samples its batch and sends clipped per-seed sums (:mod:`fwdllm.core.dp`)
    dp: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Result(Message):
    """Client -> server: per-seed losses.  ``loss_minus`` is the shared base
    loss repeated when the task was one-sided."""

    TYPE: ClassVar[str] = "result"
    round: int
    seeds: np.ndarray = _u32()
    loss_plus: np.ndarray = _f64()
    loss_minus: np.ndarray = _f64()
    n_tokens: int = 0
    seconds: float = 0.0
    #: runs with a classifier head: the exact head gradient of the batch,
    #: little-endian float32 (n_labels * n_embd), over ``head_rows`` examples
    head_grad: bytes = b""
    head_rows: int = 0
    #: ``head_grad``'s encoding (:mod:`fwdllm.core.compress`)
    head_codec: str = "f32"
    #: the batch loss at the current adapter, sent only by a task without
    #: seeds (a head-only round, ``--k 0``): there is no ``loss_minus`` to
    #: carry it, and it is the round's training loss
    base_loss: float = 0.0
    #: a task with ``dp`` (and no ``secagg``): the client's contribution
    #: vector (:func:`fwdllm.core.contribution.vector`) instead of losses
    sums: np.ndarray = field(default_factory=lambda: np.zeros(0), metadata={"array": F64s})


@dataclass(frozen=True)
class Update(Message):
    """Server -> clients: the step of ``round`` as seeds and coefficients.

    The gradient estimate is ``sum_k coeffs_k * direction(seeds_k)``; every
    party feeds it to the same optimizer (``fwdllm.optim``) at learning rate
    ``lr`` and must land on ``adapter_sha256``.  With a classifier head,
    ``head_grad`` is the head's gradient (float32 bytes, the row-weighted mean
    of the round's results), the only part not rebuilt from seeds.
    """

    TYPE: ClassVar[str] = "update"
    round: int
    version: int
    lr: float
    adapter_sha256: str
    seeds: np.ndarray = _u32()
    coeffs: np.ndarray = _f64()
    mask: dict = field(default_factory=dict)
    dist: str = "gaussian"
    head_grad: bytes = b""
    #: ``head_grad``'s encoding: every replica applies the decoded bytes
    head_codec: str = "f32"


def head_array(raw: bytes, layout: LoraLayout, codec: str = "f32") -> np.ndarray:
    """A ``head_grad`` field as a float32 array of the layout's head shape;
    ``ProtocolError`` when it does not fit or is not finite."""
    if layout.head is None:
        raise ProtocolError("head_grad sent for a layout without a head")
    try:
        return compress.decode(raw, codec, layout.head)
    except ValueError as e:
        raise ProtocolError(f"head_grad: {e}") from None


@dataclass(frozen=True)
class SnapshotRequest(Message):
    """Client -> server: I am behind or diverged; send me the full state."""

    TYPE: ClassVar[str] = "snapreq"


@dataclass(frozen=True)
class Snapshot(Message):
    """Server -> client: full adapter + optimizer state (``npz`` bytes)."""

    TYPE: ClassVar[str] = "snapshot"
    version: int
    adapter_sha256: str
    state: bytes


@dataclass(frozen=True)
class CatchUp(Message):
    """Client -> server: my replica is at ``version`` with this hash (the
    init seed's adapter at 0); bring me to the current version, by replay of
    the update history or by snapshot, whichever costs less."""

    TYPE: ClassVar[str] = "catchup"
    version: int
    adapter_sha256: str


@dataclass(frozen=True)
class Replay(Message):
    """Server -> client: the updates after the client's version
    (:meth:`fwdllm.core.history.History.encode`); applied in order they must
    land on ``adapter_sha256`` at ``version``."""

    TYPE: ClassVar[str] = "replay"
    version: int
    adapter_sha256: str
    history: bytes


@dataclass(frozen=True)
class SecAgg(Message):
    """Either way, ``--secagg`` rounds: one stage's payload of the secure
    aggregation state machines (:mod:`fwdllm.core.secagg`).  Stages: ``keys``,
    ``shares``, ``masked``, ``reveal`` (client -> server); ``roster``, ``inbox``,
    ``unmask`` (server -> client).  ``meta`` carries a masked result's clear
    bookkeeping (``n_tokens``, ``seconds``)."""

    TYPE: ClassVar[str] = "secagg"
    round: int
    stage: str
    data: bytes
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Error(Message):
    """Server -> client: the last frame was rejected, and why."""

    TYPE: ClassVar[str] = "error"
    reason: str
    #: machine-readable kind: "join" (unknown peer: send Join first),
    #: "frame" (malformed/oversized/unknown version), "result" (not your task)
    code: str = ""


@dataclass(frozen=True)
class Bye(Message):
    """Either way: the run is over / I am leaving."""

    TYPE: ClassVar[str] = "bye"
    reason: str = ""
