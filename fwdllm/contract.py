"""The contract between edge devices and the aggregator.

Both sides import this module and nothing else to agree on three things:

* **Adapter layout** - which LoRA tensors exist, their names, shapes and order.
  The names are llama.cpp's (``blk.N.attn_q.weight.lora_a``), so the same layout
  describes the GGUF file on disk, the numpy dict in memory and the flat vector
  the optimizer sees.
* **seed -> direction** - a perturbation for every trainable tensor, derived from
  ``(seed, tensor name)`` alone, bit-identical on every platform and numpy
  version.  Only raw bit-generator output and exact integer arithmetic are used:
  numpy's distribution methods (``standard_normal`` ...) have changed between
  releases and transcendental functions differ in the last ulp across CPUs.
* **Messages** - versioned dataclasses exchanged over ZeroMQ.  A message is one
  JSON header frame plus optional binary frames; decoding validates everything
  (version, type, field types, finiteness, sizes) so that hostile input can only
  ever produce a :class:`ProtocolError`.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Mapping

import numpy as np

# --------------------------------------------------------------------------- #
# Adapter layout
# --------------------------------------------------------------------------- #

#: Short target names (PEFT-style) -> llama.cpp tensor stem.  The order of this
#: mapping is the order of targets inside a layer.
TARGETS: dict[str, str] = {
    "q": "attn_q",
    "k": "attn_k",
    "v": "attn_v",
    "o": "attn_output",
    "gate": "ffn_gate",
    "up": "ffn_up",
    "down": "ffn_down",
}

#: Name of the optional classifier-head correction in a layout: a
#: (n_labels, n_embd) matrix added to the verbalizer's rows of the output
#: matrix.  It is not a LoRA tensor (llama.cpp never sees it): the edge
#: engine adds ``head @ h`` to the label logits itself, and its gradient
#: ``(softmax - onehot) h^T`` comes in closed form from the forward pass.
HEAD = "head.label_rows"


def split_targets(value: str) -> tuple[str, ...]:
    """``q,v`` or ``q+v`` -> ``("q", "v")``: the one spelling of a target list
    on every command line (``+`` is the profiler's, and survives inside a
    comma-separated ``bench convergence --strategies`` entry).  Names are
    checked where the layout is built (:meth:`LoraLayout.for_base`)."""
    return tuple(t.strip() for t in value.replace("+", ",").split(",") if t.strip())

#: PEFT module names for the same targets (used by convert's PEFT bridge).
PEFT_MODULES: dict[str, str] = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}


@dataclass(frozen=True)
class LoraTarget:
    """One adapted base weight ``W`` of shape (n_out, n_in): ``W += s * B @ A``."""

    layer: int
    target: str
    n_in: int
    n_out: int

    @property
    def base_name(self) -> str:
        return f"blk.{self.layer}.{TARGETS[self.target]}.weight"

    @property
    def a_name(self) -> str:
        return self.base_name + ".lora_a"

    @property
    def b_name(self) -> str:
        return self.base_name + ".lora_b"


@dataclass(frozen=True)
class LoraLayout:
    """Names, shapes and order of every LoRA tensor.

    ``lora_a`` is (rank, n_in) and ``lora_b`` is (n_out, rank) in numpy order,
    exactly as llama.cpp reads them.  llama.cpp applies
    ``W + user_scale * alpha / rank * B @ A``.  ``head`` = (n_labels, n_embd)
    adds the :data:`HEAD` tensor after the LoRA tensors (classification runs
    with ``--head``); it travels, hashes and steps like a LoRA tensor but is
    never written into a llama.cpp adapter.
    """

    rank: int
    alpha: float
    targets: tuple[LoraTarget, ...]
    head: tuple[int, int] | None = None

    @classmethod
    def for_base(
        cls,
        base_shapes: Mapping[str, tuple[int, int]],
        rank: int,
        alpha: float,
        targets: Iterable[str],
        layers: Iterable[int] | None = None,
    ) -> "LoraLayout":
        """Build the layout for a base model.

        ``base_shapes`` maps base tensor names (``blk.0.attn_q.weight``) to
        (n_out, n_in).  Unknown targets or absent tensors raise ``ValueError``.
        """
        wanted = list(dict.fromkeys(targets))
        bad = [t for t in wanted if t not in TARGETS]
        if bad:
            raise ValueError(f"unknown LoRA target(s) {bad}; choose from {','.join(TARGETS)}")
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        n_layer = 1 + max(
            (int(n.split(".")[1]) for n in base_shapes if n.startswith("blk.")), default=-1
        )
        layer_ids = range(n_layer) if layers is None else sorted(set(layers))
        out: list[LoraTarget] = []
        for i in layer_ids:
            for t in TARGETS:  # canonical order, whatever order the user typed
                if t not in wanted:
                    continue
                name = f"blk.{i}.{TARGETS[t]}.weight"
                if name not in base_shapes:
                    raise ValueError(f"base model has no tensor {name}")
                n_out, n_in = base_shapes[name]
                out.append(LoraTarget(i, t, int(n_in), int(n_out)))
        if not out:
            raise ValueError("LoRA layout is empty: no layers/targets selected")
        return cls(rank=rank, alpha=float(alpha), targets=tuple(out))

    @property
    def scale(self) -> float:
        """The factor llama.cpp multiplies ``B @ A`` by at user scale 1."""
        return self.alpha / self.rank

    @property
    def target_names(self) -> tuple[str, ...]:
        return tuple(t for t in TARGETS if any(x.target == t for x in self.targets))

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted({t.layer for t in self.targets}))

    @property
    def n_layers(self) -> int:
        """Layer count of the base model as far as the LoRA covers it (highest index + 1)."""
        return max(self.layers) + 1

    def lora_shapes(self) -> dict[str, tuple[int, int]]:
        """LoRA tensor name -> numpy shape, in canonical order (a before b):
        what a llama.cpp adapter file holds."""
        out: dict[str, tuple[int, int]] = {}
        for t in self.targets:
            out[t.a_name] = (self.rank, t.n_in)
            out[t.b_name] = (t.n_out, self.rank)
        return out

    def shapes(self) -> dict[str, tuple[int, int]]:
        """Every trainable tensor: the LoRA's, then the head if there is one."""
        out = self.lora_shapes()
        if self.head is not None:
            out[HEAD] = self.head
        return out

    @property
    def n_params(self) -> int:
        return sum(a * b for a, b in self.shapes().values())

    def zeros(self) -> dict[str, np.ndarray]:
        return {n: np.zeros(s, dtype=np.float32) for n, s in self.shapes().items()}

    def check(self, tensors: Mapping[str, np.ndarray]) -> None:
        """Raise ``ValueError`` unless ``tensors`` matches this layout exactly."""
        shapes = self.shapes()
        missing = [n for n in shapes if n not in tensors]
        extra = [n for n in tensors if n not in shapes]
        if missing or extra:
            raise ValueError(f"adapter does not match layout: missing {missing[:3]}, extra {extra[:3]}")
        for n, s in shapes.items():
            if tuple(tensors[n].shape) != s:
                raise ValueError(f"{n}: shape {tuple(tensors[n].shape)} != layout {s}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "targets": [[t.layer, t.target, t.n_in, t.n_out] for t in self.targets],
            # only when present, so head-less layouts keep their hashes
            **({"head": list(self.head)} if self.head is not None else {}),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LoraLayout":
        return cls(
            rank=int(d["rank"]),
            alpha=float(d["alpha"]),
            targets=tuple(LoraTarget(int(a), str(b), int(c), int(e)) for a, b, c, e in d["targets"]),
            head=(int(d["head"][0]), int(d["head"][1])) if d.get("head") else None,
        )


def adapter_sha256(layout: LoraLayout, tensors: Mapping[str, np.ndarray]) -> str:
    """Hash of an adapter's *values* (layout + little-endian float32 bytes).

    Independent of the GGUF container, so two devices that reached the same
    weights by different routes (snapshot vs. replayed updates) agree.
    """
    h = hashlib.sha256(json.dumps(layout.to_dict(), sort_keys=True).encode())
    for name in layout.shapes():
        h.update(np.ascontiguousarray(tensors[name], dtype="<f4").tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- #
# seed -> direction
# --------------------------------------------------------------------------- #

DISTRIBUTIONS = ("gaussian", "rademacher")
PARTS = ("a", "b", "both")


@dataclass(frozen=True)
class PerturbMask:
    """Which tensors a direction touches; the others get an exact zero.

    ``parts`` picks LoRA A, B or both; ``layers`` is a half-open range
    ``(start, stop)`` of layer indices; ``targets`` restricts to some of q,k,v...
    """

    parts: str = "b"
    layers: tuple[int, int] | None = None
    targets: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.parts not in PARTS:
            raise ValueError(f"mask parts must be one of {PARTS}, got {self.parts!r}")

    def selects(self, t: LoraTarget, part: str) -> bool:
        if self.parts != "both" and part != self.parts:
            return False
        if self.layers is not None and not (self.layers[0] <= t.layer < self.layers[1]):
            return False
        return self.targets is None or t.target in self.targets

    def names(self, layout: LoraLayout) -> list[str]:
        """The perturbed tensor names, in layout order."""
        out = []
        for t in layout.targets:
            if self.selects(t, "a"):
                out.append(t.a_name)
            if self.selects(t, "b"):
                out.append(t.b_name)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "parts": self.parts,
            "layers": list(self.layers) if self.layers else None,
            "targets": list(self.targets) if self.targets else None,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PerturbMask":
        layers = d.get("layers")
        targets = d.get("targets")
        return cls(
            parts=str(d.get("parts", "b")),
            layers=(int(layers[0]), int(layers[1])) if layers else None,
            targets=tuple(str(t) for t in targets) if targets else None,
        )


def _stream(seed: int, name: str) -> np.random.PCG64:
    """A PCG64 generator whose 128-bit state and increment are the SHA-256 of
    ``"{seed}:{name}"``: one independent stream per (seed, tensor).

    The state is set directly (no SeedSequence), and only ``random_raw`` is
    used; bit generators' raw streams are covered by numpy's stability policy
    (NEP 19).
    """
    digest = hashlib.sha256(f"{int(seed)}:{name}".encode()).digest()
    bg = np.random.PCG64()
    bg.state = {
        "bit_generator": "PCG64",
        "state": {
            "state": int.from_bytes(digest[:16], "little"),
            "inc": int.from_bytes(digest[16:], "little") | 1,
        },
        "has_uint32": 0,
        "uinteger": 0,
    }
    return bg


def tensor_direction(seed: int, name: str, shape: tuple[int, ...], dist: str = "gaussian") -> np.ndarray:
    """The perturbation of one tensor, float32, mean 0 and variance ~1 per entry.

    * ``rademacher``: one raw bit per entry, +-1.
    * ``gaussian``: Irwin-Hall(12), the sum of twelve 16-bit uniforms (three
      raw words per entry), centred and scaled by 2^-16.  Every step is exact
      (integers below 2^24, then a power-of-two scale), and a sum over all
      16-bit lanes of the words does not depend on byte order, so the result is
      bit-identical everywhere.  Support is +-6, variance 1 - 2^-32: all a ZO
      estimator needs from a Gaussian.
    """
    n = int(np.prod(shape))
    bg = _stream(seed, name)
    if dist == "rademacher":
        words = bg.random_raw((n + 63) // 64)
        bits = (words[:, None] >> np.arange(64, dtype=np.uint64)) & np.uint64(1)
        signs = bits.reshape(-1)[:n].astype(np.int8)
        return (1 - 2 * signs).astype(np.float32).reshape(shape)
    if dist != "gaussian":
        raise ValueError(f"unknown distribution {dist!r}; choose from {DISTRIBUTIONS}")
    # The lane sum runs as a float32 mat-vec (2x faster than an integer
    # reduction over a 12-wide axis): every partial sum is an integer below
    # 12 * 0xFFFF < 2^24, so each float32 addition is exact in any order, and
    # so are the centring and the power-of-two scaling.
    lanes = bg.random_raw(3 * n).view(np.uint16).reshape(n, 12).astype(np.float32)
    centred = lanes @ np.ones(12, dtype=np.float32) - np.float32(6 * 0xFFFF)
    return (centred * np.float32(2.0**-16)).reshape(shape)


def direction(
    seed: int, layout: LoraLayout, mask: PerturbMask, dist: str = "gaussian"
) -> dict[str, np.ndarray]:
    """The direction for ``seed``: perturbed tensors only (absent = zero)."""
    shapes = layout.shapes()
    return {n: tensor_direction(seed, n, shapes[n], dist) for n in mask.names(layout)}


def combine(
    seeds: Iterable[int],
    coeffs: Iterable[float],
    layout: LoraLayout,
    mask: PerturbMask,
    dist: str = "gaussian",
) -> dict[str, np.ndarray]:
    """``sum_k coeff_k * direction(seed_k)`` over every layout tensor, float32.

    The sum runs in float64 in the given seed order, so every party that
    replays the same (seeds, coeffs) gets the same bits.
    """
    acc = {n: np.zeros(s, dtype=np.float64) for n, s in layout.shapes().items()}
    for seed, c in zip(seeds, coeffs):
        for n, v in direction(int(seed), layout, mask, dist).items():
            acc[n] += float(c) * v.astype(np.float64)
    return {n: a.astype(np.float32) for n, a in acc.items()}


# --------------------------------------------------------------------------- #
# Messages
# --------------------------------------------------------------------------- #

PROTOCOL_VERSION = 1
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
    #: the batch loss at the current adapter, sent only by a task without
    #: seeds (a head-only round, ``--k 0``): there is no ``loss_minus`` to
    #: carry it, and it is the round's training loss
    base_loss: float = 0.0


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


def head_array(raw: bytes, layout: LoraLayout) -> np.ndarray:
    """A ``head_grad`` field as a float32 array of the layout's head shape;
    ``ProtocolError`` when it does not fit or is not finite."""
    if layout.head is None:
        raise ProtocolError("head_grad sent for a layout without a head")
    n = layout.head[0] * layout.head[1]
    if len(raw) != 4 * n:
        raise ProtocolError(f"head_grad has {len(raw)} bytes, want {4 * n}")
    arr = np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(layout.head)
    if not np.all(np.isfinite(arr)):
        raise ProtocolError("head_grad has a non-finite value")
    return arr


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
