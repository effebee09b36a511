"""--head: the classifier-head correction's exact forward-only gradient, its
optimizer rule and its wire format (the federation test runs it end to end)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from harness import THREADS

from fwdllm.core.adapter_io import base_shapes
from fwdllm.core.errors import UserError
from fwdllm.core.layout import HEAD, LoraLayout, PerturbMask
from fwdllm.core.optim import Optimizer, OptimizerSpec
from fwdllm.core.protocol import ProtocolError, Result, Update, head_array
from fwdllm.runtime.session import EdgeSession
from fwdllm.runtime.tasks import load_task, read_examples

ROWS = [("1", "a fun and moving film"), ("0", "boring and bad"), ("1", "the best movie of the year"),
        ("0", "I hate this story"), ("1", "great play , good people"), ("0", "the worst film")]


@pytest.fixture(scope="module")
def task_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("headtask")
    (d / "data.tsv").write_text("label\tsentence\n" + "".join(f"{a}\t{b}\n" for a, b in ROWS))
    (d / "task.toml").write_text(
        'name = "mini"\nformat = "tsv"\ntemplate = "Review: {text}\\nSentiment:"\n'
        'label_words = ["negative", "positive"]\nlabels = ["0", "1"]\ntext_columns = ["sentence"]\n'
    )
    return d / "task.toml"


def _layouts(model: Path, n_embd: int) -> tuple[LoraLayout, LoraLayout, dict[str, np.ndarray]]:
    from fwdllm.reference.torch_ref import random_lora

    plain = LoraLayout.for_base(base_shapes(model), rank=4, alpha=8.0, targets=["v"])
    return plain, dataclasses.replace(plain, head=(2, n_embd)), random_lora(plain, seed=1, b_std=0.05)


def test_head_gradient_is_exact_and_a_zero_head_changes_nothing(tiny_model: Path, task_file: Path) -> None:
    task = load_task(str(task_file))
    ex = read_examples(task, task_file.parent / "data.tsv")
    with EdgeSession(tiny_model, task, n_threads=THREADS, max_batch=4) as s:
        plain, headed, lora = _layouts(tiny_model, s.engine.n_embd)
        s.set_lora(plain, lora)
        ref = s.evaluate(ex)
        s.set_lora(headed, {**lora, HEAD: np.zeros(headed.head, np.float32)})
        zero = s.evaluate(ex)
        assert (zero.loss, zero.accuracy) == (ref.loss, ref.accuracy)

        rng = np.random.default_rng(0)
        head = (rng.standard_normal(headed.head) * 0.05).astype(np.float32)
        s.set_lora(headed, {**lora, HEAD: head})
        r = s.perturbed(ex, [7], 1e-2, PerturbMask("b"), one_sided=True)
        assert r.head_grad is not None and r.head_grad.shape == headed.head and r.head_rows == len(ex)
        d = rng.standard_normal(headed.head)
        d /= np.linalg.norm(d)
        h = 1e-2
        losses = []
        for sign in (1, -1):
            s.set_lora(headed, {**lora, HEAD: (head + sign * h * d).astype(np.float32)})
            losses.append(s.evaluate(ex).loss)
        fd = (losses[0] - losses[1]) / (2 * h)
        exact = float(np.sum(r.head_grad.astype(np.float64) * d))
        assert abs(fd - exact) < 1e-3 * max(1.0, abs(exact)), (fd, exact)
        assert abs(exact) > 1e-3  # a direction the loss actually depends on

        s.set_lora(headed, {**lora, HEAD: head})
        c = s.perturbed(ex, [7], 1e-2, PerturbMask("b"), one_sided=False)  # mean over the +-eps passes
        assert np.linalg.norm(c.head_grad - r.head_grad) < 0.2 * np.linalg.norm(r.head_grad)

        with pytest.raises(UserError, match="head shape"):
            s.set_lora(dataclasses.replace(plain, head=(3, s.engine.n_embd)), None)


def test_hidden_states_recovered_from_the_logits_are_the_lm_heads_input(tiny_model: Path) -> None:
    """pinv(W_S) z_S against llama.cpp's own hidden state (embeddings mode):
    equal up to the 8-bit quantization of h that llama.cpp's CPU matmul applies."""
    import llama_cpp as ll

    from fwdllm.runtime.engine import Engine, Seq
    from fwdllm.runtime.readout import HiddenFromLogits

    engine = Engine(tiny_model, n_seq_max=1, n_ctx_seq=64, n_threads=THREADS)
    try:
        toks = engine.tokenize("Review: boring and bad\nSentiment:", bos=True)
        ll.llama_set_embeddings(engine.ctx, True)
        logits = engine.decode([Seq(tuple(toks), (len(toks) - 1,))])[0]
        h = np.ctypeslib.as_array(ll.llama_get_embeddings_ith(engine.ctx, len(toks) - 1), shape=(engine.n_embd,))
        got = HiddenFromLogits(tiny_model, engine.n_vocab, engine.n_embd)(logits)[0]
    finally:
        engine.close()
    assert np.linalg.norm(got - h) < 0.02 * np.linalg.norm(h)  # measured 0.6 % (tiny), 1.0 % (SmolLM2)


