"""The adapter layout: which LoRA tensors exist, their names, shapes and order.

The names are llama.cpp's (``blk.N.attn_q.weight.lora_a``), so one layout
describes the GGUF file on disk, the numpy dict in memory and the flat vector
the optimizer sees.  Device and server both build it from the base model's
shapes, and a mismatch shows in :func:`adapter_sha256`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np

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

#: Name of the optional classifier head in a layout: a (n_labels, n_embd)
#: correction of the label words' rows of the output matrix (``--head``).  It
#: trains, travels, hashes and steps as this one compact tensor; on disk and in
#: llama.cpp it is an ordinary LoRA of the output projection (:data:`OUTPUT`),
#: ``lora_a`` = the head and ``lora_b`` = a fixed selector of those rows
#: (:meth:`LoraLayout.head_lora`).  Its gradient ``(softmax - onehot) h^T``
#: comes in closed form from the forward pass.
HEAD = "head.label_rows"

#: llama.cpp's output projection (the LM head), which the classifier head
#: adapts.  A model that ties it to ``token_embd.weight`` has no such tensor:
#: llama.cpp reads a ``token_embd.weight`` LoRA as an *input*-embedding LoRA
#: (A and B swapped, rows of A looked up per token), so the head needs an
#: untied copy of the model (``fwdllm convert untie``).
OUTPUT = "output.weight"


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
    with ``--head``): it corrects rows ``head_ids`` (the label words' first
    tokens) of the ``n_vocab``-row output matrix.
    """

    rank: int
    alpha: float
    targets: tuple[LoraTarget, ...]
    head: tuple[int, int] | None = None
    head_ids: tuple[int, ...] = ()
    n_vocab: int = 0

    def __post_init__(self) -> None:
        if self.head is not None and (len(self.head_ids) != self.head[0] or len(set(self.head_ids)) != self.head[0]
                                      or not all(0 <= i < self.n_vocab for i in self.head_ids)):
            raise ValueError(f"a head of {self.head[0]} rows needs as many distinct row ids below n_vocab "
                             f"{self.n_vocab}, got {self.head_ids}")

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
        """The blocks' LoRA tensors, name -> numpy shape, in canonical order (a
        before b); a head adds its own pair (:meth:`head_lora`) to the file."""
        out: dict[str, tuple[int, int]] = {}
        for t in self.targets:
            out[t.a_name] = (self.rank, t.n_in)
            out[t.b_name] = (t.n_out, self.rank)
        return out

    @property
    def head_scale(self) -> float:
        """llama.cpp's factor for the head's LoRA: alpha over its rank (n_labels), 1 at alpha 0."""
        assert self.head is not None
        return self.alpha / self.head[0] if self.alpha else 1.0

    def head_lora(self, head: np.ndarray) -> dict[str, np.ndarray]:
        """The head as llama.cpp's LoRA of :data:`OUTPUT`: ``lora_a`` is the head
        itself and ``lora_b`` (n_vocab, n_labels) holds ``1/head_scale`` at
        (``head_ids[i]``, i) and zeros elsewhere, so ``scale * B @ A`` adds row
        i of the head to output row ``head_ids[i]`` and leaves the others."""
        assert self.head is not None
        b = np.zeros((self.n_vocab, self.head[0]), np.float32)
        b[list(self.head_ids), np.arange(self.head[0])] = np.float32(1.0 / self.head_scale)
        return {OUTPUT + ".lora_a": np.asarray(head, dtype=np.float32), OUTPUT + ".lora_b": b}

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
            **({"head": list(self.head), "head_ids": list(self.head_ids), "n_vocab": self.n_vocab}
               if self.head is not None else {}),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LoraLayout":
        return cls(
            rank=int(d["rank"]),
            alpha=float(d["alpha"]),
            targets=tuple(LoraTarget(int(a), str(b), int(c), int(e)) for a, b, c, e in d["targets"]),
            head=(int(d["head"][0]), int(d["head"][1])) if d.get("head") else None,
            head_ids=tuple(int(i) for i in d.get("head_ids", ())),
            n_vocab=int(d.get("n_vocab", 0)),
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
