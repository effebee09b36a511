"""A --head run's product is one ordinary llama.cpp LoRA: the classifier head is
a LoRA of the output projection inside adapter.gguf, which llama.cpp, and
transformers + PEFT after `convert lora-to-peft`, load without fwdllm."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fwdllm.core.adapter_io import read_adapter, write_adapter
from fwdllm.core.errors import UserError
from fwdllm.core.layout import HEAD, OUTPUT, LoraLayout
from fwdllm.runtime.session import EdgeSession
from fwdllm.runtime.tasks import load_task, read_examples

ROWS = [("1", "a fun and moving film"), ("0", "boring and bad"), ("1", "the best movie of the year"),
        ("0", "I hate this story"), ("1", "great play , good people"), ("0", "the worst film"),
        ("1", "a good story , well told"), ("0", "bad acting and a boring plot")]


@pytest.fixture(scope="module")
def head_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(task spec, run directory) of a real 3-round `fwdllm simulate --head` on the tiny model."""
    d = tmp_path_factory.mktemp("headrun")
    (d / "data.tsv").write_text("label\tsentence\n" + "".join(f"{a}\t{b}\n" for a, b in ROWS))
    task = d / "task.json"  # the tiny model's vocabulary has these as single tokens
    task.write_text(json.dumps({"name": "mini", "format": "tsv", "template": "Review: {text}\nSentiment:",
                                "label_words": ["bad", "good"], "labels": ["0", "1"], "text_columns": ["sentence"],
                                "train": "data.tsv", "dev": "data.tsv"}))
    out = d / "run"
    cmd = [sys.executable, "-m", "fwdllm", "simulate", "--model", str(tiny_model), "--task", str(task), "--out",
           str(out), "--clients", "2", "--shard-size", "4", "--rounds", "3", "--k", "4", "--batch-size", "4",
           "--head", "--head-lr", "0.05", "--threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return task, out


def _prompts(task: Path) -> list[str]:
    return [e.prompt for e in read_examples(load_task(str(task)), task.parent / "data.tsv")]


@pytest.mark.timeout(300)
def test_head_run_adapter_alone_gives_fwdllms_label_logits_in_llama_cpp(tiny_model: Path, head_run) -> None:
    """llama-cpp-python's own ``Llama(lora_path=...)``, no fwdllm engine: the label
    words' logits equal fwdllm's within 1e-3, and differ from those without the head."""
    import llama_cpp

    task_file, out = head_run
    adapter = out / "adapter.gguf"
    layout, tensors = read_adapter(adapter)
    assert layout.head is not None and np.any(tensors[HEAD] != 0) and not (out / "head.npy").exists()
    headless = write_adapter(out.parent / "headless.gguf", layout, {**tensors, HEAD: np.zeros_like(tensors[HEAD])})
    prompts = _prompts(task_file)

    with EdgeSession(tiny_model, load_task(str(task_file)), n_threads=1) as s:
        s.set_lora(layout, tensors)
        ids = s.label_ids
        fwd = [s.engine.decode([s.prepare([e]).seqs[0]])[0][0, ids] for e in
               read_examples(s.task, task_file.parent / "data.tsv")]

    def llama_label_logits(lora: Path) -> np.ndarray:
        # flash attention as fwdllm's context runs it (llama.cpp's default there): the other kernel moves
        # these logits by ~1e-2 with or without any adapter
        llm = llama_cpp.Llama(model_path=str(tiny_model), lora_path=str(lora), n_ctx=128, n_threads=1,
                              logits_all=True, flash_attn=True, verbose=False)
        rows = []
        for p in prompts:
            toks = llm.tokenize(p.encode(), add_bos=True, special=False)
            llm.reset()
            llm.eval(toks)
            rows.append(np.asarray(llm.scores[len(toks) - 1])[ids])
        llm.close()
        return np.array(rows)

    plain = llama_label_logits(adapter)
    assert np.abs(plain - np.array(fwd)).max() < 1e-3
    assert np.abs(plain - llama_label_logits(headless)).max() > 1e-2  # the head is in the file and matters


@pytest.mark.timeout(300)
@pytest.mark.torch
def test_head_run_adapter_in_peft_adds_the_head_to_lm_head(tiny_model: Path, head_run, tmp_path: Path) -> None:
    """`convert lora-to-peft` puts the head on lm_head at its own rank: in
    transformers + PEFT it moves exactly the label words' logits, by what it
    moves them in llama.cpp (up to llama.cpp's 8-bit activations)."""
    pytest.importorskip("peft")
    import peft
    import torch
    import transformers
    from click.testing import CliRunner

    from fwdllm.convert.cli import convert

    task_file, out = head_run
    layout, tensors = read_adapter(out / "adapter.gguf")
    headless = write_adapter(tmp_path / "headless.gguf", layout, {**tensors, HEAD: np.zeros_like(tensors[HEAD])})
    for src, dst in ((out / "adapter.gguf", tmp_path / "peft"), (headless, tmp_path / "peft0")):
        res = CliRunner().invoke(convert, ["lora-to-peft", str(src), str(tiny_model), str(dst)])
        assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert "lm_head" in cfg["target_modules"] and cfg["rank_pattern"] == {"lm_head": 2}

    with EdgeSession(tiny_model, load_task(str(task_file)), n_threads=1) as s:
        ids = s.label_ids
        batch = s.prepare(read_examples(s.task, task_file.parent / "data.tsv"))
        llama = {}
        for name, t in (("head", tensors), ("none", {**tensors, HEAD: np.zeros_like(tensors[HEAD])})):
            s.set_lora(layout, t)
            llama[name] = np.array([s.engine.decode([q])[0][0] for q in batch.seqs])

    base = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_model.parent), gguf_file=tiny_model.name,
                                                             dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft"), adapter_name="head").eval()
    model.load_adapter(str(tmp_path / "peft0"), adapter_name="none")

    def peft_logits(name: str) -> np.ndarray:
        model.set_adapter(name)
        with torch.no_grad():
            return np.array([model(input_ids=torch.tensor([q.tokens])).logits[0, -1].numpy() for q in batch.seqs])

    with_head, without = peft_logits("head"), peft_logits("none")
    moved = with_head - without
    others = np.setdiff1d(np.arange(moved.shape[1]), ids)
    assert np.abs(moved[:, others]).max() < 1e-5  # lm_head's LoRA touches the label rows only
    expected = (llama["head"] - llama["none"])[:, ids]
    assert np.abs(expected).max() > 1e-2
    assert np.abs(moved[:, ids] - expected).max() < 0.05 * np.abs(expected).max()


