"""EdgeSession: losses and perturbed losses of a batch, on one loaded model.

Losses (the same definitions as ``bench/torch_ref.py``):

* classify - ``-log softmax(z[label_tokens])[y]`` where ``z`` are the logits at
  the last prompt position and ``label_tokens`` the FIRST token of each label
  word.  Restricting the softmax to the verbalizer makes the loss a proper
  K-way classification loss (it ignores probability mass on unrelated tokens,
  which zero-shot prompts spread widely) and makes accuracy = its argmax.
  The batch loss is the mean over examples.
* sft - token cross-entropy (full vocabulary) of the completion tokens given
  prompt and previous completion tokens; the batch loss is the mean over all
  completion tokens of the batch.

Perturbed evaluation (``perturbed``): the current LoRA ``W + s*B@A``
(``s = alpha/rank``) stays loaded as the main adapter.  For each seed a SECOND
adapter carries the first-order change of ``(B + e*Vb)(A + e*Va)``::

    A' = [Va; A]   (2r x in)       B' = [B, Vb]   (out x 2r)
    B'@A' = B@Va + Vb@A

(B-only masks need just ``Vb`` with ``A``: rank r; A-only masks ``B`` with
``Va``).  It is written with alpha=0 - llama.cpp then uses the user scale
verbatim - to /dev/shm and activated at scale ``+e*s`` and then ``-e*s``: one
write+load per seed, two scale switches, each followed by the whole batch.
The central difference of this linear perturbation equals that of the true
``(B+eVb)(A+eVa)`` exactly (the ``e^2 Vb@Va`` term is even in ``e``); the
one-sided estimate ``(L+ - L0)/e`` omits it, an ``O(e)`` effect like the
one-sided bias itself.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from edge_client.engine import Engine, Seq
from edge_client.tasks import Example, TaskSpec, report_bad
from fwdllm.adapter_io import write_adapter
from fwdllm.contract import LoraLayout, PerturbMask, direction
from fwdllm.errors import UserError

DEFAULT_CTX = {"classify": 256, "sft": 512}


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean loss (see module docstring)
    accuracy: float | None  # classify only
    n: int  # examples scored
    n_tokens: int  # tokens decoded
    seconds: float


@dataclass(frozen=True)
class PerturbedResult:
    seeds: np.ndarray  # uint32
    loss_plus: np.ndarray  # float64, one per seed
    loss_minus: np.ndarray  # float64; the shared base loss repeated if one_sided
    eps: float
    one_sided: bool
    n_tokens: int  # tokens decoded by ALL passes (throughput accounting)
    seconds: float

    @property
    def projected(self) -> np.ndarray:
        """Directional-derivative estimate per seed: (L+ - L-)/(2e) or (L+ - L0)/e."""
        if self.one_sided:
            return (self.loss_plus - self.loss_minus) / self.eps
        return (self.loss_plus - self.loss_minus) / (2 * self.eps)


@dataclass(frozen=True)
class _Batch:
    """Examples turned into decodable sequences, packed into decode chunks."""

    seqs: list[Seq]
    targets: list[np.ndarray]  # per sequence: label index (classify) or completion token ids
    chunks: list[list[int]]
    n_tokens: int


def _shm_dir() -> str:
    """RAM-backed directory for throwaway adapters (llama.cpp loads from files)."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else tempfile.gettempdir()


def perturbation_tensors(
    layout: LoraLayout, tensors: dict[str, np.ndarray], vdir: dict[str, np.ndarray], mask: PerturbMask
) -> dict[str, np.ndarray]:
    """The second adapter whose ``B'@A'`` is ``B@Va + Vb@A`` on masked targets."""
    out: dict[str, np.ndarray] = {}
    for t in layout.targets:
        va, vb = vdir.get(t.a_name), vdir.get(t.b_name)
        a, b = tensors[t.a_name], tensors[t.b_name]
        if va is not None and vb is not None:
            out[t.a_name], out[t.b_name] = np.concatenate([va, a], 0), np.concatenate([b, vb], 1)
        elif vb is not None:
            out[t.a_name], out[t.b_name] = a, vb
        elif va is not None:
            out[t.a_name], out[t.b_name] = va, b
    return out


