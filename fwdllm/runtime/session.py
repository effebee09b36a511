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

Perturbed evaluation (``perturbed``): for each seed the device needs the
loss at ``W + s*(B+-e*Vb)(A+-e*Va)`` (``s = alpha/rank``; the mask decides
which of ``Va``/``Vb`` are non-zero).  It writes those two shifted copies of
the current LoRA as ordinary adapters to /dev/shm and swaps them in place of
the main adapter, so a perturbed pass costs exactly what a plain pass with the
LoRA costs.  (An earlier design kept the main adapter and added a second one,
``[Va; A]``/``[B, Vb]`` at scale ``+-e*s``: one write per seed instead of two,
but every decode then ran a second set of LoRA matmuls, +7.8 % per pass on
SmolLM2 - more than the extra write.)  This is the exact central difference
of the true function, not of a linearisation.

Each adapter swap makes llama.cpp re-reserve its scheduler on the next decode
(`llama_context::set_adapters_lora` sets ``sched_need_reserve``; ~2-7 ms on
SmolLM2), so the swaps are the minimum: two per seed (one per seed plus one
for the base pass when one-sided).  Building seed k+1's adapters (direction,
shift, GGUF write) runs in a helper thread while seed k decodes - llama_decode
releases the GIL - and only the llama.cpp load stays on the main thread.

Classifier head (a layout with :data:`~fwdllm.core.layout.HEAD`): a
correction of the label words' rows of the output matrix, which llama.cpp
applies itself as a LoRA of the output projection (it is part of every
adapter written here), so the label logits are ``z = (E_lab + head) h`` with
``h`` the final-normed hidden state.  Because ``z`` is linear in ``head``, its
gradient ``mean (softmax(z) - onehot(y)) h^T`` is exact and comes from the
forward pass alone - no backward pass through any layer - with ``h``
recovered from the logits row llama.cpp already returns, on rows the head
does not touch (:mod:`fwdllm.runtime.readout`: embeddings mode would make
every token an output).  ``perturbed`` returns it next to the ZO scalars:
from the base pass when one-sided, else averaged over the symmetric +-eps
passes (their first-order terms cancel, so the average is the base pass's to
O(eps^2)).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from fwdllm.core.adapter_io import AdapterImage
from fwdllm.core.directions import direction
from fwdllm.core.errors import UserError
from fwdllm.core.layout import LoraLayout, PerturbMask
from fwdllm.runtime.engine import Engine, Seq
from fwdllm.runtime.tasks import Example, TaskSpec, report_bad

DEFAULT_CTX = {"classify": 256, "sft": 512}
#: Sequences per ``llama_decode`` (None: up to ``max_batch``).  The KV cache
#: holds ``n_ctx`` cells per sequence, so 16 sft sequences of 512 tokens took
#: 189 MB on SmolLM2 (twice its GGUF).  An sft row is already a long decode
#: (prompt + completion, ~65 tokens on AG News headlines) and scoring one per
#: decode ran at the same tokens per CPU-second as eight, so sft decodes one
#: (a batch still holds ``max_batch`` rows: they take turns).
SEQS_PER_DECODE = {"classify": None, "sft": 1}
#: Tokens llama.cpp computes at once.  Its compute buffer holds logits for all
#: of them (24.6 MiB at 128 on SmolLM2, 98 MiB at 512), and an sft row (~65
#: tokens) fits in 128; classify keeps 512, the size its logits were pinned at.
UBATCH = {"classify": 512, "sft": 128}