def test_head_round_trips_through_gguf_and_peft_bit_exact(tiny_model: Path, tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    from fwdllm.convert.peft_bridge import gguf_to_peft, peft_to_gguf
    from fwdllm.core.lora import init_lora

    layout, tensors = init_lora(tiny_model, 2, 16.0, ["v"], 0)
    layout = dataclasses.replace(layout, head=(3, 256), head_ids=(7, 2, 900), n_vocab=1024)
    rng = np.random.default_rng(0)
    tensors = {**tensors, HEAD: rng.standard_normal((3, 256)).astype(np.float32)}
    path = write_adapter(tmp_path / "a.gguf", layout, tensors)
    back_layout, back = read_adapter(path)
    assert back_layout == layout and all(np.array_equal(back[n], tensors[n]) for n in layout.shapes())
    pair = layout.head_lora(tensors[HEAD])
    assert pair[OUTPUT + ".lora_b"][[7, 2, 900], [0, 1, 2]].tolist() == [3 / 16] * 3  # 1 / (alpha / n_labels)
    again = peft_to_gguf(gguf_to_peft(path, tiny_model, tmp_path / "peft"), tiny_model, tmp_path / "b.gguf")
    l2, t2 = read_adapter(again)
    assert l2 == layout and all(np.array_equal(t2[n], tensors[n]) for n in layout.shapes())


def test_a_head_needs_an_untied_output_projection(smollm2: Path, tmp_path: Path) -> None:
    """The store's smollm2-135m is the Q4_0 file with output.weight written out:
    the same logits bit for bit; on the tied file --head is a one-line error."""
    from fwdllm.aggregator.setup import with_head
    from fwdllm.core.lora import init_lora, open_base
    from fwdllm.runtime.engine import Engine, Seq
    from fwdllm.runtime.models import resolve_model

    tied = resolve_model("smollm2-135m-q4_0")
    assert open_base(tied).output is None and open_base(smollm2).output == (49152, 576)
    logits = []
    for path in (tied, smollm2):
        engine = Engine(path, n_threads=2, n_seq_max=1, n_ctx_seq=32)
        toks = engine.tokenize("Review: a dull, lifeless mess.\nSentiment:", bos=True)
        logits.append(engine.decode([Seq(tuple(toks), (len(toks) - 1,))])[0])
        engine.close()
    np.testing.assert_array_equal(logits[0], logits[1])
    layout, tensors = init_lora(tied, 2, 4.0, ["v"], 0)
    with pytest.raises(UserError, match="convert untie"):
        with_head(layout, tensors, tied, load_task("sst2"))
    assert isinstance(with_head(layout, tensors, smollm2, load_task("sst2"))[0], LoraLayout)