class EdgeSession:
    """A model loaded once for a task; scores batches with any LoRA state."""

    def __init__(
        self,
        model: str | Path,
        task: TaskSpec,
        *,
        n_threads: int | None = None,
        max_batch: int = 16,
        n_ctx: int | None = None,
        mmap: bool = True,
        repack: bool = True,
        strict: bool = False,
    ) -> None:
        from fwdllm.models import resolve_model

        self.task = task
        self.strict = strict
        self.model_path = resolve_model(model)
        self.engine = Engine(
            self.model_path,
            n_threads=n_threads,
            n_seq_max=max_batch,
            n_ctx_seq=n_ctx or DEFAULT_CTX[task.kind],
            mmap=mmap,
            repack=repack,
        )
        self.label_ids = np.array([self._first_token(w) for w in task.label_words], dtype=np.int64)
        if len(set(self.label_ids.tolist())) != len(self.label_ids):
            raise UserError(f"task {task.name}: label words {task.label_words} share a first token")
        self.layout: LoraLayout | None = None
        self.tensors: dict[str, np.ndarray] | None = None
        self._main = None
        self._decoded_tokens = 0
        self._decode_seconds = 0.0

    def _first_token(self, word: str) -> int:
        toks = self.engine.tokenize(word, bos=False)
        if not toks:
            raise UserError(f"label word {word!r} tokenizes to nothing")
        return toks[0]

    # ------------------------------------------------------------- adapters
    def set_lora(self, layout: LoraLayout | None, tensors: dict[str, np.ndarray] | None) -> None:
        """Make ``tensors`` the main adapter (``None`` = base model; a layout
        with ``tensors=None`` means all-zero LoRA, still perturbable)."""
        if self._main is not None:
            self.engine.free_adapter(self._main)
            self._main = None
        self.layout, self.tensors = layout, None
        if layout is None:
            self.engine.set_adapters([])
            return
        if tensors is None:
            self.tensors = layout.zeros()
            self.engine.set_adapters([])
            return
        layout.check(tensors)
        self.tensors = {n: np.asarray(tensors[n], dtype=np.float32) for n in layout.shapes()}
        self._main = self._load_temp(layout, self.tensors, alpha=None)
        self.engine.set_adapters([(self._main, 1.0)])

    def _load_temp(self, layout: LoraLayout, tensors: dict[str, np.ndarray], alpha: float | None):
        fd, name = tempfile.mkstemp(prefix="fwdllm-lora-", suffix=".gguf", dir=_shm_dir())
        os.close(fd)
        try:
            write_adapter(name, layout, tensors, alpha=alpha)
            return self.engine.load_adapter(name)  # llama.cpp copies the data
        finally:
            Path(name).unlink(missing_ok=True)

    def _main_set(self) -> list:
        return [(self._main, 1.0)] if self._main is not None else []

    # -------------------------------------------------------------- scoring
    def prepare(self, examples: Sequence[Example]) -> _Batch:
        """Tokenize and pack; rows too long for the context are bad rows."""
        seqs: list[Seq] = []
        targets: list[np.ndarray] = []
        limit = self.engine.max_seq_tokens
        for ex in examples:
            prompt = self.engine.tokenize(ex.prompt, bos=True)
            if self.task.kind == "classify":
                toks, outs, tgt = prompt, (len(prompt) - 1,), np.array([ex.label])
            else:
                comp = self.engine.tokenize(ex.completion or "", bos=False)
                toks = prompt + comp
                outs = tuple(range(len(prompt) - 1, len(toks) - 1))
                tgt = np.array(comp, dtype=np.int64)
            if len(toks) > limit or not outs:
                why = f"{len(toks)} tokens > context {limit} (raise --n-ctx)" if outs else "empty prompt"
                report_bad(ex.source or "data", ex.line, why, self.strict)
                continue
            seqs.append(Seq(tuple(toks), outs))
            targets.append(tgt)
        if not seqs:
            raise UserError("no example fits the context")
        return _Batch(seqs, targets, self.engine.pack(seqs), sum(len(s.tokens) for s in seqs))

    def _nll(self, logits: np.ndarray, target: np.ndarray) -> tuple[float, int, bool]:
        """(summed NLL, number of loss terms, argmax correct) of one sequence."""
        z = logits.astype(np.float64)
        if self.task.kind == "classify":
            z = z[0, self.label_ids]
            lse = np.log(np.exp(z - z.max()).sum()) + z.max()
            return float(lse - z[target[0]]), 1, bool(np.argmax(z) == target[0])
        m = z.max(axis=1, keepdims=True)
        lse = np.log(np.exp(z - m).sum(axis=1)) + m[:, 0]
        return float((lse - z[np.arange(len(target)), target]).sum()), len(target), False

    def _run(self, batch: _Batch, adapters: list, progress: bool = False) -> tuple[float, float]:
        """(mean loss, accuracy) of the batch under ``adapters``."""
        from tqdm import tqdm

        self.engine.set_adapters(adapters)
        nll = terms = correct = 0.0
        t0 = time.perf_counter()
        for chunk in tqdm(batch.chunks, desc="scoring", unit="batch", disable=not progress, file=sys.stderr):
            for i, logits in zip(chunk, self.engine.decode([batch.seqs[i] for i in chunk])):
                a, b, c = self._nll(logits, batch.targets[i])
                nll, terms, correct = nll + a, terms + b, correct + c
        self._decode_seconds += time.perf_counter() - t0
        self._decoded_tokens += batch.n_tokens
        return nll / terms, correct / len(batch.seqs)

    def evaluate(self, examples: Sequence[Example], *, progress: bool = False) -> EvalResult:
        """Mean loss and accuracy of ``examples`` under the current LoRA."""
        t0 = time.perf_counter()
        batch = self.prepare(examples)
        loss, acc = self._run(batch, self._main_set(), progress)
        return EvalResult(
            loss=loss,
            accuracy=acc if self.task.kind == "classify" else None,
            n=len(batch.seqs),
            n_tokens=batch.n_tokens,
            seconds=time.perf_counter() - t0,
        )

    def perturbed(
        self,
        examples: Sequence[Example],
        seeds: Iterable[int],
        eps: float,
        mask: PerturbMask,
        dist: str = "gaussian",
        one_sided: bool = False,
    ) -> PerturbedResult:
        """Losses at LoRA +- eps*direction(seed) for every seed (see module doc)."""
        if self.layout is None or self.tensors is None:
            raise UserError("perturbed scoring needs a LoRA layout (set_lora)")
        if not (eps > 0 and np.isfinite(eps)):
            raise UserError(f"eps must be a positive number, got {eps}")
        seeds_arr = np.asarray(list(seeds), dtype=np.uint32)
        t0 = time.perf_counter()
        batch = self.prepare(examples)
        main = self._main_set()
        scale = eps * self.layout.scale
        base = self._run(batch, main)[0] if one_sided else None
        plus = np.empty(len(seeds_arr))
        minus = np.empty(len(seeds_arr))
        for k, seed in enumerate(seeds_arr):
            vdir = direction(int(seed), self.layout, mask, dist)
            pert = self._load_temp(self.layout, perturbation_tensors(self.layout, self.tensors, vdir, mask), 0.0)
            try:
                plus[k] = self._run(batch, main + [(pert, scale)])[0]
                minus[k] = base if base is not None else self._run(batch, main + [(pert, -scale)])[0]
            finally:
                self.engine.free_adapter(pert)
        self.engine.set_adapters(main)
        passes = len(seeds_arr) * (1 if one_sided else 2) + (1 if one_sided else 0)
        return PerturbedResult(
            seeds=seeds_arr,
            loss_plus=plus,
            loss_minus=minus,
            eps=float(eps),
            one_sided=one_sided,
            n_tokens=batch.n_tokens * passes,
            seconds=time.perf_counter() - t0,
        )

    def tokens_per_second(self) -> float:
        """Measured decode throughput (running average; a short self-benchmark
        on a synthetic full batch if nothing was scored yet)."""
        if self._decoded_tokens == 0:
            toks = self.engine.tokenize("The quick brown fox jumps over the lazy dog. " * 8, bos=True)[:64]
            seqs = [Seq(tuple(toks), (len(toks) - 1,))] * self.engine.n_seq_max
            n = sum(len(s.tokens) for s in seqs)
            t0 = time.perf_counter()
            self.engine.decode(seqs)
            self._decode_seconds += time.perf_counter() - t0
            self._decoded_tokens += n
        return self._decoded_tokens / self._decode_seconds

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> "EdgeSession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
