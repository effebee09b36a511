"""The replicated training state: adapter + optimizer + version.

The aggregator and every device hold one and keep it bit-identical by
replaying the same ``Update`` messages through the same optimizer, so a
round's step travels as seeds and coefficients, never as tensors.
"""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np

from fwdllm.core.directions import combine
from fwdllm.core.layout import HEAD, LoraLayout, PerturbMask, adapter_sha256
from fwdllm.core.optim import Optimizer, OptimizerSpec
from fwdllm.core.protocol import Update, head_array


class Replica:
    """Adapter + optimizer + version, replayable from ``Update`` messages.

    The aggregator and every worker hold one; they stay bit-identical because
    they run the same :func:`~fwdllm.contract.combine` and the same optimizer
    step on the same (seeds, coeffs, lr).
    """

    def __init__(self, layout: LoraLayout, tensors: dict[str, np.ndarray], optimizer: Optimizer, version: int) -> None:
        layout.check(tensors)
        self.layout = layout
        self.tensors = {n: np.array(tensors[n], dtype=np.float32) for n in layout.shapes()}
        self.optimizer = optimizer
        self.version = version
        self.sha = adapter_sha256(layout, self.tensors)

    def apply(self, update: Update) -> str:
        """Replay one step; returns the new hash (compare with the Update's)."""
        grad = combine(update.seeds, update.coeffs, self.layout, PerturbMask.from_dict(update.mask), update.dist)
        if self.layout.head is not None and update.head_grad:
            grad[HEAD] = head_array(update.head_grad, self.layout, update.head_codec)
        self.optimizer.step(self.tensors, grad, update.lr)
        self.version = update.version
        self.sha = adapter_sha256(self.layout, self.tensors)
        return self.sha

    def replay(self, updates: list[Update], sha: str) -> bool:
        """Apply ``updates`` in order (a catch-up); True when the replica
        lands on ``sha``.  Versions must follow on from this one."""
        for u in updates:
            if u.version != self.version + 1:
                raise ValueError(f"replay of version {u.version} onto a replica at {self.version}")
            self.apply(u)
        return self.sha == sha

    def apply_if_finite(self, update: Update) -> str | None:
        """:meth:`apply`, unless the step would leave a non-finite value in the
        adapter or the optimizer state: then the replica stays as it was and
        None is returned.  The aggregator steps through this (the Update it
        broadcasts is then always one every device can replay); devices use
        :meth:`apply` and compare hashes."""
        tensors = {n: a.copy() for n, a in self.tensors.items()}
        state = {k: np.array(a, copy=True) for k, a in self.optimizer.state_arrays().items()}
        version, sha = self.version, self.sha
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow here is the case being handled
            new_sha = self.apply(update)
        arrays = [*self.tensors.values(), *self.optimizer.state_arrays().values()]
        if all(np.all(np.isfinite(a)) for a in arrays if a.dtype.kind == "f"):
            return new_sha
        self.tensors, self.version, self.sha = tensors, version, sha
        self.optimizer.load_state_arrays(state)
        return None

    def to_bytes(self) -> bytes:
        """``npz`` of tensors, optimizer state, version and layout (no pickle)."""
        arrays: dict[str, np.ndarray] = {f"t/{n}": a for n, a in self.tensors.items()}
        arrays.update({f"o/{k}": a for k, a in self.optimizer.state_arrays().items()})
        arrays["version"] = np.array(self.version, dtype=np.int64)
        arrays["layout"] = np.frombuffer(json.dumps(self.layout.to_dict()).encode(), dtype=np.uint8)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, spec: OptimizerSpec) -> "Replica":
        """Inverse of :meth:`to_bytes`; ``ValueError`` on anything malformed."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            layout = LoraLayout.from_dict(json.loads(arrays["layout"].tobytes()))
            tensors = {k[2:]: a for k, a in arrays.items() if k.startswith("t/")}
            opt = Optimizer(spec)
            opt.load_state_arrays({k[2:]: a for k, a in arrays.items() if k.startswith("o/")})
            return cls(layout, tensors, opt, int(arrays["version"]))
        except (OSError, EOFError, KeyError, TypeError, json.JSONDecodeError, zipfile.BadZipFile) as e:
            raise ValueError(f"bad snapshot: {e}") from None
