"""A prefix every sequence of a decode shares (a few-shot prompt's
demonstrations) is decoded once and its KV copied to the others: on SmolLM2
the logits are those of decoding the sequences whole, bit for bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import fwdllm.runtime.engine as engine_mod
from fwdllm.runtime.engine import Engine, Seq
from fwdllm.runtime.tasks import SST2_TWO_SHOT


def test_a_shared_prefix_is_decoded_once_with_the_same_logits(smollm2: Path, monkeypatch) -> None:
    engine = Engine(smollm2, n_threads=1, n_seq_max=4, n_ctx_seq=96)
    try:
        demo = engine.tokenize(SST2_TWO_SHOT, bos=True)
        seqs = []
        for text in ("boring and bad", "the best movie of the year", "great play , good people"):
            toks = engine.tokenize(SST2_TWO_SHOT + f"Review: {text}\nSentiment:", bos=True)
            seqs.append(Seq(tuple(toks), (len(toks) - 3, len(toks) - 1)))
        assert engine.shared_prefix(seqs) >= len(demo) - 1 >= engine_mod.MIN_SHARED_PREFIX
        assert engine.shared_prefix(seqs[:1]) == 0  # one sequence: nothing to share
        shared = engine.decode(seqs)
        monkeypatch.setattr(engine_mod, "MIN_SHARED_PREFIX", 10**9)
        assert engine.shared_prefix(seqs) == 0
        whole = engine.decode(seqs)
    finally:
        engine.close()
    for a, b in zip(shared, whole):
        assert a.shape == (2, engine.n_vocab)
        np.testing.assert_array_equal(a, b)
