"""convert: synthetic models, quantization, inspect, lora-init (no torch needed)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from harness import THREADS

from fwdllm.convert.cli import convert
from fwdllm.convert.describe import describe
from fwdllm.convert.synth import synth_vocab, write_synth
from fwdllm.core.adapter_io import read_adapter
from fwdllm.core.errors import UserError
from fwdllm.core.gguf_file import read_header
from fwdllm.core.lora import init_lora, write_lora
from fwdllm.runtime.log import quiet_llama
from fwdllm.runtime.quantize import quantize


def _llama(path: Path, **kw):
    import llama_cpp

    quiet_llama()
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=THREADS, n_batch=256, verbose=False, **kw)


def _types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


def test_synth_tiny_loads_tokenizes_and_decodes(tiny_model: Path) -> None:
    llm = _llama(tiny_model, logits_all=True)
    text = "Hello world, this movie was great! Ünïcödé 🙂 tab\tnewline\n 123"
    tokens = llm.tokenize(text.encode())
    assert tokens[0] == llm.token_bos()
    assert llm.detokenize(tokens).decode() == text
    llm.eval(tokens)
    scores = np.asarray(llm.scores[: len(tokens)])
    assert scores.shape == (len(tokens), 1024)
    assert np.isfinite(scores).all()
    # random weights with sd 0.02: logits spread like a real model's, not flat, not exploded
    assert 0.05 < scores.std() < 5.0


def test_synth_q4_0_matches_llama_cpp_quantizer_mix(tmp_path: Path, tiny_model: Path) -> None:
    """Directly written random Q4_0 has the same tensor types as llama.cpp's own
    F16 -> Q4_0 quantization (so timings transfer), and valid blocks whose
    weights have the intended spread."""
    f16 = write_synth(tmp_path / "f16.gguf", quant="F16")
    q = quantize(f16, tmp_path / "q.gguf", "Q4_0")
    assert _types(q) == _types(tiny_model)
    assert _types(tiny_model)["output.weight"] == "Q6_K"
    reader = gguf.GGUFReader(str(tiny_model))
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        if t.tensor_type.name == "F32":
            assert (w == 1).all(), t.name  # RMS-norm gains
        else:
            assert 0.015 < w.std() < 0.025 and abs(w.mean()) < 2e-3, t.name
    assert describe(f16)["tensor_types"] == {"F16": 30, "F32": 9}


def test_synth_is_deterministic_per_seed(tmp_path: Path, tiny_model: Path) -> None:
    again = write_synth(tmp_path / "a.gguf", seed=0)
    other = write_synth(tmp_path / "b.gguf", seed=1)
    assert again.read_bytes() == tiny_model.read_bytes()
    assert other.read_bytes() != tiny_model.read_bytes()


def test_synth_vocab_is_valid() -> None:
    vocab = synth_vocab(32000)
    tokens = vocab.tokens
    assert len(tokens) == len(set(tokens)) == len(vocab.scores) == len(vocab.types) == 32000
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and tokens[3 + 0x41] == "<0x41>"
    pieces = set(tokens)
    for tok in tokens[259:]:  # every piece is reachable by pairwise merges
        assert len(tok) == 1 or tok[:-1] in pieces, tok


def test_inspect_model(tiny_model: Path) -> None:
    res = CliRunner().invoke(convert, ["inspect", str(tiny_model), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["architecture"] == "llama" and info["synthetic"] is True
    assert (info["n_layer"], info["n_embd"], info["n_head"], info["n_head_kv"], info["n_ff"]) == (4, 256, 4, 2, 704)
    assert (info["n_vocab"], info["tokenizer"]) == (1024, "llama")
    assert info["tensor_types"] == {"Q4_0": 29, "F32": 9, "Q6_K": 1}
    text = CliRunner().invoke(convert, ["inspect", str(tiny_model)])
    assert text.exit_code == 0 and "head_kv: 2" in text.output


def test_read_header_matches_gguf_py_and_refuses_damage(tmp_path: Path, tiny_model: Path) -> None:
    """The light header reader (no metadata arrays) sees what gguf-py sees:
    every scalar/string field, every tensor's name, shape, type and offset;
    cut files are refused with one line, at any cut point."""
    reader = gguf.GGUFReader(str(tiny_model))
    header = read_header(tiny_model)
    assert [(t.name, tuple(int(x) for x in t.shape), int(t.tensor_type), int(t.data_offset)) for t in reader.tensors] \
        == [(t.name, t.shape, t.ggml_type, reader.data_offset + t.offset) for t in header.tensors]
    arrays = {k for k, f in reader.fields.items() if f.types and f.types[0] == gguf.GGUFValueType.ARRAY}
    assert "tokenizer.ggml.tokens" in arrays and not arrays & set(header.fields)
    for key, f in reader.fields.items():
        if key not in arrays and not key.startswith("GGUF."):
            assert header.field(key) == pytest.approx(f.contents()) if isinstance(f.contents(), float) \
                else header.field(key) == f.contents(), key
    data = tiny_model.read_bytes()
    for cut in (10, 2_000, reader.data_offset - 1, len(data) - 1):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(UserError, match="truncated|damaged"):
            read_header(bad)


@pytest.mark.parametrize(("quant", "tensor_type"), [("Q8_0", "Q8_0"), ("Q4_K_M", "Q4_K")])
def test_synth_via_quantizer(tmp_path: Path, quant: str, tensor_type: str) -> None:
    out = write_synth(tmp_path / "m.gguf", quant=quant)
    assert describe(out)["tensor_types"][tensor_type] > 0
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # F16 intermediate removed
    llm = _llama(out)
    assert len(llm.tokenize(b"hello")) >= 2


def test_quantize_requantizes_q4_1_to_q4_0(tmp_path: Path, tiny_model: Path) -> None:
    """The model store's path: a published Q4_1 file -> Q4_0."""
    q41 = quantize(tiny_model, tmp_path / "q41.gguf", "Q4_1")
    assert describe(q41)["tensor_types"]["Q4_1"] == 29
    q40 = quantize(q41, tmp_path / "q40.gguf", "q4_0")
    assert describe(q40)["tensor_types"]["Q4_0"] == 29
    assert _llama(q40).tokenize(b"a review") == _llama(tiny_model).tokenize(b"a review")


