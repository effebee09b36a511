"""The LM head's input ``h``, recovered from the logits llama.cpp already returns.

``--head`` needs ``h`` (the final-normed hidden state) at each scored
position.  llama.cpp hands it out only in embeddings mode, and that mode makes
every token of the batch an output: the full-vocabulary logits of every
position are computed and copied, which costs more than the head itself.
But the logits are ``z = W h``
with ``W`` (n_vocab, n_embd) of full column rank, so ``h`` is the least-squares
solution of ``W_S h = z_S`` on any well-conditioned subset ``S`` of the
vocabulary.  This module reads ``2 * n_embd`` fixed rows of ``W`` once and
solves with a precomputed pseudo-inverse: one (n_embd x 2 n_embd) matvec per
example, and the recovered ``h`` is the one llama.cpp's own head multiplied.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from fwdllm.core.errors import UserError


def output_rows(model: str | os.PathLike, ids: np.ndarray) -> np.ndarray:
    """Dequantized rows ``ids`` of the output matrix (``token_embd`` when tied), float64."""
    import gguf

    from fwdllm.core.gguf_file import open_gguf

    tensors = {t.name: t for t in open_gguf(model).tensors}
    t = tensors.get("output.weight") or tensors.get("token_embd.weight")
    if t is None:
        raise UserError(f"{model}: no output.weight or token_embd.weight to recover hidden states from")
    rows = np.asarray(t.data[np.asarray(ids)])
    return np.asarray(gguf.quants.dequantize(rows, t.tensor_type), dtype=np.float64).reshape(len(ids), -1)


class HiddenFromLogits:
    """``h`` from a logits row: ``pinv(W_S) @ z_S`` over ``2 * n_embd`` rows
    spread evenly over the vocabulary, less the rows in ``exclude`` (those a
    classifier head's LoRA moves, whose logits are no longer ``W h``)."""

    def __init__(self, model: str | os.PathLike, n_vocab: int, n_embd: int, exclude: Sequence[int] = ()) -> None:
        rows = np.unique(np.linspace(0, n_vocab - 1, min(n_vocab, 2 * n_embd)).astype(np.int64))
        self.rows = np.setdiff1d(rows, np.asarray(exclude, dtype=np.int64))
        w = output_rows(model, self.rows)
        u, sv, vt = np.linalg.svd(w, full_matrices=False)
        if w.shape[1] != n_embd or sv[-1] <= sv[0] * 1e-6:
            raise UserError(f"{model}: cannot recover hidden states from the logits (output matrix is rank-deficient)")
        self.pinv = (vt.T / sv) @ u.T  # (n_embd, |S|); cond(W_S) is ~140 on SmolLM2

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """(n, n_embd) hidden states of (n, n_vocab) logits."""
        return logits[:, self.rows].astype(np.float64) @ self.pinv.T