def test_head_steps_with_adam_at_its_own_rate_while_lora_uses_sgd() -> None:
    opt = Optimizer(OptimizerSpec(name="sgd", lr=0.1, head_lr=0.01, total_rounds=10, schedule="cosine"))
    params = {"b": np.zeros(3, np.float32), HEAD: np.zeros(3, np.float32)}
    g = np.array([2.0, -0.5, 1e-3], np.float32)
    lr = opt.spec.lr_at(4)
    opt.step(params, {"b": g, HEAD: g}, lr)
    np.testing.assert_allclose(params["b"], -lr * g, rtol=1e-6)
    # Adam's first step is -rate * sign(g) (up to adam_eps), at rate = lr * head_lr / lr
    np.testing.assert_allclose(params[HEAD], -lr * 0.1 * np.sign(g), rtol=1e-4)
    with pytest.raises(ValueError, match="head learning rate"):
        OptimizerSpec(head_lr=-1.0)


def test_head_gradient_payloads_are_checked() -> None:
    layout = LoraLayout.for_base({"blk.0.attn_v.weight": (8, 8)}, rank=2, alpha=2.0, targets=["v"])
    headed = dataclasses.replace(layout, head=(2, 8))
    assert LoraLayout.from_dict(headed.to_dict()) == headed
    assert "head" not in layout.to_dict()  # head-less layouts keep their old form (and hashes)
    good = np.arange(16, dtype="<f4").tobytes()
    np.testing.assert_array_equal(head_array(good, headed), np.arange(16, dtype=np.float32).reshape(2, 8))
    for raw, lay, why in ((good[:-4], headed, "bytes"), (np.full(16, np.nan, "<f4").tobytes(), headed, "non-finite"),
                          (good, layout, "without a head")):
        with pytest.raises(ProtocolError, match=why):
            head_array(raw, lay)
    # both messages carry it as a binary frame and default to none
    none = np.zeros(0)
    r = Result.from_frames(Result(1, none, none, none, head_grad=good, head_rows=8).to_frames())
    assert r.head_grad == good and r.head_rows == 8
    assert Update.from_frames(Update(1, 1, 0.1, "", none, none).to_frames()).head_grad == b""


def test_head_needs_a_classify_task(tiny_model: Path) -> None:
    from fwdllm.aggregator.setup import with_head
    from fwdllm.core.lora import init_lora

    layout, tensors = init_lora(tiny_model, 2, 4.0, ["v"], 0)
    with pytest.raises(UserError, match="classify"):
        with_head(layout, tensors, tiny_model, load_task("sft"))
