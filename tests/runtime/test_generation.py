"""Generation on the tiny model: ROUGE-L from the library, greedy generation
with and without an adapter (the same text as ``llama_cpp.Llama``), and the
headline task's fixed splits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from harness import lora_with_b

from fwdllm.cli import main

PROMPT = "Review: a warm, funny and moving film\nSentiment:"


def test_rouge_l_is_the_library_on_a_known_pair() -> None:
    from rouge_score import rouge_scorer

    from fwdllm.runtime.generation import exact_match, rouge_l

    # LCS "the cat on the mat" = 5 of 6 tokens each way: P = R = F = 5/6
    assert rouge_l(["the cat sat on the mat"], ["the cat lay on the mat"]) == pytest.approx(5 / 6)
    assert rouge_l(["Dogs running"], ["dog runs"]) == 1.0  # the library's Porter stemmer
    pair = ("Oil prices fall as supplies rise", "Oil falls on rising supplies")
    want = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(pair[1], pair[0])["rougeL"].fmeasure
    assert rouge_l([pair[0]], [pair[1]]) == want
    assert exact_match([" Stocks  rise ", "Stocks rise"], ["Stocks rise", "stocks rise"]) == 0.5


def _generate(*args: str) -> list[str]:
    res = CliRunner().invoke(main, ["generate", "--threads", "1", "--max-tokens", "12", "--json", *args])
    assert res.exit_code == 0, res.output
    return [g["text"] for g in json.loads(res.output.strip().splitlines()[-1])["generations"]]


def test_generate_with_and_without_the_adapter(tiny_model: Path, tmp_path: Path) -> None:
    """Greedy text is deterministic and the adapter changes it; sampling repeats with its seed."""
    adapter = lora_with_b(tiny_model, tmp_path / "a.gguf")
    base = _generate("--model", str(tiny_model), "--prompt", PROMPT)
    tuned = _generate("--model", str(tiny_model), "--prompt", PROMPT, "--lora", str(adapter))
    assert base == _generate("--model", str(tiny_model), "--prompt", PROMPT)
    assert tuned == _generate("--model", str(tiny_model), "--prompt", PROMPT, "--lora", str(adapter))
    assert base[0] and tuned[0] and base != tuned
    hot = ("--model", str(tiny_model), "--prompt", PROMPT, "--temperature", "1.5")
    assert _generate(*hot, "--seed", "1") == _generate(*hot, "--seed", "1") != _generate(*hot, "--seed", "2")


def test_greedy_tokens_are_llama_cpp_pythons(tiny_model: Path, tmp_path: Path) -> None:
    """The same adapter through llama-cpp-python's own Llama(lora_path=...)
    picks the same greedy tokens.  (Its text can run past max_tokens to finish
    a multi-byte character, which the tiny model's byte tokens never do.)"""
    import itertools

    import llama_cpp

    from fwdllm.core.adapter_io import read_adapter
    from fwdllm.runtime.generation import generate
    from fwdllm.runtime.session import EdgeSession
    from fwdllm.runtime.tasks import load_task

    adapter = lora_with_b(tiny_model, tmp_path / "a.gguf")
    with EdgeSession(tiny_model, load_task("sft"), n_threads=1) as session:
        session.set_lora(*read_adapter(adapter))
        ours = generate(session, [PROMPT], max_new_tokens=12)[0]
    llm = llama_cpp.Llama(str(tiny_model), lora_path=str(adapter), n_ctx=256, n_threads=1, flash_attn=True,
                          verbose=False)
    theirs = itertools.islice(llm.generate(llm.tokenize(PROMPT.encode(), special=True), temp=0.0), 12)
    assert ours.tokens == tuple(theirs) and len(ours.tokens) == 12


def test_headline_splits_are_fixed_and_disjoint(data_dir: Path, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    from fwdllm.runtime.tasks import default_data, load_task, read_examples

    monkeypatch.setenv("FWDLLM_CACHE", str(tmp_path))
    task = load_task("agnews-headline")
    rows = {s: read_examples(task, default_data("agnews-headline", s)) for s in ("train", "dev", "test")}
    assert (len(rows["train"]), len(rows["dev"]), len(rows["test"])) == (6000, 400, 400)
    assert not {x.prompt for x in rows["dev"]} & {x.prompt for x in rows["test"]}
    first = rows["test"][0]
    assert first.prompt.startswith("Article: ") and first.prompt.endswith("\nHeadline:")
    assert first.completion == " Strong Family Equals Strong Education"