def test_bad_inputs_give_one_line_errors_and_no_output(tmp_path: Path, tiny_model: Path) -> None:
    out = tmp_path / "out.gguf"
    with pytest.raises(UserError, match="unknown quant type 'Q3_X'"):
        quantize(tiny_model, out, "Q3_X")
    truncated = tmp_path / "trunc.gguf"
    truncated.write_bytes(tiny_model.read_bytes()[: 1_000_000])
    with pytest.raises(UserError, match="truncated"):
        quantize(truncated, out, "Q4_0")
    with pytest.raises(UserError, match="unknown preset"):
        write_synth(out, preset="llama9-1t")
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_text("hello")
    res = CliRunner().invoke(convert, ["inspect", str(not_gguf)])
    assert res.exit_code == 2 and res.output.strip() == f"Error: {not_gguf}: not a GGUF file"
    res = CliRunner().invoke(convert, ["inspect", str(truncated)])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trunc.gguf", "x.gguf"]


def test_lora_init_loads_in_llama_cpp_and_is_a_no_op(tmp_path: Path, tiny_model: Path) -> None:
    out = tmp_path / "lora.gguf"
    res = CliRunner().invoke(
        convert, ["lora-init", str(tiny_model), str(out), "--rank", "4", "--lora-alpha", "8", "--targets", "v,q",
                  "--layers", "0:3", "--seed", "3"])
    assert res.exit_code == 0, res.output
    layout, tensors = read_adapter(out)
    assert (layout.rank, layout.alpha, layout.target_names, layout.layers) == (4, 8.0, ("q", "v"), (0, 1, 2))
    a = tensors["blk.0.attn_q.weight.lora_a"]
    assert a.shape == (4, 256) and a.dtype == np.float32 and 0 < np.abs(a).max() <= 1 / 16
    assert not tensors["blk.2.attn_v.weight.lora_b"].any() and tensors["blk.2.attn_v.weight.lora_b"].shape == (128, 4)
    same_layout, same = init_lora(tiny_model, 4, 8, ["q", "v"], 3, [0, 1, 2])
    assert same_layout == layout and all(np.array_equal(same[k], tensors[k]) for k in tensors)
    info = json.loads(CliRunner().invoke(convert, ["inspect", str(out), "--json"]).output)
    assert (info["type"], info["rank"], info["alpha"], info["targets"]) == ("adapter", 4, 8.0, ["q", "v"])
    assert info["n_params"] == layout.n_params
    # B = 0: llama.cpp's logits with the adapter equal the base model's
    prompt = b"the movie was great"
    base = _llama(tiny_model, logits_all=True)
    tuned = _llama(tiny_model, logits_all=True, lora_path=str(out))
    toks = base.tokenize(prompt)
    base.eval(toks)
    tuned.eval(toks)
    np.testing.assert_allclose(np.asarray(tuned.scores[: len(toks)]), np.asarray(base.scores[: len(toks)]), atol=1e-5)
    # ... and a non-zero B really is applied
    moved = {k: (v if k.endswith("lora_a") else np.full_like(v, 0.5)) for k, v in tensors.items()}
    write_lora(out, layout, moved, tiny_model)
    tuned = _llama(tiny_model, logits_all=True, lora_path=str(out))
    tuned.eval(toks)
    assert np.abs(np.asarray(tuned.scores[: len(toks)]) - np.asarray(base.scores[: len(toks)])).max() > 0.1


def test_lora_init_bad_input(tmp_path: Path, tiny_model: Path) -> None:
    out = tmp_path / "lora.gguf"
    for args, msg in [
        (["--targets", "q,x"], "--targets: unknown ['x']"),
        (["--layers", "2:10"], "base model has no tensor blk.4.attn_v.weight"),
        (["--layers", "a:b"], "--layers: expected START:STOP"),
    ]:
        res = CliRunner().invoke(convert, ["lora-init", str(tiny_model), str(out), *args])
        assert res.exit_code == 2 and msg in res.output and len(res.output.strip().splitlines()) == 1, res.output
    lora = init_lora(tiny_model, 2, 2, ["q"], 0)
    write_lora(out, *lora, tiny_model)
    res = CliRunner().invoke(convert, ["lora-init", str(out), str(tmp_path / "b.gguf")])
    assert res.exit_code == 2 and "is a LoRA adapter" in res.output
    assert [p.name for p in tmp_path.iterdir()] == ["lora.gguf"]
