"""Exact-gradient reference in torch for the edge engine's losses.

transformers loads the SAME GGUF dequantized to float32; the LoRA is applied
with forward hooks (``y += s * x @ A.T @ B.T``, ``s = alpha/rank``) from the
tensors in GGUF layout, so autograd returns d loss / d tensor directly in the
contract's names and shapes.  llama.cpp stores q/k rows RoPE-permuted
(``w.reshape(n_head, 2, d/2, ...).swapaxes(1, 2)``) while transformers
un-permutes them on load, so LoRA ``B`` of q/k is un-permuted inside the graph.

The losses are those of ``fwdllm.runtime.session`` (restricted-softmax
classification, completion-token CE for sft), computed on the token sequences
that :meth:`EdgeSession.prepare` produced, so tokenization cannot differ.
The projected gradient of a direction ``v`` is then ``sum grad * v``.

torch is imported only here (``pip install fwdllm[torch]``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np

from fwdllm.core.layout import LoraLayout


def _unpermute_rows(w, n_head: int):  # noqa: ANN001, ANN202 - torch tensors
    """GGUF (llama.cpp) row order of q/k -> HF row order."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class TorchRef:
    """A dequantized float32 copy of a GGUF model with a differentiable LoRA."""

    def __init__(self, model_path: str | os.PathLike, n_threads: int | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        if n_threads:
            torch.set_num_threads(n_threads)
        path = Path(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        ).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        cfg = self.model.config
        self.n_head = {"q": cfg.num_attention_heads, "k": cfg.num_key_value_heads}

    def _module(self, layer: int, target: str):  # noqa: ANN202
        from fwdllm.core.layout import PEFT_MODULES

        mod = self.model.model.layers[layer]
        for part in PEFT_MODULES[target].split("."):
            mod = getattr(mod, part)
        return mod

    def loss_and_grad(
        self,
        layout: LoraLayout,
        tensors: Mapping[str, np.ndarray],
        seqs: list,
        targets: list[np.ndarray],
        kind: str,
        label_ids: np.ndarray,
    ) -> tuple[float, dict[str, np.ndarray]]:
        """Batch loss and its exact gradient w.r.t. every LoRA tensor.

        ``seqs``/``targets`` come from ``EdgeSession.prepare``; sequences are
        run one at a time (no padding effects).
        """
        import torch

        leaves = {n: torch.tensor(np.asarray(tensors[n], dtype=np.float32), requires_grad=True) for n in layout.shapes()}
        scale = layout.scale
        hooks = []
        for t in layout.targets:
            a, b = leaves[t.a_name], leaves[t.b_name]
            b_hf = _unpermute_rows(b, self.n_head[t.target]) if t.target in self.n_head else b

            def hook(_mod, inp, out, a=a, b_hf=b_hf):  # noqa: ANN001, ANN202
                return out + scale * (inp[0] @ a.T) @ b_hf.T

            hooks.append(self._module(t.layer, t.target).register_forward_hook(hook))
        try:
            nll = torch.zeros((), dtype=torch.float64)
            terms = 0
            for seq, tgt in zip(seqs, targets):
                ids = torch.tensor([list(seq.tokens)], dtype=torch.long)
                logits = self.model(input_ids=ids).logits[0, list(seq.outputs)].double()
                if kind == "classify":
                    z = logits[0, torch.as_tensor(label_ids)]
                    nll = nll + torch.logsumexp(z, 0) - z[int(tgt[0])]
                    terms += 1
                else:
                    logp = torch.log_softmax(logits, dim=-1)
                    nll = nll - logp[torch.arange(len(tgt)), torch.as_tensor(tgt)].sum()
                    terms += len(tgt)
            loss = nll / terms
            loss.backward()
        finally:
            for h in hooks:
                h.remove()
        return float(loss.detach()), {n: leaf.grad.numpy().astype(np.float32) for n, leaf in leaves.items()}


def directional(grads: Mapping[str, np.ndarray], vdir: Mapping[str, np.ndarray]) -> float:
    """``grad . v`` over the perturbed tensors (absent = zero), in float64."""
    return float(sum(np.dot(grads[n].ravel().astype(np.float64), v.ravel().astype(np.float64)) for n, v in vdir.items()))


def random_lora(layout: LoraLayout, seed: int, b_std: float = 0.02) -> dict[str, np.ndarray]:
    """A LoRA with NON-zero B (unlike a fresh init), so that perturbations of
    A matter too: A ~ N(0, 1/n_in), B ~ N(0, b_std^2)."""
    from fwdllm.core.directions import tensor_direction

    out = {}
    for name, shape in layout.shapes().items():
        std = 1.0 / np.sqrt(shape[1]) if name.endswith(".lora_a") else b_std
        out[name] = tensor_direction(seed, "init:" + name, shape) * np.float32(std)
    return out


def fidelity(
    session,  # noqa: ANN001 - fwdllm.runtime.session.EdgeSession
    ref: TorchRef,
    examples: list,
    seeds: list[int],
    eps_values: list[float],
    mask,  # noqa: ANN001 - PerturbMask
    dist: str = "gaussian",
) -> dict[str, object]:
    """llama.cpp projected gradients vs torch's exact ``grad . v``.

    Uses the session's current LoRA.  Returns the exact values, and per eps the
    estimates, sign agreement and Pearson correlation.
    """
    from fwdllm.core.directions import direction

    batch = session.prepare(examples)
    loss, grads = ref.loss_and_grad(
        session.layout, session.tensors, batch.seqs, batch.targets, session.task.kind, session.label_ids
    )
    exact = np.array([directional(grads, direction(s, session.layout, mask, dist)) for s in seeds])
    out: dict[str, object] = {"torch_loss": loss, "llama_loss": session.evaluate(examples).loss, "exact": exact.tolist()}
    for eps in eps_values:
        est = session.perturbed(examples, seeds, eps, mask, dist).projected
        out[f"eps={eps:g}"] = {
            "sign_agreement": float(np.mean(np.sign(est) == np.sign(exact))),
            "pearson": float(np.corrcoef(est, exact)[0, 1]),
            "estimates": est.tolist(),
        }
    return out
