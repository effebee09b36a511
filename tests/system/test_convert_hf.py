"""convert hf / lora-from-peft / lora-to-peft against transformers + PEFT.

Tiny LlamaForCausalLM checkpoints are built here with real tokenizers trained
on SST-2 text: a SentencePiece one (untied embeddings; also as transformers 5
re-saves it, tokenizer.json only) and byte-level BPE ones with the GPT-2,
SmolLM and LLaMA-3 pre-tokenizers (tied embeddings), all with GQA.  llama.cpp must reproduce transformers'
tokens exactly and its logits within 1e-2.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from harness import THREADS

from fwdllm.convert.cli import convert
from fwdllm.convert.llama_meta import rope_unpermute
from fwdllm.core.adapter_io import read_adapter
from fwdllm.core.lora import init_lora, write_lora
from fwdllm.runtime.log import quiet_llama

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.torch, pytest.mark.timeout(90)]  # the first test also builds the models

VOCAB = 512
# Sentences from another corpus than the tokenizers were trained on, plus
# digits, punctuation runs, inner whitespace runs, newlines and non-ASCII.
EXTRA_TEXTS = [
    "Hello world! This film's plot: 123 twists\nand 4567 more...",
    "Ünïcödé café déjà vu 🙂 — naïve",
    "a  b   c\tdone\n\nend",
]


def _sentences(data_dir: Path) -> list[str]:
    rows = (data_dir / "sst2" / "train.tsv").read_text().splitlines()[1:3001]
    return [r.split("\t", 1)[1].strip() for r in rows]


def _texts(data_dir: Path) -> list[str]:
    import csv

    with open(data_dir / "ag_news" / "dev.csv", newline="") as f:
        rows = list(csv.reader(f))[1:7]
    return [f"{title} {desc}"[:300] for _, title, desc in rows] + EXTRA_TEXTS


def _spm_tokenizer(out: Path, lines: list[str]):
    """A LLaMA-style SentencePiece BPE model (identity normalization, byte
    fallback, dummy prefix) as tokenizer.model + tokenizer_config.json."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=VOCAB - 8, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        minloglevel=2, num_threads=2)
    out.mkdir(parents=True)
    (out / "tokenizer.model").write_bytes(buf.getvalue())
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True}))
    return transformers.AutoTokenizer.from_pretrained(str(out))


