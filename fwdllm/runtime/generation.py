"""Generation with the current adapter, and the metrics of a generative (sft) task.

:func:`generate` continues prompts through the session's llama.cpp engine with
its main adapter applied (``EdgeSession.set_lora``), one prompt at a time
through the KV cache (:meth:`Engine.generate`).  Greedy decoding
(``temperature=0``) takes the argmax of the logits, as ``llama_cpp.Llama``'s
greedy sampler does, so the same adapter gives the same text in
``Llama(model_path=..., lora_path=..., flash_attn=True)``: llama.cpp's own
default context, which the engine uses, has flash attention on, while
``Llama()`` turns it off, and that moved SmolLM2's logits by up to 0.5.
Sampling draws from ``softmax(logits / temperature)`` with one generator per
prompt, seeded from ``(seed, prompt index)``.  A prompt's text never depends
on the other prompts.  The text is the tokens' bytes decoded as UTF-8 with
invalid bytes dropped, as ``Llama`` renders it.

:func:`sft_scores` is what ``fwdllm eval`` reports on an sft task:

* ``perplexity`` - ``exp`` of the mean token cross-entropy over all completion
  tokens (teacher-forced; the session's sft loss);
* ``rouge_l`` - the mean ROUGE-L F-measure (0-1) of the greedy generations
  against the references, from Google's ``rouge-score`` (its default
  tokenizer, Porter stemming on);
* ``exact_match`` - the share of generations equal to their reference once
  surrounding whitespace is stripped and inner runs of whitespace are one space.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from fwdllm.core.errors import UserError
from fwdllm.core.seeds import derive_seed

if TYPE_CHECKING:
    from fwdllm.runtime.session import EdgeSession
    from fwdllm.runtime.tasks import Example


@dataclass(frozen=True)
class Generation:
    """One continuation: its text (cut before a stop string), its tokens and
    why it ended (``stop``, ``eos`` or ``length``)."""

    text: str
    tokens: tuple[int, ...]
    ended: str

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)


def generate(
    session: "EdgeSession",
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    stop: Sequence[str] = (),
    temperature: float = 0.0,
    seed: int = 0,
    progress: bool = False,
) -> list[Generation]:
    """Continue every prompt under the session's current adapter (see module doc)."""
    from tqdm import tqdm

    if temperature < 0 or not np.isfinite(temperature):
        raise UserError(f"temperature must be >= 0, got {temperature}")
    engine = session.engine
    engine.set_adapters(session.main_set())
    out = []
    for i, prompt in enumerate(tqdm(prompts, desc="generating", unit="prompt", disable=not progress, file=sys.stderr)):
        toks = engine.tokenize(prompt, bos=True)
        if not toks or len(toks) >= engine.max_seq_tokens:
            raise UserError(f"prompt {i + 1} has {len(toks)} tokens: empty, or no room left in the context of "
                            f"{engine.max_seq_tokens} (raise --n-ctx)")
        rng = np.random.Generator(np.random.PCG64(derive_seed(seed, "generate", i)))
        made: list[int] = []
        raw = bytearray()
        state = {"text": "", "ended": "length"}

        def choose(z: np.ndarray) -> int | None:
            if temperature == 0:
                tok = int(np.argmax(z))
            else:
                p = np.exp((z.astype(np.float64) - z.max()) / temperature)
                tok = int(rng.choice(len(p), p=p / p.sum()))
            if engine.is_eog(tok):
                state["ended"] = "eos"
                return None
            made.append(tok)
            raw.extend(engine.piece(tok))
            text = state["text"] = raw.decode("utf-8", errors="ignore")
            cuts = [text.find(s) for s in stop if s in text]
            if cuts:
                state.update(text=text[: min(cuts)], ended="stop")
                return None
            return tok if len(made) < max_new_tokens else None

        engine.generate(toks, choose)
        out.append(Generation(state["text"], tuple(made), state["ended"]))
    return out


def _normal(text: str) -> str:
    return " ".join(text.split())


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of predictions equal to their reference up to whitespace."""
    if len(predictions) != len(references) or not references:
        raise ValueError("need as many predictions as references, at least one")
    return sum(_normal(p) == _normal(r) for p, r in zip(predictions, references)) / len(references)


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure (0-1) by Google's ``rouge-score`` (stemming on)."""
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise UserError("ROUGE-L needs the rouge-score package: pip install 'fwdllm[eval]'") from None
    if len(predictions) != len(references) or not references:
        raise ValueError("need as many predictions as references, at least one")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(np.mean([scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]))


def sft_scores(session: "EdgeSession", examples: Sequence["Example"], *, progress: bool = False,
               generations: bool = True) -> dict[str, Any]:
    """Perplexity (and, with ``generations``, ROUGE-L and exact match of greedy
    generations) of the session's current adapter on sft ``examples``."""
    task = session.task
    r = session.evaluate(examples, progress=progress)
    out: dict[str, Any] = {"loss": r.loss, "perplexity": float(np.exp(r.loss)), "n": r.n, "n_tokens": r.n_tokens,
                           "score_s": r.seconds}
    if generations:
        import time

        t0 = time.perf_counter()
        gens = generate(session, [ex.prompt for ex in examples], max_new_tokens=task.max_new_tokens,
                        stop=task.stop, progress=progress)
        refs = [ex.completion or "" for ex in examples]
        preds = [g.text for g in gens]
        out.update(rouge_l=rouge_l(preds, refs), exact_match=exact_match(preds, refs),
                   generated_tokens=sum(g.n_tokens for g in gens), generate_s=time.perf_counter() - t0)
    return out
