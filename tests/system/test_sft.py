"""Generative fine-tuning through the real path: an sft run of `fwdllm
simulate` (aggregator and client processes) that lowers the held-out completion
loss, SmolLM2's headlines against ``llama_cpp.Llama``, and the convergence
bench's backprop baseline on the same sft split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from harness import lora_with_b

from fwdllm.aggregator.checkpoint import read_metrics


@pytest.mark.timeout(300)
def test_smollm2_headlines_are_llama_cpp_pythons_text(smollm2: Path, tmp_path: Path) -> None:
    """On SmolLM2 with an adapter, `generate`'s greedy headlines are
    Llama(lora_path=..., flash_attn=True).create_completion's text, stop included."""
    import llama_cpp

    from fwdllm.core.adapter_io import read_adapter
    from fwdllm.runtime.generation import generate
    from fwdllm.runtime.session import EdgeSession
    from fwdllm.runtime.tasks import default_data, load_task, read_examples

    adapter = lora_with_b(smollm2, tmp_path / "a.gguf", b_std=0.02)
    task = load_task("agnews-headline")
    prompts = [x.prompt for x in read_examples(task, default_data("agnews-headline", "dev"), limit=3)]
    with EdgeSession(smollm2, task, n_threads=2) as session:
        session.set_lora(*read_adapter(adapter))
        ours = [g.text for g in generate(session, prompts, max_new_tokens=24, stop=task.stop)]
    llm = llama_cpp.Llama(str(smollm2), lora_path=str(adapter), n_ctx=512, n_threads=2, flash_attn=True,
                          verbose=False)
    theirs = [llm.create_completion(p, max_tokens=24, temperature=0.0, stop=list(task.stop))["choices"][0]["text"]
              for p in prompts]
    assert ours == theirs and all(ours)


def _sft_task(tmp: Path, data_dir: Path) -> Path:
    """SST-2 sentences with one-token label-word completions, as sft JSONL:
    train and held-out rows are disjoint."""
    lines = (data_dir / "sst2" / "train.tsv").read_text(encoding="utf-8").splitlines()[1:81]
    rows = [json.dumps({"prompt": f"Review: {s}\nSentiment:", "completion": " good" if y == "1" else " bad"})
            for y, s in (ln.split("\t")[::-1] for ln in lines)]
    (tmp / "train.jsonl").write_text("\n".join(rows[:48]) + "\n")
    (tmp / "dev.jsonl").write_text("\n".join(rows[48:]) + "\n")
    spec = tmp / "tiny-sft.json"
    spec.write_text(json.dumps({"kind": "sft", "format": "jsonl", "template": "{prompt}", "train": "train.jsonl",
                                "dev": "dev.jsonl", "stop": ["\n"], "max_new_tokens": 4}))
    return spec


@pytest.mark.timeout(300)
def test_sft_run_through_the_aggregator_lowers_held_out_loss(tiny_model: Path, data_dir: Path,
                                                              tmp_path: Path) -> None:
    """`fwdllm simulate` (aggregator + 2 client processes over ZeroMQ) on an sft
    task: the held-out completion loss falls, and the first and last
    evaluations carry perplexity, ROUGE-L and exact match."""
    from fwdllm.aggregator.cli import simulate

    out = tmp_path / "run"
    args = ["--model", str(tiny_model), "--task", str(_sft_task(tmp_path, data_dir)), "--clients", "2",
            "--shard-size", "24", "--rounds", "6", "--eval-every", "3", "--k", "8", "--eps", "1e-2", "--lr", "0.05",
            "--targets", "q,v", "--threads", "1", "--out", str(out)]
    res = CliRunner().invoke(simulate, args)
    logs = "\n".join(p.read_text()[-1500:] for p in sorted((out / "logs").glob("*.log")))
    assert res.exit_code == 0, res.output + logs
    evals = [r for r in read_metrics(out) if r.get("dev_perplexity") is not None]
    assert [r["round"] for r in evals] == [0, 3, 6]
    first, last = evals[0], evals[-1]
    assert last["dev_loss"] < first["dev_loss"] - 0.05, (first["dev_loss"], last["dev_loss"])
    assert last["dev_perplexity"] == pytest.approx(np.exp(last["dev_loss"]))
    assert {"dev_rouge_l", "dev_exact_match"} <= set(first) & set(last)
    assert "dev_rouge_l" not in evals[1]
    assert "dev perplexity: before" in res.output


@pytest.mark.timeout(600)
def test_convergence_bench_carries_backprop_on_the_same_sft_split(tiny_model: Path, data_dir: Path,
                                                                    tmp_path: Path) -> None:
    """`bench convergence` on an sft task: zero-shot, a ZO run and backprop
    FedAvg-LoRA, each with perplexity and ROUGE-L scored by llama.cpp on the
    INT4 model (the backprop adapter exported to GGUF) on the same dev rows."""
    from fwdllm.bench.convergence import convergence

    spec = _sft_task(tmp_path, data_dir)
    res = CliRunner().invoke(convergence, [
        "--model", str(tiny_model), "--task", str(spec), "--clients", "2", "--shard-size", "8", "--rounds", "2",
        "--strategies", "zo-sgd", "--baselines", "fedavg-lora", "--k", "2", "--batch-size", "2", "--dev-limit", "8",
        "--eval-every", "1", "--bp-rounds", "1", "--local-steps", "1", "--bp-eval-every", "1", "--bp-lr", "1e-2",
        "--threads", "1", "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "out" / "convergence.json").read_text())
    rows = {r[0]: r for r in next(iter(data["tables"].values()))["rows"]}
    assert set(rows) == {"zero-shot", "zo-sgd", "fedavg-lora"}
    assert len(data["curves"]["fedavg-lora"]["perplexity"]) == 2  # torch's curve: round 0 and 1
    assert rows["fedavg-lora"][1] != rows["zero-shot"][1]  # its trained adapter, run by llama.cpp
    assert all(0 <= r[2] <= 1 for r in rows.values())
    assert (tmp_path / "out" / "convergence-runs" / "fedavg-lora" / "adapter.gguf").is_file()