def _bpe_tokenizer(out: Path, lines: list[str], style: str = "gpt-2"):
    """A byte-level BPE tokenizer (tokenizer.json) with the pre-tokenizer of
    GPT-2, SmolLM (single digits) or LLaMA 3 (its split regex)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from fwdllm.convert.hf_tokenizer import LLAMA3_REGEX

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = {
        "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False),
        "smollm": lambda: pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]),
        "llama-bpe": lambda: pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated"),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
    }[style]()
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    hf_tok.save_pretrained(str(out))
    return hf_tok


def _bigram_init(model, tok, lines: list[str]) -> None:
    """Make predictions decisive, so that INT4 top-1 agreement means something:
    embeddings/lm_head factor the corpus' centred bigram log-probabilities with
    the most frequent successor boosted (a random tiny model's logits are
    nearly flat, and any rounding flips its argmax)."""
    ids = [tok(line).input_ids for line in lines]
    counts = np.ones((VOCAB, VOCAB))
    for seq in ids:
        np.add.at(counts, (seq[:-1], seq[1:]), 1.0)
    logp = np.log(counts / counts.sum(1, keepdims=True))
    logp -= logp.mean(1, keepdims=True)
    logp[np.arange(VOCAB), logp.argmax(1)] += 2.0
    u, s, vt = np.linalg.svd(logp)
    k = model.config.hidden_size
    emb, out = u[:, :k] * np.sqrt(s[:k]), vt[:k].T * np.sqrt(s[:k])
    scale = np.sqrt((emb**2).mean())
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.tensor(emb / scale, dtype=torch.float32))
        model.lm_head.weight.copy_(torch.tensor(out * scale, dtype=torch.float32))


def _make_model(out: Path, tok, tied: bool, lines: list[str]):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, rope_theta=50000.0, rms_norm_eps=1e-5, max_position_embeddings=512,
        tie_word_embeddings=tied, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = transformers.LlamaForCausalLM(config)
    if not tied:
        _bigram_init(model, tok, lines)
    model.eval().save_pretrained(str(out))
    return model


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> dict[str, tuple[Path, object, object]]:
    """name -> (HF dir, tokenizer, torch model) for "spm", "bpe", and
    "spm-json": the spm model as transformers 5 re-saves it (tokenizer.json
    only, no tokenizer.model)."""
    torch.set_num_threads(THREADS)
    lines = _sentences(data_dir)
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, make_tok, tied in (("spm", _spm_tokenizer, False), ("bpe", _bpe_tokenizer, True)):
        tok = make_tok(root / name, lines)
        out[name] = (root / name, tok, _make_model(root / name, tok, tied, lines))
    src, tok, model = out["spm"]
    shutil.copytree(src, root / "spm-json", ignore=shutil.ignore_patterns("tokenizer*"))
    tok.save_pretrained(str(root / "spm-json"))
    assert not (root / "spm-json" / "tokenizer.model").exists()
    out["spm-json"] = (root / "spm-json", transformers.AutoTokenizer.from_pretrained(str(root / "spm-json")), model)
    src, _, model = out["bpe"]
    for style in ("smollm", "llama-bpe"):
        shutil.copytree(src, root / style, ignore=shutil.ignore_patterns("tokenizer*"))
        out[style] = (root / style, _bpe_tokenizer(root / style, lines, style), model)
    return out


def _llama(path: Path, lora: Path | None = None):
    import llama_cpp

    quiet_llama()
    return llama_cpp.Llama(model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=512, n_batch=512,
                           n_threads=THREADS, logits_all=True, verbose=False)


def _llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.asarray(llm.scores[: len(ids)], dtype=np.float32)


def _torch_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def _convert(args: list[str]) -> None:
    res = CliRunner().invoke(convert, args)
    assert res.exit_code == 0, res.output


@pytest.fixture(scope="module")
def f16(hf_models, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf")
    for name, (src, _, _) in hf_models.items():
        _convert(["hf", str(src), str(root / f"{name}.gguf"), "--quant", "F16"])
    return {name: root / f"{name}.gguf" for name in hf_models}


@pytest.mark.parametrize("name", ["spm", "spm-json", "bpe", "smollm", "llama-bpe"])
def test_f16_tokens_and_logits_match_transformers(name: str, hf_models, f16, data_dir: Path) -> None:
    _, tok, model = hf_models[name]
    llm = _llama(f16[name])
    for text in _texts(data_dir):
        ids = tok(text).input_ids
        assert llm.tokenize(text.encode()) == ids, text
        diff = np.abs(_llama_logits(llm, ids) - _torch_logits(model, ids)).max()
        assert diff < 1e-2, (text, diff)
    info = json.loads(CliRunner().invoke(convert, ["inspect", str(f16[name]), "--json"]).output)
    assert (info["tokenizer"], info["tokenizer_pre"]) == {
        "spm": ("llama", "default"), "spm-json": ("llama", "default"), "bpe": ("gpt2", "gpt-2"),
        "smollm": ("gpt2", "smollm"), "llama-bpe": ("gpt2", "llama-bpe")}[name]
    assert info["tied_embeddings"] == (name not in ("spm", "spm-json"))
    assert (info["n_head"], info["n_head_kv"], info["rope_theta"], info["n_vocab"]) == (4, 2, 50000.0, VOCAB)


def test_sharded_checkpoint_converts_identically(hf_models, f16, tmp_path: Path) -> None:
    import gguf

    src, tok, model = hf_models["spm"]
    sharded = tmp_path / "sharded"
    model.save_pretrained(str(sharded), max_shard_size="100KB")
    shutil.copy(src / "tokenizer.model", sharded)
    shutil.copy(src / "tokenizer_config.json", sharded)
    assert (sharded / "model.safetensors.index.json").is_file()
    out = tmp_path / "s.gguf"
    _convert(["hf", str(sharded), str(out), "--quant", "f16"])
    want = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(f16["spm"])).tensors}
    got = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(out)).tensors}
    assert want.keys() == got.keys() and all(np.array_equal(want[k], got[k]) for k in want)


def test_q4_0_keeps_next_token_predictions(hf_models, tmp_path: Path, data_dir: Path) -> None:
    src, tok, model = hf_models["spm"]
    out = tmp_path / "q4.gguf"
    _convert(["hf", str(src), str(out)])  # Q4_0 is the default
    info = json.loads(CliRunner().invoke(convert, ["inspect", str(out), "--json"]).output)
    assert info["tensor_types"]["Q4_0"] == 3 * 7 + 1  # all layer matrices + token_embd
    assert [p.name for p in tmp_path.iterdir()] == ["q4.gguf"]  # F16 intermediate removed
    llm = _llama(out)
    agree = total = 0
    for text in _texts(data_dir):
        ids = tok(text).input_ids
        agree += int((_llama_logits(llm, ids).argmax(-1) == _torch_logits(model, ids).argmax(-1)).sum())
        total += len(ids)
    assert agree / total >= 0.9, agree / total


@pytest.fixture(scope="module")
def peft_dir(hf_models, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PEFT LoRA on q,k,v,o of the spm model with non-zero B."""
    import peft

    src, _, _ = hf_models["spm"]
    model = transformers.AutoModelForCausalLM.from_pretrained(str(src))
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    lora = peft.get_peft_model(model, cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    out = tmp_path_factory.mktemp("peft") / "adapter"
    lora.save_pretrained(str(out))
    return out


def _peft_model(src: Path, adapter: Path):
    import peft

    base = transformers.AutoModelForCausalLM.from_pretrained(str(src))
    return peft.PeftModel.from_pretrained(base, str(adapter)).eval()


def test_peft_lora_in_llama_cpp_matches_peft(hf_models, f16, peft_dir: Path, tmp_path: Path, data_dir: Path) -> None:
    src, tok, model = hf_models["spm"]
    gguf_lora = tmp_path / "lora.gguf"
    _convert(["lora-from-peft", str(peft_dir), str(f16["spm"]), str(gguf_lora)])
    layout, tensors = read_adapter(gguf_lora)
    assert (layout.rank, layout.alpha, layout.target_names, layout.layers) == (4, 8.0, ("q", "k", "v", "o"), (0, 1, 2))
    reference = _peft_model(src, peft_dir)
    llm = _llama(f16["spm"], lora=gguf_lora)  # llama-cpp-python's own lora_path route
    # The same adapter with q/k B left in HF row order: proves the test sees the permutation.
    unpermuted = dict(tensors)
    for t in layout.targets:
        if t.target in ("q", "k"):
            unpermuted[t.b_name] = rope_unpermute(tensors[t.b_name], 4 if t.target == "q" else 2)
    wrong = write_lora(tmp_path / "wrong.gguf", layout, unpermuted, f16["spm"])
    llm_wrong = _llama(f16["spm"], lora=wrong)
    for text in _texts(data_dir)[:4]:
        ids = tok(text).input_ids
        expected = _torch_logits(reference, ids)
        assert np.abs(expected - _torch_logits(model, ids)).max() > 0.5  # the adapter matters
        assert np.abs(_llama_logits(llm, ids) - expected).max() < 1e-2
        assert np.abs(_llama_logits(llm_wrong, ids) - expected).max() > 0.1


def test_peft_gguf_peft_round_trip_is_exact(hf_models, f16, peft_dir: Path, tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    gguf_lora = tmp_path / "lora.gguf"
    back = tmp_path / "back"
    _convert(["lora-from-peft", str(peft_dir), str(f16["spm"]), str(gguf_lora)])
    _convert(["lora-to-peft", str(gguf_lora), str(f16["spm"]), str(back)])
    original, again = load_file(peft_dir / "adapter_model.safetensors"), load_file(back / "adapter_model.safetensors")
    assert sorted(original) == sorted(again) and len(original) == 3 * 4 * 2
    for key, value in original.items():
        assert np.array_equal(value, again[key]), key
    cfg_a, cfg_b = (json.loads((d / "adapter_config.json").read_text()) for d in (peft_dir, back))
    for key in ("r", "lora_alpha", "peft_type"):
        assert cfg_a[key] == cfg_b[key], key
    assert sorted(cfg_a["target_modules"]) == cfg_b["target_modules"]
    src, tok, _ = hf_models["spm"]
    ids = tok("the movie was great").input_ids
    np.testing.assert_array_equal(_torch_logits(_peft_model(src, back), ids), _torch_logits(_peft_model(src, peft_dir), ids))


def test_fwdllm_lora_to_peft_matches_llama_cpp(hf_models, f16, tmp_path: Path) -> None:
    """The other direction, as after fwdllm training: a GGUF adapter on some
    layers only, exported to PEFT, computes in transformers what it computes
    in llama.cpp."""
    src, tok, model = hf_models["spm"]
    layout, tensors = init_lora(f16["spm"], 4, 8, ["q", "k", "o"], 0, [0, 2])
    rng = np.random.default_rng(0)
    tensors = {k: v if k.endswith("lora_a") else rng.normal(0, 0.3, v.shape).astype(np.float32)
               for k, v in tensors.items()}
    lora = write_lora(tmp_path / "l.gguf", layout, tensors, f16["spm"])
    _convert(["lora-to-peft", str(lora), str(f16["spm"]), str(tmp_path / "peft")])
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["layers_to_transform"] == [0, 2]
    ids = tok("the movie was a great success").input_ids
    expected = _torch_logits(_peft_model(src, tmp_path / "peft"), ids)
    assert np.abs(expected - _torch_logits(model, ids)).max() > 0.1
    assert np.abs(_llama_logits(_llama(f16["spm"], lora=lora), ids) - expected).max() < 1e-2


def _one_line_error(args: list[str], match: str) -> None:
    res = CliRunner().invoke(convert, args)
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and match in lines[0], res.output


def test_bad_inputs(hf_models, f16, peft_dir: Path, tiny_model: Path, tmp_path: Path) -> None:
    src, _, _ = hf_models["spm"]
    out = tmp_path / "out"
    out.mkdir()
    not_llama = tmp_path / "mistral"
    shutil.copytree(src, not_llama)
    cfg = json.loads((not_llama / "config.json").read_text())
    (not_llama / "config.json").write_text(json.dumps({**cfg, "model_type": "mistral",
                                                        "architectures": ["MistralForCausalLM"]}))
    _one_line_error(["hf", str(not_llama), str(out / "m.gguf")], "not a LLaMA model")
    no_tok = tmp_path / "notok"
    shutil.copytree(src, no_tok, ignore=shutil.ignore_patterns("tokenizer*"))
    _one_line_error(["hf", str(no_tok), str(out / "m.gguf")], "no tokenizer.model")
    _one_line_error(["hf", str(src), str(out / "m.gguf"), "--quant", "Q3_X"], "unknown quant type 'Q3_X'")
    # adapter and base of different models, both directions
    _one_line_error(["lora-from-peft", str(peft_dir), str(tiny_model), str(out / "l.gguf")], "does not fit")
    tiny_lora = out / "tiny-lora.gguf"
    _convert(["lora-init", str(tiny_model), str(tiny_lora), "--targets", "q,k"])
    _one_line_error(["lora-to-peft", str(tiny_lora), str(f16["spm"]), str(out / "peft")], "does not fit")
    truncated = tmp_path / "trunc.gguf"
    truncated.write_bytes(f16["spm"].read_bytes()[:200_000])
    _one_line_error(["lora-from-peft", str(peft_dir), str(truncated), str(out / "l.gguf")], "truncated")
    assert [p.name for p in out.iterdir()] == ["tiny-lora.gguf"]  # nothing partial left behind
