"""Backprop baselines in torch: FedAvg-LoRA (the accuracy ceiling) and FedCyBGD.

Both train a PEFT LoRA on the GGUF that fwdllm runs, dequantized to float32 by
transformers, with fwdllm's own task definition: the prompt template and
verbalizer of :mod:`fwdllm.runtime.tasks`, tokenized by llama.cpp's tokenizer of
the same file, and the loss of :mod:`fwdllm.runtime.session` (cross-entropy over
the label words' first-token logits at the last prompt position; for an sft
task the mean token cross-entropy over the completion tokens).  Clients
read the same shard files as ``fwdllm simulate`` and draw their batches with
the same ``(run seed, round, client id)`` batch seeds, so the baselines and the
zeroth-order runs see the same data.

* **FedAvg-LoRA**: every round each client starts from the global LoRA, takes
  ``local_steps`` AdamW steps on its shard and uploads its LoRA; the server
  averages.  Bytes: the dense float32 adapter down and up.
* **FedCyBGD** (arXiv 2406.11187): the layers are cut into one block per
  client; round ``r`` belongs to client ``r mod N``, which trains only its
  block (the other LoRA tensors frozen) from the current global state and
  uploads only that block.  It downloads the blocks changed since its last
  turn.

torch, transformers and peft are imported inside functions only: the rest of
fwdllm installs without them.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

BACKPROP = ("fedavg-lora", "fedcybgd")


def _layer_of(name: str) -> int:
    """Decoder layer index of a PEFT parameter name (``...layers.12.self_attn...``)."""
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1])


class TorchLora:
    """A PEFT LoRA model on a dequantized GGUF, scoring fwdllm's task loss."""

    def __init__(self, model_path: str | Path, task, rank: int = 8, targets: Sequence[str] = ("q", "v"),  # noqa: ANN001
                 threads: int = 2, seed: int = 0) -> None:
        import llama_cpp
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        from fwdllm.core.layout import PEFT_MODULES
        from fwdllm.runtime.log import quiet_llama

        torch.set_num_threads(threads)
        torch.manual_seed(seed)
        path = Path(model_path)
        quiet_llama()
        self._vocab = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
        self.task = task
        self.label_ids = torch.tensor([self.tokenize(w, bos=False)[0] for w in task.label_words])
        base = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, bias="none",
                         target_modules=[PEFT_MODULES[t].split(".")[-1] for t in targets])
        self.model = get_peft_model(base, cfg)
        self.params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.n_layers = base.config.num_hidden_layers

    def tokenize(self, text: str, *, bos: bool) -> list[int]:
        return self._vocab.tokenize(text.encode("utf-8"), add_bos=bos, special=False)

    def loss(self, examples: Sequence) -> tuple[Any, Any, int]:  # noqa: ANN401 - torch tensors
        """(mean loss, per-example correct or None, number of loss terms) of a
        batch; right-padded (causal: padding after a sequence's end is unseen).

        classify: read at each prompt's last position, restricted to the label
        words' first tokens.  sft: the mean token cross-entropy over all
        completion tokens of the batch, as :class:`EdgeSession` scores it."""
        import torch

        sft = self.task.kind == "sft"
        prompts = [self.tokenize(ex.prompt, bos=True) for ex in examples]
        comps = [self.tokenize(ex.completion or "", bos=False) if sft else [] for ex in examples]
        seqs = [p + c for p, c in zip(prompts, comps)]
        width = max(len(s) for s in seqs)
        ids = torch.zeros((len(seqs), width), dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        logits = self.model(input_ids=ids, attention_mask=mask).logits
        if sft:  # position t predicts token t+1: completion tokens from the last prompt position on
            rows = torch.tensor([i for i, c in enumerate(comps) for _ in c])
            cols = torch.tensor([len(p) - 1 + j for p, c in zip(prompts, comps) for j in range(len(c))])
            y = torch.tensor([t for c in comps for t in c])
            z = logits[rows, cols].double()
            return torch.nn.functional.cross_entropy(z, y), None, len(y)
        last = torch.tensor([len(s) - 1 for s in seqs])
        z = logits[torch.arange(len(seqs)), last][:, self.label_ids].double()
        y = torch.tensor([ex.label for ex in examples])
        return torch.nn.functional.cross_entropy(z, y), (z.argmax(1) == y), len(examples)

    def evaluate(self, examples: Sequence, batch: int = 16) -> tuple[float | None, float]:
        """(accuracy, mean loss) on ``examples``; accuracy is None for sft,
        whose loss is the mean over all completion tokens."""
        import torch

        correct = total = terms = 0.0
        with torch.no_grad():
            for i in range(0, len(examples), batch):
                loss, ok, n = self.loss(examples[i : i + batch])
                total += float(loss) * n
                terms += n
                correct += 0.0 if ok is None else float(ok.sum())
        return (None if self.task.kind == "sft" else correct / len(examples)), total / terms

    def save_gguf(self, base: str | Path, out: str | Path) -> Path:
        """The trained LoRA as a llama.cpp adapter GGUF (via PEFT's format), so
        that llama.cpp scores and generates with it on the INT4 base."""
        import tempfile

        from fwdllm.convert.peft_bridge import peft_to_gguf

        with tempfile.TemporaryDirectory() as tmp:
            self.model.save_pretrained(tmp)
            return peft_to_gguf(tmp, base, out)

    def state(self, names: Sequence[str] | None = None) -> dict[str, Any]:
        return {n: self.params[n].detach().clone() for n in (names or self.params)}

    def load(self, state: dict[str, Any]) -> None:
        import torch

        with torch.no_grad():
            for n, v in state.items():
                self.params[n].copy_(v)

    def train(self, batches: Sequence[Sequence], lr: float, names: Sequence[str] | None = None) -> float:
        """AdamW steps on ``batches`` over the ``names`` tensors (all if None);
        a fresh optimizer per call, as a federated client starts each round."""
        import torch

        names = list(names or self.params)
        for n, p in self.params.items():
            p.requires_grad_(n in names)
        opt = torch.optim.AdamW([self.params[n] for n in names], lr=lr, weight_decay=0.0)
        total = 0.0
        for b in batches:
            opt.zero_grad()
            loss = self.loss(b)[0]
            loss.backward()
            opt.step()
            total += loss.item()
        for p in self.params.values():
            p.requires_grad_(True)
        return total / max(1, len(batches))

    def blocks(self, n_blocks: int) -> list[list[str]]:
        """LoRA tensor names of each block of consecutive layers."""
        from fwdllm.aggregator.fwdllm_algos import block_ranges

        return [[n for n in self.params if lo <= _layer_of(n) < hi] for lo, hi in block_ranges(self.n_layers, n_blocks)]

    @staticmethod
    def nbytes(state: dict[str, Any]) -> int:
        return sum(v.numel() * 4 for v in state.values())  # float32 on the wire


@dataclass
class BackpropConfig:
    rounds: int = 10
    local_steps: int = 2
    batch_size: int = 8
    lr: float = 1e-3
    eval_every: int = 5
    seed: int = 0


def _dev_scores(tl: TorchLora, dev: list) -> dict[str, float | None]:
    """``dev_accuracy`` and ``dev_loss`` (sft: ``dev_perplexity`` instead of an accuracy)."""
    acc, loss = tl.evaluate(dev)
    return {"dev_accuracy": acc, "dev_loss": loss} if acc is not None else {
        "dev_accuracy": None, "dev_loss": loss, "dev_perplexity": float(np.exp(loss))}


def run_backprop(algo: str, tl: TorchLora, shards: list[list], dev: list, cfg: BackpropConfig,
                 on_record: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Train ``algo`` (fedavg-lora | fedcybgd) and return one record per round
    (round, forward_passes, bytes per client down/up, wall seconds, dev accuracy
    or perplexity every ``eval_every`` rounds and at round 0)."""
    import torch
    from tqdm import tqdm

    from fwdllm.core.batches import sample_batch
    from fwdllm.core.seeds import derive_seed

    if algo not in BACKPROP:
        raise ValueError(f"unknown backprop baseline {algo!r}; choose from {BACKPROP}")
    n = len(shards)
    ids = [f"client-{i:02d}" for i in range(n)]
    blocks = tl.blocks(n) if algo == "fedcybgd" else []
    changed = [0] * len(blocks)  # round in which each block last changed
    seen = [-1] * n  # round in which each client last downloaded
    records = [{"round": 0, "forward_passes": 0, "bytes_down_per_client": 0, "bytes_up_per_client": 0,
                "wall_s": 0.0, **_dev_scores(tl, dev)}]
    if on_record:
        on_record(records[0])
    wall = 0.0
    for r in tqdm(range(1, cfg.rounds + 1), desc=f"{algo} rounds", unit="round", file=sys.stderr):
        t0 = time.perf_counter()

        def batches(c: int) -> list:
            return [sample_batch(shards[c], cfg.batch_size, derive_seed(cfg.seed, "batch", r, ids[c], s))
                    for s in range(cfg.local_steps)]

        if algo == "fedavg-lora":
            start = tl.state()
            acc_state = {k: torch.zeros_like(v) for k, v in start.items()}
            losses = []
            for c in range(n):
                tl.load(start)
                losses.append(tl.train(batches(c), cfg.lr))
                for k, v in tl.state().items():
                    acc_state[k] += v / n
            tl.load(acc_state)
            down = up = TorchLora.nbytes(start)
            passes = n * cfg.local_steps
        else:
            c = (r - 1) % n
            names = blocks[c]
            down = sum(TorchLora.nbytes(tl.state(blocks[b])) for b in range(len(blocks)) if changed[b] > seen[c])
            seen[c] = r
            losses = [tl.train(batches(c), cfg.lr, names)]
            changed[c] = r
            up = TorchLora.nbytes(tl.state(names))
            passes = cfg.local_steps
        wall += time.perf_counter() - t0
        rec = {"round": r, "forward_passes": passes, "bytes_down_per_client": down, "bytes_up_per_client": up,
               "wall_s": wall, "loss": float(np.mean(losses)), "dev_accuracy": None}
        if r % cfg.eval_every == 0 or r == cfg.rounds:
            rec.update(_dev_scores(tl, dev))
        records.append(rec)
        if on_record:
            on_record(rec)
    return records


def memory_worker(args: dict[str, Any]) -> dict[str, Any]:
    """Peak RSS of backprop-LoRA: load, then ``steps`` training steps."""
    from fwdllm.bench.common import bench_task
    from fwdllm.runtime.tasks import default_data, read_examples

    task = bench_task(args["task"], args["label_words"], kinds=None)  # an sft task trains on its completions
    t0 = time.perf_counter()
    tl = TorchLora(args["model"], task, rank=args["rank"], targets=args["targets"], threads=args["threads"])
    load_s = time.perf_counter() - t0
    examples = read_examples(task, default_data(args["task"], "train"), limit=args["batch"])
    t0 = time.perf_counter()
    tl.train([examples] * args["steps"], lr=1e-4)
    return {"side": "torch backprop-LoRA", "load_s": load_s, "work_s": time.perf_counter() - t0}


if __name__ == "__main__":
    from fwdllm.bench.common import child_main

    child_main(memory_worker)