def default_ctx(task: TaskSpec) -> int:
    """Tokens per example by default: :data:`DEFAULT_CTX` for the row, plus
    room for a long template's fixed text (a few-shot prompt's demonstrations,
    counted at <= 1 token per 3 characters), in steps of 64."""
    fixed = len(re.sub(r"\{[^{}]*\}", "", task.template)) // 3
    return DEFAULT_CTX[task.kind] + (-(-fixed // 64) * 64 if fixed > 32 else 0)


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
    head_grad: np.ndarray | None = None  # float32 (n_labels, n_embd): exact head gradient (see module doc)
    head_rows: int = 0  # examples behind head_grad
    base_loss: float | None = None  # the one-sided base pass's loss (the only loss when there are no seeds)
    #: ``per_example=True``: each example's loss, (seeds, examples), for DP's per-example clipping
    example_plus: np.ndarray | None = None
    example_minus: np.ndarray | None = None

    @property
    def projected(self) -> np.ndarray:
        """Directional-derivative estimate per seed: (L+ - L-)/(2e) or (L+ - L0)/e."""
        if self.one_sided:
            return (self.loss_plus - self.loss_minus) / self.eps
        return (self.loss_plus - self.loss_minus) / (2 * self.eps)


@dataclass(frozen=True)
class Batch:
    """Examples turned into decodable sequences, packed into decode chunks."""

    seqs: list[Seq]
    targets: list[np.ndarray]  # per sequence: label index (classify) or completion token ids
    chunks: list[list[int]]
    n_tokens: int


def _shm_dir() -> str:
    """RAM-backed directory for throwaway adapters (llama.cpp loads from files)."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else tempfile.gettempdir()


def shifted_tensors(
    layout: LoraLayout, tensors: dict[str, np.ndarray], vdir: dict[str, np.ndarray], delta: float
) -> dict[str, np.ndarray]:
    """The LoRA moved by ``delta`` along ``vdir`` (absent = zero), float32."""
    return {n: t + np.float32(delta) * vdir[n] if n in vdir else t for n, t in tensors.items()}


def first_tokens(tokenize: Callable[..., list[int]], task: TaskSpec) -> tuple[int, ...]:
    """The first token of each label word: the vocabulary rows a classify loss reads."""
    ids = []
    for word in task.label_words:
        toks = tokenize(word, bos=False)
        if not toks:
            raise UserError(f"label word {word!r} tokenizes to nothing")
        ids.append(int(toks[0]))
    if len(set(ids)) != len(ids):
        raise UserError(f"task {task.name}: label words {task.label_words} share a first token")
    return tuple(ids)


def label_token_ids(model: str | Path, task: TaskSpec) -> tuple[int, ...]:
    """:func:`first_tokens` from the model's vocabulary alone (no weights loaded)."""
    from fwdllm.runtime.engine import Vocab

    with closing(Vocab(model)) as vocab:
        return first_tokens(vocab.tokenize, task)


def _per_example(rows: list, base: list | None, k: int, one_sided: bool) -> dict[str, np.ndarray]:
    """``example_plus`` / ``example_minus`` (seeds x examples) from the passes' rows."""
    if not k:
        return {}
    arr = np.asarray(rows, dtype=np.float64).reshape(k, 1 if one_sided else 2, -1)
    minus = np.broadcast_to(np.asarray(base, dtype=np.float64), arr[:, 0].shape) if one_sided else arr[:, 1]
    return {"example_plus": arr[:, 0], "example_minus": np.array(minus)}


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
        from fwdllm.runtime.models import resolve_model

        self.task = task
        self.strict = strict
        self.model_path = resolve_model(model)
        self.engine = Engine(
            self.model_path,
            n_threads=n_threads,
            n_seq_max=SEQS_PER_DECODE[task.kind] or max_batch,
            n_ctx_seq=n_ctx or default_ctx(task),
            n_ubatch=UBATCH[task.kind],
            mmap=mmap,
            repack=repack,
        )
        self.label_ids = np.array(first_tokens(self.engine.tokenize, task), dtype=np.int64)
        self.layout: LoraLayout | None = None
        self.tensors: dict[str, np.ndarray] | None = None
        self._main = None
        self._image: AdapterImage | None = None
        self._readout = None  # fwdllm.runtime.readout.HiddenFromLogits, built for the first head
        self._decoded_tokens = 0
        self._decode_seconds = 0.0

    # ------------------------------------------------------------- adapters
    def set_lora(self, layout: LoraLayout | None, tensors: dict[str, np.ndarray] | None) -> None:
        """Make ``tensors`` the main adapter (``None`` = base model; a layout
        with ``tensors=None`` means all-zero LoRA, still perturbable)."""
        if self._main is not None:
            self.engine.set_adapters([])
            self.engine.free_adapter(self._main)
            self._main = None
        if layout is not None and layout != self.layout:
            self._check_head(layout)
            self._image = AdapterImage(layout)
        self.layout, self.tensors = layout, None
        if layout is None:
            self.engine.set_adapters([])
            return
        if tensors is None:
            self.tensors = layout.zeros()
        else:
            layout.check(tensors)
            self.tensors = {n: np.asarray(tensors[n], dtype=np.float32) for n in layout.shapes()}
        if tensors is None:
            self.engine.set_adapters([])
            return
        self._main = self.load_file(self._write_temp(self.tensors))
        self.engine.set_adapters([(self._main, 1.0)])

    def _check_head(self, layout: LoraLayout) -> None:
        """A head must fit the task and model; builds the hidden-state readout once."""
        if layout.head is None:
            return
        if self.task.kind != "classify":
            raise UserError(f"a classifier head needs a classify task; {self.task.name} is {self.task.kind}")
        want = (len(self.label_ids), self.engine.n_embd)
        if tuple(layout.head) != want or layout.n_vocab != self.engine.n_vocab:
            raise UserError(f"head shape {tuple(layout.head)} over {layout.n_vocab} rows does not fit this model "
                            f"and task {want} over {self.engine.n_vocab}")
        if tuple(layout.head_ids) != tuple(self.label_ids.tolist()):
            raise UserError(f"the head corrects output rows {list(layout.head_ids)}, but task {self.task.name}'s "
                            f"label words are rows {self.label_ids.tolist()}")
        from fwdllm.core.lora import open_base, untied_hint

        base = open_base(self.model_path)
        if base.output is None:
            raise UserError(f"a classifier head: {untied_hint(base)}")
        if self._readout is None:
            from fwdllm.runtime.readout import HiddenFromLogits

            self._readout = HiddenFromLogits(self.model_path, self.engine.n_vocab, self.engine.n_embd,
                                             exclude=layout.head_ids)

    def _write_temp(self, tensors: dict[str, np.ndarray]) -> str:
        """Write an adapter of the current layout to a RAM-backed temp file
        (thread-safe: no llama.cpp call)."""
        fd, name = tempfile.mkstemp(prefix=f"fwdllm-lora-{os.getpid()}-", suffix=".gguf", dir=_shm_dir())
        os.close(fd)
        try:
            self._image.write(name, tensors)
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
        return name

    def load_file(self, name: str):
        """Load an adapter file into llama.cpp (which copies the data) and delete it."""
        try:
            return self.engine.load_adapter(name)
        finally:
            Path(name).unlink(missing_ok=True)

    def write_shifted(self, seed: int, eps: float, mask: PerturbMask, dist: str, signs: Sequence[int]) -> list[str]:
        """Adapter files of the LoRA shifted by ``sign*eps*direction(seed)``, one per sign."""
        assert self.layout is not None and self.tensors is not None
        vdir = direction(int(seed), self.layout, mask, dist)
        return [self._write_temp(shifted_tensors(self.layout, self.tensors, vdir, sg * eps)) for sg in signs]

    def main_set(self) -> list:
        """The adapter set that scores at the current LoRA (empty for the base model)."""
        return [(self._main, 1.0)] if self._main is not None else []

    # -------------------------------------------------------------- scoring
    def prepare(self, examples: Sequence[Example]) -> Batch:
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
        return Batch(seqs, targets, self.engine.pack(seqs), sum(len(s.tokens) for s in seqs))

    def nll(
        self, logits: np.ndarray, target: np.ndarray, head_grad: np.ndarray | None = None,
    ) -> tuple[float, int, bool]:
        """(summed NLL, number of loss terms, argmax correct) of one sequence;
        adds its head gradient to ``head_grad`` when given."""
        if self.task.kind == "classify":
            z = logits[0, self.label_ids].astype(np.float64)
            lse = np.log(np.exp(z - z.max()).sum()) + z.max()
            if head_grad is not None:
                p = np.exp(z - lse)
                p[target[0]] -= 1.0
                head_grad += np.outer(p, self._readout(logits)[0])
            return float(lse - z[target[0]]), 1, bool(np.argmax(z) == target[0])
        # A row at a time: a whole completion's float64 logits, a few arrays of
        # ~5 MB each, were an sft client's largest transient; the sums are the same bits.
        terms = np.empty(len(target))
        for j, (row, t) in enumerate(zip(logits, target)):
            z = row.astype(np.float64)
            m = z.max()
            terms[j] = np.log(np.exp(z - m).sum()) + m - z[t]
        return float(terms.sum()), len(target), False

    def _run(
        self, batch: Batch, adapters: list, progress: bool = False, head_grad: np.ndarray | None = None,
        per_example: list[float] | None = None,
    ) -> tuple[float, float]:
        """(mean loss, accuracy) of the batch under ``adapters``; sums the
        per-example head gradients into ``head_grad`` and appends each
        example's own mean loss to ``per_example`` when given."""
        from tqdm import tqdm

        self.engine.set_adapters(adapters)
        nll = terms = correct = 0.0
        t0 = time.perf_counter()
        for chunk in tqdm(batch.chunks, desc="scoring", unit="batch", disable=not progress, file=sys.stderr):
            for i, logits in zip(chunk, self.engine.decode([batch.seqs[i] for i in chunk])):
                a, b, c = self.nll(logits, batch.targets[i], head_grad)
                nll, terms, correct = nll + a, terms + b, correct + c
                if per_example is not None:
                    per_example.append(a / max(1, b))
        self._decode_seconds += time.perf_counter() - t0
        self._decoded_tokens += batch.n_tokens
        return nll / terms, correct / len(batch.seqs)

    def evaluate(self, examples: Sequence[Example], *, progress: bool = False) -> EvalResult:
        """Mean loss and accuracy of ``examples`` under the current LoRA."""
        t0 = time.perf_counter()
        batch = self.prepare(examples)
        loss, acc = self._run(batch, self.main_set(), progress)
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
        per_example: bool = False,
    ) -> PerturbedResult:
        """Losses at LoRA +- eps*direction(seed) for every seed (see module doc);
        ``per_example`` also keeps each example's loss (DP clips per example)."""
        if self.layout is None or self.tensors is None:
            raise UserError("perturbed scoring needs a LoRA layout (set_lora)")
        if not (eps > 0 and np.isfinite(eps)):
            raise UserError(f"eps must be a positive number, got {eps}")
        seeds_arr = np.asarray(list(seeds), dtype=np.uint32)
        if not len(seeds_arr) and not one_sided:
            raise UserError("scoring without seeds needs one-sided differences (its base pass is all there is)")
        t0 = time.perf_counter()
        batch = self.prepare(examples)
        main = self.main_set()
        hg = np.zeros(self.layout.head) if self.layout.head is not None else None
        ex: list[list[float]] | None = [] if per_example else None
        base_ex: list[float] | None = [] if per_example else None
        base = self._run(batch, main, head_grad=hg, per_example=base_ex)[0] if one_sided else None
        signs = (1,) if one_sided else (1, -1)
        losses = np.empty((len(seeds_arr), len(signs)))
        with closing(self._prefetch(seeds_arr, eps, mask, dist, signs)) as prefetched:
            for k, files in enumerate(prefetched):
                adapters = []
                try:
                    while files:
                        adapters.append(self.load_file(files.pop(0)))
                    for j, ad in enumerate(adapters):
                        row: list[float] | None = [] if ex is not None else None
                        losses[k, j] = self._run(batch, [(ad, 1.0)], head_grad=None if one_sided else hg,
                                                 per_example=row)[0]
                        if ex is not None:
                            ex.append(row)
                finally:
                    for f in files:
                        Path(f).unlink(missing_ok=True)
                    self.engine.set_adapters(main)  # never free an adapter that is still set
                    for ad in adapters:
                        self.engine.free_adapter(ad)
        plus = losses[:, 0]
        minus = np.full(len(seeds_arr), base) if base is not None else losses[:, 1]
        passes = len(seeds_arr) * (1 if one_sided else 2) + (1 if one_sided else 0)
        head_passes = 1 if one_sided else 2 * len(seeds_arr)
        return PerturbedResult(
            seeds=seeds_arr,
            loss_plus=plus,
            loss_minus=minus,
            eps=float(eps),
            one_sided=one_sided,
            n_tokens=batch.n_tokens * passes,
            seconds=time.perf_counter() - t0,
            head_grad=None if hg is None or not head_passes else (hg / (head_passes * len(batch.seqs))).astype(np.float32),
            head_rows=len(batch.seqs) if hg is not None else 0,
            base_loss=base,
            **(_per_example(ex, base_ex, len(seeds_arr), one_sided) if per_example else {}),
        )

    def _prefetch(
        self, seeds: np.ndarray, eps: float, mask: PerturbMask, dist: str, signs: Sequence[int]
    ) -> Iterator[list[str]]:
        """Each seed's shifted-adapter files, in order; seed k+1's are written by
        a helper thread while the caller decodes seed k.  The caller owns (and
        must delete) every list it receives; unreceived files are deleted here."""
        with ThreadPoolExecutor(1, thread_name_prefix="fwdllm-prefetch") as pool:
            nxt = pool.submit(self.write_shifted, seeds[0], eps, mask, dist, signs) if len(seeds) else None
            try:
                for k in range(len(seeds)):
                    cur, nxt = nxt, None
                    if k + 1 < len(seeds):
                        nxt = pool.submit(self.write_shifted, seeds[k + 1], eps, mask, dist, signs)
                    yield cur.result()
            finally:
                if nxt is not None and nxt.exception() is None:
                    for f in nxt.result():
                        Path(f).unlink(missing_ok=True)

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
